"""prune_heads: query heads are physically removed (structured pruning), transformers
attentions with separate q/k/v projections and rotary embeddings (Llama, Mistral, Qwen2/3,
Gemma2/3, Mixtral's attention, ...).

`PrunedAttention` reproduces each kept head exactly: q/k norms, the module's scaling, sliding
window and attention-logit soft-capping. A q/k norm over one head's features (Qwen3, Gemma3)
applies to the sliced projection. A norm over the whole projection (OLMo2) mixes every head's
statistics, so its projection stays whole (q_proj, k_proj not sliced: no saving there) and the
kept heads are selected after the norm; v_proj, o_proj, the attention and the KV cache still
shrink. What it cannot reproduce is refused by `prune_support` before any weight is touched:
fused qkv, an attention child or attribute it does not know, a norm of any other width.

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

import copy
import functools
import inspect
import sys
from typing import Callable

import torch
from torch import nn

from headroom_sidecar.agent.adapters.base import ModelStructure, WeightLayout
from headroom_sidecar.agent.executor.cache_slot import cache_from_kwargs, write_placeholder


# What PrunedAttention reproduces of a transformers attention, per head. Anything else on the
# module (a child or a plain attribute) could change the computation in a way slicing heads
# does not reproduce, so prune_support refuses it rather than guess.
_KNOWN_CHILDREN = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"})
_KNOWN_ATTRS = frozenset({"attention_dropout", "config", "head_dim", "is_causal", "layer_idx",
                          "layer_type", "num_key_value_groups", "num_key_value_heads", "scaling",
                          "sliding_window", "is_sliding", "attn_logit_softcapping", "training"})
_QK_NORMS = ("q_norm", "k_norm")


def prune_support(structure: ModelStructure) -> str | None:
    """None when prune_heads can run exactly on this model, else why not."""
    attn = structure.blocks[0].attn
    if structure.weight_layout != WeightLayout.OUT_IN or attn.q_proj is None:
        return "needs separate q/k/v nn.Linear projections (Llama family); fused qkv not supported yet"
    if not all(isinstance(m, nn.Linear) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
        return "projections are not nn.Linear"
    mod = sys.modules.get(type(attn.module).__module__)
    if getattr(mod, "apply_rotary_pos_emb", None) is None or not hasattr(attn.module, "config"):
        return f"{type(attn.module).__name__} is not a transformers rotary attention"
    for block in structure.blocks:
        reason = _attention_reason(block.attn.module, structure.head_dim)
        if reason:
            return f"layer {block.index}: {reason}"
    return None


def _attention_reason(attn: nn.Module, head_dim: int) -> str | None:
    """Why pruned attention would not reproduce this attention exactly, or None."""
    name = type(attn).__name__
    unknown = sorted({n for n, _ in attn.named_children()} - _KNOWN_CHILDREN)
    unknown += sorted(k for k in vars(attn) if not k.startswith("_") and k not in _KNOWN_ATTRS)
    if unknown:
        return (f"{name} has {unknown}, which pruned attention does not reproduce; "
                "refused rather than risk an inexact result")
    if getattr(attn, "attn_logit_softcapping", None) is not None \
            and _forward_source(type(attn)) is None:
        return f"{name}: no source to tell whether its attn_logit_softcapping is applied"
    return _norm_reason(attn, head_dim)


def _norm_reason(attn: nn.Module, head_dim: int) -> str | None:
    """q/k norms must span one head (Qwen3, Gemma3) or the whole projection (OLMo2), both alike."""
    name = type(attn).__name__
    for norm_name, proj_name in zip(_QK_NORMS, ("q_proj", "k_proj")):
        norm = getattr(attn, norm_name, None)
        if norm is not None and _norm_width(norm) not in (head_dim, _out(attn, proj_name)):
            return (f"{name}.{norm_name} normalises {_norm_width(norm)} features: neither one "
                    f"head ({head_dim}) nor the whole {proj_name} ({_out(attn, proj_name)}), "
                    "so pruned attention cannot reproduce it")
    per_head = {_norm_width(n) == head_dim for n in (getattr(attn, m, None) for m in _QK_NORMS)
                if n is not None}
    if len(per_head) > 1:
        return f"{name}: one q/k norm is per head, the other over the whole projection"
    return None


@functools.lru_cache(maxsize=None)
def _forward_source(cls: type) -> str | None:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None


def attention_softcap(attn: nn.Module) -> float | None:
    """The logit cap the attention applies: Gemma2 passes attn_logit_softcapping to the
    attention function; Gemma3 has the attribute but does not use it."""
    cap = getattr(attn, "attn_logit_softcapping", None)
    src = _forward_source(type(attn)) or ""
    return cap if cap is not None and "self.attn_logit_softcapping" in src else None


def _norm_width(norm: nn.Module) -> int | None:
    """Features a q/k norm normalises together: the size of its weight (None: no weight)."""
    w = getattr(norm, "weight", None)
    return int(w.shape[-1]) if isinstance(w, torch.Tensor) and w.dim() == 1 else None


def _out(attn: nn.Module, proj_name: str) -> int:
    return getattr(attn, proj_name).weight.shape[0]


def whole_projection_norm(orig: nn.Module, head_dim: int) -> bool:
    """True when a q/k norm spans the whole projection (OLMo2), not one head."""
    norms = [getattr(orig, n, None) for n in _QK_NORMS]
    return any(n is not None and _norm_width(n) != head_dim for n in norms)


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
    """Drop-in for a transformers Llama-family attention with only `kept` query heads.

    Reproduces, per kept head, what the original does (see prune_support for what is
    refused): q/k norms per head (Qwen3, Gemma3) or over the projection (OLMo2), rotary
    embedding, the KV cache, the module's scaling, causality, sliding window (Mistral,
    Gemma2/3) and attention-logit soft-capping (Gemma2)."""

    def __init__(self, orig: nn.Module, kept: list[int], structure: ModelStructure):
        super().__init__()
        d, g = structure.head_dim, structure.group_size
        kept_kv, kv_map, even = kv_grouping(kept, g)
        self.config, self.layer_idx, self.head_dim = orig.config, orig.layer_idx, d
        self.scaling, self.is_causal = orig.scaling, getattr(orig, "is_causal", True)
        self.attention_dropout = getattr(orig, "attention_dropout", 0.0)
        self.sliding_window = (orig.sliding_window if hasattr(orig, "sliding_window")
                               else getattr(orig.config, "sliding_window", None))
        self.softcap = attention_softcap(orig)
        for attr in ("layer_type", "is_sliding"):       # read by some attention backends
            if hasattr(orig, attr):
                setattr(self, attr, getattr(orig, attr))
        self.kept_heads, self.kept_kv_heads = tuple(kept), tuple(kept_kv)
        # Even groups: the backend repeats each KV head `even` times; else kv_map expands.
        self.num_key_value_groups = even or 1
        self.register_buffer("kv_map", torch.tensor(kv_map, device=orig.o_proj.weight.device),
                             persistent=False)
        self.expand_kv = even == 0
        self._projections(orig, kept, kept_kv)
        # Copies: the undo log may park the original attention on another device.
        self.q_norm = _copy_or_none(getattr(orig, "q_norm", None))
        self.k_norm = _copy_or_none(getattr(orig, "k_norm", None))
        mod = sys.modules[type(orig).__module__]
        self._rope: Callable = mod.apply_rotary_pos_emb
        self._eager: Callable = mod.eager_attention_forward

    def _projections(self, orig: nn.Module, kept: list[int], kept_kv: list[int]) -> None:
        """Sliced copies of q/k/v/o. Whole-projection norms (OLMo2) need every head's
        features: q/k then stay whole, and q_keep / k_keep pick the kept heads after the norm."""
        d, device = self.head_dim, orig.o_proj.weight.device
        self.whole_norm = whole_projection_norm(orig, d)
        for name, heads in (("q", kept), ("k", kept_kv)):
            proj = getattr(orig, f"{name}_proj")
            rows = torch.arange(proj.weight.shape[0]) if self.whole_norm else _head_rows(heads, d)
            setattr(self, f"{name}_proj", slice_rows(proj, rows))
            self.register_buffer(f"{name}_keep", torch.tensor(heads, device=device)
                                 if self.whole_norm else None, persistent=False)
        self.v_proj = slice_rows(orig.v_proj, _head_rows(kept_kv, d))
        self.o_proj = slice_cols(orig.o_proj, _head_rows(kept, d))

    def _heads(self, proj: nn.Linear, norm: nn.Module | None, x: torch.Tensor,
               keep: torch.Tensor | None = None) -> torch.Tensor:
        if keep is None:                  # sliced projection; a norm (if any) is per head
            y = proj(x).view(*x.shape[:-1], -1, self.head_dim)          # [B, T, H', D]
            y = y if norm is None else norm(y)
        else:                             # whole projection, norm over it, then kept heads
            y = proj(x)                                                 # [B, T, H * D]
            y = (y if norm is None else norm(y)).view(*x.shape[:-1], -1, self.head_dim)
            y = y.index_select(-2, keep)                                # [B, T, H', D]
        return y.transpose(1, 2)                                        # [B, H', T, D]

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        cache = cache_from_kwargs(kwargs)
        kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
        q = self._heads(self.q_proj, self.q_norm, hidden_states, self.q_keep)  # [B, H', T, D]
        k = self._heads(self.k_proj, self.k_norm, hidden_states, self.k_keep)  # [B, KVH', T, D]
        v = self._heads(self.v_proj, None, hidden_states)
        cos, sin = position_embeddings
        q, k = self._rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)    # [B, KVH', S, D]
        if self.expand_kv:
            k, v = k.index_select(1, self.kv_map), v.index_select(1, self.kv_map)  # [B, H', S, D]
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                       self._eager)
        out, weights = attend(self, q, k, v, attention_mask, scaling=self.scaling,
                              dropout=0.0 if not self.training else self.attention_dropout,
                              **self._extra(), **kwargs)
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()   # [B, T, H' * D]
        return self.o_proj(out), weights

    def _extra(self) -> dict:
        """Keyword arguments the original passes only when it has the feature."""
        extra = {} if self.sliding_window is None else {"sliding_window": self.sliding_window}
        return extra if self.softcap is None else {**extra, "softcap": self.softcap}

    def extra_repr(self) -> str:
        return f"kept_heads={list(self.kept_heads)}, kept_kv_heads={list(self.kept_kv_heads)}"


def _copy_or_none(module: nn.Module | None) -> nn.Module | None:
    return None if module is None else copy.deepcopy(module)


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
