"""Per-query-class plans: each class may speculate its own way on top of the default plan.

The rule (checked before anything is touched, `class_plan_problems`): weight transforms
(int8, head pruning, sparsity, layer skipping) and execution settings (static KV cache,
compile) are process-wide: one set of weights serves every class. So a plan scoped to query
classes (its `query_classes` is not empty) may differ from the active default plan (or, with
none, from the unoptimised model) only in `execution.speculative`: its draft and k, or no
speculation at all. Anything else is refused with the transform kinds that differ.

Routing: while any class has a plan, a `ClassRouter` sits in the model instance's `generate`
chain (above or below the default plan's SpeculativeGenerate, whichever came last). Each call
asks `current_class()` (the request tracker's label of this thread's request); a class with a
plan runs its own speculative loop (or the plain loop when its plan has no speculation) on the
innermost, non-speculative generate; any other class passes through to the default plan.
A caller's own decoding loop (custom_generate, assistant_model, prompt lookup, a streamer)
is never overridden.

A class plan is tied to the default plan it was checked against (`base_hash`): when the
default changes (applied, replaced, rolled back) the class plans are dropped by `sync()` and
reported rolled back. A self draft's modules are rebuilt when the default's modules they were
built on were replaced (a trial re-applies the default).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from torch import nn

from headroom_sidecar.agent.executor.speculative.install import (CALLER_LOOPS, SpeculativeGenerate,
                                                                 build_draft, make_drafter)
from headroom_sidecar.proto.plandoc import CompileMode, TransformKind


def _process_wide(plan: Any) -> dict[TransformKind, Any]:
    """kind -> transform, without execution.speculative; a bare execution entry (no static
    cache, no compile) is the same as none."""
    out = {}
    for t in (plan.transforms if plan is not None else ()):
        if t.kind is TransformKind.EXECUTION:
            t = dataclasses.replace(t, speculative=None)
            if not t.static_kv_cache and t.compile is CompileMode.NONE:
                continue
        out[t.kind] = t
    return out


def class_plan_problems(plan: Any, default: Any) -> list[str]:
    """Why `plan` (query_classes not empty) cannot run beside `default` (None: unoptimised)."""
    problems = [f"query_classes[{i}]: the empty class is the default; scope the plan to named "
                "classes or give it no query_classes" for i, c in enumerate(plan.query_classes)
                if not c]
    mine, base = _process_wide(plan), _process_wide(default)
    differ = sorted(k.value for k in mine.keys() | base.keys() if mine.get(k) != base.get(k))
    if differ:
        against = f"default plan {default.plan_id!r}" if default is not None else \
            "the unoptimised model (no default plan is active)"
        problems.append(
            f"query_classes {list(plan.query_classes)}: a class-scoped plan may differ from "
            f"{against} only in execution.speculative (weights and execution settings serve "
            f"every class); it differs in: {', '.join(differ)}")
    return problems


def speculative_of(plan: Any) -> Any:
    ex = plan.get(TransformKind.EXECUTION)
    return ex.speculative if ex is not None else None


@dataclass
class ClassRoute:
    """One class plan (a plan scoped to several classes is one route shared by each)."""
    plan: Any                                  # agent Plan
    base_hash: Optional[str]                   # the default plan's hash it was checked against
    # Only its `_loop` is used (custom_generate=); None: this class does not speculate.
    runner: Optional[SpeculativeGenerate]
    note: str = ""


class ClassRouter:
    """The generate wrapper that sends each class's requests to its own speculation."""

    def __init__(self, inner: Callable, plans: "ClassPlans", own_attr: bool):
        self.inner, self.plans = inner, plans
        self.own_attr = own_attr      # `inner` was an instance attribute (else the class's method)

    def __call__(self, *args: Any, **kwargs: Any):
        route = self.plans.route(self.plans.current_class())
        if route is None or _callers_own_loop(kwargs):
            return self.inner(*args, **kwargs)
        kwargs.pop("custom_generate", None)            # the default plan's loop, if any
        if route.runner is not None:
            kwargs["custom_generate"] = route.runner._loop
        return _bottom(self.inner)(*args, **kwargs)


def _callers_own_loop(kwargs: dict) -> bool:
    loop = kwargs.get("custom_generate")
    ours = isinstance(getattr(loop, "__self__", None), SpeculativeGenerate)
    return (loop is not None and not ours) or any(kwargs.get(n) is not None for n in CALLER_LOOPS)


def _bottom(g: Callable) -> Callable:
    """The generate below every speculative wrapper and router (the tracker's, or the model's)."""
    while isinstance(g, (SpeculativeGenerate, ClassRouter)):
        g = g.inner
    return g


def _chain(model: nn.Module) -> Iterator[Any]:
    g = vars(model).get("generate")
    while isinstance(g, (SpeculativeGenerate, ClassRouter)):
        yield g
        g = g.inner


class ClassPlans:
    """query class -> its active plan. Call apply/rollback/sync only at a request boundary."""

    def __init__(self, model: nn.Module, executor: Any,
                 current_class: Callable[[], str] = lambda: ""):
        self.model, self.executor, self.current_class = model, executor, current_class
        self.routes: dict[str, ClassRoute] = {}

    def __bool__(self) -> bool:
        return bool(self.routes)

    def plans(self) -> dict[str, Any]:
        """query class -> its plan, sorted by class (a copy: readable from another thread)."""
        return {c: r.plan for c, r in sorted(list(self.routes.items()))}

    def route(self, query_class: str) -> Optional[ClassRoute]:
        return self.routes.get(query_class) if query_class else None

    def classes_of(self, plan_id: str) -> list[str]:
        return sorted(c for c, r in self.routes.items() if r.plan.plan_id == plan_id)

    def check(self, plan: Any) -> list[str]:
        return class_plan_problems(plan, self.executor.active_plan)

    def apply(self, plan: Any) -> tuple[ClassRoute, dict[str, ClassRoute]]:
        """-> (the new route, class -> the route it replaced). The caller has check()ed the
        plan (classcontrol.apply_class, under the apply boundary)."""
        default = self.executor.active_plan
        runner, note = self._runner(speculative_of(plan))
        route = ClassRoute(plan, default.hash if default is not None else None, runner, note)
        replaced = {c: self.routes[c] for c in plan.query_classes if c in self.routes}
        for c in plan.query_classes:
            self.routes[c] = route
        self._install()
        return route, replaced

    def rollback(self, query_class: str) -> Optional[ClassRoute]:
        route = self.routes.pop(query_class, None)
        self._install()
        return route

    def sync(self) -> dict[str, ClassRoute]:
        """After the default plan changed (or was re-applied by a trial): drops class plans
        checked against another default (returned), rebuilds stale self drafts."""
        default = self.executor.active_plan
        now = default.hash if default is not None else None
        dropped = {c: r for c, r in self.routes.items() if r.base_hash != now}
        for c in dropped:
            del self.routes[c]
        for route in {id(r): r for r in self.routes.values()}.values():
            self._refresh(route)
        self._install()
        return dropped

    def close(self) -> dict[str, ClassRoute]:
        dropped, self.routes = self.routes, {}
        self._install()
        return dropped

    def _drafter(self, spec: Any):
        """-> make_drafter's (drafter, lock, note), self drafts built by the executor."""
        return make_drafter(self.model, spec, lambda ts: build_draft(self.executor, ts))

    def _runner(self, spec: Any) -> tuple[Optional[SpeculativeGenerate], str]:
        if spec is None:
            return None, "no speculation for this class"
        drafter, lock, note = self._drafter(spec)
        return SpeculativeGenerate(None, drafter, spec.k, lock), (
            f"speculative decoding, k={spec.k}, drafts by {note}")

    def _refresh(self, route: ClassRoute) -> None:
        modules = getattr(route.runner.drafter, "modules", None) if route.runner else None
        if modules is not None and not modules.fresh(self.model):
            route.runner.drafter, route.runner.lock, _ = self._drafter(speculative_of(route.plan))

    def _install(self) -> None:
        """A router in the chain while a class has a plan; none on top when none has."""
        model = self.model
        while not self.routes and isinstance(vars(model).get("generate"), ClassRouter):
            router = vars(model).pop("generate")
            if router.own_attr:
                vars(model)["generate"] = router.inner
        if self.routes and not any(isinstance(g, ClassRouter) for g in _chain(model)):
            vars(model)["generate"] = ClassRouter(model.generate, self, "generate" in vars(model))
