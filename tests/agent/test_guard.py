"""Executor.baseline() exactness and the live quality guard (local and through a real server)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from headroom_sidecar.agent import attach, wire
from headroom_sidecar.agent.adapters import resolve_structure
from headroom_sidecar.agent.control import ControlHandler
from headroom_sidecar.agent.executor import Executor
from headroom_sidecar.agent.fingerprint import fingerprint
from headroom_sidecar.agent.guard import GuardSample, sample_ids
from headroom_sidecar.agent.handle import AgentHandle
from headroom_sidecar.agent.settings import AgentSettings
from headroom_sidecar.controlplane.server import InboundKind
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto.plandoc import PlanPurpose
from tests.agent.executor import (assert_bitwise_equal, greedy, logits, plan, plan_doc, rig,
                                  state_snapshot)
from tests.agent.test_exporter import wait_until
from tests.builders import greedy_plain, tiny_llama, tiny_plain, tiny_qwen2, token_ids

ALL_KINDS = [{"kind": "skip_layers", "layers": [1]},
             {"kind": "prune_heads", "heads": {"0": [0, 3], "2": [1]}},
             {"kind": "activation_sparsity", "thresholds": {"0": 0.05, "2": 0.02}},
             {"kind": "weight_precision", "layers": {"0": "int8", "2": "int8"}},
             {"kind": "execution", "static_kv_cache": True, "compile": "none"}]
DESTRUCTIVE = [{"kind": "skip_layers", "layers": [0, 1]}]     # tiny_llama: top-1 ~0.35
HARMLESS = [{"kind": "activation_sparsity", "thresholds": {"0": 0.0}}]   # zeroes nothing


# ------------------------------------------------------------------ Executor.baseline()
def _module_ids(model) -> list[int]:
    return [id(m) for m in model.modules()]


@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2])
def test_baseline_context_is_bitwise_both_ways(builder):
    r = rig(builder())
    snap, base, base_gen = state_snapshot(r.model), logits(r.model), greedy(r.model)
    p = plan(r.fingerprint, *ALL_KINDS)
    r.executor.apply(p)
    plan_snap, planned, plan_gen = state_snapshot(r.model), logits(r.model), greedy(r.model)
    plan_modules = _module_ids(r.model)
    assert not torch.equal(planned, base)
    with r.executor.baseline():
        assert r.executor.active_plan is p
        assert_bitwise_equal(r.model, snap)
        assert torch.equal(logits(r.model), base) and torch.equal(greedy(r.model), base_gen)
    assert _module_ids(r.model) == plan_modules                 # the plan's own objects are back
    assert_bitwise_equal(r.model, plan_snap)
    assert torch.equal(logits(r.model), planned) and torch.equal(greedy(r.model), plan_gen)
    r.executor.rollback()
    assert_bitwise_equal(r.model, snap)
    assert torch.equal(logits(r.model), base)


def test_baseline_restores_the_plan_when_the_block_raises_and_is_a_noop_without_plan():
    r = rig(tiny_llama())
    base = logits(r.model)
    with r.executor.baseline():
        assert torch.equal(logits(r.model), base)
    r.executor.apply(plan(r.fingerprint, *DESTRUCTIVE))
    planned = logits(r.model)
    with pytest.raises(KeyError):
        with r.executor.baseline():
            raise KeyError("inside")
    assert torch.equal(logits(r.model), planned)


# ------------------------------------------------------------------ sample_ids
def test_sample_ids_takes_the_first_sequence_and_the_last_tokens():
    seqs = torch.arange(20).view(2, 10)
    got = sample_ids(SimpleNamespace(sequences=seqs), max_tokens=4)      # a GenerateOutput
    assert got.tolist() == [[6, 7, 8, 9]]
    assert sample_ids(seqs[0], 128).tolist() == [list(range(10))]
    seqs[0, 9] = 99
    assert got[0, -1] == 9                                              # a copy, not a view
    for bad in (None, torch.zeros(1, 5), torch.tensor([[3]]), torch.zeros(1, 2, 3, dtype=torch.long)):
        assert sample_ids(bad, 128) is None


# ------------------------------------------------------------------ the guard, locally
def _local(model, **settings):
    s = resolve_structure(model)
    ex = Executor(model, s, fingerprint(model, s))
    cfg = AgentSettings(export_enabled=False, sample_rate=0.0, **settings)
    control = ControlHandler(model, s, ex, cfg)
    handle = AgentHandle(model, s, cfg, sink=lambda r: None, executor=ex, control=control)
    return handle, ex.fingerprint


def _serve(model, n: int, new_tokens: int = 6) -> None:
    for i in range(n):
        greedy(model, new_tokens, ids=token_ids(8, seed=40 + i))


def _guard_reports(handle) -> list[dict]:
    return [json.loads(r.detail) for r in handle.control.history
            if isinstance(r, wire.PlanStatusReport) and r.state == wire.PlanState.ROLLED_BACK]


def test_guard_rolls_back_a_destructive_plan():
    model = tiny_llama()
    snap, base = state_snapshot(model), logits(model)
    handle, fp = _local(model, guard_every_n_requests=3)
    try:
        handle.apply_plan(plan_doc(fp, *DESTRUCTIVE, plan_id="bad"))
        _serve(model, 2)
        assert handle.active_plan is not None and handle.stats().guard.checks == 0
        _serve(model, 1)                                          # the 3rd request is checked
        assert wait_until(lambda: handle.active_plan is None, 10)
        (detail,) = _guard_reports(handle)
        assert detail["cause"] == "quality_guard" and detail["threshold"] == 0.9
        assert detail["top1"] < 0.9 and detail["request_id"] == 3
        stats = handle.stats()
        assert (stats.guard.checks, stats.guard.breaches, stats.control.rolled_back) == (1, 1, 1)
        assert_bitwise_equal(model, snap)
        assert torch.equal(logits(model), base)
        _serve(model, 3)                                          # no plan: nothing more checked
        assert handle.stats().guard.checks == 1
    finally:
        handle.detach()


def test_guard_keeps_a_harmless_plan_and_checks_context_requests():
    model = tiny_plain()                                          # no generate(): full forwards
    handle, fp = _local(model, guard_every_n_requests=1)
    try:
        handle.apply_plan(plan_doc(fp, *HARMLESS, plan_id="ok"))
        with handle.request():
            greedy_plain(model, token_ids(6), 4)                  # 4 forwards, the last one 9 tokens
        assert wait_until(lambda: handle.stats().guard.checks == 1, 10)
        assert handle.control.guard.last.top1 == 1.0 and handle.control.guard.last.tokens == 9
        assert handle.stats().guard.breaches == 0 and handle.active_plan.plan_id == "ok"
    finally:
        handle.detach()
    assert handle.active_plan is None                             # detach rolls back


def test_a_check_for_a_plan_no_longer_active_is_skipped():
    model = tiny_llama()
    handle, fp = _local(model, guard_every_n_requests=0)           # sampling off: checks by hand
    try:
        handle.apply_plan(plan_doc(fp, *DESTRUCTIVE, plan_id="old"))
        old = handle.active_plan
        handle.apply_plan(plan_doc(fp, *HARMLESS, plan_id="new"))
        assert handle.control.guard.check(GuardSample(1, token_ids(8), old)) is None
        assert handle.stats().guard.stale == 1 and handle.active_plan.plan_id == "new"
        _serve(model, 2)
        assert handle.stats().guard.checks == 0
    finally:
        handle.detach()


# ------------------------------------------------------------------ through the control plane
def test_guard_rollback_reaches_the_control_plane(server):
    statuses = []
    server.state.on(InboundKind.PLAN_STATUS, lambda agent, msg: statuses.append(msg))
    model = tiny_llama()
    base = logits(model)
    signer = server.state.control.client.signer          # plans from the network are signed
    handle = attach(model, address=server.address, agent_id="guard-agent", sample_rate=0.0,
                    guard_every_n_requests=2, shutdown_timeout_ms=2000,
                    plan_verify_keys=signer.public_b64)
    try:
        assert wait_until(lambda: "guard-agent" in server.state.connected_agents())
        p = plan(handle.model_info.fingerprint, *DESTRUCTIVE, plan_id="bad")
        msg = signer.sign(pb.Plan(plan_id=p.plan_id, version=p.version, document_json=p.to_json(),
                                  sha256=p.hash), PlanPurpose.APPLY)
        assert server.state.send_to_agent("guard-agent", pb.ControlMessage(apply_plan=msg))
        assert wait_until(lambda: len(statuses) == 1)
        assert statuses[0].state == pb.PlanStatus.APPLIED
        _serve(model, 2)
        assert wait_until(lambda: len(statuses) == 2)
        got = statuses[1]
        assert (got.plan_id, got.sha256, got.state) == ("bad", p.hash, pb.PlanStatus.ROLLED_BACK)
        detail = json.loads(got.detail)
        assert detail["cause"] == "quality_guard" and detail["top1"] < detail["threshold"] == 0.9
        assert detail["request_id"] == 2
        assert torch.equal(logits(model), base)
    finally:
        handle.detach()
