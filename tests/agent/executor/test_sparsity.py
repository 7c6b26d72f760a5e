"""activation_sparsity: equals zeroing |a| < t at down_proj's input; decode gather == dense."""
from __future__ import annotations

import json

import pytest
import torch

from headroom_sidecar.agent.executor import ExecutorSettings
from headroom_sidecar.agent.executor.int8 import Int8Linear
from headroom_sidecar.agent.executor.sparsity import SPARSE_RUNNER, SparseDownProj
from headroom_sidecar.agent.kernels import KernelSettings, probe
from tests.agent.executor import greedy, logits, plan, rig
from tests.builders import tiny_llama


@pytest.fixture(autouse=True, scope="module")
def _kernel_cache_dir(tmp_path_factory):
    """Probe verdicts of this module go to a folder of its own, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADROOM_KERNEL_CACHE_DIR", str(tmp_path_factory.mktemp("kernels")))
        yield


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


@pytest.mark.parametrize("int8,kernel", [(False, "embedding_bag"), (True, "sparse_gemv_u8rows")])
def test_decode_kernel_is_probed_and_recorded(int8, kernel):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    inner = Int8Linear.from_module(lin, layout=None) if int8 else lin
    fast = SparseDownProj(inner, 0.5, weight_in_out=False, decode_gather=True)
    assert fast.choice.kernel in (kernel, "gathered")
    assert (fast.choice.kernel == "gathered") == bool(fast.choice.rejected)   # only if unsafe
    assert SparseDownProj(inner, 0.5, weight_in_out=False).choice is None     # no decode path


@pytest.mark.parametrize("int8", [False, True])
def test_unsafe_decode_kernel_falls_back_to_gathered(tmp_path, int8):
    """A verdict file saying the kernel crashed for this shape class: the module never
    runs it and decodes through the gathered reference, still equal to dense."""
    settings = KernelSettings(cache_dir=str(tmp_path))
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    inner = Int8Linear.from_module(lin, layout=None, settings=settings) if int8 else lin
    kernel = "sparse_gemv_u8rows" if int8 else "embedding_bag"
    dtype = inner.scale.dtype if int8 else lin.weight.dtype
    case = probe.ProbeCase.for_shape(kernel, 64, 128, dtype, torch.device("cpu"), SPARSE_RUNNER)
    path = probe.cache_file(settings, probe.machine("cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": {}, "verdicts": {
        case.key: {"safe": False, "reason": "killed by SIGSEGV (test)"}}}))
    probe.clear_memo()
    fast = SparseDownProj(inner, 0.5, weight_in_out=False, decode_gather=True, settings=settings)
    assert fast.choice.kernel == "gathered" and fast.decode_w is None
    assert fast.choice.rejected == {kernel: "probe: killed by SIGSEGV (test)"}
    a = torch.randn(1, 1, 128)
    w = inner.dequantized() if int8 else lin.weight
    exact = torch.nn.functional.linear(fast.sparsify(a), w, lin.bias)
    torch.testing.assert_close(fast(a), exact, atol=1e-5, rtol=1e-5)
