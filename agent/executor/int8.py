"""weight_precision int8: weight-only int8 with one scale per output channel.

The live module holds only the int8 weight and the scales (1 byte per weight instead of 2-4);
the fp weight goes to the undo log on the host CPU. The kernel is chosen once per module, when
it is built (= when the plan is applied), by measurement on this machine (choose_int8_kernel):
1. candidates (int8_candidates): CUDA: triton (Triton GEMV dequantising in registers for
   decode, dequantise + matmul for prefill), dequant. CPU fp32: int8pack_bf16
   (torch._weight_int8pack_mm on bf16-rounded activations), dequant; fbgemm (W8A8, lossy)
   only when HEADROOM_INT8_CPU_KERNEL=fbgemm. CPU bf16/fp16: int8pack, dequant.
2. each candidate but dequant runs first in a child process for the layer's shape class
   (agent/kernels/probe.py): int8pack segfaults on some CPUs for some shapes; an unsafe one
   is dropped. The executor probes the whole model's classes in one child (probe_model_int8).
3. the safe ones are timed at batch 1 on the real weight and the fastest whose output matches
   the reference wins (agent/kernels/autotune.py); `Int8Linear.choice` keeps the timings.
   HEADROOM_INT8_CPU_KERNEL=<kernel> skips the timing and keeps that kernel if it is safe.
dequant (torch.ops.headroom.int8_linear's reference: q cast to x's dtype in chunks of output
rows, y = (x @ q.T) * scale) is the fallback: plain PyTorch, never probed. fbgemm's packed
copy replaces the int8 buffer; its bytes are reported by `opaque_bytes()`.

`apply_head_int8` quantises the output head (lm_head) too; when it is tied to the input
embedding, both become views of one int8 matrix with a per-row scale (a row of the head is a
token's embedding), so they stay tied at 1 byte per weight.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from headroom_sidecar.agent.adapters.base import WeightLayout
from headroom_sidecar.agent.executor.undo import UndoLog
from headroom_sidecar.agent.kernels import autotune, probe
from headroom_sidecar.agent.kernels import cpu as cpu_kernels
from headroom_sidecar.agent.kernels import ops
from headroom_sidecar.agent.kernels.autotune import KernelChoice
from headroom_sidecar.agent.kernels.int8_impls import (NEVER_PROBED, Int8Kernel, int8pack_bf16_linear,
                                      int8pack_linear, prepare, rel_error_bound)
from headroom_sidecar.agent.kernels.ops import dequant_linear
from headroom_sidecar.agent.kernels.reference import int8_linear_ref
from headroom_sidecar.agent.kernels.select import select_backend
from headroom_sidecar.agent.kernels.settings import Backend, Int8Cpu, KernelSettings

_QMAX = 127.0               # symmetric: -127..127, so the scale maps max|w| exactly


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int8 [out, in], scale [out]) with w ≈ q * scale[:, None]."""
    w32 = w.detach().to(torch.float32)
    scale = (w32.abs().amax(dim=1) / _QMAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w32 / scale[:, None]).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q.contiguous(), scale.to(w.dtype)     # contiguous: a Conv1D weight arrives as w.T


def int8_candidates(device: torch.device, dtype: torch.dtype,
                    settings: KernelSettings) -> list[Int8Kernel]:
    """The kernels worth trying for weights on `device` used with `dtype` activations, in
    order of preference; the last is never probed (it is the fallback)."""
    backend = select_backend(device, settings)
    if backend == Backend.REFERENCE:
        return [Int8Kernel.REFERENCE]
    if backend == Backend.TRITON:
        return [Int8Kernel.TRITON, Int8Kernel.DEQUANT]
    has_pack = hasattr(torch, "_weight_int8pack_mm")
    wanted = settings.int8_cpu
    if dtype in (torch.bfloat16, torch.float16):
        return ([Int8Kernel.INT8PACK] if has_pack and wanted != Int8Cpu.DEQUANT else []) \
            + [Int8Kernel.DEQUANT]
    if dtype != torch.float32:
        return [Int8Kernel.DEQUANT]
    if wanted == Int8Cpu.FBGEMM and cpu_kernels.fbgemm_available():
        return [Int8Kernel.FBGEMM, Int8Kernel.DEQUANT]
    if wanted in (Int8Cpu.AUTO, Int8Cpu.INT8PACK_BF16) and has_pack:
        return [Int8Kernel.INT8PACK_BF16, Int8Kernel.DEQUANT]
    return [Int8Kernel.DEQUANT]


def _forced(settings: KernelSettings, device: torch.device, dtype: torch.dtype) -> bool:
    """HEADROOM_INT8_CPU_KERNEL names one kernel for fp32 CPU models: used if safe, not timed."""
    return settings.int8_cpu != Int8Cpu.AUTO and device.type == "cpu" and dtype == torch.float32


def probe_cases(candidates: list[Int8Kernel], out_features: int, in_features: int,
                dtype: torch.dtype, device: torch.device) -> dict[Int8Kernel, probe.ProbeCase]:
    return {k: probe.ProbeCase.for_shape(k, out_features, in_features, dtype, device)
            for k in candidates if k not in NEVER_PROBED}


def _int8pack_ok(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int,
                 settings: KernelSettings | None = None) -> bool:
    """Whether torch._weight_int8pack_mm passed its child-process probe for this shape class
    (it segfaults on some CPUs instead of raising: never tried in this process first)."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    kernel = Int8Kernel.INT8PACK if dtype != torch.float32 else Int8Kernel.INT8PACK_BF16
    case = probe.ProbeCase.for_shape(kernel, out_features, in_features, dtype, device)
    return probe.ensure([case], settings)[case.key].safe


def safe_int8_kernels(device: torch.device, dtype: torch.dtype, out_features: int,
                      in_features: int, settings: KernelSettings | None = None
                      ) -> tuple[list[Int8Kernel], dict[str, str]]:
    """(the candidates whose probe passed, in order; kernel -> why each other one failed)."""
    settings = settings or KernelSettings.resolve()
    candidates = int8_candidates(device, dtype, settings)
    cases = probe_cases(candidates, out_features, in_features, dtype, device)
    verdicts = probe.ensure(cases.values(), settings)
    rejected = {k.value: f"probe: {verdicts[c.key].reason}" for k, c in cases.items()
                if not verdicts[c.key].safe}
    return [k for k in candidates if k.value not in rejected], rejected


def select_int8_kernel(device: torch.device, dtype: torch.dtype,
                       settings: KernelSettings | None = None, in_features: int = 0,
                       out_features: int = 1) -> Int8Kernel:
    """The preferred safe kernel without timing (Int8Linear times them: choose_int8_kernel)."""
    return safe_int8_kernels(device, dtype, out_features, in_features, settings)[0][0]


def probe_model_int8(model: nn.Module, layout: WeightLayout,
                     settings: KernelSettings | None = None) -> None:
    """Probe, in one child process, every kernel any linear layer of `model` could use as
    int8 (the executor calls this before building Int8Linear modules one by one)."""
    settings = settings or KernelSettings.resolve()
    cases = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, (nn.Embedding, Int8Linear)) or not isinstance(w, torch.Tensor) \
                or w.dim() != 2:
            continue
        out_f, in_f = w.shape if isinstance(m, nn.Linear) or layout != WeightLayout.IN_OUT \
            else w.shape[::-1]
        cands = int8_candidates(w.device, w.dtype, settings)
        cases += probe_cases(cands, out_f, in_f, w.dtype, w.device).values()
    probe.ensure(cases, settings)


_CHOICES: dict[tuple, KernelChoice] = {}       # one timing per shape and candidate set
_CHOICES_LOCK = threading.Lock()


def choose_int8_kernel(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       settings: KernelSettings | None = None) -> KernelChoice:
    """The kernel for this weight: the safe candidates timed at batch 1, fastest correct."""
    settings = settings or KernelSettings.resolve()
    (n, k), dtype, device = q.shape, scale.dtype, q.device
    safe, rejected = safe_int8_kernels(device, dtype, n, k, settings)
    forced = _forced(settings, device, dtype)
    if forced:
        safe = safe[:1] + ([Int8Kernel.DEQUANT] if safe[0] != Int8Kernel.DEQUANT else [])
    key = (str(device), n, k, dtype, bias is not None, tuple(safe), forced)
    with _CHOICES_LOCK:
        if key not in _CHOICES:
            _CHOICES[key] = _measure(safe, q, scale, bias, forced)
        choice = _CHOICES[key]
    return KernelChoice(choice.kernel, choice.candidates_us, {**rejected, **choice.rejected})


def _measure(safe: list[Int8Kernel], q: torch.Tensor, scale: torch.Tensor,
             bias: torch.Tensor | None, forced: bool) -> KernelChoice:
    if len(safe) == 1:
        return KernelChoice(safe[0].value)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, q.shape[1], generator=g).to(q.device, scale.dtype)   # [1, K]: decode
    check = _reference_check(x, q, scale, bias)
    if forced:                   # the named kernel if its output is right, else the fallback
        wrong = autotune.checked_call(safe[0].value, _prepared(safe[0], q, scale, bias), x, check)
        return KernelChoice(safe[-1].value, {}, {safe[0].value: wrong}) if wrong \
            else KernelChoice(safe[0].value)
    fns = {kern.value: _prepared(kern, q, scale, bias) for kern in safe}
    return autotune.fastest(fns, x, check)


def _prepared(kernel: Int8Kernel, q: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None) -> autotune.Linear:
    """prepare(), or a function raising its error when called (the candidate is dropped)."""
    try:
        return prepare(kernel, q, scale, bias)
    except Exception as e:       # noqa: BLE001  e.g. fbgemm cannot pack: try the next one
        error = RuntimeError(f"preparing its layout failed: {type(e).__name__}: {e}")

        def failed(x: torch.Tensor) -> torch.Tensor:
            raise error
        return failed


_CHECK_ROWS = 256     # output rows compared with the reference (bounds its fp32 weight copy)


def _reference_check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None):
    """(kernel, y [1, N]) -> "" or what is wrong, from the first _CHECK_ROWS output rows."""
    r = min(q.shape[0], _CHECK_ROWS)
    ref = int8_linear_ref(x.float(), q[:r], scale[:r].float(),
                          None if bias is None else bias[:r].float())            # [1, r]
    return autotune.reference_check(x.shape[0], q.shape[0], ref,
                                    lambda kernel: rel_error_bound(Int8Kernel(kernel), scale.dtype))


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T + bias, for x [..., in]."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 settings: KernelSettings | None = None):
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight_int8", q)        # [out, in] int8
        self.register_buffer("scale", scale)          # [out], the original weight dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # Probed in a child process, then timed here (see agent/kernels/autotune.py).
        self.choice = choose_int8_kernel(q, scale, self.bias, settings)
        self.kernel = Int8Kernel(self.choice.kernel)
        self._op_fn = ops.dequant_linear if self.kernel == Int8Kernel.DEQUANT \
            else ops.impl("int8_linear", q.device)                # TRITON (CUDA) / DEQUANT
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
            y = int8pack_linear(x2, self.weight_int8, self.scale, self.bias)
        elif k == Int8Kernel.INT8PACK_BF16 and x2.dtype == torch.float32:
            y = int8pack_bf16_linear(x2, self.weight_int8, self.scale_bf16, self.bias)
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
    """Embedding lookup on int8 rows: out = q[ids] * scale[ids] (one scale per token row),
    times the original embedding's `embed_scale` when it had one (Gemma's sqrt(hidden)).

    Build it with `from_embedding`, which refuses an embedding it cannot reproduce exactly
    (see `int8_embedding_reason`). padding_idx only changes gradients in nn.Embedding; its
    row is looked up like any other (a zero row quantises to exact zeros)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor,
                 embed_scale: torch.Tensor | None = None, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.padding_idx = padding_idx
        self.register_buffer("weight_int8", q)        # [V, H] int8, shared with a tied head
        self.register_buffer("scale", scale)          # [V]
        # [] scalar, kept in its own dtype as the original keeps it (cast at use, as it does).
        self.register_buffer("embed_scale", None if embed_scale is None
                             else embed_scale.detach().clone(), persistent=False)

    @staticmethod
    def from_embedding(emb: nn.Module, q: torch.Tensor, scale: torch.Tensor) -> "Int8Embedding":
        reason = int8_embedding_reason(emb)
        if reason:
            raise ValueError(f"cannot quantise the input embedding: {reason}")
        return Int8Embedding(q, scale, _embed_scale(emb), emb.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:           # ids [B, T]
        rows = F.embedding(ids, self.weight_int8)                     # [B, T, H] int8
        out = rows.to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)
        return out if self.embed_scale is None else out * self.embed_scale.to(out.dtype)


def _embed_scale(emb: nn.Module) -> torch.Tensor | None:
    """The scalar a scaled-embedding subclass multiplies its lookup by, or None."""
    if type(emb).forward is nn.Embedding.forward:
        return None
    value = getattr(emb, "embed_scale", None)
    if value is None:
        return None
    return torch.as_tensor(value, device=emb.weight.device)


_PROBE_IDS = 8      # rows looked up to check a subclass's forward is lookup * embed_scale


@torch.no_grad()
def int8_embedding_reason(emb: nn.Module) -> str | None:
    """None when Int8Embedding reproduces `emb` exactly (a plain nn.Embedding, or a subclass
    whose forward is the lookup times a scalar `embed_scale`), else why not."""
    name = type(emb).__name__
    if not isinstance(emb, nn.Embedding):
        return f"{name} is not an nn.Embedding"
    if emb.max_norm is not None:
        return f"{name} has max_norm={emb.max_norm}: its lookup renormalises rows"
    if type(emb).forward is nn.Embedding.forward:
        return None
    scale = _embed_scale(emb)
    if scale is None or scale.numel() != 1:
        return (f"{name} overrides nn.Embedding.forward without a scalar embed_scale: "
                "int8 cannot tell what its forward computes")
    ids = torch.arange(min(_PROBE_IDS, emb.num_embeddings), device=emb.weight.device)[None]
    try:
        expected = F.embedding(ids, emb.weight) * scale.to(emb.weight.dtype)   # [1, N, H]
        same = torch.equal(emb(ids), expected)
    except Exception as e:       # e.g. weights offloaded to "meta": nothing to compare with
        return f"{name}.forward failed on a probe lookup ({type(e).__name__}: {e})"
    return None if same else (f"{name}.forward is not the lookup times embed_scale: "
                              "int8 would not reproduce it")


def tied_embedding(model: nn.Module, head: nn.Module) -> nn.Module | None:
    """The input embedding when it shares the output head's weight storage, else None."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    w = getattr(emb, "weight", None)
    if not isinstance(w, torch.Tensor) or w.data_ptr() != head.weight.data_ptr():
        return None
    return emb


def path_of(model: nn.Module, module: nn.Module) -> tuple[nn.Module, str]:
    for name, m in model.named_modules():
        if m is module and name:
            parent, _, leaf = name.rpartition(".")
            return (model.get_submodule(parent) if parent else model), leaf
    raise ValueError(f"{type(module).__name__} not found inside the model")


def apply_head_int8(model: nn.Module, log: UndoLog,
                    settings: KernelSettings | None = None) -> list[str]:
    """Output head -> Int8Linear; a tied input embedding -> Int8Embedding on the same int8
    matrix (keeping its embed_scale). Returns notes. Raises ValueError, before any change,
    for a head or tied embedding it cannot reproduce (head_int8_support says why)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"output head is {type(head).__name__}, not nn.Linear: cannot quantise it")
    emb = tied_embedding(model, head)
    q, scale = quantize_per_channel(head.weight)          # per output row = per token
    new_emb = None if emb is None else Int8Embedding.from_embedding(emb, q, scale)
    new_head = Int8Linear(q, scale, head.bias, settings)
    parent, leaf = path_of(model, head)
    if new_emb is not None:
        eparent, eleaf = path_of(model, emb)
        log.swap(eparent, eleaf, new_emb)
    log.swap(parent, leaf, new_head)
    tied_note = "" if emb is None else ", tied embedding int8" + (
        "" if new_emb.embed_scale is None else f" (embed_scale {float(new_emb.embed_scale):g} kept)")
    return [f"lm_head: int8 ({new_head.kernel.value})" + tied_note]


def head_int8_support(model: nn.Module) -> str | None:
    """None if int8 can replace the model's output head (an nn.Linear from
    get_output_embeddings(), and a tied input embedding that Int8Embedding reproduces:
    nn.Embedding, or a subclass that only scales by embed_scale), else why not. Call it on
    the unoptimised model."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return f"{type(model).__name__} has no get_output_embeddings()"
    head = get()
    if head is None:
        return f"{type(model).__name__}.get_output_embeddings() returned None"
    if not isinstance(head, nn.Linear):
        return f"the output head is {type(head).__name__}, not nn.Linear"
    # The tied embedding becomes int8 with the head; it must stay what it computed.
    emb = tied_embedding(model, head)
    reason = None if emb is None else int8_embedding_reason(emb)
    return None if reason is None else f"the output head is tied to the input embedding: {reason}"
