"""activation_sparsity: equals zeroing |a| < t at down_proj's input; decode gather == dense."""
from __future__ import annotations

import pytest
import torch

from agent.executor import ExecutorSettings
from agent.executor.int8 import Int8Linear
from agent.executor.sparsity import SparseDownProj
from tests.agent.executor import greedy, logits, plan, rig
from tests.builders import tiny_llama


def _zero_small(s, thresholds):
    def pre(t):
        return lambda mod, args: (args[0].masked_fill(args[0].abs() < t, 0),)
    return [s.blocks[l].mlp.down_proj.register_forward_pre_hook(pre(t)) for l, t in thresholds.items()]


@pytest.mark.parametrize("thresholds", [{0: 0.02}, {0: 0.05, 2: 0.01}, {1: 0.0}])
def test_sparsity_equals_hook_reference(thresholds):
    r = rig(tiny_llama())
    handles = _zero_small(r.structure, thresholds)
    ref = logits(r.model)
    for h in handles:
        h.remove()
    r.executor.apply(plan(r.fingerprint, {"kind": "activation_sparsity",
                                          "thresholds": {str(k): v for k, v in thresholds.items()}}))
    torch.testing.assert_close(logits(r.model), ref, atol=1e-6, rtol=1e-5)


def test_threshold_really_zeroes_activations():
    r = rig(tiny_llama())
    seen = []
    r.executor.apply(plan(r.fingerprint, {"kind": "activation_sparsity", "thresholds": {"1": 0.05}}))
    inner = r.structure.layers[1].mlp.down_proj.inner
    inner.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    logits(r.model)
    a = seen[0]
    assert (a == 0).float().mean() > 0.2 and a[a != 0].abs().min() >= 0.05


@pytest.mark.parametrize("int8", [False, True])
def test_decode_gather_equals_dense(int8):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    inner = Int8Linear.from_module(lin, layout=None) if int8 else lin
    dense = SparseDownProj(inner, 0.5, weight_in_out=False, decode_gather=False)
    fast = SparseDownProj(inner, 0.5, weight_in_out=False, decode_gather=True)
    a = torch.randn(1, 1, 128)                                    # one decode token
    w = inner.dequantized() if int8 else lin.weight               # what the weights mean
    exact = torch.nn.functional.linear(dense.sparsify(a), w, lin.bias)
    torch.testing.assert_close(fast(a), exact, atol=1e-5, rtol=1e-5)
    # The dense int8 path (int8pack, the CPU default) rounds activations to bf16.
    tol = 2e-2 if int8 else 1e-5
    torch.testing.assert_close(dense(a), exact, atol=tol, rtol=tol)
    a_many = torch.randn(1, 5, 128)                               # prefill: dense path
    torch.testing.assert_close(fast(a_many), dense(a_many))


def test_generate_with_decode_gather_matches_dense():
    doc = {"kind": "activation_sparsity", "thresholds": {"0": 0.03, "1": 0.03, "2": 0.03}}
    dense = rig(tiny_llama(), settings=ExecutorSettings(sparse_decode_gather=False))
    fast = rig(tiny_llama(), settings=ExecutorSettings(sparse_decode_gather=True))
    dense.executor.apply(plan(dense.fingerprint, doc))
    fast.executor.apply(plan(fast.fingerprint, doc))
    assert torch.equal(greedy(fast.model, n=8), greedy(dense.model, n=8))
