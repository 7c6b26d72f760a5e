"""Hugging Face Phi-3 (Phi3ForCausalLM): fused qkv_proj (q|k|v) and fused gate_up_proj.

Roles for the executor: qkv = qkv_proj, o = o_proj, up = gate_up_proj (the fused gate|up,
hidden -> 2 x intermediate; gate_proj None), down = down_proj. Head pruning is refused by the
executor (it needs separate q/k/v projections); the MLP statistics read down_proj's input,
which is act(gate) * up exactly as for a separate gate/up MLP.
"""
from __future__ import annotations

from torch import nn

from headroom_sidecar.agent.adapters.base import (Adapter, AttentionRefs, BlockRefs, MlpRefs, ModelStructure,
                                 WeightLayout, require)
from headroom_sidecar.agent.adapters.hf_llama import _hidden_states, _rope, attended_keys, probe_or_refuse


def phi3_qk_probe(attn: nn.Module, args: tuple, kwargs: dict):
    """q [B, H, T, D] for this forward's tokens and k [B, KVH, S, D] for every cached token."""
    h = _hidden_states(args, kwargs)                               # [B, T, hidden]
    q_size = attn.config.num_attention_heads * attn.head_dim
    kv_size = attn.num_key_value_heads * attn.head_dim
    q, k_new, _ = attn.qkv_proj(h).split([q_size, kv_size, kv_size], dim=-1)
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q, k_new = q.view(shape).transpose(1, 2), k_new.view(shape).transpose(1, 2)  # [B, n, T, D]
    cos, sin = kwargs["position_embeddings"]
    q, k_new = _rope(attn)(q, k_new, cos, sin)                     # partial rotary handled there
    return q, attended_keys(kwargs, attn.layer_idx, k_new)


class Phi3Adapter(Adapter):
    name = "hf-phi3"

    def matches(self, model: nn.Module) -> bool:
        layers = getattr(getattr(model, "model", None), "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            return False
        attn, mlp = getattr(layers[0], "self_attn", None), getattr(layers[0], "mlp", None)
        return hasattr(attn, "qkv_proj") and hasattr(attn, "o_proj") and hasattr(mlp, "gate_up_proj")

    def structure(self, model: nn.Module) -> ModelStructure:
        cfg = require(model, "config", "hf-phi3 adapter")
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        layers = model.model.layers
        blocks = tuple(self._block(i, layer) for i, layer in enumerate(layers))
        return ModelStructure(
            architecture=type(model).__name__, num_layers=len(layers), num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, blocks=blocks,
            layers=layers, weight_layout=WeightLayout.OUT_IN,
            qk_probe=probe_or_refuse(model, blocks, frozenset({"Phi3Attention"}), phi3_qk_probe),
            name=str(getattr(cfg, "name_or_path", "") or ""), padding_source=model.model)

    @staticmethod
    def _block(i: int, layer: nn.Module) -> BlockRefs:
        where = f"hf-phi3 adapter, layer {i}"
        attn, mlp = require(layer, "self_attn", where), require(layer, "mlp", where)
        return BlockRefs(
            index=i, module=layer,
            attn=AttentionRefs(module=attn, o_proj=require(attn, "o_proj", where),
                               qkv_proj=require(attn, "qkv_proj", where)),
            mlp=MlpRefs(module=mlp, up_proj=require(mlp, "gate_up_proj", where),
                        down_proj=require(mlp, "down_proj", where)))
