"""Hugging Face GPT-2 (GPT2LMHeadModel): fused qkv Conv1D, learned positions, ungated MLP."""
from __future__ import annotations

import torch
from torch import nn

from headroom_sidecar.agent.adapters.base import (Adapter, AttentionRefs, BlockRefs, MlpRefs, ModelStructure,
                                 UnsupportedModelError, WeightLayout, require)
from headroom_sidecar.agent.adapters.hf_llama import _cache_keys


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    h = kwargs.get("hidden_states", args[0] if args else None)
    if h is None:
        raise UnsupportedModelError("gpt2 attention hook: no hidden_states argument")
    return h


def _self_attention_cache(kwargs: dict):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    # Models built with cross-attention wrap the self-attention cache in an EncoderDecoderCache.
    return getattr(cache, "self_attention_cache", cache)


def gpt2_qk_probe(attn: nn.Module, args: tuple, kwargs: dict):
    """q [B, H, T, D] for this forward's tokens, k [B, H, S, D] for every key (no RoPE in GPT-2)."""
    h = _hidden_states(args, kwargs)                                # [B, T, hidden]
    q, k_new, _ = attn.c_attn(h).split(attn.split_size, dim=2)      # each [B, T, H * D]
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q = q.view(shape).transpose(1, 2)                               # [B, H, T, D]
    k_new = k_new.view(shape).transpose(1, 2)
    k_all = _cache_keys(_self_attention_cache(kwargs), attn.layer_idx)
    return q, (k_new if k_all is None else k_all)


class GPT2Adapter(Adapter):
    name = "hf-gpt2"

    def matches(self, model: nn.Module) -> bool:
        blocks = getattr(getattr(model, "transformer", None), "h", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            return False
        attn, mlp = getattr(blocks[0], "attn", None), getattr(blocks[0], "mlp", None)
        return hasattr(attn, "c_attn") and hasattr(attn, "c_proj") and hasattr(mlp, "c_fc")

    def structure(self, model: nn.Module) -> ModelStructure:
        cfg = require(model, "config", "gpt2 adapter")
        heads, hidden = cfg.n_head, cfg.n_embd
        layers = model.transformer.h
        return ModelStructure(
            architecture=type(model).__name__, num_layers=len(layers), num_heads=heads,
            num_kv_heads=heads, head_dim=hidden // heads, hidden_size=hidden,
            intermediate_size=getattr(cfg, "n_inner", None) or 4 * hidden,
            blocks=tuple(self._block(i, layer) for i, layer in enumerate(layers)),
            layers=layers, weight_layout=WeightLayout.IN_OUT, qk_probe=gpt2_qk_probe,
            name=str(getattr(cfg, "name_or_path", "") or ""), padding_source=model.transformer)

    @staticmethod
    def _block(i: int, layer: nn.Module) -> BlockRefs:
        where = f"gpt2 adapter, transformer.h[{i}]"
        attn, mlp = require(layer, "attn", where), require(layer, "mlp", where)
        return BlockRefs(
            index=i, module=layer,
            attn=AttentionRefs(module=attn, o_proj=require(attn, "c_proj", where + ".attn"),
                               qkv_proj=require(attn, "c_attn", where + ".attn")),
            mlp=MlpRefs(module=mlp, up_proj=require(mlp, "c_fc", where + ".mlp"),
                        down_proj=require(mlp, "c_proj", where + ".mlp")))
