"""weight_precision fp32_packed: fp32 weights in the layout of the fastest fp32 GEMM measured here.

Nothing is rounded: the weights stay fp32 and the products are summed in fp32, in another
order than F.linear's (within the probe's 1e-5 relative bound), so a plan of fp32_packed layers is kept by
the same quality checks as any other plan, and a speculative verifier made of them returns
its own tokens as always.

Per nn.Linear of a listed layer (and the output head with key lm_head; a tied input embedding
keeps the original matrix, so the packed head is a second copy): the candidates of
agent/kernels/dense_impls.py, onednn_packed probed first in a child process for the shape
class (agent/kernels/probe.py), then timed on the real weight at 1 and 8 rows (a decode step
and a speculative verify) against aten; the smallest sum of the two medians wins. When aten
wins, or the probe fails, or the weight is not an fp32 CPU weight, the module is left as it is
and the note says why. HEADROOM_FP32_CPU_KERNEL=aten|onednn_packed skips the timing.
A down projection that activation sparsity wraps is left alone (its decode reads its own copy).
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import nn

from headroom_sidecar.agent.executor.int8 import path_of
from headroom_sidecar.agent.executor.undo import UndoLog
from headroom_sidecar.agent.kernels import autotune, probe
from headroom_sidecar.agent.kernels.autotune import KernelChoice
from headroom_sidecar.agent.kernels.dense_impls import (TIMING_ROWS, DenseKernel, onednn_available,
                                                       pack, rel_error_bound)
from headroom_sidecar.agent.kernels.settings import Fp32Cpu, KernelSettings

RUNNER = "headroom_sidecar.agent.kernels.dense_impls"
_CHECK_ROWS = 256        # output rows compared with the fp64 reference


class PackedLinear(nn.Module):
    """y = x @ W.T + b for x [..., in], W [out, in] fp32 held in oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], choice: KernelChoice):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.choice, self.kernel = choice, DenseKernel(choice.kernel)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        packed = pack(self.kernel, weight, self.bias)
        self._fn, self._held, self._nbytes = packed.fn, packed.held, packed.nbytes

    @property
    def weight(self) -> torch.Tensor:
        """The plain [out, in] matrix, unpacked (exactly) on each access: for apply-time readers
        (an int8 draft built over this layer), never the forward."""
        return self._held.to_dense() if self._held.is_mkldnn else self._held

    def opaque_bytes(self) -> int:
        """The packed matrix, which PyTorch cannot see as a parameter (agent.executor.weights)."""
        return self._nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)        # x [..., in] -> [..., out]: the op takes any leading dims

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kernel={self.kernel.value}")


def packable_reason(module: nn.Module) -> Optional[str]:
    """None when `module` can be packed here, else why it stays as it is."""
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not an nn.Linear"
    w = module.weight
    if w.dtype != torch.float32 or w.device.type != "cpu":
        return f"weight is {str(w.dtype).removeprefix('torch.')} on {w.device.type}, not fp32 on a CPU"
    if not onednn_available():
        return "this PyTorch build has no oneDNN (torch.backends.mkldnn)"
    return None


def probe_cases(module: nn.Linear) -> list[probe.ProbeCase]:
    out_f, in_f = module.weight.shape
    return [probe.ProbeCase.for_shape(DenseKernel.ONEDNN_PACKED, out_f, in_f, torch.float32,
                                      module.weight.device, RUNNER)]


def probe_model_dense(modules: list[nn.Module], settings: KernelSettings) -> None:
    """All the shape classes of `modules` in one probe child."""
    probe.ensure([c for m in modules if packable_reason(m) is None for c in probe_cases(m)],
                 settings)


_CHOICES: dict[tuple, KernelChoice] = {}       # one timing per shape
_CHOICES_LOCK = threading.Lock()


def choose_dense_kernel(module: nn.Linear, settings: KernelSettings) -> KernelChoice:
    """aten unless onednn_packed is safe here and, timed on this weight, faster."""
    why = packable_reason(module)
    if why is None and settings.fp32_cpu == Fp32Cpu.ATEN:
        why = "HEADROOM_FP32_CPU_KERNEL=aten"
    if why is not None:
        return KernelChoice(DenseKernel.ATEN.value, {}, {DenseKernel.ONEDNN_PACKED.value: why})
    (case,) = probe_cases(module)
    verdict = probe.ensure([case], settings)[case.key]
    if not verdict.safe:
        return KernelChoice(DenseKernel.ATEN.value, {},
                            {DenseKernel.ONEDNN_PACKED.value: f"probe: {verdict.reason}"})
    if settings.fp32_cpu == Fp32Cpu.ONEDNN_PACKED:
        return KernelChoice(DenseKernel.ONEDNN_PACKED.value)
    w, b = module.weight.detach(), module.bias
    key = (tuple(w.shape), b is not None)
    with _CHOICES_LOCK:
        if key not in _CHOICES:
            _CHOICES[key] = _timed_choice(w, b)
        return _CHOICES[key]


def _timed_choice(w: torch.Tensor, bias: Optional[torch.Tensor]) -> KernelChoice:
    """Both kernels at each of TIMING_ROWS (autotune.fastest, interleaved); the smallest sum."""
    fns = {k.value: pack(k, w, bias).fn for k in (DenseKernel.ONEDNN_PACKED, DenseKernel.ATEN)}
    total: dict[str, float] = {name: 0.0 for name in fns}
    timings: dict[str, float] = {}
    rejected: dict[str, str] = {}
    g = torch.Generator().manual_seed(0)
    for rows in TIMING_ROWS:
        x = torch.randn(rows, w.shape[1], generator=g)                      # [M, K]
        choice = autotune.fastest(fns, x, _reference_check(x, w, bias))
        rejected.update(choice.rejected)
        for name in fns:
            us = choice.candidates_us.get(name, float("inf"))
            timings[f"{name} x{rows}"] = us
            total[name] += us
    ok = {n: t for n, t in total.items() if n not in rejected}
    best = min(ok, key=ok.get) if ok else DenseKernel.ATEN.value
    return KernelChoice(best, timings, rejected)


def _reference_check(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]):
    r = min(w.shape[0], _CHECK_ROWS)
    ref = x.double() @ w[:r].double().T + (0 if bias is None else bias[:r].double())   # [M, r]
    return autotune.reference_check(x.shape[0], w.shape[0], ref,
                                    lambda kernel: rel_error_bound(DenseKernel(kernel), torch.float32))


def packed_or_none(module: nn.Module, settings: KernelSettings
                   ) -> tuple[Optional[PackedLinear], KernelChoice]:
    """(the packed module, or None when `module` stays as it is; the choice and its timings)."""
    choice = choose_dense_kernel(module, settings)
    if choice.kernel == DenseKernel.ATEN.value:
        return None, choice
    return PackedLinear(module.weight.detach(), module.bias, choice), choice


def apply_head_packed(model: nn.Module, log: UndoLog, settings: KernelSettings) -> list[str]:
    """The output head packed; a tied input embedding keeps the original matrix."""
    head = model.get_output_embeddings()
    new, choice = packed_or_none(head, settings)
    if new is None:
        return [f"lm_head: fp32_packed not applied, aten kept ({_why_aten(choice)})"]
    parent, leaf = path_of(model, head)
    log.swap(parent, leaf, new, park=False)       # a tied embedding still uses the matrix
    tied = model.get_input_embeddings().weight is head.weight
    return [f"lm_head: fp32_packed ({new.kernel.value})" + (
        f", a second copy of the tied embedding ({new.opaque_bytes() / 2**20:.1f} MiB)" if tied else "")]


def _why_aten(choice: KernelChoice) -> str:
    reason = choice.rejected.get(DenseKernel.ONEDNN_PACKED.value)
    return reason or "faster here: " + ", ".join(f"{k} {v:g} us" for k, v in choice.candidates_us.items())

