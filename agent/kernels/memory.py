"""Real bytes a model holds, including weights packed into opaque C++ objects.

`agent.executor.weight_bytes` counts parameters and buffers only. A module whose weight lives
in an object PyTorch cannot see (fbgemm's packed int8 matrix) reports it by a method
`opaque_bytes() -> int`; `held_bytes` adds those.
"""
from __future__ import annotations

from torch import nn

from agent.executor.weights import weight_bytes


def opaque_bytes(model: nn.Module) -> int:
    return sum(m.opaque_bytes() for m in model.modules() if hasattr(m, "opaque_bytes"))


def held_bytes(model: nn.Module) -> int:
    return weight_bytes(model) + opaque_bytes(model)
