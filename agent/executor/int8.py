"""weight_precision int8: weight-only int8 with one scale per output channel.

The live module holds only the int8 weight and the scales (1 byte per weight instead of 2-4);
the fp weight goes to the undo log on the host CPU. The kernel is chosen once, when the
module is built (= when the plan is applied), by agent.kernels.select:
- CUDA: torch.ops.headroom.int8_linear -> Triton GEMV dequantising in registers (decode),
  dequantise + matmul for prefill;
- CPU, fp32, HEADROOM_INT8_CPU_KERNEL=int8pack_bf16 (the default): torch._weight_int8pack_mm
  on the same int8 weight, activations rounded to bf16 for the call (weight-only int8; see
  agent/kernels/settings.py for the measurements);
- CPU, HEADROOM_INT8_CPU_KERNEL=fbgemm, fp32: fbgemm's int8 GEMM on a weight packed once
  (W8A8 dynamic: activations are quantised per call too; opt-in, see agent/kernels/settings.py).
  The packed copy replaces the int8 buffer; its bytes are reported by `opaque_bytes()`;
- bf16/fp16 activations: torch._weight_int8pack_mm where this torch build has it;
- otherwise (HEADROOM_INT8_CPU_KERNEL=dequant, in_features not a multiple of 8, other
  devices) torch.ops.headroom.int8_linear's reference: q cast to x's dtype in chunks of
  output rows (the transient fp copy stays small), y = (x @ q.T) * scale.

`apply_head_int8` quantises the output head (lm_head) too; when it is tied to the input
embedding, both become views of one int8 matrix with a per-row scale (a row of the head is a
token's embedding), so they stay tied at 1 byte per weight.
"""
from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn

from agent.adapters.base import WeightLayout
from agent.executor.undo import UndoLog
from agent.kernels import cpu as cpu_kernels
from agent.kernels import ops
from agent.kernels.ops import dequant_linear
from agent.kernels.reference import int8_linear_ref
from agent.kernels.select import select_backend
from agent.kernels.settings import Backend, Int8Cpu, KernelSettings

_QMAX = 127.0               # symmetric: -127..127, so the scale maps max|w| exactly


class Int8Kernel(str, enum.Enum):
    TRITON = "triton"               # headroom::int8_linear, CUDA kernel
    FBGEMM = "fbgemm"               # packed W8A8 (CPU, opt-in)
    INT8PACK = "int8pack"           # torch._weight_int8pack_mm (bf16/fp16)
    INT8PACK_BF16 = "int8pack_bf16"  # the same for fp32 models, activations rounded to bf16
    DEQUANT = "dequant"             # headroom::int8_linear, chunked dequantise (any device)
    REFERENCE = "reference"         # agent.kernels.reference, forced by settings


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int8 [out, in], scale [out]) with w ≈ q * scale[:, None]."""
    w32 = w.detach().to(torch.float32)
    scale = (w32.abs().amax(dim=1) / _QMAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w32 / scale[:, None]).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q.contiguous(), scale.to(w.dtype)     # contiguous: a Conv1D weight arrives as w.T


def _int8pack_ok(device: torch.device, dtype: torch.dtype) -> bool:
    if dtype not in (torch.bfloat16, torch.float16) or not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        x = torch.ones(1, 8, dtype=dtype, device=device)
        q = torch.ones(8, 8, dtype=torch.int8, device=device)
        torch._weight_int8pack_mm(x, q, torch.ones(8, dtype=dtype, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


# torch._weight_int8pack_mm on CPU (torch 2.13) segfaults when in_features % 8 != 0.
_INT8PACK_K_MULTIPLE = 8


def select_int8_kernel(device: torch.device, dtype: torch.dtype,
                       settings: KernelSettings | None = None, in_features: int = 0) -> Int8Kernel:
    settings = settings or KernelSettings.resolve()
    backend = select_backend(device, settings)
    if backend == Backend.TRITON:
        return Int8Kernel.TRITON
    if backend == Backend.REFERENCE:
        return Int8Kernel.REFERENCE
    packable = in_features % _INT8PACK_K_MULTIPLE == 0
    if packable and _int8pack_ok(device, dtype):
        return Int8Kernel.INT8PACK
    if backend == Backend.CPU_FAST and dtype == torch.float32:
        wanted = settings.int8_cpu
        if wanted == Int8Cpu.FBGEMM and cpu_kernels.fbgemm_available():
            return Int8Kernel.FBGEMM
        if wanted == Int8Cpu.INT8PACK_BF16 and packable \
                and _int8pack_ok(device, torch.bfloat16):
            return Int8Kernel.INT8PACK_BF16
    return Int8Kernel.DEQUANT


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T + bias, for x [..., in]."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 settings: KernelSettings | None = None):
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight_int8", q)        # [out, in] int8
        self.register_buffer("scale", scale)          # [out], the original weight dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel = select_int8_kernel(q.device, scale.dtype, settings, q.shape[1])
        self._op_fn = ops.impl("int8_linear", q.device)          # TRITON / DEQUANT kernels
        self._packed, self._packed_bytes = None, 0
        if self.kernel == Int8Kernel.INT8PACK_BF16:
            self.register_buffer("scale_bf16", scale.to(torch.bfloat16))   # [out], 2 B each
        if self.kernel == Int8Kernel.FBGEMM:
            # The packed copy is the weight from now on; the int8 buffer would be a second one.
            self._packed = cpu_kernels.fbgemm_pack(q, scale, self.bias)
            self._packed_bytes = cpu_kernels.fbgemm_packed_bytes(q)
            del self._buffers["weight_int8"]

    @staticmethod
    def from_module(module: nn.Module, layout: WeightLayout,
                    settings: KernelSettings | None = None) -> "Int8Linear":
        """From an nn.Linear ([out, in]) or a GPT-2 style Conv1D ([in, out], WeightLayout.IN_OUT)."""
        w = module.weight.detach()
        w = w.t() if layout == WeightLayout.IN_OUT and not isinstance(module, nn.Linear) else w
        q, scale = quantize_per_channel(w)
        return Int8Linear(q, scale, getattr(module, "bias", None), settings)

    def int8_weight(self) -> torch.Tensor:
        """q [out, in] int8 (unpacked from fbgemm's copy when that is what is held)."""
        if self._packed is None:
            return self.weight_int8
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    def opaque_bytes(self) -> int:
        """Bytes held outside parameters and buffers (see agent.executor.weights)."""
        return self._packed_bytes

    def dequantized(self, cols: torch.Tensor | None = None) -> torch.Tensor:
        """The fp weight [out, in] (or its `cols` input columns) — for the sparse gather path."""
        q = self.int8_weight()
        q = q if cols is None else q.index_select(1, cols)
        return q.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                  # [N, in]
        k = self.kernel
        if k == Int8Kernel.FBGEMM and x2.dtype == torch.float32:
            y = cpu_kernels.fbgemm_linear(x2, self._packed)            # bias is in the pack
        elif k == Int8Kernel.INT8PACK and x2.dtype == self.scale.dtype:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scale)
            y = y if self.bias is None else y + self.bias
        elif k == Int8Kernel.INT8PACK_BF16 and x2.dtype == torch.float32:
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight_int8,
                                          self.scale_bf16).float()
            y = y if self.bias is None else y + self.bias
        elif k == Int8Kernel.REFERENCE:
            y = int8_linear_ref(x2, self.int8_weight(), self.scale, self.bias)
        elif self._packed is not None:     # fbgemm pack, activations not fp32: dequantise
            y = dequant_linear(x2, self.int8_weight(), self.scale, self.bias)
        else:
            y = ops.call("int8_linear", self._op_fn, x2, self.weight_int8, self.scale, self.bias)
        return y.reshape(*shape[:-1], self.out_features)              # [..., out]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kernel={self.kernel.value}")


class Int8Embedding(nn.Module):
    """Embedding lookup on int8 rows: out = q[ids] * scale[ids] (one scale per token row)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("weight_int8", q)        # [V, H] int8, shared with a tied head
        self.register_buffer("scale", scale)          # [V]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:           # ids [B, T]
        rows = F.embedding(ids, self.weight_int8)                     # [B, T, H] int8
        return rows.to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)


def _path_of(model: nn.Module, module: nn.Module) -> tuple[nn.Module, str]:
    for name, m in model.named_modules():
        if m is module and name:
            parent, _, leaf = name.rpartition(".")
            return (model.get_submodule(parent) if parent else model), leaf
    raise ValueError(f"{type(module).__name__} not found inside the model")


def apply_head_int8(model: nn.Module, log: UndoLog,
                    settings: KernelSettings | None = None) -> list[str]:
    """Output head -> Int8Linear; a tied input embedding -> Int8Embedding on the same int8
    matrix. Returns notes. Needs get_output_embeddings()/get_input_embeddings()."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"output head is {type(head).__name__}, not nn.Linear: cannot quantise it")
    emb = model.get_input_embeddings()
    tied = isinstance(emb, nn.Embedding) and emb.weight.data_ptr() == head.weight.data_ptr()
    q, scale = quantize_per_channel(head.weight)          # per output row = per token
    new_head = Int8Linear(q, scale, head.bias, settings)
    parent, leaf = _path_of(model, head)
    if tied:
        eparent, eleaf = _path_of(model, emb)
        log.swap(eparent, eleaf, Int8Embedding(q, scale))
    log.swap(parent, leaf, new_head)
    return [f"lm_head: int8 ({new_head.kernel.value})" + (", tied embedding int8" if tied else "")]
