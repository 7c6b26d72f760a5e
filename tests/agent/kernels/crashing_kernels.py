"""A probe runner (see agent.kernels.probe.DEFAULT_RUNNER) whose kernels fail on purpose, the
way real ones do: killed by a signal, aborted, exiting, raising, hanging, or wrong. Imported
only inside probe children, never by the test process."""
from __future__ import annotations

import ctypes
import os
import time

import torch

from headroom_sidecar.agent.kernels.reference import int8_linear_ref


def prepare(kernel: str, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    def run(x: torch.Tensor) -> torch.Tensor:             # x [M, K] -> [M, N]
        if kernel == "segv_k16_8" and q.shape[1] % 16 == 8 and x.shape[0] > 1:
            ctypes.string_at(0)                           # SIGSEGV, like int8pack on some CPUs
        if kernel == "abort":
            os.abort()
        if kernel == "exit3":
            os._exit(3)
        if kernel == "raises":
            raise RuntimeError("no kernel image for this shape")
        if kernel == "hang":
            time.sleep(3600)
        if kernel == "wrong" and x.shape[0] > 1:
            return torch.zeros(x.shape[0], q.shape[0], dtype=x.dtype)
        return int8_linear_ref(x, q, scale, bias)
    return run


def rel_error_bound(kernel: str, dtype: torch.dtype) -> float:
    return 1e-4
