"""The experiment loop: hypotheses over the plan space, each one measured by a trial.

Order (cheap and safe first): fp32_packed on every layer and the output head (the same fp32
weights in the layout of the fastest fp32 GEMM on the agent's CPU: quality-neutral, so kept
only if faster), then int8 weights on every layer (one trial if it fits; int8 layers replace
packed ones), then int8
on the output head (lm_head, one trial), then activation sparsity layer by layer (binary
search for the largest threshold on the layer's ladder), then head pruning (lowest share
first, binary search for the batch size), then layer skipping (lowest influence first, one
layer per trial). Every hypothesis is the kept plan plus one change; it is kept if its
evidence is within the quality budget. Last, on a trial kept for it: static KV cache +
compiled decode on top of the best plan, kept only if it is also faster (a compile per trial
would cost about a minute on a CPU, so it is tried once, at the end).

A hypothesis is kept when its evidence is inside the quality budget and its latency ratio
(plan / unoptimised, timed back to back in the same trial) is at most the budget's
max_latency_ratio (1.0 unless a policy states a trade). The best plan is chosen among the kept
ones by the objective: LATENCY (the default) takes the fastest, and among plans within
`latency_tie_fraction` of it the smallest; MEMORY (where a policy's latency rule trades speed
for memory) takes the smallest, then the fastest.

Binary searches assume that more of one change never costs less quality (a larger threshold,
more heads). With that, each search keeps the largest prefix that fits in about log2(n) trials.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from headroom_sidecar.controlplane.plan_diff import layer_ranges
from headroom_sidecar.proto.plan import (HEAD_KEY, ActivationSparsity, CompileMode, Execution, Plan,
                                         PlanMode, Precision, PruneHeads, SkipLayers, WeightPrecision)
from headroom_sidecar.controlplane.planner.candidates import Candidates
from headroom_sidecar.controlplane.planner.settings import PlannerSettings
from headroom_sidecar.controlplane.policy.schema import Objective


class TrialError(RuntimeError):
    """The trial could not be measured (agent refused the plan, timed out, ...): the hypothesis is dropped."""


class EvidenceKey(str, enum.Enum):
    """Keys of the evidence dict a trial returns (the agent's TrialResult.evidence_json)."""
    TOP1 = "top1_agreement"     # fraction of next-token argmax equal to the baseline's
    PPL_RATIO = "ppl_ratio"     # perplexity with the plan / without
    MEAN_KL = "mean_kl"         # mean KL(baseline || plan) of next-token distributions, nats
    EXACT_MATCH = "exact_match" # fraction of greedy continuations identical to the baseline's
    LATENCY_PLAN = "latency_ms_per_token_plan"   # median decode step with the plan
    LATENCY_RATIO = "latency_ratio"   # plan / unoptimised, median of back-to-back pairs
    MEMORY_RATIO = "memory_ratio"     # weight bytes with the plan / without
    ERROR = "error"             # non-empty: the trial failed


class Phase(str, enum.Enum):
    FP32_PACKED = "fp32_packed"
    INT8 = "int8"
    INT8_HEAD = "int8_lm_head"
    SPARSITY = "activation_sparsity"
    PRUNE_HEADS = "prune_heads"
    SKIP_LAYERS = "skip_layers"
    EXECUTION = "execution"
    SPECULATION = "speculation"     # per query class: draft and k (planner/speculation.py)


@dataclass(frozen=True)
class QualityBudget:
    min_top1: float = 0.97
    max_ppl_ratio: float = 1.01
    max_mean_kl: float = 0.02
    min_exact_match: Optional[float] = None   # None: not checked
    # Latency (plan / unoptimised): 1.0 = never slower; a policy's stated trade may raise it.
    max_latency_ratio: float = 1.0

    def _checks(self):
        # (label, key, is_minimum, limit), in a fixed order so reasons read the same every time
        checks = [("top1", EvidenceKey.TOP1, True, self.min_top1),
                  ("ppl_ratio", EvidenceKey.PPL_RATIO, False, self.max_ppl_ratio),
                  ("mean_kl", EvidenceKey.MEAN_KL, False, self.max_mean_kl)]
        if self.min_exact_match is not None:
            checks.append(("exact_match", EvidenceKey.EXACT_MATCH, True, self.min_exact_match))
        checks.append(("latency_ratio", EvidenceKey.LATENCY_RATIO, False, self.max_latency_ratio))
        return checks

    def check(self, evidence: Mapping[str, Any]) -> tuple[bool, str]:
        """(within budget, reason): 'kept: top1 0.985 >= 0.97, ...' or 'dropped: <failures>'."""
        passed, failed = [], []
        for label, key, is_min, limit in self._checks():
            value = evidence.get(key.value)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                failed.append(f"evidence has no finite {key.value} (got {value!r})")
            elif (value >= limit) if is_min else (value <= limit):
                passed.append(f"{label} {value:.4g} {'>=' if is_min else '<='} {limit:.4g}")
            else:
                failed.append(f"{label} {value:.4g} {'<' if is_min else '>'} {limit:.4g}")
        if failed:
            return False, "dropped: " + ", ".join(failed)
        return True, "kept: " + ", ".join(passed)


@dataclass(frozen=True)
class TrialRecord:
    index: int                  # 1-based, in the order trials ran
    phase: Phase
    change: str                 # the one change on top of the kept plan, in words
    plan: dict                  # the full plan document that was trialled
    evidence: Optional[dict]
    kept: bool
    reason: str
    elapsed_ms: float


@dataclass(frozen=True)
class SearchResult:
    best: Optional[dict]        # the kept plan the objective prefers; None if no change fit
    best_trial: Optional[TrialRecord]
    trail: list[TrialRecord]
    stop_reason: str
    objective: Objective = Objective.LATENCY


def choose_best(trail: list[TrialRecord], objective: Objective,
                tie_fraction: float) -> Optional[TrialRecord]:
    """Among kept trials: the best on the objective's metric; among those within tie_fraction
    of it, the best on the other (latency first: the smallest of the near-fastest)."""
    kept = [r for r in trail if r.kept and r.evidence]
    if not kept:
        return None
    first, second = (EvidenceKey.LATENCY_RATIO, EvidenceKey.MEMORY_RATIO)
    if objective is Objective.MEMORY:
        first, second = second, first
    value = lambda r, key: _finite(r.evidence.get(key.value))
    top = min(value(r, first) for r in kept)
    near = [r for r in kept if value(r, first) <= top * (1 + tie_fraction)]
    return min(near, key=lambda r: (value(r, second), value(r, first), r.index))


def _finite(v: Any) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else math.inf


@dataclass(frozen=True)
class _Parts:
    """The kept plan as sets, so one change is one set operation."""
    packed: frozenset = frozenset()  # fp32_packed layers (int8 ones win a layer in both)
    packed_head: bool = False       # the output head fp32_packed (int8_head wins)
    int8: frozenset = frozenset()
    int8_head: bool = False         # the output head (lm_head) in int8
    thresholds: tuple = ()          # ((layer, threshold), ...)
    heads: frozenset = frozenset()  # {(layer, head)}
    skipped: frozenset = frozenset()
    compiled: bool = False          # static KV cache + compiled decode

    def with_threshold(self, layer: int, t: float) -> "_Parts":
        rest = tuple(p for p in self.thresholds if p[0] != layer)
        return dataclasses.replace(self, thresholds=tuple(sorted(rest + ((layer, t),))))

    def _precision(self, keep: Callable[[int], bool]) -> WeightPrecision:
        layers = {l: Precision.INT8 if l in self.int8 else Precision.FP32_PACKED
                  for l in sorted(self.int8 | self.packed) if keep(l)}
        head = Precision.INT8 if self.int8_head else \
            Precision.FP32_PACKED if self.packed_head else None
        return WeightPrecision(layers, head)

    def transforms(self) -> tuple:
        """A skipped layer never runs: its other changes are left out of the document."""
        keep = lambda layer: layer not in self.skipped
        out = []
        if self.int8 or self.int8_head or self.packed or self.packed_head:
            out.append(self._precision(keep))
        if self.thresholds:
            out.append(ActivationSparsity({l: t for l, t in self.thresholds if keep(l)}))
        heads: dict[int, list[int]] = {}
        for layer, head in sorted(self.heads):
            if keep(layer):
                heads.setdefault(layer, []).append(head)
        if heads:
            out.append(PruneHeads({l: tuple(h) for l, h in heads.items()}))
        if self.skipped:
            out.append(SkipLayers(tuple(sorted(self.skipped))))
        head = lambda t: isinstance(t, WeightPrecision) and t.head is not None
        kept = tuple(t for t in out if t.touched_layers() or head(t))
        return kept + ((Execution(True, CompileMode.TORCH_COMPILE),) if self.compiled else ())


class _OutOfTrials(Exception):
    pass


Evaluate = Callable[[dict], Mapping[str, Any]]
Record = Callable[[TrialRecord], None]


@dataclass(frozen=True)
class PlanTarget:
    """What the plans are for; every hypothesis document carries these."""
    model_fingerprint: str
    plan_id_prefix: str             # hypothesis i gets plan_id f"{prefix}-t{i:03d}": make it unique per run
    query_classes: tuple[str, ...] = ()
    mode: PlanMode = PlanMode.STRUCTURAL


class Planner:
    """One experiment loop for one model fingerprint and query class.

    `evaluate(plan_doc) -> evidence` runs a trial (in production: a TrialRequest to an agent);
    it raises TrialError, or returns evidence with a non-empty "error", when the trial failed.
    `record(TrialRecord)` is called once per hypothesis, after its trial, in order.
    `propose(plan_doc)`, if given, is called before each trial (e.g. to store the plan first).
    """

    def __init__(self, evaluate: Evaluate, budget: QualityBudget, max_trials: Optional[int] = None,
                 record: Optional[Record] = None, settings: Optional[PlannerSettings] = None,
                 propose: Optional[Callable[[dict], None]] = None,
                 objective: Objective = Objective.LATENCY):
        self.settings = settings or PlannerSettings.resolve()
        self.objective = objective
        self.max_trials = self.settings.max_trials if max_trials is None else max_trials
        if self.max_trials < 0:
            raise ValueError(f"max_trials must be >= 0, got {self.max_trials}")
        self._evaluate, self._budget = evaluate, budget
        self._record, self._propose = record or (lambda r: None), propose or (lambda d: None)

    def run(self, target: PlanTarget, candidates: Candidates) -> SearchResult:
        self._target, self._cands = target, candidates
        self._kept, self._trail, self._head = _Parts(), [], None
        stop = "every candidate tried"
        phases = (self._phase_packed, self._phase_int8, self._phase_int8_head, self._phase_sparsity,
                  self._phase_heads, self._phase_skip)
        if target.mode == PlanMode.DYNAMIC:
            phases = (self._phase_sparsity,)   # only thresholds can change per request
        compile_last = self.settings.compiled_decode and target.mode == PlanMode.STRUCTURAL
        # The execution trial comes last (a compile per trial would cost minutes on a CPU)
        # and has its trial kept for it.
        self._limit = self.max_trials - (1 if compile_last and self.max_trials > 1 else 0)
        try:
            for phase in phases:
                phase()
        except _OutOfTrials:
            stop = f"max_trials ({self.max_trials}) reached"
        if compile_last and len(self._trail) < self.max_trials:
            self._phase_execution()
        best = choose_best(self._trail, self.objective, self.settings.latency_tie_fraction)
        return SearchResult(best.plan if best else None, best, list(self._trail), stop,
                            self.objective)

    # ------------------------------------------------------------ phases
    def _phase_packed(self) -> None:
        """Quality-neutral (fp32 all the way), so kept only when faster than the unoptimised
        model; an agent that cannot pack here leaves its layers as they are and is not faster."""
        if self.settings.fp32_packed:
            self._trial(Phase.FP32_PACKED, f"fp32_packed weights on every layer and {HEAD_KEY}",
                        dataclasses.replace(self._kept, packed=frozenset(range(
                            self._cands.num_layers)), packed_head=True), faster_than=1.0)

    def _phase_int8(self) -> None:
        order = self._cands.int8_layers
        start = self._kept

        def probe(k: int) -> bool:
            layers = order[:k]
            return self._trial(Phase.INT8, f"int8 weights on {_layers_word(layers)}",
                               dataclasses.replace(start, int8=start.int8 | set(layers)))
        _largest_ok(len(order), probe, try_all_first=True)

    def _phase_int8_head(self) -> None:
        """One hypothesis on top of the best plan so far; an agent whose head is not an
        nn.Linear refuses it (a failed trial, dropped like any other)."""
        if self.settings.int8_lm_head:
            self._trial(Phase.INT8_HEAD, f"int8 weights on {HEAD_KEY}",
                        dataclasses.replace(self._kept, int8_head=True))

    def _phase_execution(self) -> None:
        """Quality-neutral, so kept only when it is also faster than the plan it builds on."""
        before = (self._head.evidence or {}).get(EvidenceKey.LATENCY_RATIO.value) if self._head else None
        self._limit = self.max_trials
        self._trial(Phase.EXECUTION, "static KV cache + compiled decode",
                    dataclasses.replace(self._kept, compiled=True), faster_than=before)

    def _protected(self) -> set[int]:
        """The first and last blocks (the default safety policy rejects structural changes
        there, so a trial on them would only spend the budget)."""
        last = self._cands.num_layers - 1
        return {0, last} if self.settings.protect_edge_layers else set()

    def _phase_sparsity(self) -> None:
        protected = self._protected()
        sparse = [c for c in self._cands.sparse_layers if c.layer not in protected]
        for cand in sparse[:self.settings.max_sparse_layers]:
            start = self._kept

            def probe(k: int, cand=cand, start=start) -> bool:
                step = cand.ladder[k - 1]
                return self._trial(Phase.SPARSITY, f"layer {cand.layer} MLP: zero |a| < "
                                   f"{step.threshold:g} (~{step.est_zero_fraction:.0%} of activations)",
                                   start.with_threshold(cand.layer, step.threshold))
            _largest_ok(len(cand.ladder), probe, try_all_first=False)

    def _phase_heads(self) -> None:
        order = self._prunable_heads()
        start = self._kept

        def probe(k: int) -> bool:
            chosen = order[:k]
            layers = layer_ranges({l for l, _ in chosen})
            return self._trial(Phase.PRUNE_HEADS, f"prune the {k} lowest-share heads (layers {layers})",
                               dataclasses.replace(start, heads=start.heads | set(chosen)))
        _largest_ok(len(order), probe, try_all_first=False)

    def _phase_skip(self) -> None:
        protected = self._protected()
        order = [c for c in self._cands.layers if c.layer not in protected]
        for cand in order[:self.settings.skip_candidates]:
            if len(self._kept.skipped) >= self.settings.max_skip_layers:
                return
            self._trial(Phase.SKIP_LAYERS, f"skip layer {cand.layer} "
                        f"(influence {cand.mean_influence:.3g})",
                        dataclasses.replace(self._kept, skipped=self._kept.skipped | {cand.layer}))

    def _prunable_heads(self) -> list[tuple[int, int]]:
        """Lowest share first, leaving every layer at least min_heads_per_layer heads."""
        taken: dict[int, int] = {}
        out, protected = [], self._protected()
        for c in self._cands.heads:
            if c.layer in protected:
                continue
            cap = self._cands.heads_per_layer.get(c.layer, 0) - self.settings.min_heads_per_layer
            if (c.layer, c.head) in self._kept.heads or taken.get(c.layer, 0) >= cap:
                continue
            taken[c.layer] = taken.get(c.layer, 0) + 1
            out.append((c.layer, c.head))
        return out[:self.settings.max_head_candidates]

    # ------------------------------------------------------------ one trial
    def _trial(self, phase: Phase, change: str, parts: _Parts,
               faster_than: Optional[float] = None) -> bool:
        if len(self._trail) >= self._limit:
            raise _OutOfTrials()
        index = len(self._trail) + 1
        t = self._target
        doc = Plan(f"{t.plan_id_prefix}-t{index:03d}", 1, t.model_fingerprint,
                      parts.transforms(), t.query_classes, t.mode,
                      notes=f"planner hypothesis {index}: {change}").to_doc()
        self._propose(doc)
        t0 = time.perf_counter()
        evidence, kept, reason = self._measure(doc)
        if kept and faster_than is not None:
            kept, reason = _faster(evidence, faster_than, reason)
        rec = TrialRecord(index, phase, change, doc, evidence, kept, reason,
                          (time.perf_counter() - t0) * 1e3)
        self._trail.append(rec)
        if kept:
            self._kept, self._head = parts, rec
        self._record(rec)
        return kept

    def _measure(self, doc: dict) -> tuple[Optional[dict], bool, str]:
        try:
            evidence = dict(self._evaluate(doc))
        except TrialError as e:
            return None, False, f"dropped: trial failed: {e}"
        if evidence.get(EvidenceKey.ERROR.value):
            return evidence, False, f"dropped: trial failed: {evidence[EvidenceKey.ERROR.value]}"
        kept, reason = self._budget.check(evidence)
        return evidence, kept, reason


def _faster(evidence: Mapping[str, Any], before: float, reason: str) -> tuple[bool, str]:
    """Latency ratios (each against the unoptimised model timed in its own trial) compare
    across trials; milliseconds from different windows do not."""
    after = _finite(evidence.get(EvidenceKey.LATENCY_RATIO.value))
    before = _finite(before)
    if not math.isfinite(before):
        return True, reason
    if after < before:
        return True, f"{reason}; latency ratio {after:.3f} vs {before:.3f} before"
    return False, f"dropped: not faster (latency ratio {after:.3f} vs {before:.3f} before)"


def _largest_ok(n: int, probe: Callable[[int], bool], try_all_first: bool) -> int:
    """Largest k in [0, n] whose probe(k) is ok; k = 0 is the kept plan (ok by construction).

    try_all_first spends one trial on k = n: right when the whole change usually fits (int8).
    """
    lo, hi = 0, n + 1
    if n == 0:
        return 0
    if try_all_first:
        if probe(n):
            return n
        hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _layers_word(layers) -> str:
    return f"layer{'s' if len(layers) != 1 else ''} {layer_ranges(layers)}"
