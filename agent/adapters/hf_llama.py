"""Hugging Face Llama-family causal LMs: Llama, Mistral, Qwen2/3, Gemma2/3, OLMo2, SmolLM.

Same module layout (model.layers[i].self_attn.q/k/v/o_proj, mlp.gate/up/down_proj). Traced
attention statistics come from the probabilities the attention returns under eager attention;
under sdpa / flash they are re-derived by `llama_qk_probe`, which reproduces only the attention
classes in `PROBED_ATTENTION` (their q/k norms and RoPE). Any other class in this layout is
accepted only with eager attention, and refused otherwise (UnsupportedModelError at attach).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from headroom_sidecar.agent.adapters.base import (Adapter, AttentionRefs, BlockRefs, MlpRefs, ModelStructure,
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


def attended_keys(kwargs: dict, layer_idx: int, k_new: torch.Tensor) -> torch.Tensor:
    """Keys this forward attended to: this forward's own without a cache, else the cache's
    after its update. A sliding-window cache keeps only the last window - 1 keys: in a prefill
    (nothing cached before) the forward attended to all of k_new; once it has dropped keys
    with a past, the keys attended are gone and the statistic is refused."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    cache = getattr(cache, "self_attention_cache", cache)
    k_all = _cache_keys(cache, layer_idx)
    if k_all is None:
        return k_new
    layer = cache.layers[layer_idx]
    if getattr(layer, "is_sliding", False):
        seen = getattr(layer, "cumulative_length", None)             # tokens ever cached
        if seen == k_new.shape[-2]:
            return k_new                                             # prefill: nothing before
        if seen is None or seen > k_all.shape[-2]:
            raise UnsupportedModelError(
                f"{type(layer).__name__} of layer {layer_idx} dropped keys this forward attended "
                f"to; attention statistics past the sliding window need attn_implementation='eager'")
    return k_all


def _rope(attn: nn.Module):
    # Each HF model file defines its own apply_rotary_pos_emb with the same signature.
    fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise UnsupportedModelError(f"{type(attn).__module__}: no apply_rotary_pos_emb")
    return fn


# Attention classes whose scores llama_qk_probe reproduces (tests/agent/observe/test_eager_parity.py):
# the rest of the score (scale, soft-cap, mask incl. sliding window) is read from the module
# and the attention_mask it receives.
PROBED_ATTENTION = frozenset({
    "LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "Gemma2Attention",
    "Gemma3Attention", "Olmo2Attention"})


def _normed(attn: nn.Module, name: str, x: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Projection output [B, T, n * D] -> [B, n, T, D] after the module's q/k norm, if any:
    per head (Qwen3, Gemma3: weight [D]) or over the whole projection (OLMo2: weight [n * D])."""
    norm = getattr(attn, name, None)
    if norm is not None and norm.weight.numel() != attn.head_dim:
        x = norm(x)                                          # whole-projection norm, then split
        norm = None
    x = x.view(shape)                                        # [B, T, n, D]
    if norm is not None:
        x = norm(x)
    return x.transpose(1, 2)


def llama_qk_probe(attn: nn.Module, args: tuple, kwargs: dict):
    """q [B, H, T, D] for this forward's tokens and k [B, KVH, S, D] for every cached token."""
    h = _hidden_states(args, kwargs)                       # [B, T, hidden]
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q = _normed(attn, "q_norm", attn.q_proj(h), shape)      # [B, H, T, D]
    k_new = _normed(attn, "k_norm", attn.k_proj(h), shape)  # [B, KVH, T, D]
    cos, sin = kwargs["position_embeddings"]
    q, k_new = _rope(attn)(q, k_new, cos, sin)
    return q, attended_keys(kwargs, attn.layer_idx, k_new)


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
            weight_layout=WeightLayout.OUT_IN, qk_probe=probe_or_refuse(model, blocks),
            name=str(getattr(cfg, "name_or_path", "") or ""), padding_source=model.model)

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


def probe_or_refuse(model: nn.Module, blocks, probed: frozenset = PROBED_ATTENTION, probe=llama_qk_probe):
    """The probe when every attention class is one it reproduces; None (statistics from the
    eager probabilities) under eager attention; else UnsupportedModelError."""
    unknown = sorted({type(b.attn.module).__name__ for b in blocks} - probed)
    if not unknown:
        return probe
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl == "eager":
        return None
    raise UnsupportedModelError(
        f"{type(model).__name__}: headroom cannot reproduce the attention scores of "
        f"{', '.join(unknown)} under attn_implementation={impl!r} (it returns no probabilities "
        f"and its q/k computation is not one headroom knows); load the model with "
        f"attn_implementation='eager' or register an adapter with a qk_probe")
