"""Kernels behind the executor's transforms: Triton on CUDA, fbgemm fast paths on CPU, and the
plain PyTorch references they are tested against; registered as torch.library custom ops.
Before a module uses a kernel it is run in a child process for the module's shape class
(probe.py, verdicts cached per machine), and among the safe ones the fastest on this machine is
kept (autotune.py).

Importing this package registers the ops (torch.ops.headroom.*); it never imports triton,
which is loaded only when a CUDA module selects it.
"""
from headroom_sidecar.agent.kernels import ops  # noqa: F401  (registers torch.ops.headroom.*)
from headroom_sidecar.agent.kernels.select import KernelUnavailableError, select_backend, triton_available
from headroom_sidecar.agent.kernels.settings import Backend, Fp32Cpu, Int8Cpu, KernelSettings

__all__ = ["Backend", "Fp32Cpu", "Int8Cpu", "KernelSettings", "KernelUnavailableError", "select_backend",
           "triton_available"]
