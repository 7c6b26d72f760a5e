"""Plain PyTorch references: the definition every kernel is tested against.

Both compute in fp32 and return the activation dtype, like the kernels do.
"""
from __future__ import annotations

import torch


def int8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] fp, q [N, K] int8, scale [N] -> [M, N] = x @ (q * scale[:, None]).T + bias."""
    y = (x.float() @ q.float().t()) * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def sparse_gemv_ref(a: torch.Tensor, w_t: torch.Tensor, scale: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, I] (mostly zeros), w_t [I, O] fp or int8 -> [M, O] = a @ w_t * scale + bias.
    `scale` [O] is the per-output-channel scale of an int8 w_t."""
    y = a.float() @ w_t.float()
    if scale is not None:
        y = y * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(a.dtype)
