"""Kernel selection, done once when a plan is applied (a module keeps its choice), not per call."""
from __future__ import annotations

import functools

import torch

from headroom_sidecar.agent.kernels.settings import Backend, KernelSettings


class KernelUnavailableError(RuntimeError):
    """A backend was asked for explicitly where it cannot run."""


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(device: torch.device, settings: KernelSettings | None = None) -> Backend:
    """The backend for tensors on `device`: never AUTO."""
    settings = settings or KernelSettings.resolve()
    wanted = settings.backend
    if wanted == Backend.AUTO:
        if device.type == "cuda" and triton_available():
            return Backend.TRITON
        return Backend.CPU_FAST if device.type == "cpu" else Backend.REFERENCE
    if wanted == Backend.TRITON and not (device.type == "cuda" and triton_available()):
        raise KernelUnavailableError(f"kernel backend 'triton' needs CUDA and the triton package "
                                     f"(device {device}, triton installed: {triton_available()})")
    if wanted == Backend.CPU_FAST and device.type != "cpu":
        raise KernelUnavailableError(f"kernel backend 'cpu_fast' needs CPU tensors, got {device}")
    return wanted
