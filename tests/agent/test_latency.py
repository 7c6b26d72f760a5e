"""Interleaved latency: pairs back to back, order alternating, the ratio's direction right.

Speed here is made deterministic on purpose: a block that sleeps a fixed time per forward
makes one side measurably slower whatever the machine does, so the tests check direction and
pairing, never a machine's speed."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from headroom_sidecar.agent.executor import Executor
from headroom_sidecar.agent.executor.executor import DEFAULT_APPLIERS
from headroom_sidecar.agent.latency import Spread, interleaved
from headroom_sidecar.proto.plan import TransformKind
from tests.agent.executor import plan, rig
from tests.builders import tiny_llama, token_ids

SLEEP_S = 0.05


class Sleepy(nn.Module):
    """The block it wraps, plus a fixed sleep per forward; records which side ran."""

    def __init__(self, inner: nn.Module, log: list, side: str, sleep_s: float):
        super().__init__()
        self.inner, self.log, self.side, self.sleep_s = inner, log, side, sleep_s

    def forward(self, *args, **kwargs):
        self.log.append(self.side)
        time.sleep(self.sleep_s)
        return self.inner(*args, **kwargs)


def _slow_plan_rig(plan_sleep_s: float, base_sleep_s: float):
    """Layer 1 wrapped on both sides; a 'skip_layers' plan swaps in the plan side's wrapper."""
    model, log = tiny_llama(), []
    layers = model.model.layers

    def swap(ex: Executor, t, undo) -> list[str]:
        undo.swap(layers, "1", Sleepy(layers[1].inner, log, "plan", plan_sleep_s), park=False)
        return []
    r = rig(model, appliers={**DEFAULT_APPLIERS, TransformKind.SKIP_LAYERS: swap})
    layers[1] = Sleepy(layers[1], log, "base", base_sleep_s)   # after the adapter read the block
    r.executor.apply(plan(r.fingerprint, {"kind": "skip_layers", "layers": [1]}))
    return r, log


@pytest.mark.parametrize("plan_sleep_s, base_sleep_s, slower", [
    (SLEEP_S, 0.0, True),      # the plan adds a sleep: slower, ratio > 1
    (0.0, SLEEP_S, False),     # the plan removes one: faster, ratio < 1
])
def test_ratio_direction(plan_sleep_s, base_sleep_s, slower):
    r, _ = _slow_plan_rig(plan_sleep_s, base_sleep_s)
    lat = interleaved(r.model, r.executor, [token_ids(6)[0]], new_tokens=4, rounds=3)
    assert (lat.ratio.median > 1.0) is slower
    assert (lat.plan_ms.median > lat.base_ms.median) is slower
    # every pair, not just the median, points the same way: the sleep dwarfs the noise
    assert (lat.ratio.min > 1.0 if slower else lat.ratio.max < 1.0)


def test_pairs_alternate_and_the_plan_stays_applied():
    r, log = _slow_plan_rig(0.0, 0.0)
    prompts = [token_ids(5, seed=1)[0], token_ids(5, seed=2)[0]]
    lat = interleaved(r.model, r.executor, prompts, new_tokens=3, rounds=2)
    assert (lat.ratio.n, lat.base_ms.n, lat.plan_ms.n) == (4, 4, 4)
    # per generate of 3 tokens the block runs 3 times (prefill + 2 decode steps)
    sides = [log[i] for i in range(0, len(log), 3)]
    # warm-up base, warm-up plan; then pairs (r, i): (0,0) B P, (0,1) P B, (1,0) P B, (1,1) B P
    assert sides == ["base", "plan", "base", "plan", "plan", "base", "plan", "base", "base", "plan"]
    assert r.executor.active_plan is not None
    assert lat.thread == threading.current_thread().name


def test_warmup_is_reported_apart():
    r, _ = _slow_plan_rig(SLEEP_S, 0.0)
    lat = interleaved(r.model, r.executor, [token_ids(6)[0]], new_tokens=4, rounds=1)
    # whole first generate: at least 4 forwards x the sleep; per-token figures exclude it
    assert lat.warmup_plan_ms >= 4 * SLEEP_S * 1e3
    assert lat.warmup_base_ms > 0 and lat.plan_ms.n == 1


def test_needs_a_plan_and_something_to_time():
    r = rig(tiny_llama())
    with pytest.raises(RuntimeError, match="plan applied"):
        interleaved(r.model, r.executor, [token_ids(5)[0]], 4, 1)
    r.executor.apply(plan(r.fingerprint, {"kind": "skip_layers", "layers": [1]}))
    with pytest.raises(ValueError, match="2 new tokens"):
        interleaved(r.model, r.executor, [token_ids(5)[0]], 1, 1)
    with pytest.raises(ValueError, match="one prompt"):
        interleaved(r.model, r.executor, [], 4, 1)


def test_spread():
    assert Spread.of([3.0, 1.0, 2.0]) == Spread(3, 1.0, 2.0, 3.0)
    empty = Spread.of([])
    assert empty.n == 0 and torch.isnan(torch.tensor(empty.median))
