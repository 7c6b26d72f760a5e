"""What the policy engine reads (plan, evidence, model facts, context) and what it returns."""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional


class Outcome(str, enum.Enum):
    """The decision on a whole plan."""
    APPROVE = "approve"
    REJECT = "reject"
    NEEDS_HUMAN = "needs_human"


class RuleOutcome(str, enum.Enum):
    """One rule's verdict; FAIL means reject, NEEDS_HUMAN asks an operator."""
    PASS = "pass"
    FAIL = "fail"
    NEEDS_HUMAN = "needs_human"
    NOT_APPLICABLE = "not_applicable"


@dataclass(frozen=True)
class DeterminismProbe:
    runs: int
    bitwise_identical: bool

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DeterminismProbe":
        _check_keys(d, {"runs", "bitwise_identical"}, "evidence.determinism_probe")
        runs, same = d.get("runs"), d.get("bitwise_identical")
        if not isinstance(runs, int) or isinstance(runs, bool) or runs < 0:
            raise ValueError(f"evidence.determinism_probe.runs: expected an int >= 0, got {runs!r}")
        if not isinstance(same, bool):
            raise ValueError("evidence.determinism_probe.bitwise_identical: expected a bool, "
                             f"got {same!r}")
        return cls(runs=runs, bitwise_identical=same)


@dataclass(frozen=True)
class Evidence:
    """Quality, speed and size measured by a trial, plan against the same model without it."""
    top1_agreement: Optional[float] = None
    mean_kl: Optional[float] = None
    ppl_ratio: Optional[float] = None
    exact_match: Optional[float] = None
    latency_ms_per_token_base: Optional[float] = None
    latency_ms_per_token_plan: Optional[float] = None
    latency_ratio: Optional[float] = None
    latency_pairs: Optional[float] = None     # back-to-back pairs behind latency_ratio
    weight_bytes_base: Optional[float] = None
    weight_bytes_plan: Optional[float] = None
    memory_ratio: Optional[float] = None
    heads_removed_fraction: Optional[float] = None
    layers_removed_fraction: Optional[float] = None
    eval_tokens: Optional[float] = None
    n_prompts: Optional[float] = None
    determinism_probe: Optional[DeterminismProbe] = None
    # Keys a newer agent sent that this engine does not know; never read by a rule.
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], strict: bool = True) -> "Evidence":
        """strict: an unknown key is an error (test cases, where it is a typo); else kept in extra."""
        if not isinstance(d, Mapping):
            raise ValueError(f"evidence: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if strict:
            _check_keys(d, known, "evidence")
        values: dict[str, Any] = {}
        for name in known & set(d):
            if name == "determinism_probe":
                probe = d[name]
                values[name] = None if probe is None else DeterminismProbe.from_dict(probe)
            else:
                values[name] = _number_or_none(d[name], f"evidence.{name}")
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(**values, extra=extra)

    def metric(self, name: str) -> Optional[float]:
        return getattr(self, name)


# Numeric evidence fields a metric_bound rule may name.
METRICS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(Evidence) if f.name not in ("determinism_probe", "extra"))


@dataclass(frozen=True)
class Context:
    """Who the plan would serve, and what was applied recently to the same model fingerprint."""
    tenant: str = ""
    route: str = ""
    query_class: str = ""
    requires_determinism: bool = False
    # Unix seconds of recent applies for this model fingerprint (rate limits).
    recent_applies_s: tuple[float, ...] = ()
    # Unix seconds; None means the engine's clock.
    now_s: Optional[float] = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Context":
        names = {f.name for f in dataclasses.fields(cls)}
        _check_keys(d, names, "context")
        values = dict(d)
        for name in ("tenant", "route", "query_class"):
            if name in values and not isinstance(values[name], str):
                raise ValueError(f"context.{name}: expected a string, got {values[name]!r}")
        if "requires_determinism" in values and not isinstance(values["requires_determinism"], bool):
            raise ValueError("context.requires_determinism: expected a bool")
        applies = values.get("recent_applies_s", ())
        if not isinstance(applies, (list, tuple)):
            raise ValueError("context.recent_applies_s: expected a list of unix seconds")
        values["recent_applies_s"] = tuple(
            _number_or_none(t, f"context.recent_applies_s[{i}]") for i, t in enumerate(applies))
        if values.get("now_s") is not None:
            values["now_s"] = _number_or_none(values["now_s"], "context.now_s")
        return cls(**values)


@dataclass(frozen=True)
class RuleResult:
    rule_id: str
    file: str
    line: int
    kind: str
    measured: Any
    threshold: Any
    outcome: RuleOutcome
    message: str

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["outcome"] = self.outcome.value
        return d


@dataclass(frozen=True)
class Revision:
    """Which policy set decided: content hash always, git commit when the folder is in git."""
    content_sha256: str
    git_commit: Optional[str] = None
    # The folder differs from git_commit (uncommitted edits): the commit alone does not name it.
    git_dirty: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    plan_id: str
    plan_sha256: str
    risk: str
    risk_score: float
    results: tuple[RuleResult, ...]
    revision: Revision
    evaluated_at_s: float

    def failing(self) -> list[RuleResult]:
        return [r for r in self.results if r.outcome in (RuleOutcome.FAIL, RuleOutcome.NEEDS_HUMAN)]

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome.value, "plan_id": self.plan_id,
                "plan_sha256": self.plan_sha256, "risk": self.risk,
                "risk_score": self.risk_score, "results": [r.to_dict() for r in self.results],
                "revision": self.revision.to_dict(), "evaluated_at_s": self.evaluated_at_s}


def _check_keys(d: Mapping[str, Any], known: set[str], where: str) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; "
                         f"known: {', '.join(sorted(known))}")


def _number_or_none(v: Any, where: str) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise ValueError(f"{where}: expected a number, got {v!r}")
    return float(v)
