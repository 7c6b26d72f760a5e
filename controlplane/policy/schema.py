"""The policy language: a closed set of rule kinds, each a frozen dataclass (see policies/README.md)."""
from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass
from typing import Optional, Union

from headroom_sidecar.controlplane.policy.plan import Component, TransformKind
from headroom_sidecar.controlplane.policy.risk import RiskLevel
from headroom_sidecar.controlplane.policy.types import Context, Revision

POLICY_SCHEMA = "headroom.policy/v1"


class RuleKind(str, enum.Enum):
    METRIC_BOUND = "metric_bound"
    PROTECT = "protect"
    REMOVAL_CAP = "removal_cap"
    TRANSFORM_ACCESS = "transform_access"
    RISK_APPROVAL = "risk_approval"
    RATE_LIMIT = "rate_limit"
    DETERMINISM = "determinism"
    LATENCY = "latency"


class Objective(str, enum.Enum):
    """What a latency rule's trade puts first (the planner's objective where the rule applies)."""
    LATENCY = "latency"   # fastest inside the quality budget, memory as tie-break
    MEMORY = "memory"     # smallest inside the quality budget, latency as tie-break


class OnFail(str, enum.Enum):
    REJECT = "reject"
    NEEDS_HUMAN = "needs_human"


class RemovalUnit(str, enum.Enum):
    HEADS = "heads"                      # pruned heads / (layers * heads)
    LAYERS = "layers"                    # skipped layers / layers
    HEADS_PER_LAYER = "heads_per_layer"  # the most pruned in any one layer / heads


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str
    reason: str
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        field = f" {self.field}:" if self.field else ""
        return f"{where}: {self.severity.value}:{field} {self.reason}"


class PolicyError(Exception):
    """Every problem found in a policy set (or test file), each with file, line and reason."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class Scope:
    """Which contexts a rule speaks to; each list holds globs, an empty list matches anything."""
    tenants: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    query_classes: tuple[str, ...] = ()

    def matches(self, ctx: Context) -> bool:
        return (_any_glob(self.tenants, ctx.tenant, True) and _any_glob(self.routes, ctx.route, True)
                and _any_glob(self.query_classes, ctx.query_class, True))


def _any_glob(patterns: tuple[str, ...], value: str, empty: bool) -> bool:
    if not patterns:
        return empty
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


@dataclass(frozen=True)
class MetricBound:
    metric: str
    min: Optional[float]
    max: Optional[float]
    required: bool  # False: a trial that did not measure the metric leaves the rule not_applicable


@dataclass(frozen=True)
class ComponentTarget:
    component: Component
    layers: tuple[int, ...]  # empty for embeddings / lm_head; negative counts from the end


@dataclass(frozen=True)
class Protect:
    layers: tuple[int, ...]  # every part of these layers; negative counts from the end
    components: tuple[ComponentTarget, ...]
    # The kinds that may not change these parts; others pass (their effect is judged elsewhere,
    # e.g. int8's by the quality rules). Absent in the YAML: every kind, as before the field.
    transforms: tuple[TransformKind, ...] = tuple(TransformKind)


@dataclass(frozen=True)
class RemovalCap:
    unit: RemovalUnit
    max_fraction: float


@dataclass(frozen=True)
class TransformAccess:
    allow: Optional[tuple[TransformKind, ...]]   # allow-list: any other kind fails
    forbid: Optional[tuple[TransformKind, ...]]  # deny-list: any of these fails


@dataclass(frozen=True)
class RiskApproval:
    at_or_above: RiskLevel


@dataclass(frozen=True)
class RateLimit:
    max_applies: int
    window_s: float


@dataclass(frozen=True)
class Determinism:
    # The rule applies when the route or tenant matches (globs), or the context asks for it.
    routes: tuple[str, ...]
    tenants: tuple[str, ...]
    when_requested: bool
    forbid_kinds: tuple[TransformKind, ...]
    min_probe_runs: int

    def applies(self, ctx: Context) -> bool:
        return (_any_glob(self.routes, ctx.route, False) or _any_glob(self.tenants, ctx.tenant, False)
                or (self.when_requested and ctx.requires_determinism))


@dataclass(frozen=True)
class Latency:
    """latency_ratio (plan / unoptimised, median of back-to-back pairs) at most max_ratio, from
    at least min_pairs pairs. A rule with a `trade` states why a slower plan is worth it (e.g.
    memory first); where it applies, it supersedes the latency rules without one."""
    max_ratio: float
    min_pairs: int
    trade: Optional[Objective] = None
    reason: str = ""


Params = Union[MetricBound, Protect, RemovalCap, TransformAccess, RiskApproval, RateLimit,
               Determinism, Latency]


@dataclass(frozen=True)
class Rule:
    id: str
    kind: RuleKind
    file: str
    line: int
    on_fail: OnFail
    scope: Scope
    description: str
    params: Params
    # Why this rule may sit outside lint's safe bounds (controlplane/policy/bounds.py); lint
    # then warns instead of failing. "" : it may not.
    allow_unsafe: str = ""
    # Globs over the PLAN's query_classes (not the request context's, which `scope` matches):
    # the rule speaks only to plans scoped to a matching class; a default plan (no classes) is
    # outside it (not_applicable). Empty: every plan.
    query_classes: tuple[str, ...] = ()

    def covers_plan(self, plan_classes: tuple[str, ...]) -> bool:
        return not self.query_classes or any(_any_glob(self.query_classes, c, False)
                                             for c in plan_classes)


@dataclass(frozen=True)
class PolicySet:
    folder: str
    files: tuple[str, ...]
    rules: tuple[Rule, ...]
    revision: Revision
