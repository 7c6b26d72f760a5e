"""Hugging Face Llama-family causal LMs: Llama, Mistral, Qwen2, SmolLM (same module layout)."""
from __future__ import annotations

import sys

import torch
from torch import nn

from agent.adapters.base import (Adapter, AttentionRefs, BlockRefs, MlpRefs, ModelStructure,
                                 UnsupportedModelError, WeightLayout, require)


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    h = kwargs.get("hidden_states", args[0] if args else None)
    if h is None:
        raise UnsupportedModelError("attention hook: no hidden_states argument")
    return h


def _cache_keys(cache, layer_idx: int) -> torch.Tensor | None:
    """Keys the layer attends to, read from a transformers Cache after its update; or None."""
    layers = getattr(cache, "layers", None)
    if cache is None or layers is None or layer_idx >= len(layers):
        return None
    keys = getattr(layers[layer_idx], "keys", None)
    if keys is None or keys.numel() == 0:
        return None
    seq_len = cache.get_seq_length(layer_idx)  # static caches are preallocated past this
    return keys[..., :seq_len, :]


def _rope(attn: nn.Module):
    # Each HF model file defines its own apply_rotary_pos_emb with the same signature.
    fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise UnsupportedModelError(f"{type(attn).__module__}: no apply_rotary_pos_emb")
    return fn


def llama_qk_probe(attn: nn.Module, args: tuple, kwargs: dict):
    """q [B, H, T, D] for this forward's tokens and k [B, KVH, S, D] for every cached token."""
    h = _hidden_states(args, kwargs)                       # [B, T, hidden]
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)          # [B, H, T, D]
    k_new = attn.k_proj(h).view(shape).transpose(1, 2)      # [B, KVH, T, D]
    cos, sin = kwargs["position_embeddings"]
    q, k_new = _rope(attn)(q, k_new, cos, sin)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    k_all = _cache_keys(cache, attn.layer_idx)
    return q, (k_new if k_all is None else k_all)


class HFLlamaAdapter(Adapter):
    name = "hf-llama-family"

    def matches(self, model: nn.Module) -> bool:
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            return False
        first = layers[0]
        attn, mlp = getattr(first, "self_attn", None), getattr(first, "mlp", None)
        return hasattr(attn, "q_proj") and hasattr(attn, "o_proj") and hasattr(mlp, "gate_proj")

    def structure(self, model: nn.Module) -> ModelStructure:
        cfg = require(model, "config", "hf-llama adapter")
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        layers = model.model.layers
        blocks = tuple(self._block(i, layer) for i, layer in enumerate(layers))
        return ModelStructure(
            architecture=type(model).__name__, num_layers=len(layers), num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size, blocks=blocks, layers=layers,
            weight_layout=WeightLayout.OUT_IN, qk_probe=llama_qk_probe,
            name=str(getattr(cfg, "name_or_path", "") or ""))

    @staticmethod
    def _block(i: int, layer: nn.Module) -> BlockRefs:
        where = f"hf-llama adapter, layer {i}"
        attn = require(layer, "self_attn", where)
        mlp = require(layer, "mlp", where)
        return BlockRefs(
            index=i, module=layer,
            attn=AttentionRefs(module=attn, o_proj=require(attn, "o_proj", where),
                               q_proj=require(attn, "q_proj", where),
                               k_proj=require(attn, "k_proj", where),
                               v_proj=require(attn, "v_proj", where)),
            mlp=MlpRefs(module=mlp, up_proj=require(mlp, "up_proj", where),
                        down_proj=require(mlp, "down_proj", where),
                        gate_proj=require(mlp, "gate_proj", where)))
