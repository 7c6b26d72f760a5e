"""Triton kernels vs the PyTorch reference, on CPU under TRITON_INTERPRET=1.

Runs only where the triton package imports (it is a CUDA-side dependency); the CPU fast paths
and the references are tested in test_cpu_paths.py whether or not it does.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py must set TRITON_INTERPRET=1"

from headroom_sidecar.agent.kernels import triton_kernels as tk  # noqa: E402
from headroom_sidecar.agent.kernels.reference import int8_linear_ref, sparse_gemv_ref  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=5e-2, rtol=3e-2)}


def _int8(n: int, k: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(dtype)
    return q, scale


def _sparse_act(m: int, i: int, sparsity: float, dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, i, generator=g)
    return a.masked_fill(torch.rand(m, i, generator=g) < sparsity, 0).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (4, 45, 77), (3, 130, 257)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_gemv_matches_reference(m, n, k, dtype, bias):
    q, scale = _int8(n, k, dtype)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    out = tk.int8_gemv(x, q, scale, b)
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out, int8_linear_ref(x, q, scale, b), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,i,o", [(1, 96, 64), (4, 77, 45), (2, 130, 70), (16, 40, 20)])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_sparse_gemv_fp_matches_reference(m, i, o, sparsity, dtype):
    a = _sparse_act(m, i, sparsity, dtype)
    w_t = torch.randn(i, o).to(dtype)
    b = torch.randn(o).to(dtype)
    torch.testing.assert_close(tk.sparse_gemv(a, w_t, None, b), sparse_gemv_ref(a, w_t, None, b),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 4])
def test_sparse_gemv_int8_matches_reference(m, dtype):
    a = _sparse_act(m, 99, 0.7, dtype)
    q_t = _int8(99, 53, dtype)[0]                # the transposed int8 weight [I, O]
    s = _int8(53, 1, dtype, seed=2)[1]           # [O] per-output-channel scale
    torch.testing.assert_close(tk.sparse_gemv(a, q_t, s), sparse_gemv_ref(a, q_t, s), **TOL[dtype])


def test_sparse_gemv_skips_rows_of_zero_activations():
    """A row whose activation is zero for every token is never read: poisoning it with NaN
    changes nothing (a dense kernel would return NaN)."""
    a = _sparse_act(2, 64, 0.0, torch.float32)
    a[:, 10:40] = 0
    w_t = torch.randn(64, 32)
    ref = sparse_gemv_ref(a, w_t)
    w_t[10:40] = float("nan")
    torch.testing.assert_close(tk.sparse_gemv(a, w_t), ref)


def test_sparse_gemv_refuses_prefill_sized_batches():
    with pytest.raises(ValueError, match="dense path"):
        tk.sparse_gemv(torch.randn(tk.MAX_TOKENS + 1, 8), torch.randn(8, 8))


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_split_reduction_adds_bias_once(split, bias):
    """Cut along K (int8) or I (sparse) into fp32 partial sums: same result, bias once."""
    q, scale = _int8(40, 300, torch.float32)
    x, b = torch.randn(2, 300), (torch.randn(40) if bias else None)
    torch.testing.assert_close(tk.int8_gemv(x, q, scale, b, split=split),
                               int8_linear_ref(x, q, scale, b), atol=1e-4, rtol=1e-4)
    a, w_t = _sparse_act(2, 300, 0.5, torch.float32), torch.randn(300, 40)
    torch.testing.assert_close(tk.sparse_gemv(a, w_t, None, b, split=split),
                               sparse_gemv_ref(a, w_t, None, b), atol=1e-4, rtol=1e-4)
