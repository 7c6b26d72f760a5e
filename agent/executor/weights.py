"""Real bytes a model holds: every parameter and buffer, shared storage counted once, plus
weights packed into objects PyTorch cannot see (fbgemm's packed int8 matrix), which a module
reports through a method `opaque_bytes() -> int`. A tensor subclass that wraps other tensors
(torchao's quantised weights) is counted by the tensors inside it."""
from __future__ import annotations

import itertools
from typing import Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def _leaves(t: torch.Tensor) -> Iterator[torch.Tensor]:
    if is_traceable_wrapper_subclass(t):             # e.g. torchao: int data + scales inside
        for name in t.__tensor_flatten__()[0]:
            yield from _leaves(getattr(t, name))
    else:
        yield t


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (int8 = 1 byte each); tied weights counted once."""
    seen, total = set(), 0
    for t in itertools.chain.from_iterable(
            map(_leaves, itertools.chain(model.parameters(), model.buffers()))):
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key in seen or storage.data_ptr() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def opaque_bytes(model: nn.Module) -> int:
    return sum(m.opaque_bytes() for m in model.modules() if hasattr(m, "opaque_bytes"))


def weight_bytes(model: nn.Module) -> int:
    """Everything the model's weights occupy: tensors plus opaque packed copies."""
    return tensor_bytes(model) + opaque_bytes(model)
