"""The int8 linear kernels y = x @ (q * scale[:, None]).T + bias, by name, with the error
their arithmetic allows against agent.kernels.reference.int8_linear_ref.

`prepare(kernel, q, scale, bias)` returns a function of x [M, K] -> [M, N] holding whatever
layout that kernel needs (fbgemm's pack, a bf16 scale): the probe child and the apply-time
timer run exactly these, and Int8Linear's forward calls the same per-kernel functions.
"""
from __future__ import annotations

import enum
from typing import Callable, Optional

import torch

from headroom_sidecar.agent.kernels import cpu, ops

Linear = Callable[[torch.Tensor], torch.Tensor]


class Int8Kernel(str, enum.Enum):
    TRITON = "triton"               # headroom::int8_linear, CUDA kernel
    FBGEMM = "fbgemm"               # packed W8A8 (CPU, opt-in)
    INT8PACK = "int8pack"           # torch._weight_int8pack_mm (bf16/fp16)
    INT8PACK_BF16 = "int8pack_bf16"  # the same for fp32 models, activations rounded to bf16
    DEQUANT = "dequant"             # headroom::int8_linear, chunked dequantise (any device)
    REFERENCE = "reference"         # agent.kernels.reference, forced by settings


# Kernels that are plain PyTorch ops on ordinary tensors: they cannot crash the process, so
# they need no probe (and are the fallbacks when every probed kernel is unsafe).
NEVER_PROBED = frozenset({Int8Kernel.DEQUANT, Int8Kernel.REFERENCE})


def rel_error_bound(kernel: Int8Kernel, dtype: torch.dtype) -> float:
    """Largest ||y - ref|| / ||ref|| the kernel's arithmetic allows (ref computed in fp32)."""
    if kernel == Int8Kernel.FBGEMM:
        return 0.03           # 7-bit per-tensor activations: ~1.3% on Gaussian inputs
    if dtype != torch.float32 or kernel == Int8Kernel.INT8PACK_BF16:
        return 0.02           # bf16 activations / output: 2^-8 relative per element
    return 1e-4               # fp32 all the way: summation order only


def int8pack_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] bf16/fp16, scale [N] the same dtype -> [M, N]."""
    y = torch._weight_int8pack_mm(x.contiguous(), q, scale)
    return y if bias is None else y + bias


def int8pack_bf16_linear(x: torch.Tensor, q: torch.Tensor, scale_bf16: torch.Tensor,
                         bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] fp32 -> [M, N] fp32, the matmul on bf16 activations."""
    y = torch._weight_int8pack_mm(x.to(torch.bfloat16), q, scale_bf16).float()
    return y if bias is None else y + bias


def prepare(kernel: Int8Kernel, q: torch.Tensor, scale: torch.Tensor,
            bias: Optional[torch.Tensor]) -> Linear:
    """q [N, K] int8, scale [N] in the model dtype -> x [M, K] -> [M, N]."""
    kernel = Int8Kernel(kernel)
    if kernel == Int8Kernel.INT8PACK:
        return lambda x: int8pack_linear(x, q, scale, bias)
    if kernel == Int8Kernel.INT8PACK_BF16:
        scale_bf16 = scale.to(torch.bfloat16)
        return lambda x: int8pack_bf16_linear(x, q, scale_bf16, bias)
    if kernel == Int8Kernel.FBGEMM:
        packed = cpu.fbgemm_pack(q, scale, bias)
        return lambda x: cpu.fbgemm_linear(x, packed)
    if kernel == Int8Kernel.TRITON:
        fn = ops.impl("int8_linear", q.device)
        return lambda x: fn(x, q, scale, bias)
    if kernel == Int8Kernel.DEQUANT:
        return lambda x: ops.dequant_linear(x, q, scale, bias)
    from headroom_sidecar.agent.kernels.reference import int8_linear_ref
    return lambda x: int8_linear_ref(x, q, scale, bias)
