"""lint: load problems (errors), thresholds looser than the safe bounds (errors, or warnings
naming the rule's `allow_unsafe` reason), plus rules that load but cannot do what their author
meant (warnings). `policy lint --strict` fails on warnings too."""
from __future__ import annotations

from typing import Callable, Optional

from headroom_sidecar.controlplane.policy.bounds import (LATENCY_MIN_PAIRS, LATENCY_TRADED_MAX,
                                        LATENCY_UNTRADED_MAX, METRIC_BOUNDS, REMOVAL_BOUNDS,
                                        SafeBound, Side)
from headroom_sidecar.controlplane.policy.loader import read_policy_set
from headroom_sidecar.controlplane.policy.plan import TransformKind
from headroom_sidecar.controlplane.policy.schema import (
    Determinism, Latency, MetricBound, Problem, Protect, RemovalCap, Rule, Severity,
    TransformAccess)

# Metrics that are fractions by definition: a bound outside [0, 1] never or always holds.
FRACTION_METRICS = ("top1_agreement", "exact_match", "heads_removed_fraction",
                    "layers_removed_fraction")


def lint(folder: str) -> list[Problem]:
    policy_set, problems = read_policy_set(folder)
    if policy_set is None:
        return problems
    found = []
    for rule in policy_set.rules:
        found += _unsafe(rule)
        found += [_warning(rule, w) for w in _rule_warnings(rule)]
    return found


def has_errors(problems: list[Problem]) -> bool:
    return any(p.severity is Severity.ERROR for p in problems)


def _warning(rule: Rule, reason: str) -> Problem:
    return Problem(rule.file, rule.line, rule.id, reason, Severity.WARNING)


def _unsafe(rule: Rule) -> list[Problem]:
    """An error for a threshold looser than its safe bound; a warning if the rule says why."""
    found = _loose_threshold(rule.params)
    if found is None:
        return [_warning(rule, "allow_unsafe is set but every threshold is within the safe "
                               "bounds: drop it")] if rule.allow_unsafe else []
    if rule.allow_unsafe:
        return [_warning(rule, f"{found}; allowed as unsafe: {rule.allow_unsafe}")]
    return [Problem(rule.file, rule.line, rule.id,
                    f"{found}; tighten it, or say why with allow_unsafe: <reason>")]


def _loose_threshold(params) -> Optional[str]:
    bound, name, value = None, "", None
    if isinstance(params, MetricBound) and params.metric in METRIC_BOUNDS:
        bound = METRIC_BOUNDS[params.metric]
        name = f"{params.metric} {bound.side.value}"
        value = params.min if bound.side is Side.MIN else params.max
    elif isinstance(params, RemovalCap) and params.unit in REMOVAL_BOUNDS:
        bound, name, value = REMOVAL_BOUNDS[params.unit], f"{params.unit.value} max_fraction", \
            params.max_fraction
    elif isinstance(params, Latency):
        bound, name, value = _latency_bound(params)
    if bound is None or not bound.violated_by(value):
        return None
    return f"{name} {value:g} is outside the safe bound {_spell(bound)} ({bound.why})"


def _latency_bound(p: Latency) -> tuple[SafeBound, str, float]:
    """The bound the rule breaks first: too few pairs, else a max_ratio too loose for it."""
    if LATENCY_MIN_PAIRS.violated_by(p.min_pairs):
        return LATENCY_MIN_PAIRS, "latency min_pairs", p.min_pairs
    cap = LATENCY_UNTRADED_MAX if p.trade is None else LATENCY_TRADED_MAX
    return cap, "latency max_ratio" + ("" if p.trade is None else f" (trade {p.trade.value})"), \
        p.max_ratio


def _spell(bound: SafeBound) -> str:
    return f"{'>=' if bound.side is Side.MIN else '<='} {bound.limit:g}"


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
