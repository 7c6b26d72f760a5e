"""ControlLoop against a real server, DuckDB file and attached agent: needs_human then an
operator's approval or rejection, refusals to start, and a policy folder that does not load."""
import pytest

from headroom_sidecar.controlplane.loop import LoopError, PlanRequest
from headroom_sidecar.controlplane.planner import QualityBudget
from tests.controlplane import helpers
from tests.controlplane.loopkit import (LOOSE_BUDGET, LiveAgent, audit_kinds, start, token_eval_args,
                                        traced_agent, traced_rows, wait_for, write_policies)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def review(tmp_path_factory):
    """Policies that always ask a human (an unreachable exact_match, on_fail needs_human)."""
    server, agent = traced_agent(tmp_path_factory.mktemp("loop"), "agent-l", 3, needs_human=True,
                                 canary_s=0.1)
    yield server, agent
    agent.close()
    server.stop(grace_s=0.5)


def _plan(server, agent, **kw):
    loop = server.state.control.loop
    request = PlanRequest(agent_id=agent.agent_id, max_trials=1, budget=QualityBudget(**LOOSE_BUDGET),
                          eval=token_eval_args(), **kw)
    job = loop.wait(loop.trigger(request).job_id, timeout_s=60)
    assert job.state.value == "done", job.message
    return job


def test_needs_human_then_operator_approval_rolls_out(review):
    server, agent = review
    control = server.state.control
    job = _plan(server, agent)
    assert job.decision == "needs_human" and job.plan_status == "needs_human"
    (decision,) = control.plans.decisions(job.plan_id)
    review_rule = next(r for r in decision.rules if r["rule_id"] == "review.exact-match")
    assert review_rule["outcome"] == "needs_human" and review_rule["threshold"] == {"min": 1.5}
    assert "review.exact-match" in decision.reason

    with pytest.raises(LoopError, match="identity"):
        control.loop.approve(job.plan_id, "", "no one")
    rollout = control.loop.approve(job.plan_id, "bob", "read the continuations")
    rollout = control.loop.wait(rollout.job_id, timeout_s=30)
    assert rollout.state.value == "done" and rollout.plan_status == "applied", rollout.message
    approvals = control.audit.rows(kind="APPROVED", subject=job.plan_id)
    assert approvals[0].actor == "operator:bob" and approvals[0].details["reason"] == \
        "read the continuations"
    assert audit_kinds(control, job.plan_id)[-5:] == [
        "POLICY_EVALUATED", "NEEDS_HUMAN", "APPROVED", "APPLY_REQUESTED", "APPLIED"]
    control.loop.rollback(job.plan_id, "bob", "cleanup")


def test_operator_rejection_and_rate_limit_context(review):
    server, agent = review
    control = server.state.control
    job = _plan(server, agent, tenant="acme", route="/chat")
    # The plan approved in the test before was applied once on this model: the rate limit saw it.
    (decision,) = control.plans.decisions(job.plan_id)
    rate = next(r for r in decision.rules if r["rule_id"] == "process.rate-limit")
    assert rate["measured"] == 1
    result = control.loop.reject(job.plan_id, "bob", "not now")
    assert result["status"] == "rejected"
    with pytest.raises(LoopError, match="rejected; operators approve"):
        control.loop.approve(job.plan_id, "bob", "changed my mind")
    assert audit_kinds(control, job.plan_id)[-2:] == ["NEEDS_HUMAN", "REJECTED"]


def test_trigger_refusals(review):
    server, agent = review
    loop = server.state.control.loop
    with pytest.raises(LoopError, match="no agent 'ghost'"):
        loop.trigger(PlanRequest(agent_id="ghost"))
    with pytest.raises(LoopError, match="no connected agent runs model 000000000000"):
        loop.trigger(PlanRequest(fingerprint="0" * 64))
    with pytest.raises(ValueError, match="eval: unknown field"):
        loop.trigger(PlanRequest(agent_id="agent-l", eval={"sequences": 3}))


def test_no_traces_fails_the_job_with_the_reason(review):
    server, agent = review
    loop = server.state.control.loop
    job = loop.wait(loop.trigger(PlanRequest(agent_id="agent-l", query_class="never-seen",
                                             eval=token_eval_args())).job_id, 30)
    assert job.state.value == "failed" and "no traced requests" in job.message
    assert "'never-seen'" in job.message


def test_policy_folder_that_does_not_load_keeps_telemetry_and_reports(tmp_path):
    server = start(tmp_path)
    folder = tmp_path / "policies"
    (folder / "loop.yaml").write_text("schema: headroom.policy/v1\nrules:\n  - id: x\n    kind: nope\n")
    server.stop(grace_s=0.5)
    server = start_with_folder(tmp_path, str(folder))
    try:
        policies = server.state.control.policies
        assert policies.store is None and any("loop.yaml" in p for p in policies.problems)
        with pytest.raises(LoopError, match="no policy set is loaded"):
            policies.require()
        agent = LiveAgent(server.address, "agent-p")
        agent.serve(1)
        agent.handle.exporter.flush(5_000)
        wait_for(lambda: traced_rows(server, "agent-p") >= 1, what="telemetry still stored")
        agent.close()
        write_policies(folder)
        assert policies.reload()["ok"] and policies.show()["loaded"]
    finally:
        server.stop(grace_s=0.5)


def start_with_folder(tmp_path, folder: str):
    from headroom_sidecar.controlplane.app import start_server
    from headroom_sidecar.controlplane.settings import ServerSettings
    from tests.controlplane.loopkit import control_settings
    return start_server(ServerSettings(db_path=str(tmp_path / "cp2.duckdb"), port=0),
                        control_settings(folder))


def test_the_first_trial_packs_the_agents_fp32_weights(tmp_path, monkeypatch):
    """The planner's fp32_packed trial runs on the agent (forced packing: on a tiny model the
    timing may keep aten) and comes back measured, kept or dropped on its latency alone."""
    monkeypatch.setenv("HEADROOM_FP32_CPU_KERNEL", "onednn_packed")
    server, agent = traced_agent(tmp_path, "agent-p", 3, fp32_packed=True)
    try:
        loop = server.state.control.loop
        job = loop.wait(loop.trigger(PlanRequest(
            agent_id=agent.agent_id, max_trials=1, budget=QualityBudget(**LOOSE_BUDGET),
            eval=token_eval_args())).job_id, timeout_s=60)
        (trial,) = server.state.control.plans.trials(f"{job.job_id}-t001")
        assert trial.error is None, trial.error
        kernels = {v["kernel"] for v in trial.evidence["kernels"].values()}
        assert kernels == {"onednn_packed"}
        assert trial.evidence["top1_agreement"] >= 0.99      # fp32: summation order only
        assert ("no hypothesis fit" in job.message) == (trial.evidence["latency_ratio"] >= 1.0)
    finally:
        agent.close()
        server.stop(grace_s=0.5)


@pytest.mark.parametrize("dtype, device, tried", [("float32", "cpu", True),
                                                   ("bfloat16", "cpu", False),
                                                   ("float32", "cuda:0", False)])
def test_fp32_packed_is_tried_only_for_an_fp32_model_on_a_cpu(tmp_path, dtype, device, tried):
    server = start(tmp_path, fp32_packed=True)
    stream = helpers.AgentStream(server.address)
    try:
        hello = helpers.hello("agent-d")
        hello.hello.model.dtype, hello.hello.model.device = dtype, device
        stream.send(hello)
        loop = server.state.control.loop
        wait_for(lambda: loop.fleet.model_facts(helpers.MODEL.fingerprint), what="registration")
        assert loop._planner_settings(helpers.MODEL.fingerprint).fp32_packed is tried
    finally:
        stream.close()
        server.stop(grace_s=0.5)


def test_after_the_search_only_the_best_kept_plan_is_left_to_decide(tmp_path):
    """Both hypotheses fit the loose budget; the one the objective picks waits for a human,
    the other kept one is superseded by it (not left trialled beside it)."""
    server, agent = traced_agent(tmp_path, "agent-s", 3, needs_human=True, compiled_decode=False)
    try:
        loop = server.state.control.loop
        job = loop.wait(loop.trigger(PlanRequest(
            agent_id=agent.agent_id, max_trials=2, budget=QualityBudget(**LOOSE_BUDGET),
            eval=token_eval_args())).job_id, timeout_s=60)
        plans = server.state.control.plans
        statuses = {p.plan_id: p.status.value for p in plans.list(fingerprint=agent.fingerprint)}
    finally:
        agent.close()
        server.stop(grace_s=0.5)
    assert job.plan_status == "needs_human" and len(statuses) == 2
    others = {status for plan_id, status in statuses.items() if plan_id != job.plan_id}
    assert statuses[job.plan_id] == "needs_human" and others == {"superseded"}
