"""The executor: validates a plan against the model it holds, applies it atomically, rolls back.

    ex = Executor(model, structure, fingerprint)       # fingerprint of the unoptimised model
    with ex.lock:                                      # the caller's request boundary
        report = ex.apply(plan)                        # PlanError: refused, model untouched
    ex.rollback()                                      # bitwise-identical original again
    with ex.baseline():                                # the original for a moment, plan kept
        reference = model(ids)

Transforms run in `APPLY_ORDER`. Each records its changes in one UndoLog; if any transform
fails, the log is undone before the error propagates, so a plan is all or nothing.
Transforms find the modules to rewrite through their attribute paths inside the *live* block,
so a later transform (int8) rewrites what an earlier one (pruning) left in place.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from torch import Tensor, nn

from headroom_sidecar.agent.adapters.base import BlockRefs, ModelStructure
from headroom_sidecar.agent.executor.execution import apply_execution, execution_support
from headroom_sidecar.agent.executor.int8 import (Int8Linear, apply_head_int8, head_int8_support,
                                 probe_model_int8)
from headroom_sidecar.agent.executor.packed import (PackedLinear, apply_head_packed, packed_or_none,
                                                   probe_model_dense)
from headroom_sidecar.agent.executor.prune import PrunedAttention, ZeroAttention, prune_support
from headroom_sidecar.agent.executor.skip import IdentityBlock, apply_skip
from headroom_sidecar.agent.executor.speculative.install import build_draft
from headroom_sidecar.agent.executor.sparsity import SparseDownProj
from headroom_sidecar.agent.executor.undo import UndoLog
from headroom_sidecar.agent.executor.weights import weight_bytes
from headroom_sidecar.agent.kernels.autotune import kernel_choices
from headroom_sidecar.agent.kernels.dense_impls import DenseKernel
from headroom_sidecar.agent.kernels.settings import Fp32Cpu, KernelSettings
from headroom_sidecar.agent.plan import check_fit
from headroom_sidecar.proto.plan import (ActivationSparsity, Execution, Plan, Precision, PruneHeads,
                                         SkipLayers, Transform, TransformKind, WeightPrecision)
from headroom_sidecar.agent.adapters.base import WeightLayout


class TransformError(RuntimeError):
    """A transform failed while applying; the model was restored before this was raised."""


@dataclass(frozen=True)
class ExecutorSettings:
    # Where modules removed from the live model wait for a rollback (host memory).
    park_device: str = field(default="cpu", metadata={"env": "HEADROOM_EXECUTOR_PARK_DEVICE"})
    # Sparse down projection reads only surviving weight columns at decode (see sparsity.py).
    sparse_decode_gather: bool = field(default=False,
                                       metadata={"env": "HEADROOM_SPARSE_DECODE_GATHER"})
    # execution: static cache length in tokens; 0 = the longest request seen, rounded up.
    static_cache_tokens: int = field(default=0, metadata={"env": "HEADROOM_STATIC_CACHE_TOKENS"})

    def __post_init__(self) -> None:
        if self.static_cache_tokens < 0:
            raise ValueError(f"executor setting static_cache_tokens={self.static_cache_tokens}: "
                             "must be >= 0 (0 = the longest request seen)")

    @classmethod
    def resolve(cls, **overrides: Any) -> "ExecutorSettings":
        from headroom_sidecar.agent.settings import resolve_settings
        return resolve_settings(cls, overrides, "executor")


@dataclass
class ApplyReport:
    plan_id: str
    plan_hash: str
    applied: list[str]                 # transform kinds, in the order applied
    notes: list[str]                   # validation notes and fallbacks taken
    apply_ms: float
    weight_bytes_before: int
    weight_bytes_after: int
    heads_removed: int
    layers_skipped: int
    # module path -> {"kernel", "candidates_us", "rejected"}: each measured kernel choice
    kernels: dict[str, dict] = field(default_factory=dict)


_ROLES = ("attn", "mlp", "q", "k", "v", "qkv", "o", "gate", "up", "down")


def block_paths(block: BlockRefs) -> dict[str, str]:
    """Role -> attribute path of that module inside the block ('self_attn.q_proj', ...)."""
    names = {id(m): n for n, m in block.module.named_modules()}
    mods = {"attn": block.attn.module, "mlp": block.mlp.module, "q": block.attn.q_proj,
            "k": block.attn.k_proj, "v": block.attn.v_proj, "qkv": block.attn.qkv_proj,
            "o": block.attn.o_proj, "gate": block.mlp.gate_proj, "up": block.mlp.up_proj,
            "down": block.mlp.down_proj}
    return {role: names[id(m)] for role, m in mods.items() if m is not None and id(m) in names}


def _split(path: str) -> tuple[str, str]:
    parent, _, leaf = path.rpartition(".")
    return parent, leaf


Applier = Callable[["Executor", Transform, UndoLog], list[str]]


class Executor:
    def __init__(self, model: nn.Module, structure: ModelStructure, fingerprint: str,
                 settings: ExecutorSettings | None = None,
                 appliers: dict[TransformKind, Applier] | None = None):
        self.model, self.structure, self.fingerprint = model, structure, fingerprint
        self.settings = settings or ExecutorSettings.resolve()
        self.paths = [block_paths(b) for b in structure.blocks]
        # Judged once, on the unoptimised head: an applied plan may have swapped it for int8.
        self.head_reason = head_int8_support(model)
        self.lock = threading.Lock()     # held across apply/rollback; callers hold it per request
        self.appliers = dict(DEFAULT_APPLIERS if appliers is None else appliers)
        self.active_plan: Plan | None = None
        # Longest request seen (prompt + output tokens); the agent's tracker sets it.
        self.longest_request_tokens: Callable[[], int] = lambda: 0
        self._log: UndoLog | None = None

    def supported(self) -> dict[TransformKind, str | None]:
        """Each kind -> None if it can run on this model, else the reason it cannot."""
        offloaded = _offloaded(self.model)
        if offloaded:
            return {kind: offloaded for kind in TransformKind}
        return {TransformKind.SKIP_LAYERS: None,
                TransformKind.PRUNE_HEADS: prune_support(self.structure),
                TransformKind.ACTIVATION_SPARSITY: None if all("down" in p for p in self.paths)
                else "down projection not found inside the block",
                TransformKind.WEIGHT_PRECISION: _int8_support(self.structure),
                TransformKind.EXECUTION: execution_support(self.model)}

    def validate(self, plan: Plan) -> list[str]:
        """PlanError listing every problem, or the notes; touches nothing."""
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return check_fit(plan, self.structure, self.fingerprint, self.supported(),
                         self.head_reason, dtype)

    def apply(self, plan: Plan) -> ApplyReport:
        with self.lock:
            notes = self.validate(plan)
            if self.active_plan is not None:
                self._rollback_locked()
            t0, before = time.perf_counter(), weight_bytes(self.model)
            log, applied = UndoLog(self.settings.park_device), []
            for t in plan.ordered():
                try:
                    notes += self.appliers[t.kind](self, t, log)
                except Exception as e:
                    log.undo()
                    _drop_compiled(self.model)
                    raise TransformError(f"plan {plan.plan_id!r}: {t.kind.value} failed "
                                         f"({type(e).__name__}: {e}); model restored") from e
                applied.append(t.kind.value)
            _drop_compiled(self.model)
            self._log, self.active_plan = log, plan
            return ApplyReport(plan.plan_id, plan.hash, applied, notes,
                               (time.perf_counter() - t0) * 1e3, before,
                               weight_bytes(self.model), self._heads_removed(plan),
                               len(_skipped(plan)), kernel_choices(self.model))

    def rollback(self) -> None:
        with self.lock:
            self._rollback_locked()

    @contextlib.contextmanager
    def baseline(self) -> Iterator[None]:
        """The unoptimised model inside the block (original module objects, bitwise); the plan's
        own modules come back on exit without re-running its transforms. `active_plan` stays
        set. Holds `lock`: do not apply or roll back inside the block."""
        with self.lock:
            if self._log is None:
                yield
                return
            compiled = _stash_compiled(self.model)   # traced with the plan's modules
            try:
                with self._log.reverted():
                    yield
            finally:
                _drop_compiled(self.model)
                self.model.__dict__.update(compiled)

    def _rollback_locked(self) -> None:
        if self._log is not None:
            self._log.undo()
        _drop_compiled(self.model)
        self._log, self.active_plan = None, None

    def live(self, layer: int, role: str) -> tuple[nn.Module, str, nn.Module]:
        """(parent module, attribute name, current module) of `role` in live block `layer`."""
        parent_path, leaf = _split(self.paths[layer][role])
        block = self.structure.layers[layer]
        parent = block.get_submodule(parent_path) if parent_path else block
        return parent, leaf, getattr(parent, leaf)

    def is_skipped(self, layer: int) -> bool:
        return isinstance(self.structure.layers[layer], IdentityBlock)

    def _heads_removed(self, plan: Plan) -> int:
        prune, skipped = plan.get(TransformKind.PRUNE_HEADS), _skipped(plan)
        pruned = 0 if prune is None else sum(len(h) for l, h in prune.heads.items() if l not in skipped)
        return pruned + len(skipped) * self.structure.num_heads


def _int8_support(s: ModelStructure) -> str | None:
    """int8 replaces 2-D projection weights (nn.Linear [out, in], GPT-2 Conv1D [in, out]);
    any other projection (fused experts, a custom module) is refused before a weight changes."""
    for b in s.blocks:
        for name, mod in (("q", b.attn.q_proj), ("k", b.attn.k_proj), ("v", b.attn.v_proj),
                          ("qkv", b.attn.qkv_proj), ("o", b.attn.o_proj),
                          ("gate", b.mlp.gate_proj), ("up", b.mlp.up_proj),
                          ("down", b.mlp.down_proj)):
            w = getattr(mod, "weight", None)
            linear = isinstance(mod, nn.Linear) or s.weight_layout == WeightLayout.IN_OUT
            if mod is not None and not (linear and isinstance(w, Tensor) and w.dim() == 2):
                return (f"layer {b.index}: {name} projection is {type(mod).__name__}, not a "
                        "linear layer with a 2-D weight; int8 cannot replace it")
    return None


def _offloaded(model: nn.Module) -> str | None:
    """Weights on the meta device live elsewhere (accelerate offload): a transform would have to
    move or copy them, so every plan is refused before it touches one."""
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            return (f"parameter {name} is offloaded (meta device, accelerate): plans need every "
                    f"weight resident")
    return None


def _skipped(plan: Plan) -> set[int]:
    skip = plan.get(TransformKind.SKIP_LAYERS)
    return set(skip.layers) if skip else set()


_COMPILED_ATTRS = ("_compiled_call", "_last_compile_config")


def _stash_compiled(model: nn.Module) -> dict[str, Any]:
    return {n: model.__dict__.pop(n) for n in _COMPILED_ATTRS if n in model.__dict__}


def _drop_compiled(model: nn.Module) -> None:
    """A compiled decode cached by generate() belongs to the modules it was traced with."""
    for name in _COMPILED_ATTRS:
        if name in model.__dict__:
            delattr(model, name)


# --------------------------------------------------------------------------- the appliers

def _apply_skip(ex: Executor, t: SkipLayers, log: UndoLog) -> list[str]:
    apply_skip(ex.structure, t.layers, log)
    return []


def _apply_prune(ex: Executor, t: PruneHeads, log: UndoLog) -> list[str]:
    s = ex.structure
    for layer, heads in sorted(t.heads.items()):
        if not heads or ex.is_skipped(layer):
            continue
        parent, leaf, attn = ex.live(layer, "attn")
        kept = [h for h in range(s.num_heads) if h not in set(heads)]
        new = PrunedAttention(attn, kept, s) if kept else ZeroAttention(attn, s.hidden_size)
        log.swap(parent, leaf, new)
    return []


def _apply_sparsity(ex: Executor, t: ActivationSparsity, log: UndoLog) -> list[str]:
    in_out = ex.structure.weight_layout == WeightLayout.IN_OUT
    for layer, threshold in sorted(t.thresholds.items()):
        if ex.is_skipped(layer):
            continue
        parent, leaf, down = ex.live(layer, "down")
        # park=False: the wrapper keeps using the original down projection.
        log.swap(parent, leaf, SparseDownProj(down, threshold, in_out,
                                              ex.settings.sparse_decode_gather), park=False)
    return []


def _apply_precision(ex: Executor, t: WeightPrecision, log: UndoLog) -> list[str]:
    """int8 and fp32_packed layers. A draft plan is built over the verifier's live modules: an
    int8 one is shared, a packed one is quantised from its weight for an int8 draft."""
    settings = KernelSettings.resolve()
    if Precision.INT8 in set(t.layers.values()) or t.head == Precision.INT8:
        probe_model_int8(ex.model, ex.structure.weight_layout)   # one probe child for all shapes
    packs = Precision.FP32_PACKED in set(t.layers.values()) or t.head == Precision.FP32_PACKED
    if packs and settings.fp32_cpu != Fp32Cpu.ATEN:
        probe_model_dense(list(ex.model.modules()), settings)
    kept: dict[str, int] = {}
    for layer, precision in sorted(t.layers.items()):
        if ex.is_skipped(layer):
            continue
        for parent, leaf, mod in _precision_targets(ex, layer, precision):
            if precision == Precision.INT8:
                log.swap(parent, leaf, Int8Linear.from_module(mod, ex.structure.weight_layout))
                continue
            new, choice = packed_or_none(mod, settings)
            if new is None:
                why = choice.rejected.get(DenseKernel.ONEDNN_PACKED.value, "aten is faster here")
                kept[why] = kept.get(why, 0) + 1
            else:
                log.swap(parent, leaf, new)
    notes = [f"fp32_packed: {n} linear(s) left as they are: {why}" for why, n in kept.items()]
    # check_fit refused the plan unless the head is an nn.Linear; a tied embedding follows it.
    if t.head == Precision.INT8:
        notes += apply_head_int8(ex.model, log)
    elif t.head == Precision.FP32_PACKED:
        notes += apply_head_packed(ex.model, log, settings)
    return notes


def _precision_targets(ex: Executor, layer: int, precision: Precision) -> list[tuple]:
    """(parent, name, module) of each linear of `layer` to replace under `precision`."""
    out = []
    for role in ("q", "k", "v", "qkv", "o", "gate", "up", "down"):
        if role not in ex.paths[layer] or not _has_role(ex, layer, role):
            continue
        parent, leaf, mod = ex.live(layer, role)
        if isinstance(mod, SparseDownProj):
            if precision == Precision.FP32_PACKED:
                continue               # its decode gathers from a copy of its own (sparsity.py)
            parent, leaf, mod = mod, "inner", mod.inner   # quantise the projection it wraps
        # int8 over a packed layer quantises its (unpacked) weight; nothing repacks an int8 one.
        done = (Int8Linear,) if precision == Precision.INT8 else (Int8Linear, PackedLinear)
        if not isinstance(mod, done):
            out.append((parent, leaf, mod))
    return out


def _has_role(ex: Executor, layer: int, role: str) -> bool:
    """False when an earlier transform removed the module (e.g. ZeroAttention has no q_proj)."""
    try:
        ex.live(layer, role)
        return True
    except AttributeError:
        return False


def _apply_execution(ex: Executor, t: Execution, log: UndoLog) -> list[str]:
    return apply_execution(ex.model, ex.structure.layers, t, log,
                           fixed_cache_tokens=ex.settings.static_cache_tokens,
                           longest_seen=ex.longest_request_tokens,
                           draft_builder=lambda transforms: build_draft(ex, transforms))


DEFAULT_APPLIERS: dict[TransformKind, Applier] = {
    TransformKind.SKIP_LAYERS: _apply_skip,
    TransformKind.PRUNE_HEADS: _apply_prune,
    TransformKind.ACTIVATION_SPARSITY: _apply_sparsity,
    TransformKind.WEIGHT_PRECISION: _apply_precision,
    TransformKind.EXECUTION: _apply_execution,
}
