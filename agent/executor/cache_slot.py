"""Keeps a transformers KV cache consistent for a layer whose attention no longer runs.

transformers reads the sequence length (positions, mask sizes) from the first attention
layer's cache entry. A layer that is skipped, or whose heads are all pruned, still writes a
one-element-per-token placeholder there, so every other layer's cache keeps working; the
cost is B * T * 2 elements per such layer, against B * KVH * T * D * 2 for a real entry.
"""
from __future__ import annotations

import torch


def cache_from_kwargs(kwargs: dict):
    cache = kwargs.get("cache", None)
    return cache if cache is not None else kwargs.get("past_key_values", None)


def write_placeholder(cache, layer_idx: int, hidden: torch.Tensor) -> None:
    """Records `hidden`'s T new positions in `cache` for `layer_idx` without storing keys."""
    if cache is None or not hasattr(cache, "update") or layer_idx is None:
        return
    b, t = hidden.shape[:2]
    z = hidden.new_zeros(b, 1, t, 1)   # [B, 1 head, T, 1]
    cache.update(z, z, layer_idx)
