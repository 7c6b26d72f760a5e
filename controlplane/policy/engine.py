"""Evaluates a plan with its evidence and context against a policy set: every rule, then one outcome."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

from headroom_sidecar.controlplane.policy.plan import PER_LAYER, PlanMode, PlanView, plan_view
from headroom_sidecar.controlplane.policy.risk import RiskLevel, risk_level, risk_score
from headroom_sidecar.controlplane.policy.schema import (
    Determinism, Latency, MetricBound, OnFail, PolicySet, Protect, RateLimit, RemovalCap,
    RemovalUnit, RiskApproval, Rule, RuleKind, TransformAccess)
from headroom_sidecar.controlplane.policy.types import (
    Context, Decision, Evidence, Outcome, RuleOutcome, RuleResult)
from headroom_sidecar.proto.plan_fit import ModelFacts

Clock = Callable[[], float]


@dataclass(frozen=True)
class Inputs:
    plan: PlanView
    evidence: Evidence
    context: Context
    risk: RiskLevel
    risk_score: float
    now_s: float


@dataclass(frozen=True)
class Check:
    passed: Optional[bool]  # None: the rule does not apply here
    measured: Any
    threshold: Any
    message: str


def evaluate(policy_set: PolicySet, plan: Mapping[str, Any],
             evidence: Union[Evidence, Mapping[str, Any]], model: Union[ModelFacts, Mapping[str, Any]],
             context: Union[Context, Mapping[str, Any]], *, clock: Clock = time.time) -> Decision:
    """Any failing rule rejects; else any needs_human asks an operator; else approve.

    Raises PlanError for a malformed plan and ValueError for malformed evidence/model/context.
    """
    ins = make_inputs(plan, evidence, model, context, clock)
    traded = trade_rule(policy_set, ins.context)
    results = tuple(_superseded(rule, traded) if _is_superseded(rule, traded)
                    else evaluate_rule(rule, ins) for rule in policy_set.rules)
    return Decision(outcome=combine(results), plan_id=ins.plan.plan_id, plan_sha256=ins.plan.sha256,
                    risk=ins.risk.value, risk_score=ins.risk_score, results=results,
                    revision=policy_set.revision, evaluated_at_s=ins.now_s)


def trade_rule(policy_set: PolicySet, context: Context) -> Optional[Rule]:
    """The first latency rule with a trade whose scope matches: where one applies, the latency
    rules without a trade step aside (a slower plan is approved only where a policy says why)."""
    for rule in policy_set.rules:
        if rule.kind is RuleKind.LATENCY and rule.params.trade is not None \
                and rule.scope.matches(context):
            return rule
    return None


def _is_superseded(rule: Rule, traded: Optional[Rule]) -> bool:
    return traded is not None and rule.kind is RuleKind.LATENCY and rule.params.trade is None


def _superseded(rule: Rule, traded: Rule) -> RuleResult:
    p: Latency = traded.params
    return RuleResult(rule_id=rule.id, file=rule.file, line=rule.line, kind=rule.kind.value,
                      measured=None, threshold=rule.params.max_ratio,
                      outcome=RuleOutcome.NOT_APPLICABLE,
                      message=f"superseded by {traded.id} ({p.trade.value} first: {p.reason})")


def make_inputs(plan, evidence, model, context, clock: Clock = time.time) -> Inputs:
    model = model if isinstance(model, ModelFacts) else ModelFacts.from_dict(model)
    evidence = evidence if isinstance(evidence, Evidence) else Evidence.from_dict(evidence)
    context = context if isinstance(context, Context) else Context.from_dict(context)
    view = plan_view(plan, model)
    score = risk_score(view)
    now_s = context.now_s if context.now_s is not None else clock()
    return Inputs(plan=view, evidence=evidence, context=context, risk=risk_level(score),
                  risk_score=score, now_s=now_s)


def combine(results: tuple[RuleResult, ...]) -> Outcome:
    outcomes = {r.outcome for r in results}
    if RuleOutcome.FAIL in outcomes:
        return Outcome.REJECT
    return Outcome.NEEDS_HUMAN if RuleOutcome.NEEDS_HUMAN in outcomes else Outcome.APPROVE


def evaluate_rule(rule: Rule, ins: Inputs) -> RuleResult:
    if not rule.scope.matches(ins.context):
        check = Check(None, None, None, "scope does not match this tenant/route/query class")
    elif not rule.covers_plan(ins.plan.query_classes):
        scoped = list(ins.plan.query_classes) or "none: the default plan"
        check = Check(None, None, None, f"the rule speaks to plans for query classes "
                      f"{list(rule.query_classes)}; this plan's classes: {scoped}")
    else:
        check = _CHECKS[type(rule.params)](rule.params, ins)
    if check.passed is None:
        outcome = RuleOutcome.NOT_APPLICABLE
    elif check.passed:
        outcome = RuleOutcome.PASS
    else:
        outcome = RuleOutcome.FAIL if rule.on_fail is OnFail.REJECT else RuleOutcome.NEEDS_HUMAN
    return RuleResult(rule_id=rule.id, file=rule.file, line=rule.line, kind=rule.kind.value,
                      measured=check.measured, threshold=check.threshold, outcome=outcome,
                      message=check.message)


def _metric_bound(p: MetricBound, ins: Inputs) -> Check:
    value = ins.evidence.metric(p.metric)
    threshold = {k: v for k, v in (("min", p.min), ("max", p.max)) if v is not None}
    if value is None:
        if not p.required:
            return Check(None, None, threshold, f"{p.metric} not measured (optional)")
        return Check(False, None, threshold, f"{p.metric} was not measured")
    if p.min is not None and value < p.min:
        return Check(False, value, threshold, f"{p.metric} {value:g} < min {p.min:g}")
    if p.max is not None and value > p.max:
        return Check(False, value, threshold, f"{p.metric} {value:g} > max {p.max:g}")
    return Check(True, value, threshold, f"{p.metric} {value:g} within bounds")


def _latency(p: Latency, ins: Inputs) -> Check:
    ratio, pairs = ins.evidence.latency_ratio, ins.evidence.latency_pairs
    threshold = {"max_ratio": p.max_ratio, "min_pairs": p.min_pairs}
    if p.trade is not None:
        threshold["trade"] = p.trade.value
    if ratio is None:
        return Check(False, None, threshold, "latency_ratio was not measured")
    if pairs is None or pairs < p.min_pairs:
        return Check(False, ratio, threshold, f"latency from {0 if pairs is None else int(pairs)} "
                     f"back-to-back pair(s), fewer than {p.min_pairs}: not evidence of speed")
    if ratio > p.max_ratio:
        return Check(False, ratio, threshold, f"latency_ratio {ratio:.4g} > max {p.max_ratio:g}: "
                     f"{'slower' if ratio > 1 else 'less faster'} than the policy allows")
    traded = f" ({p.trade.value} first: {p.reason})" if p.trade is not None else ""
    return Check(True, ratio, threshold, f"latency_ratio {ratio:.4g} <= max {p.max_ratio:g}{traded}")


def _protect(p: Protect, ins: Inputs) -> Check:
    protected = _protected_parts(p, ins.plan.model.num_layers)
    touched = [t for t in ins.plan.touches if (t.component, t.layer) in protected]
    hits = sorted({_touch_name(t) for t in touched if t.kind in p.transforms})
    # Touches by kinds the rule does not forbid: not a failure, but said, so the audit shows them.
    allowed = sorted({_touch_name(t) for t in touched if t.kind not in p.transforms})
    threshold = {"parts": _protected_names(protected), "transforms": [k.value for k in p.transforms]}
    note = f"; allowed here: {'; '.join(allowed)}" if allowed else ""
    if hits:
        return Check(False, hits, threshold, "plan changes protected parts: " + "; ".join(hits) + note)
    if allowed:
        forbidden = ", ".join(k.value for k in p.transforms) or "none"
        return Check(True, [], threshold, f"no forbidden kind ({forbidden}) changes a protected "
                     f"part{note}")
    return Check(True, [], threshold, "no protected part is changed")


def _protected_parts(p: Protect, num_layers: int) -> set:
    """{(component, layer)}; layer None for embeddings / lm_head."""
    protected = {(c, _resolve(layer, num_layers)) for layer in p.layers for c in PER_LAYER}
    for target in p.components:
        if target.component in PER_LAYER:
            protected |= {(target.component, _resolve(layer, num_layers)) for layer in target.layers}
        else:
            protected.add((target.component, None))
    return protected


def _resolve(layer: int, num_layers: int) -> int:
    # Negative counts from the end, as in Python: -1 is the last layer of whichever model.
    return layer + num_layers if layer < 0 else layer


def _touch_name(t) -> str:
    where = t.component.value if t.layer is None else f"layer {t.layer} {t.component.value}"
    return f"{t.kind.value} changes {where}"


def _protected_names(protected: set) -> list[str]:
    return sorted(c.value if layer is None else f"layer {layer} {c.value}" for c, layer in protected)


def _removal_cap(p: RemovalCap, ins: Inputs) -> Check:
    measured = {RemovalUnit.HEADS: ins.plan.heads_removed_fraction,
                RemovalUnit.LAYERS: ins.plan.layers_removed_fraction,
                RemovalUnit.HEADS_PER_LAYER: ins.plan.max_heads_removed_fraction_per_layer}[p.unit]
    measured = round(measured, 6)
    ok = measured <= p.max_fraction
    rel = "<=" if ok else ">"
    return Check(ok, measured, p.max_fraction,
                 f"{p.unit.value} removed fraction {measured:.4g} {rel} cap {p.max_fraction:g}")


def _transform_access(p: TransformAccess, ins: Inputs) -> Check:
    kinds = [k.value for k in ins.plan.kinds]
    if p.allow is not None:
        allowed = [k.value for k in p.allow]
        bad = [k for k in kinds if k not in allowed]
        threshold = {"allow": allowed}
    else:
        forbidden = [k.value for k in p.forbid]
        bad = [k for k in kinds if k in forbidden]
        threshold = {"forbid": forbidden}
    if bad:
        return Check(False, kinds, threshold, f"transform kind(s) not allowed here: {', '.join(bad)}")
    return Check(True, kinds, threshold, "every transform kind is allowed here")


def _risk_approval(p: RiskApproval, ins: Inputs) -> Check:
    measured = {"level": ins.risk.value, "score": ins.risk_score}
    if ins.risk.rank >= p.at_or_above.rank:
        return Check(False, measured, p.at_or_above.value,
                     f"risk {ins.risk.value} (score {ins.risk_score:.4g}) is at or above "
                     f"{p.at_or_above.value}: a human must approve")
    return Check(True, measured, p.at_or_above.value, f"risk {ins.risk.value} is below "
                 f"{p.at_or_above.value}")


def _rate_limit(p: RateLimit, ins: Inputs) -> Check:
    since_s = ins.now_s - p.window_s
    count = sum(1 for t in ins.context.recent_applies_s if since_s < t <= ins.now_s)
    threshold = {"max_applies": p.max_applies, "window_s": p.window_s}
    if count >= p.max_applies:
        return Check(False, count, threshold, f"{count} applies in the last {p.window_s:g} s: "
                     f"one more would exceed {p.max_applies}")
    return Check(True, count, threshold, f"{count} applies in the last {p.window_s:g} s")


def _determinism(p: Determinism, ins: Inputs) -> Check:
    threshold = {"mode": PlanMode.STRUCTURAL.value, "query_classes": [],
                 "forbid_kinds": [k.value for k in p.forbid_kinds], "min_probe_runs": p.min_probe_runs,
                 "bitwise_identical": True}
    if not p.applies(ins.context):
        return Check(None, None, threshold, "this route/tenant does not require determinism")
    problems = _determinism_problems(p, ins)
    if problems:
        return Check(False, problems, threshold, "not deterministic: " + "; ".join(problems))
    return Check(True, [], threshold, "structural, pinned, probe bitwise identical")


def _determinism_problems(p: Determinism, ins: Inputs) -> list[str]:
    plan, probe = ins.plan, ins.evidence.determinism_probe
    problems = []
    if plan.mode is not PlanMode.STRUCTURAL:
        problems.append(f"mode is {plan.mode.value}, not structural")
    if plan.query_classes:
        problems.append(f"behaviour depends on query classes {list(plan.query_classes)}")
    problems += [f"uses {k.value}" for k in plan.kinds if k in p.forbid_kinds]
    if probe is None:
        problems.append("no determinism probe in the evidence")
    elif probe.runs < p.min_probe_runs:
        problems.append(f"probe ran {probe.runs} time(s), needs {p.min_probe_runs}")
    elif not probe.bitwise_identical:
        problems.append("probe outputs were not bitwise identical")
    return problems


_CHECKS: dict[type, Callable[[Any, Inputs], Check]] = {
    MetricBound: _metric_bound,
    Protect: _protect,
    RemovalCap: _removal_cap,
    TransformAccess: _transform_access,
    RiskApproval: _risk_approval,
    RateLimit: _rate_limit,
    Determinism: _determinism,
    Latency: _latency,
}
