"""What only the agent can check about a plan: does it fit the model loaded here.

The plan model, its parser and the shape rules are the contract's (proto/plan.py,
proto/plan_fit.py); this adds what needs the live model: its fingerprint, the transform kinds
its adapter supports, and whether its output head can be replaced by int8.
"""
from __future__ import annotations

from typing import Mapping

from headroom_sidecar.agent.adapters.base import ModelStructure
from headroom_sidecar.proto.plan import Plan, PlanError, WeightPrecision, in_kind_order
from headroom_sidecar.proto.plan_fit import ModelFacts, check_fits
from headroom_sidecar.proto.plandoc import HEAD_KEY, TransformKind

_HEAD_UNCHECKED = "no model was given to check its output head against"


def check_fit(plan: Plan, structure: ModelStructure, fingerprint: str,
              supported: Mapping[TransformKind, str | None] | None = None,
              head_reason: str | None = _HEAD_UNCHECKED, dtype: str = "float32") -> list[str]:
    """Raises PlanError with every reason `plan` cannot run on this model; returns notes.

    `supported` maps a kind to None (supported here) or the reason it is not (from the executor).
    `head_reason`: head_int8_support(unoptimised model); a plan that sets the output head's
    precision is refused unless it is None. `dtype`: the weights' dtype name (fp32_packed
    needs float32).
    """
    problems: list[str] = []
    if plan.model_fingerprint != fingerprint:
        problems.append(f"plan.model_fingerprint: {plan.model_fingerprint[:12]}… does not match "
                        f"this model ({fingerprint[:12]}…): the plan was made for another model")
    for path, t in _all_transforms(plan):
        reason = (supported or {}).get(t.kind)
        if reason:
            problems.append(f"{path}.kind: {t.kind.value}: not supported for "
                            f"{structure.architecture}: {reason}")
        if isinstance(t, WeightPrecision) and t.head is not None and head_reason:
            problems.append(f"{path}.layers.{HEAD_KEY}: cannot set the output head to "
                            f"{t.head.value}: {head_reason}")
    try:
        notes = check_fits(plan, ModelFacts(structure.num_layers, structure.num_heads, dtype))
    except PlanError as e:
        problems += e.problems
        notes = []
    if problems:
        raise PlanError(problems, plan.plan_id)
    return notes


def _all_transforms(plan: Plan):
    """(path, transform) for the plan's transforms and its draft plan's, paths as check_fits."""
    for i, t in enumerate(in_kind_order(plan.transforms)):
        yield f"plan.transforms[{i}]", t
        spec = getattr(t, "speculative", None)
        drafted = in_kind_order(spec.draft_transforms) if spec is not None else ()
        for j, d in enumerate(drafted):
            yield f"plan.transforms[{i}].speculative.draft_plan.transforms[{j}]", d
