"""A trigger for one query class, end to end: a real server and DuckDB file, a real attached
tiny Llama. The job trials speculation candidates on the agent, keeps one (or says why none
pays), the policy approves it, the rollout applies it as the class's own plan, and the class's
requests then carry their speculation figures into the store."""
from __future__ import annotations

import pytest

from headroom_sidecar.controlplane.loop import PlanRequest
from headroom_sidecar.controlplane.planner import QualityBudget
from tests.controlplane.loopkit import LOOSE_BUDGET, token_eval_args, traced_agent, wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server, agent = traced_agent(tmp_path_factory.mktemp("classes"), "agent-c", 3, "grounded",
                                 canary_s=0.1)
    yield server, agent
    agent.close()
    server.stop(grace_s=0.5)


def _job(server, agent, max_latency_ratio: float, max_trials: int = 2):
    loop = server.state.control.loop
    budget = QualityBudget(**{**LOOSE_BUDGET, "max_latency_ratio": max_latency_ratio})
    request = PlanRequest(agent_id=agent.agent_id, query_class="grounded", max_trials=max_trials,
                          budget=budget, eval=token_eval_args())
    job = loop.wait(loop.trigger(request).job_id, timeout_s=120)
    assert job.state.value == "done", job.message
    return job


def test_when_no_candidate_beats_the_bar_the_class_is_left_alone(live):
    server, agent = live
    job = _job(server, agent, max_latency_ratio=1e-6)
    assert job.message.startswith("speculation does not pay for class 'grounded': best ratio ")
    assert job.plan_id is None and agent.handle.class_plans == {}
    trials = server.state.control.plans.list(query_class="grounded")
    assert len(trials) == 2 and {p.status.value for p in trials} == {"rejected"}
    # Measured on the class's own prompts: the 3 grounded requests the agent served (a class
    # job asks for traffic_prompts unless the trigger says otherwise).
    for p in trials:
        (trial,) = server.state.control.plans.trials(p.plan_id)
        assert "prompts: the 3 most recent of query class(es) grounded served by this agent" \
            in trial.evidence["notes"]


def test_a_kept_candidate_becomes_the_class_plan_and_its_requests_report_speculation(live):
    server, agent = live
    job = _job(server, agent, max_latency_ratio=1e6)
    assert job.message.startswith("speculation for class 'grounded': prompt_lookup k="), job.message
    assert job.decision == "approve" and job.plan_status == "applied", job.message
    wait_for(lambda: "grounded" in agent.handle.class_plans, what="class plan on the agent")
    assert agent.handle.active_plan is None                  # the default is untouched
    assert agent.handle.class_plans["grounded"].plan_id == job.plan_id
    agent.serve(2, query_class="grounded")
    agent.serve(1, query_class="chat")
    agent.handle.exporter.flush(5_000)

    def figures():
        with server.store.reader() as cur:
            return cur.execute(
                "SELECT query_class, sum(spec_verify_forwards), sum(spec_drafted) FROM requests "
                "WHERE agent_id = 'agent-c' AND query_class IN ('grounded', 'chat') "
                "GROUP BY query_class ORDER BY query_class").fetchall()
    rows = wait_for(lambda: (r := figures()) and len(r) == 2 and r[1][1] > 0 and r, what="rows")
    assert rows[0] == ("chat", 0, 0) and rows[1][1] > 0


def test_over_a_default_plan_the_class_plan_keeps_it_and_a_new_default_drops_it(live):
    server, agent = live
    plans = server.state.control.plans
    loop = server.state.control.loop
    request = PlanRequest(agent_id=agent.agent_id, max_trials=1, eval=token_eval_args(),
                          budget=QualityBudget(**LOOSE_BUDGET))
    default = loop.wait(loop.trigger(request).job_id, timeout_s=120)
    assert default.plan_status == "applied", default.message
    # The agent dropped its class plan (checked against the old default); the store agrees.
    wait_for(lambda: agent.handle.class_plans == {}, what="class plan dropped")
    assert {p.status.value for p in plans.list(query_class="grounded")
            if p.query_classes} <= {"rejected", "superseded", "rolled_back"}
    job = _job(server, agent, max_latency_ratio=1e6, max_trials=1)
    assert f"over the default plan '{default.plan_id}'" in job.message, job.message
    assert job.plan_status == "applied", job.message
    wait_for(lambda: "grounded" in agent.handle.class_plans, what="class plan on the agent")
    assert agent.handle.active_plan.plan_id == default.plan_id           # kept, not replaced
    assert plans.get(default.plan_id).status.value == "applied"
    bar = plans.get(f"{job.job_id}-s001")
    assert bar.query_classes == ("grounded",) and "the bar" in bar.doc["notes"]
    # A rollback from the control plane takes the class plan only; the default stays.
    result = loop.rollback(job.plan_id, "bob", "class test done")
    assert result.status.value == "rolled_back", result.message
    wait_for(lambda: agent.handle.class_plans == {}, what="class plan rolled back")
    assert agent.handle.active_plan.plan_id == default.plan_id
