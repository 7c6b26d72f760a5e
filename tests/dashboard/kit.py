"""A real control plane with real data from a short run, for the dashboard's tests.

World: a server over a DuckDB file with policies that always ask a human; a tiny Llama agent
(connected) that served traced requests across tenants, routes and query classes; a second
agent that served one request and detached (disconnected); one plan that went needs_human ->
approved (operator:carol) -> applied -> rolled back with a reason. Pending needs_human plans
are made on demand (`pending_plan`).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from headroom_sidecar.proto.client import AdminClient, reply_json
from tests.builders import token_ids
from tests.controlplane.loopkit import (LOOSE_BUDGET, LiveAgent, connected, start, token_eval_args,
                                        traced_rows, wait_for)

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
AGENT = "agent-dash"
GONE = "agent-gone"
HISTORY_OPERATOR = "carol"
ROLLBACK_REASON = "latency regression seen on the canary"
# (tenant, route, query class) per request: every filter on the internals page has a choice.
TRAFFIC = [("acme", "/chat", "qa"), ("acme", "/chat", "qa"), ("acme", "/code", "code"),
           ("globex", "/chat", "qa"), ("globex", "/code", "code"), ("globex", "/sum", "summarize")]


@dataclass
class World:
    server: object
    agent: LiveAgent
    history_plan: str

    @property
    def address(self) -> str:
        return self.server.address


def serve_traffic(agent: LiveAgent) -> None:
    for i, (tenant, route, query_class) in enumerate(TRAFFIC):
        with agent.handle.request(tenant=tenant, route=route, query_class=query_class):
            agent.model.generate(token_ids(8, seed=i), attention_mask=torch.ones(1, 8, dtype=torch.long),
                                 max_new_tokens=3, do_sample=False, pad_token_id=0)
    agent.handle.exporter.flush(5_000)


def _job_done(admin: AdminClient, job_id: str):
    # ControlLoop._run_job marks a job done before it fills in plan_status (in its finally):
    # a poller between the two reads plan_status None, so wait for both.
    job = reply_json(admin.get_job(job_id))
    settled = job["state"] != "running" and (job["plan_id"] is None or job["plan_status"])
    return job if settled else None


def pending_plan(address: str, agent_id: str = AGENT) -> str:
    """A fresh plan the policies sent to a human (status needs_human)."""
    with AdminClient(address, actor="planner-test") as admin:
        job = admin.trigger_plan(agent_id=agent_id, max_trials=1, budget=LOOSE_BUDGET,
                                 eval=token_eval_args())
        job = wait_for(lambda: _job_done(admin, job.job_id), 60, "planning job")
    assert job["state"] == "done" and job["plan_status"] == "needs_human", job
    return job["plan_id"]


def wait_rollout(admin: AdminClient, job_id: str) -> dict:
    job = wait_for(lambda: _job_done(admin, job_id), 30, "rollout job")
    assert job["state"] == "done", job
    return job


def history_plan(address: str) -> str:
    """needs_human -> approved -> applied -> rolled back, by a configured operator."""
    plan_id = pending_plan(address)
    with AdminClient(address, actor=HISTORY_OPERATOR) as admin:
        rollout = admin.approve_plan(plan_id, "continuations read")
        assert wait_rollout(admin, rollout.job_id)["plan_status"] == "applied"
        result = admin.rollback_plan(plan_id, ROLLBACK_REASON)
    assert result.status == "rolled_back", result
    return plan_id


def build_world(tmp: Path) -> World:
    server = start(tmp, needs_human=True, canary_s=0.1)
    gone = LiveAgent(server.address, GONE, seed=1)
    agent = LiveAgent(server.address, AGENT)
    wait_for(lambda: connected(server, AGENT) and connected(server, GONE), what="agents")
    gone.serve(1)
    gone.handle.exporter.flush(5_000)
    gone.close()
    serve_traffic(agent)
    wait_for(lambda: traced_rows(server, AGENT) >= len(TRAFFIC), what="traces stored")
    return World(server, agent, history_plan(server.address))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_address() -> str:
    """A localhost port nothing listens on."""
    return f"127.0.0.1:{free_port()}"
