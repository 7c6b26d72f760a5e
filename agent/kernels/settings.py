"""Kernel selection settings (argument > HEADROOM_* env > default, validated).

    HEADROOM_KERNEL_BACKEND          auto | triton | cpu_fast | reference
    HEADROOM_INT8_CPU_KERNEL         auto (default) | int8pack_bf16 | dequant | fbgemm
    HEADROOM_FP32_CPU_KERNEL         auto (default) | onednn_packed | aten  (fp32_packed layers)
    HEADROOM_KERNEL_CACHE_DIR        where probe verdicts are kept ('' = ~/.cache/headroom/kernels)
    HEADROOM_KERNEL_PROBE_TIMEOUT_S  one probe child's wall-clock limit (torch import included)

Which int8 kernel a layer runs is measured, not assumed (agent/kernels/autotune.py): each
candidate is first run in a child process for the layer's shape class (agent/kernels/probe.py:
torch._weight_int8pack_mm segfaults on some CPUs, e.g. AVX-512 VNNI without avx512_bf16, when
in_features % 16 == 8 and there is more than one row), then the safe ones are timed at batch 1
on this machine and the fastest whose output matches the reference is kept. Candidates:
- int8pack_bf16 (fp32 models): weight-only int8 through torch._weight_int8pack_mm,
  activations rounded to bf16 for the call (8-bit significand: relative rounding error at
  most 2^-8 per activation, products accumulated in fp32), the result cast back to fp32.
  Faster than dequant where the CPU has a fast path for it; not always faster than fp32
  F.linear (a user's AVX-512 VNNI Xeon: slower at 576x576, ~1.2x at 1536x576).
- int8pack (bf16/fp16 models): the same op on the model's own activation dtype.
- dequant: weight-only int8, q cast to the activation dtype in chunks then matmul: exact to
  the reference in fp32; always safe, the last fallback.
- triton (CUDA): int8 GEMV dequantising in registers (see triton_kernels.py).
- fbgemm: W8A8 dynamic, activations quantised per tensor to 7 bits on the fly. Lossy
  (SmolLM2's activation outliers: perplexity x2.9), so `auto` never picks it: only
  HEADROOM_INT8_CPU_KERNEL=fbgemm does (if its probe passes).
Forcing a kernel keeps that one if its probe passes, else falls to dequant.
"""
from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Backend(str, enum.Enum):
    AUTO = "auto"            # Triton on CUDA, the CPU fast path on CPU, the reference elsewhere
    TRITON = "triton"
    CPU_FAST = "cpu_fast"
    REFERENCE = "reference"


class Fp32Cpu(str, enum.Enum):
    AUTO = "auto"                    # time the safe fp32 kernels at 1 and 8 rows, keep the fastest
    ONEDNN_PACKED = "onednn_packed"  # oneDNN on a weight reordered once (if its probe passes)
    ATEN = "aten"                    # F.linear: fp32_packed layers stay as they are


class Int8Cpu(str, enum.Enum):
    AUTO = "auto"                    # time the safe weight-only kernels, keep the fastest
    INT8PACK_BF16 = "int8pack_bf16"  # weight-only int8, bf16 activations for the matmul
    DEQUANT = "dequant"              # weight-only: dequantise in chunks, fp matmul (exact)
    FBGEMM = "fbgemm"                # W8A8 dynamic: fbgemm's int8 GEMM on a weight packed once


DEFAULT_CACHE_DIR = Path("~/.cache/headroom/kernels")


@dataclass(frozen=True)
class KernelSettings:
    backend: Backend = field(default=Backend.AUTO, metadata={"env": "HEADROOM_KERNEL_BACKEND"})
    int8_cpu: Int8Cpu = field(default=Int8Cpu.AUTO, metadata={"env": "HEADROOM_INT8_CPU_KERNEL"})
    fp32_cpu: Fp32Cpu = field(default=Fp32Cpu.AUTO, metadata={"env": "HEADROOM_FP32_CPU_KERNEL"})
    cache_dir: str = field(default="", metadata={"env": "HEADROOM_KERNEL_CACHE_DIR"})
    probe_timeout_s: float = field(default=180.0,
                                   metadata={"env": "HEADROOM_KERNEL_PROBE_TIMEOUT_S"})

    def __post_init__(self) -> None:
        if not self.probe_timeout_s > 0:
            raise ValueError(f"kernel setting probe_timeout_s={self.probe_timeout_s}: must be > 0")

    def cache_path(self) -> Path:
        """The folder of the probe verdict files (created on first write)."""
        return Path(self.cache_dir or DEFAULT_CACHE_DIR).expanduser()

    @classmethod
    def resolve(cls, **overrides: Any) -> "KernelSettings":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown kernel setting(s): {', '.join(sorted(unknown))}")
        values = {}
        for f in dataclasses.fields(cls):
            raw = overrides.get(f.name)
            where = f"setting {f.name}"
            if raw is None and f.metadata["env"] in os.environ:
                raw, where = os.environ[f.metadata["env"]], f"environment variable {f.metadata['env']}"
            if raw is not None:
                values[f.name] = _convert(type(f.default), raw, where)
        return cls(**values)


def _convert(kind: type, raw: Any, where: str) -> Any:
    try:
        return kind(raw)
    except ValueError:
        allowed = [m.value for m in kind] if issubclass(kind, enum.Enum) else kind.__name__
        raise ValueError(f"{where}={raw!r}: not one of {allowed}" if isinstance(allowed, list)
                         else f"{where}={raw!r}: not a valid {allowed}") from None
