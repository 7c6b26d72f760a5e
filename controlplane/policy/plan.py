"""What the policy rules read of a plan: kinds, touched parts, removed fractions.

The document is parsed and fitted to the model by the contract (proto/plan.py,
proto/plan_fit.py), so the engine accepts and refuses exactly what the agent and the control
plane do; this only derives the rules' view of a valid plan.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from headroom_sidecar.proto.plan import (HEAD_KEY, Plan, PlanMode, TransformKind,
                                         WeightPrecision, parse_plan)
from headroom_sidecar.proto.plan_fit import ModelFacts, check_fits


class Component(str, enum.Enum):
    """A part of the model a rule can protect; attention and mlp exist once per layer.
    (No plan can change the embeddings; a rule may still name them.)"""
    ATTENTION = "attention"
    MLP = "mlp"
    EMBEDDINGS = "embeddings"
    LM_HEAD = HEAD_KEY     # also weight_precision's key for the output head


PER_LAYER = (Component.ATTENTION, Component.MLP)
# Which per-layer parts each kind changes (execution settings change none).
_PARTS = {TransformKind.PRUNE_HEADS: (Component.ATTENTION,),
          TransformKind.SKIP_LAYERS: PER_LAYER,
          TransformKind.ACTIVATION_SPARSITY: (Component.MLP,),
          TransformKind.WEIGHT_PRECISION: PER_LAYER,
          TransformKind.EXECUTION: ()}


@dataclass(frozen=True)
class Touch:
    kind: TransformKind
    component: Component
    layer: Optional[int]  # None for embeddings / lm_head


@dataclass(frozen=True)
class PlanView:
    plan_id: str
    sha256: str                 # of the document as received (Plan.hash)
    mode: PlanMode
    query_classes: tuple[str, ...]
    kinds: tuple[TransformKind, ...]
    pruned_heads: Mapping[int, frozenset[int]]
    skipped_layers: frozenset[int]
    sparsity_layers: frozenset[int]
    precision_layers: frozenset[int]     # layers whose weights are rounded (int8)
    rounded_head: bool                   # the output head's weights are rounded (int8)
    touches: tuple[Touch, ...]
    model: ModelFacts

    @property
    def heads_removed_fraction(self) -> float:
        total = self.model.num_layers * self.model.num_heads
        return sum(len(h) for h in self.pruned_heads.values()) / total

    @property
    def max_heads_removed_fraction_per_layer(self) -> float:
        return max((len(h) for h in self.pruned_heads.values()), default=0) / self.model.num_heads

    @property
    def layers_removed_fraction(self) -> float:
        return len(self.skipped_layers) / self.model.num_layers


def plan_view(doc: Any, model: ModelFacts) -> PlanView:
    """PlanError (paths start with "plan.") unless `doc` is a valid plan that fits `model`."""
    plan = parse_plan(doc, where="plan")
    check_fits(plan, model, where="plan")
    layers = {k: frozenset(t.touched_layers()) for k in TransformKind
              if (t := plan.get(k)) is not None}
    prune = plan.get(TransformKind.PRUNE_HEADS)
    precision = plan.get(TransformKind.WEIGHT_PRECISION) or WeightPrecision({})
    return PlanView(plan_id=plan.plan_id, sha256=plan.hash, mode=plan.mode,
                    query_classes=plan.query_classes,
                    kinds=tuple(t.kind for t in plan.transforms),
                    pruned_heads={l: frozenset(h) for l, h in (prune.heads if prune else {}).items()},
                    skipped_layers=layers.get(TransformKind.SKIP_LAYERS, frozenset()),
                    sparsity_layers=layers.get(TransformKind.ACTIVATION_SPARSITY, frozenset()),
                    precision_layers=frozenset(l for l, p in precision.layers.items() if p.rounds),
                    rounded_head=precision.head is not None and precision.head.rounds,
                    touches=_touches(plan), model=model)


def _touches(plan: Plan) -> tuple[Touch, ...]:
    out = [Touch(t.kind, c, layer) for t in plan.transforms
           for layer in sorted(t.touched_layers()) for c in _PARTS[t.kind]]
    precision = plan.get(TransformKind.WEIGHT_PRECISION)
    if isinstance(precision, WeightPrecision) and precision.head is not None:
        out.append(Touch(TransformKind.WEIGHT_PRECISION, Component.LM_HEAD, None))
    return tuple(out)
