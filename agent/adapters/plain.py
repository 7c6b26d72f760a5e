"""Hand-written PyTorch transformers in the gpt-fast layout.

    model.layers[i].attention.wqkv / .wo      fused q|k|v projection, output projection
    model.layers[i].feed_forward.w1 / w3 / w2 gate, up, down (SwiGLU)
    model.config.n_head / n_local_heads / head_dim / dim / intermediate_size

The attention's forward receives `freqs_cis` (RoPE tables for this forward's positions) and the
model's module defines `apply_rotary_emb(x [B, T, H, D], freqs_cis)`, as gpt-fast's does.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from headroom_sidecar.agent.adapters.base import (Adapter, AttentionRefs, BlockRefs, MlpRefs, ModelStructure,
                                 UnsupportedModelError, WeightLayout, require)


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> torch.Tensor:
    value = kwargs.get(name, args[index] if len(args) > index else None)
    if value is None:
        raise UnsupportedModelError(f"plain attention hook: no {name!r} argument (position {index})")
    return value


def _rope(attn: nn.Module):
    fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_emb", None)
    if fn is None:
        raise UnsupportedModelError(f"{type(attn).__module__}: no apply_rotary_emb for the plain adapter")
    return fn


def plain_qk_probe(attn: nn.Module, args: tuple, kwargs: dict):
    """q [B, H, T, D], k [B, KVH, T, D] recomputed from the attention's input.

    Only full forwards are supported (keys = this forward's tokens); a model with its own KV
    cache needs an adapter that reads the cache.
    """
    x = _arg(args, kwargs, 0, "x")                                   # [B, T, dim]
    freqs_cis = _arg(args, kwargs, 1, "freqs_cis")
    bsz, seqlen, _ = x.shape
    q_size, kv_size = attn.n_head * attn.head_dim, attn.n_local_heads * attn.head_dim
    q, k, _ = attn.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
    rope = _rope(attn)
    q = rope(q.view(bsz, seqlen, attn.n_head, attn.head_dim), freqs_cis)
    k = rope(k.view(bsz, seqlen, attn.n_local_heads, attn.head_dim), freqs_cis)
    return q.transpose(1, 2), k.transpose(1, 2)


class PlainAdapter(Adapter):
    name = "plain-gpt-fast"

    def matches(self, model: nn.Module) -> bool:
        layers = getattr(model, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            return False
        attn, ff = getattr(layers[0], "attention", None), getattr(layers[0], "feed_forward", None)
        return hasattr(attn, "wqkv") and hasattr(attn, "wo") and hasattr(ff, "w2")

    def structure(self, model: nn.Module) -> ModelStructure:
        cfg = require(model, "config", "plain adapter")
        where = "plain adapter, model.config"
        heads = require(cfg, "n_head", where)
        kv_heads = getattr(cfg, "n_local_heads", None)
        kv_heads = heads if kv_heads is None or kv_heads <= 0 else kv_heads  # gpt-fast: -1 = n_head
        hidden = require(cfg, "dim", where)
        return ModelStructure(
            architecture=type(model).__name__, num_layers=len(model.layers), num_heads=heads,
            num_kv_heads=kv_heads, head_dim=getattr(cfg, "head_dim", None) or hidden // heads,
            hidden_size=hidden, intermediate_size=require(cfg, "intermediate_size", where),
            blocks=tuple(self._block(i, layer) for i, layer in enumerate(model.layers)),
            layers=model.layers, weight_layout=WeightLayout.OUT_IN, qk_probe=plain_qk_probe,
            name=str(getattr(cfg, "name", "") or ""))

    @staticmethod
    def _block(i: int, layer: nn.Module) -> BlockRefs:
        where = f"plain adapter, layers[{i}]"
        attn = require(layer, "attention", where)
        ff = require(layer, "feed_forward", where)
        return BlockRefs(
            index=i, module=layer,
            attn=AttentionRefs(module=attn, o_proj=require(attn, "wo", where + ".attention"),
                               qkv_proj=require(attn, "wqkv", where + ".attention")),
            mlp=MlpRefs(module=ff, up_proj=require(ff, "w3", where + ".feed_forward"),
                        down_proj=require(ff, "w2", where + ".feed_forward"),
                        gate_proj=require(ff, "w1", where + ".feed_forward")))
