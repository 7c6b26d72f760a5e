"""The Admin RPC over a real server: commands, argument checks and their status codes."""
import re

import grpc
import pytest

from headroom_sidecar.controlplane.admin import AdminClient
from headroom_sidecar.controlplane.plans import PlanDoc, SkipLayers
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto import headroom_pb2_grpc
from tests.controlplane import helpers
from tests.controlplane.loopkit import connected, start, wait_for


@pytest.fixture(scope="module")
def admin(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("admin"))
    stream = helpers.AgentStream(server.address)
    stream.send(helpers.hello("agent-x"))
    wait_for(lambda: connected(server, "agent-x"), what="agent")
    control = server.state.control
    control.plans.add(PlanDoc("adm-1", 1, helpers.MODEL.fingerprint, (SkipLayers((1,)),)).to_doc(),
                      "test")
    with AdminClient(server.address, actor="dana") as client:
        yield server, client
    stream.close()
    server.stop(grace_s=0.5)


def _code(client, command, args=None, actor=None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        client.call(command, args, actor=actor)
    return e.value.code(), e.value.details()


def test_agents_and_plans(admin):
    server, client = admin
    (agent,) = client.call("agents.list")
    assert agent["agent_id"] == "agent-x" and agent["connected"] and agent["num_layers"] == 3
    plans = client.call("plan.list", {"status": "proposed"})
    assert [p["plan_id"] for p in plans] == ["adm-1"]
    shown = client.call("plan.show", {"plan_id": "adm-1"})
    assert shown["diff"] == ["scope: structural, query classes: all", "layer 1: skipped"]
    assert shown["history"][0]["to_status"] == "proposed" and shown["trials"] == []


@pytest.mark.parametrize("command, args, actor, code, message", [
    ("plan.nope", {}, None, grpc.StatusCode.INVALID_ARGUMENT, "unknown command 'plan.nope'"),
    ("plan.show", {}, None, grpc.StatusCode.INVALID_ARGUMENT, "'plan_id' is required"),
    ("plan.show", {"plan_id": 3}, None, grpc.StatusCode.INVALID_ARGUMENT, "expected str, got 3"),
    ("plan.show", {"plan_id": "x", "extra": 1}, None, grpc.StatusCode.INVALID_ARGUMENT,
     "unknown argument(s) extra"),
    ("plan.show", {"plan_id": "missing"}, None, grpc.StatusCode.NOT_FOUND, "no plan 'missing'"),
    ("plan.trigger", {}, None, grpc.StatusCode.INVALID_ARGUMENT, "give 'agent_id' or 'fingerprint'"),
    ("plan.trigger", {"agent_id": "agent-x", "max_trials": 0}, None,
     grpc.StatusCode.INVALID_ARGUMENT, "must be >= 1"),
    ("plan.trigger", {"agent_id": "agent-x", "budget": {"min_top": 1}}, None,
     grpc.StatusCode.INVALID_ARGUMENT, "unknown field(s) min_top"),
    ("plan.approve", {"plan_id": "adm-1", "reason": "ok"}, None,
     grpc.StatusCode.FAILED_PRECONDITION, "adm-1 is proposed"),
    ("plan.approve", {"plan_id": "adm-1", "reason": "ok"}, "", grpc.StatusCode.UNAUTHENTICATED,
     "identity"),
    ("plan.rollback", {"plan_id": "adm-1", "reason": "x"}, None,
     grpc.StatusCode.FAILED_PRECONDITION, "adm-1 is proposed"),
    ("audit.list", {"kind": "NOPE"}, None, grpc.StatusCode.INVALID_ARGUMENT, "unknown audit kind"),
    ("plan.status", {"job_id": "job-x"}, None, grpc.StatusCode.NOT_FOUND, "no job 'job-x'"),
])
def test_bad_requests_get_clear_statuses(admin, command, args, actor, code, message):
    server, client = admin
    got, details = _code(client, command, args, actor)
    assert got == code and message in details


def test_args_json_that_is_not_json(admin):
    server, client = admin
    with grpc.insecure_channel(server.address) as channel:
        stub = headroom_pb2_grpc.HeadroomStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Admin(pb.AdminRequest(command="plan.list", args_json="{nope"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "args_json is not JSON: line 1" in e.value.details()


def test_audit_verify_and_anchor(admin):
    server, client = admin
    server.state.control.audit.append("NOTE", "test", "adm-1", {"n": 1})
    result = client.call("audit.verify")
    assert result["ok"] and result["rows_checked"] >= 1
    anchor = result["head"]
    assert client.call("audit.verify", {"anchor": anchor})["ok"]
    bad = client.call("audit.verify", {"anchor": {"seq": anchor["seq"], "row_hash": "0" * 64}})
    assert not bad["ok"] and bad["reason"] == "row_hash differs from the anchor"


def test_policy_show_and_reload(admin):
    server, client = admin
    shown = client.call("policy.show")
    assert shown["loaded"] and shown["revision"]["content_sha256"]
    assert {r["id"] for r in shown["rules"]} == {"quality.top1", "structure.layers-cap",
                                                 "process.rate-limit"}
    result = client.call("policy.reload")
    assert result["ok"] and not result["changed"]
    (row,) = server.state.control.audit.rows(kind="POLICY_RELOADED", limit=1)
    assert row.actor == "operator:dana"


def test_trigger_without_traces_reports_why(admin):
    server, client = admin
    job = client.call("plan.trigger", {"agent_id": "agent-x"})
    done = server.state.control.loop.wait(job["job_id"], 10)
    assert done.state.value == "failed" and "no traced requests" in done.message
    assert client.call("plan.status", {"job_id": job["job_id"]})["state"] == "failed"


def test_one_planning_job_per_model(tmp_path):
    """agent-y has traces but never answers trials: its job runs until the agent goes away."""
    server = start(tmp_path)
    stream = helpers.AgentStream(server.address)
    try:
        stream.send(helpers.hello("agent-y"))
        stream.send(helpers.batch(1, helpers.tables(helpers.records(4, traced_every=1))))
        assert stream.recv().ack.rows_stored > 0
        with AdminClient(server.address, actor="dana") as client:
            job = client.call("plan.trigger", {"agent_id": "agent-y", "max_trials": 1})
            code, details = _code(client, "plan.trigger", {"fingerprint": helpers.MODEL.fingerprint})
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert f"job {job['job_id']} is still running" in details
            stream.close()
            done = server.state.control.loop.wait(job["job_id"], 15)
        assert done.state.value == "done" and "no hypothesis fit" in done.message
        (trial,) = server.state.control.plans.trials(f"{job['job_id']}-t001")
        # Whether the trial went out before the stream closed or after: dropped, saying why.
        assert re.search("disconnected before answering|agent-y is not connected", trial.error)
    finally:
        server.stop(grace_s=0.5)
