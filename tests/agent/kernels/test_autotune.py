"""Kernels chosen by measurement: the fastest correct candidate, timings recorded per layer."""
from __future__ import annotations

import json
import time

import torch
from torch import nn

from headroom_sidecar.agent.adapters.base import WeightLayout
from headroom_sidecar.agent.executor.int8 import Int8Linear
from headroom_sidecar.agent.kernels import KernelSettings
from headroom_sidecar.agent.kernels.autotune import (SLOW_FACTOR, KernelChoice, _hopeless, _round_robin, fastest,
                                    kernel_choices, within_slow_factor)

X = torch.randn(1, 8)


def _slow(x):
    time.sleep(0.003)
    return x * 2


def _ok(kernel, y):
    return "" if torch.equal(y, X * 2) else "wrong"


def test_fastest_correct_candidate_wins_and_wrong_ones_are_rejected():
    fns = {"wrong_fast": lambda x: x * 3, "slow": _slow, "fast": lambda x: x * 2}
    c = fastest(fns, X, _ok)
    assert c.kernel == "fast" and c.rejected == {"wrong_fast": "wrong"}
    assert set(c.candidates_us) == {"slow", "fast"} and c.candidates_us["slow"] >= 3000


def test_a_candidate_that_raises_is_rejected_not_raised():
    def boom(x):
        raise MemoryError("out of memory")
    c = fastest({"boom": boom, "fast": lambda x: x * 2}, X, _ok)
    assert c.kernel == "fast" and c.rejected == {"boom": "MemoryError: out of memory"}


def test_no_correct_candidate_falls_back_to_the_last():
    c = fastest({"a": lambda x: x * 3, "b": lambda x: x * 4}, X, _ok)
    assert c == KernelChoice("b", {}, {"a": "wrong", "b": "wrong"})


def test_a_candidate_much_slower_than_the_best_is_timed_once():
    samples = _round_robin({"fast": lambda x: x * 2, "slow": _slow}, X, budget_ms=1000)
    assert len(samples["slow"]) == 1 and len(samples["fast"]) > 1


def test_a_slow_warm_up_over_budget_is_not_timed_again():
    c = fastest({"fast": lambda x: x * 2, "slow": _slow}, X, _ok, budget_ms=2.0)
    assert c.kernel == "fast" and c.candidates_us["slow"] >= 3000
    warm_s = 2.0 ** -7                                  # 7.8125 ms, exact in binary
    assert _hopeless(warm_s, [2.0 ** -10], share_ms=7.8)            # over its share, 8x slower
    assert not _hopeless(warm_s, [2.0 ** -10], share_ms=7.8125)     # exactly its share: timed
    assert not _hopeless(warm_s, [warm_s / SLOW_FACTOR], share_ms=1.0)   # exactly SLOW_FACTOR x
    assert _hopeless(warm_s, [warm_s / SLOW_FACTOR * 0.999], share_ms=1.0)


def test_slow_factor_boundary_keeps_a_candidate_exactly_at_it():
    """Exactly SLOW_FACTOR times slower stays in; just above drops out."""
    latest = {"a": 1.0, "b": SLOW_FACTOR, "c": SLOW_FACTOR + 1e-6}
    assert within_slow_factor(latest) == {"a", "b"}


def test_int8_linear_records_its_choice_json_ready(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
    model[0] = Int8Linear.from_module(model[0], WeightLayout.OUT_IN,
                                      KernelSettings(cache_dir=str(tmp_path)))
    choices = kernel_choices(model)
    assert list(choices) == ["0"]
    c = choices["0"]
    assert c["kernel"] == model[0].kernel.value
    if len(c["candidates_us"]) > 1:            # timed: the fastest won
        assert c["kernel"] == min(c["candidates_us"], key=c["candidates_us"].get)
    assert json.loads(json.dumps(choices)) == choices
