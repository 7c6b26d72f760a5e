"""The sparse decode kernels of SparseDownProj as probe runners (see agent/kernels/probe.py):
each computes the same int8 linear y = a @ (q * scale[:, None]).T + bias from the layout the
module builds, so the probe child can compare it with the reference.

    embedding_bag        CPU, fp w_t [I, O]: torch's embedding_bag over surviving rows
    sparse_gemv_u8rows   CPU, int8 w_t as fbgemm 8-bit row-wise rows [I, O + 8]
    triton_sparse_gemv   CUDA, fp or int8 w_t (int8 when the inner module is int8)
"""
from __future__ import annotations

import enum
from typing import Callable, Optional

import torch

from headroom_sidecar.agent.kernels import cpu, ops
from headroom_sidecar.agent.kernels.ops import TRITON_MAX_TOKENS

CPU_MAX_TOKENS = 1     # embedding_bag reads each token's rows separately: a batch re-reads them


class SparseKernel(str, enum.Enum):
    EMBEDDING_BAG = "embedding_bag"
    U8ROWS = "sparse_gemv_u8rows"
    TRITON = "triton_sparse_gemv"
    TRITON_INT8 = "triton_sparse_gemv_int8"
    GATHERED = "gathered"            # the reference: gather kept columns, dense matmul; safe


def probe_rows(kernel: str) -> tuple[int, ...]:
    """Row counts the module sends this kernel (more rows go to the dense inner module)."""
    if SparseKernel(kernel) in (SparseKernel.TRITON, SparseKernel.TRITON_INT8):
        return (1, 2, 5, TRITON_MAX_TOKENS)
    return (CPU_MAX_TOKENS,)


def rel_error_bound(kernel: str, dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 0.02


def prepare(kernel: str, q: torch.Tensor, scale: torch.Tensor,
            bias: Optional[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """q [O, I] int8, scale [O] -> a [M, I] -> [M, O], through the kernel's own layout."""
    kernel = SparseKernel(kernel)
    if kernel == SparseKernel.U8ROWS:
        rows = cpu.rowwise_u8_layout(q.t().contiguous())                 # [I, O + 8]
        fn = ops.impl("sparse_gemv_u8rows", q.device)
        return lambda a: fn(a, rows, scale, bias)
    fn = ops.impl("sparse_gemv", q.device)
    if kernel == SparseKernel.TRITON_INT8:
        q_t = q.t().contiguous()                                         # [I, O] int8
        return lambda a: fn(a, q_t, scale, bias)
    w_t = (q.to(scale.dtype) * scale[:, None]).t().contiguous()          # [I, O]
    return lambda a: fn(a, w_t, None, bias)
