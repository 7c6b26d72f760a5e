"""weight_precision int8: weight-only int8 with one scale per output channel.

The live module holds only the int8 weight and the scales (1 byte per weight instead of 2-4);
the fp weight goes to the undo log on the host CPU. The matmul dequantises on the fly:
- bf16/fp16 activations: torch._weight_int8pack_mm (a fused int8-weight kernel), when this
  torch build has it for the device;
- otherwise y = (x @ q.T) * scale, with q cast to x's dtype in chunks of output rows so the
  transient fp copy stays small.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agent.adapters.base import WeightLayout

_CHUNK_ROWS = 4096          # output rows dequantised at a time: bounds the transient fp copy
_QMAX = 127.0               # symmetric: -127..127, so the scale maps max|w| exactly


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int8 [out, in], scale [out]) with w ≈ q * scale[:, None]."""
    w32 = w.detach().to(torch.float32)
    scale = (w32.abs().amax(dim=1) / _QMAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w32 / scale[:, None]).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q, scale.to(w.dtype)


def _int8pack_ok(device: torch.device, dtype: torch.dtype) -> bool:
    if dtype not in (torch.bfloat16, torch.float16) or not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        x = torch.ones(1, 8, dtype=dtype, device=device)
        q = torch.ones(8, 8, dtype=torch.int8, device=device)
        torch._weight_int8pack_mm(x, q, torch.ones(8, dtype=dtype, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T + bias, for x [..., in]."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight_int8", q)        # [out, in] int8
        self.register_buffer("scale", scale)          # [out], the original weight dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.use_int8pack = _int8pack_ok(q.device, scale.dtype)

    @staticmethod
    def from_module(module: nn.Module, layout: WeightLayout) -> "Int8Linear":
        """From an nn.Linear ([out, in]) or a GPT-2 style Conv1D ([in, out], WeightLayout.IN_OUT)."""
        w = module.weight.detach()
        w = w.t() if layout == WeightLayout.IN_OUT and not isinstance(module, nn.Linear) else w
        q, scale = quantize_per_channel(w)
        return Int8Linear(q, scale, getattr(module, "bias", None))

    def dequantized(self, cols: torch.Tensor | None = None) -> torch.Tensor:
        """The fp weight [out, in] (or its `cols` input columns) — for the sparse gather path."""
        q = self.weight_int8 if cols is None else self.weight_int8.index_select(1, cols)
        return q.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                  # [N, in]
        if self.use_int8pack and x2.dtype == self.scale.dtype:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scale)
        else:
            y = torch.cat([F.linear(x2, self.weight_int8[r:r + _CHUNK_ROWS].to(x2.dtype))
                           for r in range(0, self.out_features, _CHUNK_ROWS)], dim=-1)
            y = y * self.scale.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)              # [..., out]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int8pack={self.use_int8pack}")
