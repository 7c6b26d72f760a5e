"""Query classes page against a real control plane: a class plan chosen by a class trigger on a
real tiny agent shows with its acceptance rate, tokens per forward and measured speed-up; a
class without a plan runs the default; with no labelled traffic the page says how to start."""
from __future__ import annotations

import pytest
import torch

from headroom_sidecar.controlplane.loop import PlanRequest
from headroom_sidecar.controlplane.planner import QualityBudget
from tests.controlplane.loopkit import (LOOSE_BUDGET, LiveAgent, token_eval_args, traced_agent,
                                        wait_for)
from tests.builders import token_ids
from tests.dashboard.helpers import no_exception, tables, texts

pytestmark = pytest.mark.timeout(180)


def _serve_repetitive(agent: LiveAgent, query_class: str) -> None:
    """A prompt that repeats itself: prompt lookup finds n-grams to draft from."""
    half = token_ids(6, seed=5)
    ids = torch.cat([half, half], dim=1)                                    # [1, 12]
    with agent.handle.request(query_class=query_class):
        agent.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def classes_world(tmp_path_factory):
    server, agent = traced_agent(tmp_path_factory.mktemp("classes-dash"), "agent-cls", 2,
                                 "grounded", canary_s=0.1)
    loop = server.state.control.loop
    request = PlanRequest(agent_id="agent-cls", query_class="grounded", max_trials=1,
                          budget=QualityBudget(**LOOSE_BUDGET), eval=token_eval_args())
    job = loop.wait(loop.trigger(request).job_id, timeout_s=120)
    assert job.plan_status == "applied", job.message
    wait_for(lambda: "grounded" in agent.handle.class_plans, what="class plan")
    for query_class in ("grounded", "grounded", "chat"):
        _serve_repetitive(agent, query_class)
    agent.handle.exporter.flush(5_000)
    yield server, job
    agent.close()
    server.stop(grace_s=0.5)


def test_each_class_shows_its_plan_and_speculation_figures(classes_world, open_app):
    server, job = classes_world
    at = open_app(server.address, "classes")
    no_exception(at)
    (frame,) = tables(at)
    rows = frame.set_index("query class")
    assert rows.loc["grounded", "active plan"].startswith(f"{job.plan_id} (")
    assert rows.loc["grounded", "active plan"].endswith(") on agent-cls")
    assert 0.0 <= rows.loc["grounded", "acceptance rate"] <= 1.0
    assert rows.loc["grounded", "tokens per forward"] >= 1.0
    assert rows.loc["grounded", "measured speed-up"] > 0
    assert rows.loc["chat", "active plan"] == "default plan"
    assert str(rows.loc["chat", "acceptance rate"]) == "nan"      # it never speculated
    assert rows.loc["grounded", "requests"] == 4 and rows.loc["chat", "requests"] == 1


def test_no_labelled_traffic_says_how_to_start(empty_server, open_app):
    at = open_app(empty_server.address, "classes")
    no_exception(at)
    assert not tables(at) and "handle.request(query_class=...)" in texts(at)
