"""Architectures headroom recognises and refuses, with the reason, instead of "no adapter".

Mixture-of-experts blocks (Mixtral, Qwen2-MoE, ...): transformers 5 keeps every expert's
weights in one fused parameter (`mlp.experts.gate_up_proj` / `down_proj` tensors), so there is
no per-expert down projection module whose input the MLP statistics could read, and the
executor's MLP transforms (activation sparsity, int8) have no module to swap. Rather than
trace a router-mixed output that is not an activation, the model is refused at attach.
"""
from __future__ import annotations

from torch import nn

from headroom_sidecar.agent.adapters.base import Adapter, ModelStructure, UnsupportedModelError


def _first_layer(model: nn.Module):
    for path in (("model", "layers"), ("transformer", "h"), ("layers",)):
        obj = model
        for name in path:
            obj = getattr(obj, name, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj[0]
    return None


class MixtureOfExpertsRefusal(Adapter):
    name = "refuse-mixture-of-experts"

    def matches(self, model: nn.Module) -> bool:
        layer = _first_layer(model)
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        return mlp is not None and hasattr(mlp, "experts")

    def structure(self, model: nn.Module) -> ModelStructure:
        layer = _first_layer(model)
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: its MLP ({type(mlp).__name__}) is a "
            f"mixture of experts with fused expert weights, so there is no down projection module "
            f"per block for headroom's MLP statistics and MLP transforms (see agent/adapters/refused.py)")
