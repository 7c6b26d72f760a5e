"""Real bytes a model holds, including weights packed into opaque C++ objects: the executor's
`weight_bytes` counts both (agent/executor/weights.py); these names stay for the kernels' users."""
from __future__ import annotations

from agent.executor.weights import opaque_bytes, weight_bytes

held_bytes = weight_bytes

__all__ = ["held_bytes", "opaque_bytes"]
