"""Loads a policy set (every *.yaml directly in a folder) into typed rules, or says what is wrong where."""
from __future__ import annotations

import os
import re
from typing import Callable, Optional

import yaml

from headroom_sidecar.controlplane.policy.plan import Component, PER_LAYER, TransformKind
from headroom_sidecar.controlplane.policy.revision import revision_of
from headroom_sidecar.controlplane.policy.risk import RiskLevel
from headroom_sidecar.controlplane.policy.schema import (
    POLICY_SCHEMA, ComponentTarget, Determinism, Latency, MetricBound, Objective, OnFail, Params,
    PolicyError,
    PolicySet, Problem, Protect, RateLimit, RemovalCap, RemovalUnit, RiskApproval, Rule, RuleKind,
    Scope, TransformAccess)
from headroom_sidecar.controlplane.policy.types import METRICS
from headroom_sidecar.controlplane.policy.yamlread import Reader, compose_file, line_of

RULE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def policy_files(folder: str) -> list[str]:
    """Names of the policy files: *.yaml directly in folder (tests/ below it is not policy)."""
    return sorted(n for n in os.listdir(folder)
                  if n.endswith((".yaml", ".yml")) and os.path.isfile(os.path.join(folder, n)))


def load_policy_set(folder: str) -> PolicySet:
    """The policy set in folder; PolicyError lists every problem with file, line and reason."""
    policy_set, problems = read_policy_set(folder)
    if problems:
        raise PolicyError(problems)
    return policy_set


def read_policy_set(folder: str) -> tuple[Optional[PolicySet], list[Problem]]:
    if not os.path.isdir(folder):
        return None, [Problem(folder, 0, "", "not a folder")]
    names = policy_files(folder)
    if not names:
        return None, [Problem(folder, 0, "", "no *.yaml policy files")]
    problems: list[Problem] = []
    rules: list[Rule] = []
    for name in names:
        rules.extend(_read_file(folder, name, problems))
    _check_unique_ids(rules, problems)
    if problems:
        return None, problems
    return PolicySet(folder=folder, files=tuple(names), rules=tuple(rules),
                     revision=revision_of(folder, names)), []


def _read_file(folder: str, name: str, problems: list[Problem]) -> list[Rule]:
    display = os.path.join(folder, name)
    root = compose_file(display, display, problems)
    if root is None:
        if not any(p.file == display for p in problems):
            problems.append(Problem(display, 1, "", "empty file; expected schema and rules"))
        return []
    top = Reader(root, display, "", problems)
    if not top.ok:
        return []
    schema = top.string("schema", required=True)
    if schema is not None and schema != POLICY_SCHEMA:
        top.fail(top.value_node("schema"), "schema", f"expected {POLICY_SCHEMA!r}, got {schema!r}")
    top.string("description")
    rule_nodes = top.seq("rules", required=True)
    top.finish()
    rules = [_read_rule(n, display, f"rules[{i}]", problems) for i, n in enumerate(rule_nodes)]
    return [r for r in rules if r is not None]


def _read_rule(node: yaml.Node, file: str, where: str, problems: list[Problem]) -> Optional[Rule]:
    before = len(problems)
    r = Reader(node, file, where, problems)
    if not r.ok:
        return None
    rule_id = r.string("id", required=True)
    if rule_id is not None and not RULE_ID.match(rule_id):
        r.fail(r.value_node("id"), "id", f"{rule_id!r} must match {RULE_ID.pattern}")
    kind = r.choice("kind", RuleKind, required=True)
    description = r.string("description", default="")
    allow_unsafe = r.string("allow_unsafe", default="")
    if r.has("allow_unsafe") and allow_unsafe is not None and not allow_unsafe.strip():
        r.fail(r.value_node("allow_unsafe"), "allow_unsafe", "give the reason the bound is unsafe")
    default_on_fail = OnFail.NEEDS_HUMAN if kind is RuleKind.RISK_APPROVAL else OnFail.REJECT
    on_fail = r.choice("on_fail", OnFail, default=default_on_fail)
    scope = _read_scope(r)
    plan_classes = r.str_list("query_classes") or ()
    if kind is None:
        return None  # its other fields cannot be judged without a kind: do not call them unknown
    params = _KIND_READERS[kind](r)
    r.finish()
    if len(problems) > before or params is None:
        return None
    return Rule(id=rule_id, kind=kind, file=file, line=line_of(node), on_fail=on_fail,
                scope=scope, description=description, params=params,
                allow_unsafe=(allow_unsafe or "").strip(), query_classes=tuple(plan_classes))


def _read_scope(r: Reader) -> Scope:
    s = r.sub("scope")
    if s is None or not s.ok:
        return Scope()
    scope = Scope(tenants=s.str_list("tenants") or (), routes=s.str_list("routes") or (),
                  query_classes=s.str_list("query_classes") or ())
    s.finish()
    return scope


def _metric_bound(r: Reader) -> Optional[Params]:
    metric = r.string("metric", required=True)
    lo, hi = r.number("min"), r.number("max")
    required = r.boolean("required", default=True)
    if metric is not None and metric not in METRICS:
        r.fail(r.value_node("metric"), "metric",
               f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
        return None
    if lo is None and hi is None and not (r.has("min") or r.has("max")):
        r.fail(r.node, "", "a metric_bound needs min, max or both")
        return None
    if lo is not None and hi is not None and lo > hi:
        r.fail(r.value_node("min"), "min", f"min {lo} is above max {hi}: nothing can pass")
        return None
    return MetricBound(metric=metric, min=lo, max=hi, required=required)


def _protect(r: Reader) -> Optional[Params]:
    layers = r.int_list("layers") or ()
    targets = _protect_targets(r)
    kinds = r.enum_list("transforms", TransformKind)
    if not layers and not targets and not r.has("components"):
        r.fail(r.node, "", "a protect rule needs layers, components or both")
        return None
    # Absent: every kind, so a rule written before the field means what it meant then.
    kinds = tuple(TransformKind) if kinds is None else tuple(dict.fromkeys(kinds))
    return Protect(layers=tuple(layers), components=tuple(targets), transforms=kinds)


def _protect_targets(r: Reader) -> list[ComponentTarget]:
    targets = []
    for i, node in enumerate(r.seq("components")):
        c = Reader(node, r.file, f"{r.where}.components[{i}]", r.problems)
        if not c.ok:
            continue
        component = c.choice("component", Component, required=True)
        c_layers = c.int_list("layers")
        c.finish()
        if component in PER_LAYER and not c_layers:
            c.fail(node, "layers", f"component {component.value} needs the layers it protects")
        elif component is not None and component not in PER_LAYER and c_layers is not None:
            c.fail(node, "layers", f"component {component.value} is not per layer; drop layers")
        elif component is not None:
            targets.append(ComponentTarget(component, tuple(c_layers or ())))
    return targets


def _removal_cap(r: Reader) -> Optional[Params]:
    unit = r.choice("unit", RemovalUnit, required=True)
    cap = r.number("max_fraction", required=True)
    if cap is not None and not 0.0 <= cap <= 1.0:
        r.fail(r.value_node("max_fraction"), "max_fraction", f"{cap} is not a fraction in [0, 1]")
        return None
    if unit is None or cap is None:
        return None
    return RemovalCap(unit=unit, max_fraction=cap)


def _transform_access(r: Reader) -> Optional[Params]:
    allow = r.enum_list("allow", TransformKind)
    forbid = r.enum_list("forbid", TransformKind)
    if (allow is None) == (forbid is None):
        r.fail(r.node, "", "a transform_access rule needs exactly one of allow, forbid")
        return None
    return TransformAccess(allow=allow, forbid=forbid)


def _risk_approval(r: Reader) -> Optional[Params]:
    level = r.choice("at_or_above", RiskLevel, required=True)
    return None if level is None else RiskApproval(at_or_above=level)


def _rate_limit(r: Reader) -> Optional[Params]:
    max_applies = r.integer("max_applies", required=True)
    window_s = r.number("window_s", required=True)
    if max_applies is not None and max_applies < 1:
        r.fail(r.value_node("max_applies"), "max_applies", f"{max_applies} must be >= 1")
        return None
    if window_s is not None and window_s <= 0:
        r.fail(r.value_node("window_s"), "window_s", f"{window_s} must be > 0")
        return None
    if max_applies is None or window_s is None:
        return None
    return RateLimit(max_applies=max_applies, window_s=window_s)


def _determinism(r: Reader) -> Optional[Params]:
    routes = r.str_list("routes") or ()
    tenants = r.str_list("tenants") or ()
    when_requested = r.boolean("when_requested", default=True)
    forbid = r.enum_list("forbid_kinds", TransformKind)
    runs = r.integer("min_probe_runs", default=2)
    if runs is not None and runs < 2:
        r.fail(r.value_node("min_probe_runs"), "min_probe_runs",
               f"{runs}: comparing outputs needs at least 2 runs")
        return None
    return Determinism(routes=routes, tenants=tenants, when_requested=when_requested,
                       forbid_kinds=(TransformKind.ACTIVATION_SPARSITY,) if forbid is None else forbid,
                       min_probe_runs=runs)


def _latency(r: Reader) -> Optional[Params]:
    max_ratio = r.number("max_ratio", required=True)
    min_pairs = r.integer("min_pairs", default=4)
    trade = r.choice("trade", Objective)
    reason = r.string("reason", default="")
    if max_ratio is not None and max_ratio <= 0:
        r.fail(r.value_node("max_ratio"), "max_ratio", f"{max_ratio} must be > 0")
        return None
    if min_pairs is not None and min_pairs < 1:
        r.fail(r.value_node("min_pairs"), "min_pairs", f"{min_pairs} must be >= 1")
        return None
    if trade is not None and not reason.strip():
        r.fail(r.node, "reason", "a latency rule with a trade must say why (reason)")
        return None
    if max_ratio is None or min_pairs is None:
        return None
    return Latency(max_ratio=max_ratio, min_pairs=min_pairs, trade=trade, reason=reason.strip())


_KIND_READERS: dict[RuleKind, Callable[[Reader], Optional[Params]]] = {
    RuleKind.METRIC_BOUND: _metric_bound,
    RuleKind.PROTECT: _protect,
    RuleKind.REMOVAL_CAP: _removal_cap,
    RuleKind.TRANSFORM_ACCESS: _transform_access,
    RuleKind.RISK_APPROVAL: _risk_approval,
    RuleKind.RATE_LIMIT: _rate_limit,
    RuleKind.DETERMINISM: _determinism,
    RuleKind.LATENCY: _latency,
}


def _check_unique_ids(rules: list[Rule], problems: list[Problem]) -> None:
    seen: dict[str, Rule] = {}
    for rule in rules:
        if rule.id in seen:
            first = seen[rule.id]
            problems.append(Problem(rule.file, rule.line, "id",
                                    f"duplicate rule id {rule.id!r} (first at {first.file}:{first.line})"))
        seen.setdefault(rule.id, rule)
