"""TrialClient against a real server and a real attached agent; eval sets."""
import json
import threading

import pytest

from headroom_sidecar.controlplane.evalsets import EvalSettings, byte_token_ids, eval_spec, token_eval
from headroom_sidecar.controlplane.planner import TrialError
from headroom_sidecar.proto.plan import Plan, Precision, SkipLayers, WeightPrecision
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.controlplane.trials import AgentGone, StatusState, plan_message
from tests.controlplane import helpers
from tests.controlplane.loopkit import EVAL, LiveAgent, connected, start, token_eval_args, wait_for


@pytest.fixture(scope="module")
def loop_env(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("trials"))
    agent = LiveAgent(server.address, "agent-t")
    wait_for(lambda: connected(server, "agent-t"), what="agent connected")
    yield server, agent
    agent.close()
    server.stop(grace_s=0.5)


def _doc(fp: str, plan_id: str, layers=(1,)) -> dict:
    return Plan(plan_id, 1, fp, (SkipLayers(tuple(layers)),)).to_doc()


def _spec() -> str:
    return json.dumps(eval_spec(EVAL, token_eval_args()))


def test_trial_returns_the_agents_evidence(loop_env):
    server, agent = loop_env
    doc = _doc(agent.fingerprint, "tt-skip")
    ev = server.state.control.client.request("agent-t", doc, _spec(), timeout_s=30)
    assert ev["plan_id"] == "tt-skip"
    assert ev["plan_hash"] == plan_message(doc).sha256
    assert 0.0 <= ev["top1_agreement"] <= 1.0 and ev["layers_removed_fraction"] == pytest.approx(1 / 3)
    assert ev["eval_tokens"] == EVAL.max_sequences * (EVAL.seq_len - 1)


def test_a_plan_that_does_not_fit_is_a_trial_error(loop_env):
    server, agent = loop_env
    with pytest.raises(TrialError, match=r"(?s)agent agent-t: .*layer.*out of range"):
        server.state.control.client.request("agent-t", _doc(agent.fingerprint, "tt-bad", (7,)),
                                            _spec(), timeout_s=30)


def test_unknown_agent_fails_at_once(loop_env):
    server, agent = loop_env
    with pytest.raises(AgentGone, match="not connected"):
        server.state.control.client.request("nobody", _doc(agent.fingerprint, "tt-x"), _spec(), 30)


def test_silent_agent_times_out_and_a_gone_one_fails_fast(loop_env):
    server, agent = loop_env
    client = server.state.control.client
    stream = helpers.AgentStream(server.address)
    stream.send(helpers.hello("silent"))
    wait_for(lambda: connected(server, "silent"), what="silent agent")
    with pytest.raises(TrialError, match="did not answer within 0.5 s"):
        client.request("silent", _doc(agent.fingerprint, "tt-s1"), _spec(), timeout_s=0.5)
    threading.Timer(0.3, stream.close).start()
    with pytest.raises(AgentGone, match="disconnected before answering"):
        client.request("silent", _doc(agent.fingerprint, "tt-s2"), _spec(), timeout_s=30)


def test_apply_and_rollback_round_trip(loop_env):
    server, agent = loop_env
    client = server.state.control.client
    doc = Plan("tt-int8", 1, agent.fingerprint,
                  (WeightPrecision({0: Precision.INT8}),)).to_doc()
    before = agent.logits()
    applied = client.apply("agent-t", doc, timeout_s=30)
    assert applied.state is StatusState.APPLIED and applied.plan_id == "tt-int8"
    assert not agent.logits().equal(before)
    rolled = client.rollback("agent-t", "tt-int8", "test", timeout_s=30)
    assert rolled.state is StatusState.ROLLED_BACK
    assert agent.logits().equal(before)


def test_unrequested_status_goes_to_subscribers(loop_env):
    server, agent = loop_env
    got = []
    server.state.control.client.subscribe(got.append)
    with helpers.AgentStream(server.address) as stream:
        stream.send(helpers.hello("guarded"))
        stream.send(pb.AgentMessage(plan_status=pb.PlanStatus(
            plan_id="tt-none", state=pb.PlanStatus.ROLLED_BACK,
            detail=json.dumps({"cause": "quality_guard", "top1": 0.5}))))
        report = wait_for(lambda: [r for r in got if r.plan_id == "tt-none"], what="status")[0]
    assert report.state is StatusState.ROLLED_BACK and report.agent_id == "guarded"
    assert report.cause == "quality_guard" and report.detail_json["top1"] == 0.5


# ---------------------------------------------------------------------- eval sets
def test_eval_spec_defaults_to_held_out_text():
    spec = eval_spec(EvalSettings())
    assert spec["texts"] and "token_sequences" not in spec
    assert spec["seq_len"] == 64 and spec["max_sequences"] == 4 and spec["new_tokens"] == 12


def test_token_eval_cuts_sequences_and_prompts_from_real_text():
    ev = token_eval(EVAL, vocab_size=128)
    assert [len(s) for s in ev["token_sequences"]] == [EVAL.seq_len] * EVAL.max_sequences
    assert [len(p) for p in ev["token_prompts"]] == [EVAL.prompt_tokens] * EVAL.prompts
    assert max(max(s) for s in ev["token_sequences"]) < 128
    assert byte_token_ids("Az", 128) == [65, 122]


@pytest.mark.parametrize("override, message", [
    ({"token_sequences": [[1, -2]]}, r"token_sequences\[0\]"),
    ({"bogus": 1}, "unknown field"),
    ({"seq_len": 0}, "seq_len=0 must be > 0"),
])
def test_eval_spec_refuses_bad_overrides(override, message):
    with pytest.raises(ValueError, match=message):
        eval_spec(EVAL, override)
