"""Applies plans to a live PyTorch model: validated, atomic, bitwise-reversible."""
from headroom_sidecar.agent.executor.executor import (ApplyReport, Executor, ExecutorSettings, TransformError,
                                     block_paths)
from headroom_sidecar.agent.executor.weights import weight_bytes

__all__ = ["ApplyReport", "Executor", "ExecutorSettings", "TransformError", "block_paths",
           "weight_bytes"]
