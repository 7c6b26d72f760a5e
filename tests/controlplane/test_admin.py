"""The typed Admin RPCs over a real server: methods, argument checks and their status codes."""
import json
import math
import re

import grpc
import pytest

from headroom_sidecar.controlplane.admin import METHODS
from headroom_sidecar.proto.plan import Plan, SkipLayers
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto.client import AdminClient, as_dict
from tests.controlplane import helpers
from tests.controlplane.loopkit import connected, start, wait_for


@pytest.fixture(scope="module")
def admin(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("admin"))
    stream = helpers.AgentStream(server.address)
    stream.send(helpers.hello("agent-x"))
    wait_for(lambda: connected(server, "agent-x"), what="agent")
    control = server.state.control
    control.plans.add(Plan("adm-1", 1, helpers.MODEL.fingerprint, (SkipLayers((1,)),)).to_doc(),
                      "test")
    with AdminClient(server.address, actor="dana") as client:
        yield server, client
    stream.close()
    server.stop(grace_s=0.5)


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_agents_and_plans(admin):
    server, client = admin
    (agent,) = client.list_agents().agents
    assert agent.agent_id == "agent-x" and agent.connected and agent.num_layers == 3
    assert agent.last_seen_us > 0
    plans = client.list_plans(status="proposed").plans
    assert [p.plan_id for p in plans] == ["adm-1"]
    shown = client.show_plan("adm-1")
    assert list(shown.diff) == ["scope: structural, query classes: all", "layer 1: skipped"]
    assert shown.history[0].to_status == "proposed" and not shown.history[0].HasField("from_status")
    assert len(shown.trials) == 0 and json.loads(shown.doc_json)["plan_id"] == "adm-1"


def test_as_dict_gives_the_json_shape(admin):
    server, client = admin
    shown = as_dict(client.show_plan("adm-1"))
    assert shown["plan"]["status"] == "proposed" and shown["doc"]["plan_id"] == "adm-1"
    assert shown["history"][0]["from_status"] is None and shown["running_on"] == {}
    assert json.loads(json.dumps(shown, allow_nan=False)) == shown


@pytest.mark.parametrize("call, code, message", [
    (lambda c: c.show_plan(""), grpc.StatusCode.INVALID_ARGUMENT, "ShowPlan: argument 'plan_id' is required"),
    (lambda c: c.show_plan("missing"), grpc.StatusCode.NOT_FOUND, "no plan 'missing'"),
    (lambda c: c.trigger_plan(), grpc.StatusCode.INVALID_ARGUMENT, "give 'agent_id' or 'fingerprint'"),
    (lambda c: c.trigger_plan(agent_id="agent-x", max_trials=0), grpc.StatusCode.INVALID_ARGUMENT,
     "'max_trials': must be >= 1, got 0"),
    (lambda c: c.trigger_plan(agent_id="agent-x", budget={"min_top1": math.nan}),
     grpc.StatusCode.INVALID_ARGUMENT, "'budget.min_top1': expected a finite number"),
    (lambda c: c.trigger_plan(agent_id="agent-x", eval=["x"]), grpc.StatusCode.INVALID_ARGUMENT,
     "'eval_json': expected an object, got list"),
    (lambda c: c.approve_plan("adm-1", "ok"), grpc.StatusCode.FAILED_PRECONDITION, "adm-1 is proposed"),
    (lambda c: c.approve_plan("adm-1", ""), grpc.StatusCode.INVALID_ARGUMENT, "'reason' is required"),
    (lambda c: c.approve_plan("adm-1", "ok", actor=""), grpc.StatusCode.UNAUTHENTICATED, "identity"),
    (lambda c: c.rollback_plan("adm-1", "x"), grpc.StatusCode.FAILED_PRECONDITION, "adm-1 is proposed"),
    (lambda c: c.list_audit(kind="NOPE"), grpc.StatusCode.INVALID_ARGUMENT, "unknown audit kind"),
    (lambda c: c.list_audit(limit=0), grpc.StatusCode.INVALID_ARGUMENT, "'limit': must be >= 1, got 0"),
    (lambda c: c.list_plans(status="nope"), grpc.StatusCode.INVALID_ARGUMENT, "unknown plan status 'nope'"),
    (lambda c: c.get_job("job-x"), grpc.StatusCode.NOT_FOUND, "no job 'job-x'"),
])
def test_bad_requests_get_clear_statuses(admin, call, code, message):
    server, client = admin
    got, details = _code(lambda: call(client))
    assert got == code and message in details


def test_limit_one_is_the_smallest_accepted(admin):
    server, client = admin
    server.state.control.audit.append("NOTE", "test", "adm-1", {"n": 0})
    assert len(client.list_audit(limit=1).rows) == 1


def test_bytes_that_are_not_the_request_message(admin):
    server, client = admin
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary("/headroom.v1.Headroom/ShowPlan")
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff\xff", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ShowPlan: cannot parse ShowPlanRequest" in e.value.details()


def test_every_rpc_of_the_service_is_registered():
    service = pb.DESCRIPTOR.services_by_name["Headroom"]
    admin_methods = {m.name for m in service.methods} - {"Connect", "Query"}
    assert admin_methods == set(METHODS)
    for name, (request_cls, _) in METHODS.items():
        assert service.methods_by_name[name].input_type.full_name == request_cls.DESCRIPTOR.full_name
    assert "Admin" not in admin_methods and not hasattr(pb, "AdminRequest")


def test_audit_verify_and_anchor(admin):
    server, client = admin
    server.state.control.audit.append("NOTE", "test", "adm-1", {"n": 1})
    result = client.verify_audit()
    assert result.ok and result.rows_checked >= 1 and not result.HasField("first_bad_seq")
    anchor = as_dict(result.head)
    assert client.verify_audit(anchor).ok
    bad = client.verify_audit({"seq": anchor["seq"], "row_hash": "0" * 64})
    assert not bad.ok and bad.reason == "row_hash differs from the anchor"
    rows = client.list_audit(subject="adm-1", kind="NOTE").rows
    assert {"n": 1} in [json.loads(r.details_json) for r in rows]
    assert {r.kind for r in rows} == {"NOTE"} and all(r.row_hash for r in rows)


def test_policy_show_and_reload(admin):
    server, client = admin
    shown = client.show_policy()
    assert shown.loaded and shown.revision.content_sha256
    assert {r.id for r in shown.rules} == {"quality.top1", "structure.layers-cap",
                                           "process.rate-limit"}
    result = client.reload_policy()
    assert result.ok and not result.changed and result.policy.loaded
    (row,) = server.state.control.audit.rows(kind="POLICY_RELOADED", limit=1)
    assert row.actor == "operator:dana"


def test_analysis_summary_without_traces_is_empty(admin):
    server, client = admin
    summary = client.analysis_summary(agent_id="agent-x", limit=1)
    assert len(summary.least_used_heads) == 0 and len(summary.latency_by_query_class) == 0


def test_trigger_without_traces_reports_why(admin):
    server, client = admin
    job = client.trigger_plan(agent_id="agent-x")
    done = server.state.control.loop.wait(job.job_id, 10)
    assert done.state.value == "failed" and "no traced requests" in done.message
    assert client.get_job(job.job_id).state == "failed"
    assert job.job_id in {j.job_id for j in client.list_jobs().jobs}


def test_one_planning_job_per_model(tmp_path):
    """agent-y has traces but never answers trials: its job runs until the agent goes away."""
    server = start(tmp_path)
    stream = helpers.AgentStream(server.address)
    try:
        stream.send(helpers.hello("agent-y"))
        stream.send(helpers.batch(1, helpers.tables(helpers.records(4, traced_every=1))))
        assert stream.recv().ack.rows_stored > 0
        with AdminClient(server.address, actor="dana") as client:
            job = client.trigger_plan(agent_id="agent-y", max_trials=1)
            code, details = _code(lambda: client.trigger_plan(fingerprint=helpers.MODEL.fingerprint))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert f"job {job.job_id} is still running" in details
            stream.close()
            done = server.state.control.loop.wait(job.job_id, 15)
        assert done.state.value == "done" and "no hypothesis fit" in done.message
        (trial,) = server.state.control.plans.trials(f"{job.job_id}-t001")
        # Whether the trial went out before the stream closed or after: dropped, saying why.
        assert re.search("disconnected before answering|agent-y is not connected", trial.error)
    finally:
        server.stop(grace_s=0.5)
