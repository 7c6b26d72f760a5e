"""A model's identity: the fingerprint plans are pinned to, and what registration reports."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from agent.adapters.base import ModelStructure

# Bytes hashed from the start of each parameter: enough to tell checkpoints apart cheaply.
_SAMPLE_ELEMENTS = 256


@dataclass(frozen=True)
class ModelInfo:
    fingerprint: str
    name: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    num_parameters: int
    dtype: str
    device: str


def fingerprint(model: nn.Module, structure: ModelStructure) -> str:
    """sha256 over the architecture, every parameter's name and shape, and a weight sample.

    Computed once at attach, before any plan changes a weight, so it names the unoptimised model.
    """
    h = hashlib.sha256()
    h.update(f"{structure.architecture}|{structure.num_layers}|{structure.num_heads}|"
             f"{structure.num_kv_heads}|{structure.head_dim}".encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            sample = p.detach().reshape(-1)[:_SAMPLE_ELEMENTS].to("cpu", torch.float32)
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def model_info(model: nn.Module, structure: ModelStructure) -> ModelInfo:
    first = next(model.parameters())
    return ModelInfo(
        fingerprint=fingerprint(model, structure), name=structure.name,
        architecture=structure.architecture, num_layers=structure.num_layers,
        num_heads=structure.num_heads, num_kv_heads=structure.num_kv_heads,
        head_dim=structure.head_dim, hidden_size=structure.hidden_size,
        intermediate_size=structure.intermediate_size,
        num_parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(first.dtype).removeprefix("torch."), device=str(first.device))
