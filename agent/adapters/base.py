"""What headroom needs to know about a model's structure, and the adapter registry.

An adapter turns one family of models into a `ModelStructure`: the transformer blocks and,
inside each, the modules whose inputs and outputs the agent hooks and the executor rewrites.
Register your own for an architecture headroom does not know:

    from headroom_sidecar.agent.adapters import Adapter, register_adapter

    class MyAdapter(Adapter):
        name = "my-transformer"
        def matches(self, model): return isinstance(model, MyTransformer)
        def structure(self, model): return ModelStructure(...)

    register_adapter(MyAdapter())
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


class WeightLayout(enum.Enum):
    """How a projection stores its weight."""
    OUT_IN = "out_in"  # nn.Linear: weight [out_features, in_features], y = x @ W.T
    IN_OUT = "in_out"  # GPT-2 Conv1D: weight [in_features, out_features], y = x @ W


class UnsupportedModelError(TypeError):
    """No adapter matched, or an adapter could not find a part it needs; says which."""


# (attn module, hook args, hook kwargs) -> (q [B, H, Tq, D], k [B, KVH, S, D]) exactly as the
# model's attention scores them: after its q/k norms and positional encoding, for the queries of
# this forward and all keys they attend to. Used only when the attention module does not return
# its probabilities (sdpa / flash); the softmax scale is the module's `scaling`, soft-capping its
# `attn_logit_softcapping`, the mask the `attention_mask` kwarg it receives (see trace.py).
QKProbe = Callable[[nn.Module, tuple, dict], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class AttentionRefs:
    module: nn.Module                 # whole attention; its forward hook sees hidden states
    o_proj: nn.Module                 # input [..., H * D]: heads' outputs concatenated, head-major
    q_proj: Optional[nn.Module] = None  # separate projections (Llama family)
    k_proj: Optional[nn.Module] = None
    v_proj: Optional[nn.Module] = None
    qkv_proj: Optional[nn.Module] = None  # fused projection (GPT-2 c_attn, gpt-fast wqkv): q|k|v


@dataclass(frozen=True)
class MlpRefs:
    module: nn.Module
    up_proj: nn.Module                  # hidden -> intermediate (Phi-3: the fused gate|up, 2 x I)
    down_proj: nn.Module                # input [..., I] is the activation the sparsity stats see
    gate_proj: Optional[nn.Module] = None  # gated MLPs (SwiGLU); None for GPT-2


@dataclass(frozen=True)
class BlockRefs:
    index: int
    module: nn.Module   # input and output hidden states: [B, T, hidden]
    attn: AttentionRefs
    mlp: MlpRefs


@dataclass(frozen=True)
class ModelStructure:
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    blocks: tuple[BlockRefs, ...]
    layers: nn.ModuleList            # container of the blocks, for layer skipping
    weight_layout: WeightLayout
    qk_probe: Optional[QKProbe]      # see QKProbe; None: attention stats need eager attention
    name: str = ""                   # e.g. the HF name_or_path
    # Module whose forward receives the request's padding mask as an `attention_mask` kwarg,
    # 2D [B, S] (1 = real token), for this forward's tokens and every cached one (HF: the base
    # model, model.model / model.transformer). None: the model takes no padding mask.
    padding_source: Optional[nn.Module] = None

    @property
    def group_size(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads


class Adapter:
    name: str = "adapter"

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def structure(self, model: nn.Module) -> ModelStructure:
        raise NotImplementedError


_REGISTRY: list[Adapter] = []


def register_adapter(adapter: Adapter, *, first: bool = True) -> None:
    """Adds an adapter; user adapters go first so they win over the built-in ones."""
    if first:
        _REGISTRY.insert(0, adapter)
    else:
        _REGISTRY.append(adapter)


def registered_adapters() -> tuple[Adapter, ...]:
    return tuple(_REGISTRY)


def require(obj: object, attr: str, where: str):
    """getattr that fails with the missing part's name and where it was looked for."""
    value = getattr(obj, attr, None)
    if value is None:
        raise UnsupportedModelError(f"{where}: no attribute {attr!r} on {type(obj).__name__}")
    return value


def resolve_structure(model: nn.Module) -> ModelStructure:
    """The first registered adapter that matches `model` describes it."""
    for adapter in _REGISTRY:
        if adapter.matches(model):
            return adapter.structure(model)
    names = ", ".join(a.name for a in _REGISTRY) or "none"
    raise UnsupportedModelError(
        f"no headroom adapter matches {type(model).__module__}.{type(model).__name__} "
        f"(registered: {names}); register one with agent.adapters.register_adapter, "
        f"see agent/adapters/base.py")
