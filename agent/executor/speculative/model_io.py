"""The two things speculation asks of a transformers causal LM: a croppable cache, a forward."""
from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor, nn


class SpeculationUnsupported(RuntimeError):
    """This model (or request) cannot be speculated on; the caller runs plain generation."""


def new_cache(model: nn.Module):
    """An empty DynamicCache for `model` that can roll back rejected positions (crop)."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    cache.activate_past_recording()          # sliding-window layers keep what a crop needs
    if not cache.is_croppable:
        raise SpeculationUnsupported(f"{type(model).__name__}: its KV cache cannot be cropped "
                                     "back after a rejected draft")
    return cache


@functools.lru_cache(maxsize=64)
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def forward_logits(model: nn.Module, ids: Tensor, cache, keep: int) -> Tensor:
    """ids [1, T] appended to `cache` -> the last `keep` positions' logits [keep, V]."""
    kwargs = {"logits_to_keep": keep} if _takes_logits_to_keep(type(model)) else {}
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, use_cache=True, **kwargs)
    return out.logits[0, -keep:]                                      # [keep, V]
