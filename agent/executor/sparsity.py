"""activation_sparsity: MLP activations (the input of down_proj) with |a| < threshold are zeroed.

The down projection is swapped for `SparseDownProj`, which wraps the original module (so the
same weights, and any hook on it, still see the activation, now sparsified). Wrapping the
down projection rather than the whole MLP works for every MLP shape the adapters describe
(gated SwiGLU, GPT-2 c_fc/c_proj, gpt-fast w1/w2/w3): the activation is by definition its input.

Decode fast path (one token, opt-in): only the columns of the down weight whose activation
survives are read: y = a[kept] @ W[:, kept].T. On the 2-core CPU this was measured slower
than the dense GEMV at SmolLM2's size (gathering costs more than it saves), so it is off by
default; a fused sparse GEMV kernel comes later.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agent.executor.int8 import Int8Linear


class SparseDownProj(nn.Module):
    def __init__(self, inner: nn.Module, threshold: float, weight_in_out: bool,
                 decode_gather: bool = False):
        super().__init__()
        self.inner = inner
        self.threshold = float(threshold)
        self.weight_in_out = weight_in_out    # GPT-2 Conv1D keeps its weight as [in, out]
        self.decode_gather = decode_gather

    def sparsify(self, a: torch.Tensor) -> torch.Tensor:
        return a.masked_fill(a.abs() < self.threshold, 0)

    def forward(self, a: torch.Tensor) -> torch.Tensor:         # a [B, T, I]
        a = self.sparsify(a)
        if self.decode_gather and a.shape[:-1].numel() == 1:
            return self.gathered(a)
        return self.inner(a)

    def gathered(self, a: torch.Tensor) -> torch.Tensor:
        """One token: only the kept activations and their weight columns take part."""
        flat = a.reshape(-1)                                           # [I]
        kept = flat.nonzero().squeeze(1)                               # [K]
        w = self._weight_columns(kept)                                 # [out, K]
        y = F.linear(flat.index_select(0, kept).unsqueeze(0), w)       # [1, out]
        bias = getattr(self.inner, "bias", None)
        if bias is not None:
            y = y + bias
        return y.reshape(*a.shape[:-1], -1)

    def _weight_columns(self, kept: torch.Tensor) -> torch.Tensor:
        if isinstance(self.inner, Int8Linear):
            return self.inner.dequantized(kept)
        w = self.inner.weight
        return w.index_select(0, kept).t() if self.weight_in_out else w.index_select(1, kept)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}, decode_gather={self.decode_gather}"
