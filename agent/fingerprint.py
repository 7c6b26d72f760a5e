"""A model's identity: the fingerprint plans are pinned to, and what registration reports."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from headroom_sidecar.agent.adapters.base import ModelStructure

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
    Weights offloaded by accelerate (parameter on the meta device, values in the offload hook's
    weights_map, on the host or on disk) are read from there: the same model gives the same
    fingerprint offloaded or not. A meta parameter with no such hook raises OffloadError.
    """
    h = hashlib.sha256()
    h.update(f"{structure.architecture}|{structure.num_layers}|{structure.num_heads}|"
             f"{structure.num_kv_heads}|{structure.head_dim}".encode())
    offloaded = _offloaded_weights(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            values = offloaded(name) if p.device.type == "meta" else p
            sample = values.detach().reshape(-1)[:_SAMPLE_ELEMENTS].to("cpu", torch.float32)
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


class OffloadError(ValueError):
    """A parameter has no values headroom can read (meta device, no accelerate offload hook)."""


def _hooks(module: nn.Module) -> list:
    """accelerate hooks on `module` (a SequentialHook holds several)."""
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", None) or [hook])


def _offloaded_weights(model: nn.Module) -> Callable[[str], torch.Tensor]:
    """name -> values of an accelerate-offloaded (meta) parameter, from the weights_map of the
    offload hook on its module or an ancestor (keys are relative to that module)."""
    maps = {name: hook.weights_map for name, module in model.named_modules()
            for hook in _hooks(module) if getattr(hook, "weights_map", None) is not None}

    def values(name: str) -> torch.Tensor:
        parts = name.split(".")
        for cut in range(len(parts) - 1, -1, -1):          # nearest module first
            wmap = maps.get(".".join(parts[:cut]))
            key = ".".join(parts[cut:])
            if wmap is not None and key in wmap:
                return wmap[key]
        raise OffloadError(
            f"headroom: parameter {name!r} is on the meta device and no accelerate offload hook "
            f"holds its values (a model built with init_empty_weights and never loaded?); "
            f"attach needs real weights to fingerprint the model: load or dispatch it first")
    return values


def execution_device(model: nn.Module) -> torch.device:
    """Where the model computes: the first parameter not on the meta device, else the
    execution device of an accelerate hook (everything offloaded), else the host."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    for module in model.modules():
        for hook in _hooks(module):
            device = getattr(hook, "execution_device", None)
            if device is not None:
                return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return torch.device("cpu")


def model_info(model: nn.Module, structure: ModelStructure) -> ModelInfo:
    first = next(model.parameters())
    return ModelInfo(
        fingerprint=fingerprint(model, structure), name=structure.name,
        architecture=structure.architecture, num_layers=structure.num_layers,
        num_heads=structure.num_heads, num_kv_heads=structure.num_kv_heads,
        head_dim=structure.head_dim, hidden_size=structure.hidden_size,
        intermediate_size=structure.intermediate_size,
        num_parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(first.dtype).removeprefix("torch."), device=str(execution_device(model)))
