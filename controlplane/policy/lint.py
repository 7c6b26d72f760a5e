"""lint: load problems (errors) plus rules that load but cannot do what their author meant (warnings)."""
from __future__ import annotations

from typing import Callable, Optional

from controlplane.policy.loader import read_policy_set
from controlplane.policy.plan import TransformKind
from controlplane.policy.schema import (
    Determinism, MetricBound, Problem, Protect, RemovalCap, Rule, Severity, TransformAccess)

# Metrics that are fractions by definition: a bound outside [0, 1] never or always holds.
FRACTION_METRICS = ("top1_agreement", "exact_match", "heads_removed_fraction",
                    "layers_removed_fraction")


def lint(folder: str) -> list[Problem]:
    policy_set, problems = read_policy_set(folder)
    if policy_set is None:
        return problems
    warnings = []
    for rule in policy_set.rules:
        warnings += [_warning(rule, w) for w in _rule_warnings(rule)]
    return warnings


def has_errors(problems: list[Problem]) -> bool:
    return any(p.severity is Severity.ERROR for p in problems)


def _warning(rule: Rule, reason: str) -> Problem:
    return Problem(rule.file, rule.line, rule.id, reason, Severity.WARNING)


def _rule_warnings(rule: Rule) -> list[str]:
    out = [] if rule.description else ["no description: say why the rule exists"]
    check = _CHECKS.get(type(rule.params))
    found = check(rule.params) if check else None
    return out + ([found] if found else [])


def _metric_bound(p: MetricBound) -> Optional[str]:
    if p.metric not in FRACTION_METRICS:
        return None
    if (p.min is not None and p.min > 1.0) or (p.max is not None and p.max < 0.0):
        return f"{p.metric} is a fraction in [0, 1]: this bound can never pass"
    if (p.min is None or p.min <= 0.0) and (p.max is None or p.max >= 1.0):
        return f"{p.metric} is a fraction in [0, 1]: this bound always passes"
    return None


def _protect(p: Protect) -> Optional[str]:
    # execution changes no part of the model, so it alone can never touch a protected part.
    if not set(p.transforms) - {TransformKind.EXECUTION}:
        return "transforms names no kind that changes a model part: the rule never fails"
    return None


def _removal_cap(p: RemovalCap) -> Optional[str]:
    return "max_fraction 1.0 caps nothing" if p.max_fraction >= 1.0 else None


def _transform_access(p: TransformAccess) -> Optional[str]:
    if p.allow is not None and set(p.allow) == set(TransformKind):
        return "allow lists every transform kind: the rule never fails"
    if p.forbid is not None and not p.forbid:
        return "forbid is empty: the rule never fails"
    return None


def _determinism(p: Determinism) -> Optional[str]:
    if not p.routes and not p.tenants and not p.when_requested:
        return "no routes, no tenants and when_requested false: the rule never applies"
    return None


_CHECKS: dict[type, Callable] = {
    MetricBound: _metric_bound,
    Protect: _protect,
    RemovalCap: _removal_cap,
    TransformAccess: _transform_access,
    Determinism: _determinism,
}
