"""The kernels as torch.library custom ops, each with a fake (meta) implementation, so a
torch.compile'd model traces them as single opaque nodes instead of breaking the graph.

    torch.ops.headroom.int8_linear(x [M, K], q [N, K] int8, scale [N], bias?) -> [M, N]
        CUDA: Triton int8 GEMV for M <= 16, dequantise + matmul above (prefill);
        elsewhere: dequantise in chunks of output rows, fp matmul (the weight-only reference).
    torch.ops.headroom.sparse_gemv(a [M, I], w_t [I, O], scale [O]?, bias?) -> [M, O]
        CUDA: Triton row-skipping sparse GEMV (w_t fp or int8 with per-channel scale);
        CPU, fp32 w_t: embedding_bag over the surviving rows; else the plain reference.
    torch.ops.headroom.sparse_gemv_u8rows(a [M, I], rows [I, O + 8] uint8, scale [O], bias?)
        CPU: fbgemm's 8-bit row-wise embedding bag (see cpu.py).

Which kernel a module uses, with which prepared layout, is decided once at apply time:
`impl(op, device)` returns the function behind the op for that device, and `call` runs it
directly in eager mode (a custom op's Python dispatch costs tens of microseconds a call, as
much as a decode GEMV on a CPU) and through torch.ops.headroom while torch.compile traces.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from headroom_sidecar.agent.kernels import cpu
from headroom_sidecar.agent.kernels.reference import sparse_gemv_ref

CHUNK_ROWS = 4096          # output rows dequantised at a time: bounds the transient fp copy
TRITON_MAX_TOKENS = 16     # decode-sized batches go to the GEMV kernels, larger ones dense


def dequant_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] -> [M, N]: q cast to x's dtype a chunk of rows at a time, then scaled."""
    y = torch.cat([F.linear(x, q[r:r + CHUNK_ROWS].to(x.dtype))
                   for r in range(0, q.shape[0], CHUNK_ROWS)], dim=-1)
    y = y * scale.to(x.dtype)
    return y if bias is None else y + bias


def _int8_linear_cuda(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    if x.shape[0] > TRITON_MAX_TOKENS:
        return dequant_linear(x, q, scale, bias)
    from headroom_sidecar.agent.kernels import triton_kernels
    return triton_kernels.int8_gemv(x, q, scale, bias)


def _sparse_gemv_default(a: torch.Tensor, w_t: torch.Tensor, scale: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor]) -> torch.Tensor:
    if a.device.type == "cpu" and w_t.dtype == torch.float32 and a.dtype == torch.float32 \
            and scale is None:
        return cpu.sparse_gemv_cpu(a, w_t, bias)
    return sparse_gemv_ref(a, w_t, scale, bias)


def _sparse_gemv_cuda(a: torch.Tensor, w_t: torch.Tensor, scale: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    from headroom_sidecar.agent.kernels import triton_kernels
    return triton_kernels.sparse_gemv(a, w_t, scale, bias)


def _sparse_gemv_u8rows(a: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> torch.Tensor:
    return cpu.sparse_gemv_int8_cpu(a.float(), rows, scale.float(), bias).to(a.dtype)


int8_linear = torch.library.custom_op("headroom::int8_linear", dequant_linear, mutates_args=())
int8_linear.register_kernel("cuda")(_int8_linear_cuda)
sparse_gemv = torch.library.custom_op("headroom::sparse_gemv", _sparse_gemv_default,
                                      mutates_args=())
sparse_gemv.register_kernel("cuda")(_sparse_gemv_cuda)
sparse_gemv_u8rows = torch.library.custom_op("headroom::sparse_gemv_u8rows", _sparse_gemv_u8rows,
                                             mutates_args=(), device_types="cpu")


@int8_linear.register_fake
def _int8_linear_fake(x, q, scale, bias):
    return x.new_empty(x.shape[0], q.shape[0])


@sparse_gemv.register_fake
def _sparse_gemv_fake(a, w_t, scale, bias):
    return a.new_empty(a.shape[0], w_t.shape[1])


@sparse_gemv_u8rows.register_fake
def _sparse_gemv_u8rows_fake(a, rows, scale, bias):
    return a.new_empty(a.shape[0], scale.shape[0])


_IMPLS: dict[tuple[str, str], Callable] = {
    ("int8_linear", "cuda"): _int8_linear_cuda, ("int8_linear", "*"): dequant_linear,
    ("sparse_gemv", "cuda"): _sparse_gemv_cuda, ("sparse_gemv", "*"): _sparse_gemv_default,
    ("sparse_gemv_u8rows", "cpu"): _sparse_gemv_u8rows,
}


def impl(op: str, device: torch.device) -> Callable:
    """The function torch.ops.headroom.<op> runs for tensors on `device`."""
    found = _IMPLS.get((op, device.type)) or _IMPLS.get((op, "*"))
    if found is None:
        raise ValueError(f"headroom::{op} has no kernel for {device.type} tensors")
    return found


def call(op: str, fn: Callable, *args):
    """`fn` (from impl) in eager mode; the registered op while torch.compile traces."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.headroom, op)(*args)
    return fn(*args)
