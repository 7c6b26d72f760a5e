"""Per-class speculation: which draft and k (if any) pay for one query class, by trial.

A class-scoped plan may differ from the default plan only in execution.speculative (the
agent refuses anything else: agent/executor/speculative/classes.py), so for a trigger with a
query class the hypotheses are the default plan's transforms plus one speculative setting:
prompt lookup with k in K_CHOICES, and, when a draft plan is given (e.g. the kept plan of a
weight search), the model under that draft plan with the same k. Each is trialled on the
class's own prompts (the job's eval set); the agent times it against the unoptimised model
in interleaved pairs (agent/latency.py) and reports exact match against it.

A candidate is kept only with exact match 1.0 (greedy speculation returns the verifier's own
tokens: less means the trial did not verify what it claims) and a latency ratio strictly
below `max_latency_ratio` (1.0 per speed.not-slower: speculation that only breaks even is
not worth its risk). The best is the smallest ratio (ties: the smaller k, then prompt lookup,
which costs no memory). With none kept the class is left alone, and the result says why.

Over a default plan (its transforms not empty) the verifier is that plan, while trials compare
with the unoptimised model; so the default plan itself, scoped to the class without
speculation, is trialled first as the bar: a candidate must match the unoptimised output at
least as often as it does (speculation adds no error of its own) and its latency ratio over
the bar's must be below `max_latency_ratio` (the speed speculation adds to the default).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from headroom_sidecar.controlplane.planner.search import (EvidenceKey, Phase, TrialError,
                                                          TrialRecord)
from headroom_sidecar.proto.plan import Plan
from headroom_sidecar.proto.plandoc import CompileMode, SpeculativeDraft, TransformKind

# On the CPU measured (bench/verify_cost.py) a verify forward of a 3-token draft costs about
# what one of 12 does, so a long draft is nearly free when it is right; which k pays differs
# by class (bench/speculative.py), so the trials pick per class.
K_CHOICES = (3, 6, 12)
EXACT_MATCH_REQUIRED = 1.0
_DRAFT_ORDER = {SpeculativeDraft.PROMPT_LOOKUP: 0, SpeculativeDraft.SELF: 1}


@dataclass(frozen=True)
class SpecCandidate:
    draft: SpeculativeDraft
    k: int

    def words(self) -> str:
        return f"{self.draft.value} k={self.k}"


@dataclass(frozen=True)
class SpeculationResult:
    query_class: str
    best: Optional[dict]                 # the class plan to propose; None: leave the class alone
    best_trial: Optional[TrialRecord]
    trail: list[TrialRecord]
    message: str                         # for the job: the choice, or why speculation does not pay


def candidates(draft_plan: Optional[Sequence[dict]], k_choices: Sequence[int] = K_CHOICES
               ) -> list[SpecCandidate]:
    drafts = [SpeculativeDraft.PROMPT_LOOKUP] + ([SpeculativeDraft.SELF] if draft_plan else [])
    return [SpecCandidate(d, k) for d in drafts for k in k_choices]


@dataclass(frozen=True)
class Bar:
    """What a candidate must beat: the unoptimised model, or the default plan's own trial."""
    exact_match: float = EXACT_MATCH_REQUIRED
    latency_ratio: float = 1.0
    source: str = "the unoptimised model"


def class_plan_doc(base_doc: Mapping[str, Any], query_class: str, cand: Optional[SpecCandidate],
                   draft_plan: Optional[Sequence[dict]], plan_id: str, notes: str) -> dict:
    """The default plan's transforms with `cand` as execution.speculative (None: none, the
    bar), scoped to the class. ValueError when the default's execution settings leave no room
    for speculation."""
    transforms = [dict(t) for t in base_doc.get("transforms", [])]
    execution = next((t for t in transforms if t.get("kind") == TransformKind.EXECUTION.value), None)
    if execution is None:
        execution = {"kind": TransformKind.EXECUTION.value, "static_kv_cache": False,
                     "compile": CompileMode.NONE.value}
        transforms.append(execution)
    if execution.get("static_kv_cache") or execution.get("compile") != CompileMode.NONE.value:
        raise ValueError("the default plan uses a static KV cache or a compiled decode, which "
                         "speculation cannot run with (it crops its own dynamic caches)")
    execution.pop("speculative", None)
    if cand is not None:
        execution["speculative"] = {"draft": cand.draft.value, "k": cand.k}
        if cand.draft is SpeculativeDraft.SELF:
            execution["speculative"]["draft_plan"] = {"transforms": [dict(t) for t in draft_plan or ()]}
    else:
        transforms.remove(execution)          # bare: the same as none (normal form drops it)
    doc = {**base_doc, "plan_id": plan_id, "version": 1, "query_classes": [query_class],
           "transforms": transforms, "notes": notes}
    return Plan.from_doc(doc).to_doc()          # validated, normal form


def judge(evidence: Optional[Mapping[str, Any]], max_latency_ratio: float,
          bar: Bar = Bar()) -> tuple[bool, str]:
    """(kept, reason) for one candidate's evidence, against `bar`."""
    if evidence is None:
        return False, "dropped: no evidence"
    if evidence.get(EvidenceKey.ERROR.value):
        return False, f"dropped: trial failed: {evidence[EvidenceKey.ERROR.value]}"
    exact = _number(evidence.get(EvidenceKey.EXACT_MATCH.value))
    ratio = _number(evidence.get(EvidenceKey.LATENCY_RATIO.value)) / bar.latency_ratio
    if not exact >= bar.exact_match:
        return False, (f"refused: exact match {exact:.3f} < {bar.exact_match:g} of "
                       f"{bar.source} (greedy speculation must return the verifier's own tokens)")
    if not ratio < max_latency_ratio:
        return False, (f"dropped: latency ratio {ratio:.3f} over {bar.source} not below "
                       f"{max_latency_ratio:g}")
    return True, f"kept: exact match {exact:g}, latency ratio {ratio:.3f} over {bar.source}"


def _number(v: Any) -> float:
    try:
        out = float(v)
    except (TypeError, ValueError):
        return math.nan
    return out


class SpeculationSearch:
    """evaluate(plan_doc) -> evidence (raises TrialError when the trial failed); record and
    propose as for Planner (one call per candidate, in order)."""

    def __init__(self, evaluate: Callable[[dict], Mapping[str, Any]],
                 max_latency_ratio: float = 1.0, max_trials: Optional[int] = None,
                 record: Optional[Callable[[TrialRecord], None]] = None,
                 propose: Optional[Callable[[dict], None]] = None,
                 k_choices: Sequence[int] = K_CHOICES):
        if not max_latency_ratio > 0:
            raise ValueError(f"max_latency_ratio must be > 0, got {max_latency_ratio}")
        self._evaluate, self.max_latency_ratio = evaluate, max_latency_ratio
        self.max_trials, self.k_choices = max_trials, tuple(k_choices)
        self._record, self._propose = record or (lambda r: None), propose or (lambda d: None)

    def run(self, base_doc: Mapping[str, Any], query_class: str, plan_id_prefix: str,
            draft_plan: Optional[Sequence[dict]] = None) -> SpeculationResult:
        """base_doc: the default plan's document (its fingerprint and transforms); a bare
        document with no transforms when the class's verifier is the unoptimised model."""
        if not query_class:
            raise ValueError("speculation is searched per query class: give one")
        trail: list[TrialRecord] = []
        self._bar = Bar()
        if base_doc.get("transforms"):
            rec = self._trial(1, base_doc, query_class, None, draft_plan, plan_id_prefix)
            if rec is None:
                return SpeculationResult(query_class, None, None, trail, _no_room(query_class))
            trail.append(rec)
            self._bar = _bar_of(rec, base_doc)
            if self._bar is None:
                self._record(rec)
                return SpeculationResult(query_class, None, None, trail, _no_bar(query_class, rec))
        for cand in candidates(draft_plan, self.k_choices)[:self.max_trials]:
            rec = self._trial(len(trail) + 1, base_doc, query_class, cand, draft_plan,
                              plan_id_prefix)
            if rec is None:
                return SpeculationResult(query_class, None, None, trail, _no_room(query_class))
            trail.append(rec)
        best = min((r for r in trail if r.kept), key=_rank, default=None)
        trail = [_only_best(r, best) for r in trail]
        for rec in trail:            # after the choice: the store keeps one plan, the best
            self._record(rec)
        return SpeculationResult(query_class, best.plan if best else None, best, trail,
                                 self._message(query_class, trail, best))

    def _trial(self, index: int, base_doc, query_class, cand, draft_plan, prefix
               ) -> Optional[TrialRecord]:
        words = cand.words() if cand is not None else "the default plan, no speculation (the bar)"
        try:
            doc = class_plan_doc(base_doc, query_class, cand, draft_plan, f"{prefix}-s{index:03d}",
                                 f"speculation for class {query_class!r}: {words}")
        except ValueError:
            return None
        self._propose(doc)
        t0 = time.perf_counter()
        try:
            evidence: Optional[dict] = dict(self._evaluate(doc))
        except TrialError as e:
            evidence, kept, reason = None, False, f"dropped: trial failed: {e}"
        else:
            kept, reason = judge(evidence, self.max_latency_ratio, self._bar)
            if cand is None:
                kept, reason = False, "the bar the candidates must beat (not a candidate)"
        return TrialRecord(index, Phase.SPECULATION, words, doc, evidence, kept, reason,
                           (time.perf_counter() - t0) * 1e3)

    def _message(self, query_class: str, trail: list[TrialRecord],
                 best: Optional[TrialRecord]) -> str:
        over = "" if self._bar.source == Bar().source else f" over {self._bar.source}"
        if best is not None:
            return (f"speculation for class {query_class!r}: {best.change}, latency ratio "
                    f"{_ratio(best) / self._bar.latency_ratio:.3f}{over} (best of "
                    f"{len(trail)} trial(s), exact match {_exact(best):g})")
        measured = [r for r in trail if math.isfinite(_ratio(r)) and _spec_of(r) is not None]
        if not measured:
            return (f"speculation does not pay for class {query_class!r}: no candidate could be "
                    f"measured ({len(trail)} trial(s))")
        top = min(measured, key=_ratio)
        return (f"speculation does not pay for class {query_class!r}: best ratio "
                f"{_ratio(top) / self._bar.latency_ratio:.3f}{over} ({top.change}; "
                f"{top.reason}); the class is left alone")


def _ratio(r: TrialRecord) -> float:
    return _number((r.evidence or {}).get(EvidenceKey.LATENCY_RATIO.value))


def _exact(r: TrialRecord) -> float:
    return _number((r.evidence or {}).get(EvidenceKey.EXACT_MATCH.value))


def speculative_of(doc: Mapping[str, Any]) -> Optional[dict]:
    """A plan document's execution.speculative, or None."""
    ex = next((t for t in doc.get("transforms", ()) if t["kind"] == TransformKind.EXECUTION.value), {})
    return ex.get("speculative")


def _spec_of(r: TrialRecord) -> Optional[dict]:
    return speculative_of(r.plan)


def _rank(r: TrialRecord) -> tuple:
    spec = _spec_of(r)
    return (_ratio(r), spec["k"], _DRAFT_ORDER[SpeculativeDraft(spec["draft"])], r.index)


def _bar_of(rec: TrialRecord, base_doc: Mapping[str, Any]) -> Optional[Bar]:
    """The default plan's own trial as the bar; None when it could not be measured."""
    if rec.evidence is None or rec.evidence.get(EvidenceKey.ERROR.value):
        return None
    exact, ratio = _exact(rec), _ratio(rec)
    if not (math.isfinite(exact) and math.isfinite(ratio) and ratio > 0):
        return None
    return Bar(exact, ratio, f"the default plan {base_doc.get('plan_id', '')!r}")


def _no_bar(query_class: str, rec: TrialRecord) -> str:
    why = rec.reason
    return (f"speculation does not pay for class {query_class!r}: the default plan could not "
            f"be measured as the bar ({why}); the class is left alone")


def _only_best(r: TrialRecord, best: Optional[TrialRecord]) -> TrialRecord:
    if not r.kept or r is best:
        return r
    return dataclasses.replace(r, kept=False, reason=f"dropped: latency ratio {_ratio(r):.3f}, "
                               f"{best.change} is faster ({_ratio(best):.3f})")


def _no_room(query_class: str) -> str:
    return (f"speculation does not pay for class {query_class!r}: the default plan's static KV "
            "cache or compiled decode leaves no room for it; the class is left alone")
