"""Kernel selection settings (argument > HEADROOM_* env > default, validated).

    HEADROOM_KERNEL_BACKEND   auto | triton | cpu_fast | reference
    HEADROOM_INT8_CPU_KERNEL  dequant | int8pack_bf16 | fbgemm

CPU int8 kernels for fp32 models, on SmolLM2-135M's shapes (timings: the batch-1 GEMV table
that `.venv/bin/python bench/table.py` prints; perplexity: its fbgemm row with --kernel-rows):
- int8pack_bf16 (the default): weight-only int8 through torch._weight_int8pack_mm,
  activations rounded to bf16 for the call (8-bit significand: relative rounding error at
  most 2^-8 per activation, products accumulated in fp32), the result cast back to fp32;
  1.2-4x faster than fp32 F.linear at batch 1 (4x on the lm_head). Needs
  in_features % 8 == 0 (else dequant).
- dequant: weight-only int8, q cast to fp32 in chunks then fp32 matmul: exact to the
  reference (fp32 activations), but 4-6x slower than fp32 at decode sizes.
- fbgemm: W8A8 dynamic: activations quantised per tensor to 7 bits on the fly. Fast, but
  SmolLM2's activation outliers make it unusable (perplexity x2.9); opt-in only.
"""
from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field
from typing import Any


class Backend(str, enum.Enum):
    AUTO = "auto"            # Triton on CUDA, the CPU fast path on CPU, the reference elsewhere
    TRITON = "triton"
    CPU_FAST = "cpu_fast"
    REFERENCE = "reference"


class Int8Cpu(str, enum.Enum):
    INT8PACK_BF16 = "int8pack_bf16"  # weight-only int8, bf16 activations for the matmul
    DEQUANT = "dequant"              # weight-only: dequantise in chunks, fp matmul (exact)
    FBGEMM = "fbgemm"                # W8A8 dynamic: fbgemm's int8 GEMM on a weight packed once


@dataclass(frozen=True)
class KernelSettings:
    backend: Backend = field(default=Backend.AUTO, metadata={"env": "HEADROOM_KERNEL_BACKEND"})
    int8_cpu: Int8Cpu = field(default=Int8Cpu.INT8PACK_BF16, metadata={"env": "HEADROOM_INT8_CPU_KERNEL"})

    @classmethod
    def resolve(cls, **overrides: Any) -> "KernelSettings":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown kernel setting(s): {', '.join(sorted(unknown))}")
        values = {}
        for f in dataclasses.fields(cls):
            enum_cls = type(f.default)
            raw = overrides.get(f.name)
            where = f"setting {f.name}"
            if raw is None and f.metadata["env"] in os.environ:
                raw, where = os.environ[f.metadata["env"]], f"environment variable {f.metadata['env']}"
            if raw is not None:
                try:
                    values[f.name] = enum_cls(raw)
                except ValueError:
                    raise ValueError(f"{where}={raw!r}: not one of "
                                     f"{[m.value for m in enum_cls]}") from None
        return cls(**values)
