"""Applies plans to a live PyTorch model: validated, atomic, bitwise-reversible."""
from agent.executor.executor import (ApplyReport, Executor, ExecutorSettings, TransformError,
                                     block_paths)
from agent.executor.weights import weight_bytes

__all__ = ["ApplyReport", "Executor", "ExecutorSettings", "TransformError", "block_paths",
           "weight_bytes"]
