"""skip_layers: a whole transformer block is swapped for one that returns its input."""
from __future__ import annotations

import torch
from torch import nn

from headroom_sidecar.agent.adapters.base import ModelStructure
from headroom_sidecar.agent.executor.cache_slot import cache_from_kwargs, write_placeholder
from headroom_sidecar.agent.executor.undo import UndoLog


class IdentityBlock(nn.Module):
    """Returns the hidden states it is given, as a transformers decoder layer does (a tensor).

    Keeps the KV cache's bookkeeping for its layer (see cache_slot) so generate() still works.
    """

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, *args, **kwargs) -> torch.Tensor:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, T, hidden]
        write_placeholder(cache_from_kwargs(kwargs), self.layer_idx, hidden)
        return hidden

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


def cache_layer_index(block: nn.Module, attn: nn.Module, fallback: int) -> int:
    """The index the model's KV cache uses for this block (HF attention carries layer_idx)."""
    idx = getattr(attn, "layer_idx", None)
    return fallback if idx is None else int(idx)


def apply_skip(structure: ModelStructure, layers: tuple[int, ...], log: UndoLog) -> None:
    for i in layers:
        block = structure.blocks[i]
        idx = cache_layer_index(block.module, block.attn.module, i)
        log.swap(structure.layers, str(i), IdentityBlock(idx))
