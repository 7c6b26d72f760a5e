"""The fp32 linear kernels of `weight_precision: fp32_packed`, by name, as a probe runner.

The weights stay fp32; only the layout and the GEMM that reads them change:
- onednn_packed: the weight reordered once into oneDNN's blocked layout
  (torch.ops.mkldnn._reorder_linear_weight), multiplied by oneDNN's inner product
  (torch.ops.mkldnn._linear_pointwise): the ops inductor's CPU weight freezing uses. Where the
  default BLAS has no fast path for a few rows, it keeps a verify forward of a speculative
  draft close to a decode step (bench/verify_cost.py).
- aten: F.linear on the weight as it is (MKL or OpenBLAS): the fallback, never probed.
Both are fp32 all the way: they differ from each other only in summation order.

`prepare(kernel, q, scale, bias)` is the probe runner's protocol (agent/kernels/probe.py: the
child checks x @ (q * scale).T + bias against the reference); `pack(kernel, w, bias)` is what a
layer holds.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

Linear = Callable[[torch.Tensor], torch.Tensor]
# A decode step, and a verify forward of a draft of 7 tokens: a layer is timed at both.
TIMING_ROWS = (1, 8)


class DenseKernel(str, enum.Enum):
    ONEDNN_PACKED = "onednn_packed"
    ATEN = "aten"


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def rel_error_bound(kernel: DenseKernel, dtype: torch.dtype) -> float:
    """||y - ref|| / ||ref|| allowed (ref in fp64): fp32 summation order only."""
    return 1e-5


@dataclass(frozen=True)
class Packed:
    fn: Linear                   # x [..., K] fp32 -> [..., N] fp32
    nbytes: int                  # what the held layout takes (blocked layouts pad)
    held: torch.Tensor           # the weight in that layout (an opaque mkldnn tensor, or w)


def pack(kernel: DenseKernel, w: torch.Tensor, bias: Optional[torch.Tensor]) -> Packed:
    """w [N, K] fp32 -> the layout and function of `kernel`."""
    kernel = DenseKernel(kernel)
    if kernel == DenseKernel.ONEDNN_PACKED:
        if w.dtype != torch.float32 or w.device.type != "cpu":
            raise ValueError(f"onednn_packed needs fp32 CPU weights, got {w.dtype} on {w.device}")
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous())
        b = None if bias is None else bias.detach()
        return Packed(lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""),
                      int(torch.ops.mkldnn._nbytes(packed)), packed)
    return Packed(lambda x: F.linear(x, w, bias), w.numel() * w.element_size(), w)


def prepare(kernel: str, q: torch.Tensor, scale: torch.Tensor,
            bias: Optional[torch.Tensor]) -> Linear:
    """Probe runner: the weight q * scale[:, None] in fp32, through `kernel`."""
    w = q.float() * scale.float()[:, None]
    return pack(DenseKernel(kernel), w, None if bias is None else bias.float()).fn
