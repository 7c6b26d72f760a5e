"""prune_heads: query heads are physically removed (structured pruning), Llama family.

The attention module is swapped for `PrunedAttention`, which holds sliced copies of the
projections: q_proj rows and o_proj input columns of the kept query heads, k_proj/v_proj rows
of the KV heads still used. A KV head goes only when every query head of its group is pruned.

Uneven groups (e.g. 2 query heads left on one KV head, 3 on another) are handled with an index
map instead of duplicated KV heads: the cache stores each kept KV head once, and `kv_map`
(query head -> kept KV head) expands K/V to one per query head right before attention, which
is what repeat_kv does anyway. When the remaining groups are even, the map is not needed and
the attention backend's own grouped-query path is used.

A layer whose heads are all pruned gets `ZeroAttention`: output o_proj(0) (= its bias, or 0).
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn

from agent.adapters.base import ModelStructure, WeightLayout
from agent.executor.cache_slot import cache_from_kwargs, write_placeholder


def prune_support(structure: ModelStructure) -> str | None:
    """None when prune_heads can run on this model, else why not."""
    attn = structure.blocks[0].attn
    if structure.weight_layout != WeightLayout.OUT_IN or attn.q_proj is None:
        return "needs separate q/k/v nn.Linear projections (Llama family); fused qkv not supported yet"
    if not all(isinstance(m, nn.Linear) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
        return "projections are not nn.Linear"
    mod = sys.modules.get(type(attn.module).__module__)
    if getattr(mod, "apply_rotary_pos_emb", None) is None or not hasattr(attn.module, "config"):
        return f"{type(attn.module).__name__} is not a transformers rotary attention"
    return None


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return lin


def slice_rows(lin: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    rows = rows.to(lin.weight.device)
    return _linear(lin.weight.index_select(0, rows),
                   None if lin.bias is None else lin.bias.index_select(0, rows))


def slice_cols(lin: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    return _linear(lin.weight.index_select(1, cols.to(lin.weight.device)), lin.bias)


def kv_grouping(kept: list[int], group_size: int) -> tuple[list[int], list[int], int]:
    """(kept KV heads, kv_map: kept query head -> position in kept KV heads, even group size
    or 0 when the kept query heads are not evenly grouped)."""
    kept_kv = sorted({h // group_size for h in kept})
    kv_map = [kept_kv.index(h // group_size) for h in kept]
    counts = [kv_map.count(j) for j in range(len(kept_kv))]
    even = counts[0] if len(set(counts)) == 1 else 0
    return kept_kv, kv_map, even


class PrunedAttention(nn.Module):
    """Drop-in for a transformers Llama-family attention with only `kept` query heads."""

    def __init__(self, orig: nn.Module, kept: list[int], structure: ModelStructure):
        super().__init__()
        d, g = structure.head_dim, structure.group_size
        kept_kv, kv_map, even = kv_grouping(kept, g)
        self.config, self.layer_idx, self.head_dim = orig.config, orig.layer_idx, d
        self.scaling, self.is_causal = orig.scaling, True
        self.attention_dropout = getattr(orig, "attention_dropout", 0.0)
        self.sliding_window = (orig.sliding_window if hasattr(orig, "sliding_window")
                               else getattr(orig.config, "sliding_window", None))
        self.kept_heads, self.kept_kv_heads = tuple(kept), tuple(kept_kv)
        # Even groups: the backend repeats each KV head `even` times; else kv_map expands.
        self.num_key_value_groups = even or 1
        self.register_buffer("kv_map", torch.tensor(kv_map, device=orig.o_proj.weight.device),
                             persistent=False)
        self.expand_kv = even == 0
        self.q_proj = slice_rows(orig.q_proj, _head_rows(kept, d))
        self.k_proj = slice_rows(orig.k_proj, _head_rows(kept_kv, d))
        self.v_proj = slice_rows(orig.v_proj, _head_rows(kept_kv, d))
        self.o_proj = slice_cols(orig.o_proj, _head_rows(kept, d))
        mod = sys.modules[type(orig).__module__]
        self._rope: Callable = mod.apply_rotary_pos_emb
        self._eager: Callable = mod.eager_attention_forward

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        cache = cache_from_kwargs(kwargs)
        kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)      # [B, H', T, D]
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)      # [B, KVH', T, D]
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self._rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)    # [B, KVH', S, D]
        if self.expand_kv:
            k, v = k.index_select(1, self.kv_map), v.index_select(1, self.kv_map)  # [B, H', S, D]
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                       self._eager)
        extra = {} if self.sliding_window is None else {"sliding_window": self.sliding_window}
        out, weights = attend(self, q, k, v, attention_mask, scaling=self.scaling,
                              dropout=0.0 if not self.training else self.attention_dropout,
                              **extra, **kwargs)
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()   # [B, T, H' * D]
        return self.o_proj(out), weights

    def extra_repr(self) -> str:
        return f"kept_heads={list(self.kept_heads)}, kept_kv_heads={list(self.kept_kv_heads)}"


class ZeroAttention(nn.Module):
    """An attention whose every head is pruned: contributes o_proj(0), i.e. its bias or 0."""

    def __init__(self, orig: nn.Module, hidden_size: int):
        super().__init__()
        self.layer_idx = getattr(orig, "layer_idx", None)
        self.hidden_size = hidden_size
        bias = getattr(orig.o_proj, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        write_placeholder(cache_from_kwargs(kwargs), self.layer_idx, hidden_states)
        out = hidden_states.new_zeros(*hidden_states.shape[:-1], self.hidden_size)
        return (out if self.bias is None else out + self.bias), None
