"""proto/client.py: replies as JSON-ready dicts, the actor metadata check, and reconnecting to a
server that came back. (The typed methods against the real control plane:
tests/controlplane/test_admin.py, tests/security.)"""
import json
import math
import socket
from concurrent import futures

import grpc
import pytest

from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto import headroom_pb2_grpc
from headroom_sidecar.proto.client import AdminClient, as_dict, check_actor, reply_json


def test_unset_optional_fields_are_none_and_set_ones_keep_their_value():
    job = pb.Job(job_id="j", state="done", trials=0, plan_id="")
    d = as_dict(job)
    assert d["plan_id"] == "" and d["last_error"] is None and d["finished_at_s"] is None
    assert d["trials"] == 0 and d["message"] == ""          # no presence: the default shows


def test_json_documents_are_decoded_under_the_name_without_the_suffix():
    trial = pb.PlanTrial(trial_id="t", evidence_json=json.dumps({"top1_agreement": 0.99}))
    d = as_dict(trial)
    assert d["evidence"] == {"top1_agreement": 0.99} and "evidence_json" not in d
    assert as_dict(pb.PlanTrial(trial_id="t"))["evidence"] is None      # "" = no document


def test_nested_messages_maps_nan_and_unset_submessages():
    reply = pb.ShowPlanReply(plan=pb.PlanRecord(plan_id="p", query_classes=["qa"]),
                             running_on={"agent-1": "canary"},
                             history=[pb.PlanTransition(to_status="proposed")])
    d = as_dict(reply)
    assert d["plan"]["query_classes"] == ["qa"] and d["running_on"] == {"agent-1": "canary"}
    assert d["history"][0]["from_status"] is None
    assert as_dict(pb.LayerInfluence(mean_influence=math.nan))["mean_influence"] is None
    assert as_dict(pb.PolicySet(folder="f"))["revision"] is None
    assert json.dumps(d, allow_nan=False)


def test_reply_json_unwraps_only_a_reply_that_is_one_list():
    plans = pb.ListPlansReply(plans=[pb.PlanRecord(plan_id="a"), pb.PlanRecord(plan_id="b")])
    assert [p["plan_id"] for p in reply_json(plans)] == ["a", "b"]
    assert reply_json(pb.ListJobsReply()) == []
    # one field, but not a list: stays a dict
    assert reply_json(pb.VerifyAuditRequest(anchor=pb.AuditAnchor(seq=3)))["anchor"]["seq"] == 3
    assert reply_json(pb.RejectPlanReply(plan_id="p", status="rejected")) == \
        {"plan_id": "p", "status": "rejected"}


@pytest.mark.parametrize("actor", ["", "alice", "operator:bob", " ", "~"])
def test_printable_ascii_actors_are_accepted(actor):
    assert check_actor(actor) == actor


@pytest.mark.parametrize("actor", ["al\nice", "\x7f", "\x1f", "zoë"])
def test_other_actors_are_refused_before_any_call(actor):
    with pytest.raises(ValueError, match="printable ASCII"):
        check_actor(actor)
    with pytest.raises(ValueError, match="printable ASCII"):
        AdminClient("127.0.0.1:1", actor=actor)


class _NoAgents(headroom_pb2_grpc.HeadroomServicer):
    def ListAgents(self, request, context):
        return pb.ListAgentsReply()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_new_client_reaches_a_server_that_came_back_while_another_channel_backs_off():
    # An agent's channel in the same process failed to connect and now waits out gRPC's
    # reconnect backoff (1 s, growing); an operator's new client must not inherit that wait
    # (this failed a restart test in CI: "failed to connect to all addresses", server up).
    address = f"127.0.0.1:{_free_port()}"
    agent_like = grpc.insecure_channel(address)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            headroom_pb2_grpc.HeadroomStub(agent_like).ListAgents(pb.ListAgentsRequest(), timeout=5)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        server = grpc.server(futures.ThreadPoolExecutor(2))
        headroom_pb2_grpc.add_HeadroomServicer_to_server(_NoAgents(), server)
        assert server.add_insecure_port(address)
        server.start()
        try:
            with AdminClient(address) as admin:
                assert list(admin.list_agents().agents) == []
        finally:
            server.stop(0)
    finally:
        agent_like.close()
