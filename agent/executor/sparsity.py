"""activation_sparsity: MLP activations (the input of down_proj) with |a| < threshold are zeroed.

The down projection is swapped for `SparseDownProj`, which wraps the original module (so the
same weights, and any hook on it, still see the activation, now sparsified). Wrapping the
down projection rather than the whole MLP works for every MLP shape the adapters describe
(gated SwiGLU, GPT-2 c_fc/c_proj, gpt-fast w1/w2/w3): the activation is by definition its input.

Decode fast path (`decode_gather`, opt-in by ExecutorSettings.sparse_decode_gather): only the
weights of surviving activations are read, y = a[kept] @ W[:, kept].T, from a layout built
once when the plan is applied (and again when the executor swaps `inner` for int8):
- Triton (CUDA, up to 16 tokens): w_t = W.T contiguous (int8 + scales if inner is int8);
  the kernel skips the rows of w_t whose activation is zero for every token;
- CPU (1 token): the same w_t, read by embedding_bag over the surviving rows; for an int8
  inner, fbgemm's 8-bit row-wise bag on w_t (see agent/kernels/cpu.py);
- reference: gather the surviving columns of the weight, then a dense matmul.
Before the module uses the Triton or CPU kernel, that kernel is run for the layer's shape
class in a child process (agent/kernels/probe.py, runner agent/kernels/sparse_impls.py): if it
crashes or is wrong there, the module keeps `gathered` (and says why in `.choice`).
The layout is a second copy of the down weight (a GPT-2 Conv1D weight already is w_t, so none
there); it is a buffer, so weight memory reports it. Prefill (more tokens) runs dense.
Measured on the 2-core CPU with `.venv/bin/python bench/table.py --kernel-rows` (SmolLM2,
30% sparsity; its "sparse decode" row against "plan + int8", and its batch-1 GEMV table): no
end-to-end win (53.5 vs 48.2 ms/token, +26 MB), the down GEMV alone wins only near 90%
sparsity; so the CPU path stays opt-in. The Triton path has not been run on a GPU yet
(`bench/gpu.py` measures it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headroom_sidecar.agent.executor.int8 import Int8Linear
from headroom_sidecar.agent.kernels import cpu as cpu_kernels
from headroom_sidecar.agent.kernels import ops, probe
from headroom_sidecar.agent.kernels.autotune import KernelChoice
from headroom_sidecar.agent.kernels.ops import TRITON_MAX_TOKENS
from headroom_sidecar.agent.kernels.select import select_backend
from headroom_sidecar.agent.kernels.settings import Backend, KernelSettings
from headroom_sidecar.agent.kernels.sparse_impls import CPU_MAX_TOKENS, SparseKernel

SPARSE_RUNNER = "headroom_sidecar.agent.kernels.sparse_impls"


class SparseDownProj(nn.Module):
    def __init__(self, inner: nn.Module, threshold: float, weight_in_out: bool,
                 decode_gather: bool = False, settings: KernelSettings | None = None):
        super().__init__()
        self.threshold = float(threshold)
        self.weight_in_out = weight_in_out    # GPT-2 Conv1D keeps its weight as [in, out]
        self.decode_gather = decode_gather
        self.kernel_settings = settings or KernelSettings.resolve()
        self.backend: Backend | None = None
        # The decode layout: a non-persistent buffer (not in state_dict, counted as memory).
        self.register_buffer("decode_w", None, persistent=False)
        self.inner = inner                    # builds the decode layout (see __setattr__)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "inner":
            # The executor's int8 transform swaps `inner` after wrapping; the decode layout
            # must follow the weights actually in place, so it is rebuilt here, at apply time.
            self._prepare()

    def _prepare(self) -> None:
        self.decode_w = None
        self.decode_scale, self.max_tokens, self.backend = None, 0, None
        self._op, self._op_fn = "", None
        self.choice = None             # KernelChoice of the decode path, when there is one
        if not self.decode_gather:
            return
        self.backend = select_backend(self._any_weight().device, self.kernel_settings)
        kernel, rejected = self._probed_kernel()
        self.choice = KernelChoice(kernel.value, {}, rejected)
        if kernel == SparseKernel.GATHERED:
            self.backend = Backend.REFERENCE
            self.max_tokens = 1                                       # gathered(): one token
            return
        w_t, self.decode_scale = self._w_t()
        if self.backend == Backend.CPU_FAST and self.decode_scale is not None:
            w_t = cpu_kernels.rowwise_u8_layout(w_t)                  # [I, O + 8] uint8
        self.decode_w = w_t
        self.max_tokens = TRITON_MAX_TOKENS if self.backend == Backend.TRITON else CPU_MAX_TOKENS
        self._op = "sparse_gemv_u8rows" if w_t.dtype == torch.uint8 else "sparse_gemv"
        self._op_fn = ops.impl(self._op, w_t.device)

    def _probed_kernel(self) -> tuple[SparseKernel, dict[str, str]]:
        """The backend's sparse kernel if its child-process probe passed for this shape
        class (see agent/kernels/probe.py), else the gathered reference (and why)."""
        int8 = isinstance(self.inner, Int8Linear)
        kernel = {Backend.CPU_FAST: SparseKernel.U8ROWS if int8 else SparseKernel.EMBEDDING_BAG,
                  Backend.TRITON: SparseKernel.TRITON_INT8 if int8 else SparseKernel.TRITON,
                  }.get(self.backend, SparseKernel.GATHERED)
        if kernel == SparseKernel.GATHERED:
            return kernel, {}
        w = self._any_weight()
        dtype = self.inner.scale.dtype if int8 else w.dtype
        out_f, in_f = self._out_in()
        case = probe.ProbeCase.for_shape(kernel, out_f, in_f, dtype, w.device, SPARSE_RUNNER)
        verdict = probe.ensure([case], self.kernel_settings)[case.key]
        if verdict.safe:
            return kernel, {}
        return SparseKernel.GATHERED, {kernel.value: f"probe: {verdict.reason}"}

    def _out_in(self) -> tuple[int, int]:
        if isinstance(self.inner, Int8Linear):
            return self.inner.out_features, self.inner.in_features
        o, i = self.inner.weight.shape
        return (i, o) if self.weight_in_out else (o, i)

    def _any_weight(self) -> torch.Tensor:
        return self.inner.scale if isinstance(self.inner, Int8Linear) else self.inner.weight

    def _w_t(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The down weight as [I, O] (one row per activation), and its per-output scale."""
        if isinstance(self.inner, Int8Linear):
            return self.inner.int8_weight().t().contiguous(), self.inner.scale
        w = self.inner.weight.detach()
        return (w.contiguous() if self.weight_in_out else w.t().contiguous()), None

    def sparsify(self, a: torch.Tensor) -> torch.Tensor:
        return a.masked_fill(a.abs() < self.threshold, 0)

    def forward(self, a: torch.Tensor) -> torch.Tensor:         # a [B, T, I]
        a = self.sparsify(a)
        if self.decode_gather and a.shape[:-1].numel() <= self.max_tokens:
            return self._decode(a)
        return self.inner(a)

    def _decode(self, a: torch.Tensor) -> torch.Tensor:
        if self.backend not in (Backend.TRITON, Backend.CPU_FAST):
            return self.gathered(a)
        a2 = a.reshape(-1, a.shape[-1])                                # [N, I]
        bias = getattr(self.inner, "bias", None)
        y = ops.call(self._op, self._op_fn, a2, self.decode_w, self.decode_scale, bias)
        return y.reshape(*a.shape[:-1], -1)                            # [B, T, O]

    def gathered(self, a: torch.Tensor) -> torch.Tensor:
        """One token: only the kept activations and their weight columns take part."""
        flat = a.reshape(-1)                                           # [I]
        kept = flat.nonzero().squeeze(1)                               # [K]
        w = self._weight_columns(kept)                                 # [out, K]
        y = F.linear(flat.index_select(0, kept).unsqueeze(0), w)       # [1, out]
        bias = getattr(self.inner, "bias", None)
        if bias is not None:
            y = y + bias
        return y.reshape(*a.shape[:-1], -1)

    def _weight_columns(self, kept: torch.Tensor) -> torch.Tensor:
        if isinstance(self.inner, Int8Linear):
            return self.inner.dequantized(kept)
        w = self.inner.weight
        return w.index_select(0, kept).t() if self.weight_in_out else w.index_select(1, kept)

    def extra_repr(self) -> str:
        backend = self.backend.value if self.backend else "dense"
        return f"threshold={self.threshold:g}, decode_gather={self.decode_gather}, decode={backend}"
