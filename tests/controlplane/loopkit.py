"""Builders for the closed-loop tests: a real server with a policy folder, a real attached agent
on a tiny Llama, traced requests, and token-id eval sets (the tiny model has no tokenizer).

The agent is the real one: attach() answers trials, plans and rollbacks (agent/control.py).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from headroom_sidecar.agent import attach
from headroom_sidecar.controlplane.admin import ControlSettings
from headroom_sidecar.controlplane.evalsets import EvalSettings, token_eval
from headroom_sidecar.controlplane.loop import LoopSettings
from headroom_sidecar.controlplane.planner import PlannerSettings
from headroom_sidecar.controlplane.policy import PolicySettings
from headroom_sidecar.controlplane.rollout import RolloutSettings
from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings
from tests.builders import tiny_llama, token_ids

EVAL = EvalSettings(seq_len=24, max_sequences=2, prompts=1, prompt_tokens=8, new_tokens=4,
                    latency_repeats=1)
# The tiny random model's quality numbers mean nothing: a budget every hypothesis meets.
# Tiny models say nothing about speed (int8 on 64-wide layers is slower): these tests are about
# the decision flow, so the latency bound is loose too.
LOOSE_BUDGET = {"min_top1": 0.0, "max_ppl_ratio": 1e6, "max_mean_kl": 1e6, "max_latency_ratio": 1e6}

PERMISSIVE = """\
schema: headroom.policy/v1
description: Permissive bounds for a tiny random model.
rules:
  - id: quality.top1
    kind: metric_bound
    metric: top1_agreement
    min: 0.0
    description: measured, any value
    allow_unsafe: a tiny random model agrees with nothing; the loop is under test, not quality
  - id: structure.layers-cap
    kind: removal_cap
    unit: layers
    max_fraction: 0.5
    description: at most half the blocks
    allow_unsafe: the tiny test models have 2-4 layers; one skipped is already a quarter
  - id: process.rate-limit
    kind: rate_limit
    max_applies: 100
    window_s: 3600
    description: generous
"""

REVIEW = """\
  - id: review.exact-match
    kind: metric_bound
    metric: exact_match
    min: 1.5
    on_fail: needs_human
    description: unreachable, so an operator always reads the continuations
"""


def write_policies(folder: Path, needs_human: bool = False) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "loop.yaml").write_text(PERMISSIVE + (REVIEW if needs_human else ""))
    return str(folder)


def control_settings(policies: str, canary_s: float = 0.3, canary_requests: int = 0,
                     max_trials: int = 2, fp32_packed: bool = False,
                     compiled_decode: bool = True) -> ControlSettings:
    """fp32_packed: the planner's first trial (off unless a test asks: on a tiny model whether
    it is faster is up to the timing, and the other tests count their trials from int8)."""
    return ControlSettings(
        policy=PolicySettings(folder=policies), loop=LoopSettings(trial_timeout_s=60.0,
                                                                  max_trials=max_trials),
        rollout=RolloutSettings(canary_s=canary_s, canary_requests=canary_requests,
                                apply_timeout_s=30.0, poll_s=0.05),
        eval=EVAL, planner=PlannerSettings(max_sparse_layers=1, skip_candidates=1,
                                           fp32_packed=fp32_packed, compiled_decode=compiled_decode))


# address -> the server's plan signing public key: what an operator puts in the agents'
# HEADROOM_PLAN_VERIFY_KEYS (agents refuse unsigned plans and keys they were not given).
PLAN_KEYS: dict[str, str] = {}


def start(tmp_path: Path, needs_human: bool = False, **kw):
    policies = write_policies(tmp_path / "policies", needs_human)
    server = start_server(ServerSettings(db_path=str(tmp_path / "cp.duckdb"), port=0),
                          control_settings(policies, **kw))
    PLAN_KEYS[server.address] = server.state.control.client.signer.public_b64
    return server


def token_eval_args(vocab: int = 128) -> dict:
    return token_eval(EVAL, vocab)


class LiveAgent:
    """A tiny Llama attached to the server, tracing every request."""

    def __init__(self, address: str, agent_id: str, seed: int = 0, **settings):
        self.model = tiny_llama(seed=seed)
        settings.setdefault("plan_verify_keys", PLAN_KEYS.get(address))
        # The test thread polls jobs instead of serving: the control thread takes each trial
        # after 50 ms (tests/agent/test_control.py covers the hand-off to a serving thread).
        settings.setdefault("trial_handoff_s", 0.05)
        self.handle = attach(self.model, address=address, sample_rate=1.0, agent_id=agent_id,
                             flush_interval_ms=50, **settings)
        self.agent_id = agent_id
        self.fingerprint = self.handle.model_info.fingerprint

    def serve(self, n: int, query_class: str = "qa") -> None:
        for i in range(n):
            with self.handle.request(tenant="acme", route="/chat", query_class=query_class):
                self.model.generate(token_ids(8, seed=i), attention_mask=torch.ones(1, 8, dtype=torch.long),
                                    max_new_tokens=3, do_sample=False, pad_token_id=0)

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        return self.model(token_ids(16, seed=99)).logits

    def close(self) -> None:
        self.handle.detach()


def traced_agent(tmp_path: Path, agent_id: str, n: int, query_class: str = "qa",
                 **start_kw) -> tuple:
    """(server, LiveAgent): a control plane with a connected agent whose n requests of
    `query_class` are traced and stored."""
    server = start(tmp_path, **start_kw)
    agent = LiveAgent(server.address, agent_id)
    wait_for(lambda: connected(server, agent_id), what="agent")
    agent.serve(n, query_class=query_class)
    agent.handle.exporter.flush(5_000)
    wait_for(lambda: traced_rows(server, agent_id) >= n, what="traces")
    return server, agent


def wait_for(predicate, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def traced_rows(server, agent_id: str) -> int:
    with server.store.reader() as cur:
        return cur.execute("SELECT count(DISTINCT request_id) FROM layer_stats WHERE agent_id = ?",
                           [agent_id]).fetchone()[0]


def connected(server, agent_id: str) -> bool:
    return agent_id in server.state.connected_agents()


def audit_kinds(control, subject: Optional[str] = None) -> list[str]:
    rows = control.audit.rows(subject=subject, limit=10_000, newest_first=False)
    return [r.kind.value for r in rows]
