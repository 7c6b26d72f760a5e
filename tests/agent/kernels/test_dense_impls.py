"""fp32 linear kernels of fp32_packed against a float64 reference, and their probe."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headroom_sidecar.agent.executor.packed import RUNNER
from headroom_sidecar.agent.kernels import KernelSettings, probe
from headroom_sidecar.agent.kernels.dense_impls import (DenseKernel, onednn_available, pack,
                                                       prepare, rel_error_bound)
from headroom_sidecar.agent.kernels.probe_child import _compare
from headroom_sidecar.agent.kernels.reference import int8_linear_ref



def _weights(n: int, k: int, bias: bool):
    g = torch.Generator().manual_seed(n * 1000 + k)
    return torch.randn(n, k, generator=g), (torch.randn(n, generator=g) if bias else None)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def test_this_build_has_onednn():
    assert onednn_available()         # the CPU wheels CI installs ship it; the rest rely on it


@pytest.mark.parametrize("kernel", list(DenseKernel))
@pytest.mark.parametrize("n,k", [(32, 64), (48, 72), (576, 1536), (17, 5)])
@pytest.mark.parametrize("rows", [1, 2, 5, 37])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_float64_reference(kernel, n, k, rows, bias):
    w, b = _weights(n, k, bias)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))          # [M, K]
    ref = x.double() @ w.double().T + (0 if b is None else b.double())             # [M, N]
    y = pack(kernel, w, b).fn(x)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    assert _rel(y, ref) <= rel_error_bound(kernel, torch.float32)
    if kernel == DenseKernel.ONEDNN_PACKED:                 # aten is F.linear itself
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-4, atol=1e-6 * k)   # k terms


def test_the_bound_catches_a_kernel_that_rounds_to_bf16():
    w, b = _weights(64, 256, True)
    x = torch.randn(4, 256)
    ref = x.double() @ w.double().T + b.double()
    lossy = F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()).float()
    assert _rel(lossy, ref) > rel_error_bound(DenseKernel.ONEDNN_PACKED, torch.float32)


def test_packed_layout_reports_its_real_size_and_only_takes_fp32_cpu_weights():
    w, _ = _weights(1536, 577, False)
    packed = pack(DenseKernel.ONEDNN_PACKED, w, None)
    assert packed.nbytes >= w.numel() * 4 and torch.equal(packed.held.to_dense(), w)
    with pytest.raises(ValueError, match="fp32 CPU weights"):
        pack(DenseKernel.ONEDNN_PACKED, w.bfloat16(), None)


def test_probe_runner_computes_the_int8_reference_weight():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (40, 72), dtype=torch.int8, generator=g)
    scale, bias = torch.rand(40, generator=g) * 0.02, torch.randn(40, generator=g)
    x = torch.randn(3, 72, generator=g)
    y = prepare(DenseKernel.ONEDNN_PACKED.value, q, scale, bias)(x)
    assert _compare(y, int8_linear_ref(x, q, scale, bias), 1e-5) == ""


def test_onednn_is_probed_safe_in_a_child(tmp_path):
    probe.clear_memo()
    try:
        settings = KernelSettings(cache_dir=str(tmp_path), probe_timeout_s=120)
        cases = [probe.ProbeCase.for_shape(DenseKernel.ONEDNN_PACKED, n, k, torch.float32,
                                           torch.device("cpu"), RUNNER)
                 for n, k in [(576, 576), (192, 576), (1536, 577)]]
        verdicts = probe.ensure(cases, settings)
        assert verdicts.keys() == {c.key for c in cases}
        assert all(v.safe for v in verdicts.values()), verdicts
    finally:
        probe.clear_memo()
