"""Does a valid plan fit a model's shape? One rule set for agent, control plane and policy engine.

`check_fits(plan, facts)` raises PlanError with every problem (paths name the transform by its
index in the normal form, plan.to_doc()["transforms"]) and returns notes for legal-but-odd
combinations. Decided once:
- every layer index < num_layers and head index < num_heads, in the plan and its draft plan;
- skipping every layer is refused (the model, or the draft, would be the identity);
- pruning every head of one layer is allowed (its MLP still runs) with a note; leaving every
  layer without attention (all heads pruned or skipped) is refused;
- fp32_packed on a model whose weights are not fp32 is refused.
What only the agent can know (the fingerprint of the loaded model, which kinds its adapter
supports, whether its output head can be int8) stays in agent/plan.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Union

from headroom_sidecar.proto.plan import Plan
from headroom_sidecar.proto.plan_types import (PlanError, PruneHeads, SkipLayers,
                                               Transform, WeightPrecision, in_kind_order)
from headroom_sidecar.proto.plandoc import HEAD_KEY, Precision, TransformKind

_FACT_KEYS = ("num_layers", "num_heads", "dtype")


@dataclass(frozen=True)
class ModelFacts:
    """What the checks, the diff and the policy rules need to know about the unoptimised model."""
    num_layers: int
    num_heads: int                       # attention (query) heads per layer
    dtype: str = "float32"               # weights' torch dtype name (the diff, fp32_packed)

    def __post_init__(self):
        for name in ("num_layers", "num_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"model.{name}: expected an int > 0, got {v!r}")
        if not isinstance(self.dtype, str) or not self.dtype:
            raise ValueError(f"model.dtype: expected a dtype name, got {self.dtype!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelFacts":
        if not isinstance(d, Mapping):
            raise ValueError(f"model: expected a mapping, got {type(d).__name__}")
        unknown = sorted(str(k) for k in set(d) - set(_FACT_KEYS))
        if unknown:
            raise ValueError(f"model: unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(_FACT_KEYS)}")
        return cls(d.get("num_layers"), d.get("num_heads"), d.get("dtype", "float32"))

    @classmethod
    def of(cls, facts: Union["ModelFacts", Mapping[str, Any]]) -> "ModelFacts":
        return facts if isinstance(facts, ModelFacts) else cls.from_dict(facts)


def check_fits(plan: Plan, facts: Union[ModelFacts, Mapping[str, Any]],
               where: str = "plan") -> list[str]:
    """Raises PlanError listing every way `plan` does not fit the model; returns notes."""
    facts = ModelFacts.of(facts)
    problems, notes = [], []
    ordered = in_kind_order(plan.transforms)
    _check_list(ordered, f"{where}.transforms", facts, problems, notes, "model")
    for i, t in enumerate(ordered):
        spec = getattr(t, "speculative", None)
        if spec is not None and spec.draft_transforms:
            _check_list(in_kind_order(spec.draft_transforms),
                        f"{where}.transforms[{i}].speculative.draft_plan.transforms", facts,
                        problems, [], "draft")
    if problems:
        raise PlanError(problems, plan.plan_id)
    return notes


def _check_list(transforms: tuple, path: str, facts: ModelFacts, problems: list[str],
                notes: list[str], what: str) -> None:
    skip = next((t for t in transforms if isinstance(t, SkipLayers)), None)
    skipped = set(skip.layers) if skip else set()
    for i, t in enumerate(transforms):
        _check_ranges(t, f"{path}[{i}]", facts, problems)
        on_skipped = sorted(t.touched_layers() & skipped) if t is not skip else []
        if on_skipped:
            notes.append(f"{path}[{i}] ({t.kind.value}): layer(s) {on_skipped} are skipped; "
                         "this has no effect there")
    n = facts.num_layers
    if skip is not None and skipped >= set(range(n)):
        problems.append(f"{path}[{transforms.index(skip)}].layers: skips all {n} layers; the "
                        f"{what} would be an identity")
    prune = next((t for t in transforms if isinstance(t, PruneHeads)), None)
    if prune is not None:
        _check_attention_left(prune, f"{path}[{transforms.index(prune)}]", facts, skipped,
                              problems, notes)


def _check_ranges(t: Transform, path: str, facts: ModelFacts, problems: list[str]) -> None:
    field_name = _LAYER_FIELD.get(t.kind)
    bad = sorted(x for x in t.touched_layers() if x >= facts.num_layers)
    if bad:
        problems.append(f"{path}.{field_name}: layer(s) {bad} out of range (the model has "
                        f"{facts.num_layers} layers)")
    if isinstance(t, WeightPrecision):
        _check_dtype(t, path, facts, problems)
    if isinstance(t, PruneHeads):
        for layer, heads in sorted(t.heads.items()):
            over = [h for h in heads if h >= facts.num_heads]
            if over:
                problems.append(f"{path}.heads.{layer}: head(s) {over} out of range (the model "
                                f"has {facts.num_heads} query heads)")


def _check_dtype(t: WeightPrecision, path: str, facts: ModelFacts, problems: list[str]) -> None:
    """fp32_packed keeps fp32 weights: on a model whose weights are not fp32 it is refused."""
    if facts.dtype == "float32":
        return
    packed = [str(l) for l in sorted(t.layers) if t.layers[l] == Precision.FP32_PACKED]
    packed += [HEAD_KEY] if t.head == Precision.FP32_PACKED else []
    if packed:
        problems.append(f"{path}.layers: {Precision.FP32_PACKED.value} on {', '.join(packed)} "
                        f"needs fp32 weights; the model's are {facts.dtype}")


def _check_attention_left(prune: PruneHeads, path: str, facts: ModelFacts, skipped: set[int],
                          problems: list[str], notes: list[str]) -> None:
    h = facts.num_heads
    emptied = {layer for layer, heads in prune.heads.items() if len(heads) >= h}
    for layer in sorted(emptied):
        notes.append(f"{path}.heads.{layer}: all {h} heads pruned; its attention contributes "
                     "nothing (its MLP still runs)")
    if (emptied | skipped) >= set(range(facts.num_layers)):
        problems.append(f"{path}.heads: every layer would be left without attention")


_LAYER_FIELD = {TransformKind.PRUNE_HEADS: "heads", TransformKind.SKIP_LAYERS: "layers",
                TransformKind.ACTIVATION_SPARSITY: "thresholds",
                TransformKind.WEIGHT_PRECISION: "layers", TransformKind.EXECUTION: ""}
