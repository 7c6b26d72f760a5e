"""The control handler's side of per-class plans: apply, roll back and report them.

Called by agent/control.py (ControlHandler) at a request boundary; every function returns the
PlanStatus reports to send and never raises for a plan the rule refuses. Every status of a
class plan carries "query_classes" in its detail (the classes it was applied to / taken from).
The quality guard watches the default plan only: a class plan changes no weight and its greedy
output is the verifier's own (speculation is lossless by construction).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

from headroom_sidecar.agent import wire
from headroom_sidecar.agent.executor import ApplyReport
from headroom_sidecar.agent.executor.speculative.classes import ClassPlans, ClassRoute, speculative_of
from headroom_sidecar.agent.executor.weights import weight_bytes
from headroom_sidecar.proto.plan import PlanError

StatusFn = Callable[[Any, int, Mapping[str, Any]], wire.PlanStatusReport]   # (plan, state, detail)


def spec_detail(plan: Any) -> Optional[dict]:
    spec = speculative_of(plan)
    if spec is None:
        return None
    return {"draft": spec.draft.value, "k": spec.k, "draft_transforms": len(spec.draft_transforms)}


def refusal(classes: ClassPlans, plan: Any) -> Optional[PlanError]:
    """The rule (classes.py), checked before the boundary: nothing is touched if it fails."""
    problems = classes.check(plan) if plan.query_classes else []
    if not problems:
        return None
    err = PlanError(problems, plan.plan_id)
    err.query_classes = list(plan.query_classes)
    return err


def scope_detail(err: Exception) -> dict:
    """{"query_classes": [...]} for a refused class plan, {} for any other refusal."""
    scope = getattr(err, "query_classes", None)
    return {"query_classes": scope} if scope is not None else {}


def apply_class(classes: ClassPlans, plan: Any, status: StatusFn, provenance: Mapping[str, str]
                ) -> tuple[list[wire.PlanStatusReport], Optional[ApplyReport], Optional[Exception]]:
    """At the boundary: (reports, the apply report, the error). Re-checks the rule against the
    default active now (it may have changed since the check outside the boundary)."""
    scope = {"query_classes": list(plan.query_classes)}
    err = refusal(classes, plan)
    if err is not None:
        return [status(plan, wire.PlanState.REFUSED, {"problems": err.problems, **scope,
                                                     **provenance})], None, err
    current = [classes.routes.get(c) for c in plan.query_classes]
    if all(r is not None and r.plan.hash == plan.hash for r in current):
        route = classes.routes[plan.query_classes[0]]
        return [status(plan, wire.PlanState.APPLIED, {**scope, **provenance, "already_active": True,
                                                      "notes": [route.note]})
                ], _report(classes, plan, route, 0.0), None
    t0 = time.perf_counter()
    try:
        route, replaced = classes.apply(plan)
    except Exception as e:  # noqa: BLE001 - a draft that cannot be built: nothing changed
        return [status(plan, wire.PlanState.FAILED, {**scope, "error": f"{type(e).__name__}: {e}"})
                ], None, e
    reports = rolled_back_reports(replaced, status, {"cause": "replaced", "by": plan.plan_id})
    report = _report(classes, plan, route, (time.perf_counter() - t0) * 1e3)
    default = classes.executor.active_plan
    reports.append(status(plan, wire.PlanState.APPLIED, {
        **scope, **provenance, "speculative": spec_detail(plan), "notes": report.notes,
        "default_plan": default.plan_id if default is not None else None,
        "apply_ms": report.apply_ms}))
    return reports, report, None


def rollback_classes(classes: ClassPlans, query_classes: list[str], status: StatusFn,
                     detail: Mapping[str, Any]) -> list[wire.PlanStatusReport]:
    dropped = {c: r for c in query_classes if (r := classes.rollback(c)) is not None}
    return rolled_back_reports(dropped, status, detail)


def rolled_back_reports(dropped: Mapping[str, ClassRoute], status: StatusFn,
                        detail: Mapping[str, Any]) -> list[wire.PlanStatusReport]:
    """One ROLLED_BACK per plan, naming the classes it was taken from."""
    by_plan: dict[str, tuple[Any, list[str]]] = {}
    for c, route in sorted(dropped.items()):
        by_plan.setdefault(route.plan.hash, (route.plan, []))[1].append(c)
    return [status(p, wire.PlanState.ROLLED_BACK, {**detail, "query_classes": cs})
            for p, cs in by_plan.values()]


def _report(classes: ClassPlans, plan: Any, route: ClassRoute, apply_ms: float) -> ApplyReport:
    size = weight_bytes(classes.model)
    return ApplyReport(plan.plan_id, plan.hash, ["execution"], [route.note], apply_ms, size, size,
                       0, 0)

