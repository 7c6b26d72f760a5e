"""Reads a plan document (headroom.plan/v1) into what the rules need: kinds, touched parts, fractions."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from headroom_sidecar.proto.plandoc import (HEAD_KEY, PLAN_SCHEMA, PlanMode, TransformKind,  # noqa: F401
                           plan_hash as plan_sha256)
from headroom_sidecar.controlplane.policy.types import ModelFacts



class Component(str, enum.Enum):
    """A part of the model a transform can change; attention and mlp exist once per layer."""
    ATTENTION = "attention"
    MLP = "mlp"
    EMBEDDINGS = "embeddings"
    LM_HEAD = HEAD_KEY     # also weight_precision's key for the output head


PER_LAYER = (Component.ATTENTION, Component.MLP)
PRECISIONS = ("int8", "int4")
COMPILE_MODES = ("none", "torch_compile", "cuda_graph")


class PlanError(ValueError):
    """A plan document that is malformed or does not fit the model; says which field."""


@dataclass(frozen=True)
class Touch:
    kind: TransformKind
    component: Component
    layer: Optional[int]  # None for embeddings / lm_head


@dataclass(frozen=True)
class PlanView:
    plan_id: str
    sha256: str
    mode: PlanMode
    query_classes: tuple[str, ...]
    kinds: tuple[TransformKind, ...]
    pruned_heads: Mapping[int, frozenset[int]]
    skipped_layers: frozenset[int]
    sparsity_layers: frozenset[int]
    precision_layers: frozenset[int]
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


def parse_plan(doc: Mapping[str, Any], model: ModelFacts) -> PlanView:
    if not isinstance(doc, Mapping):
        raise PlanError(f"plan: expected a mapping, got {type(doc).__name__}")
    if doc.get("schema") != PLAN_SCHEMA:
        raise PlanError(f"plan.schema: expected {PLAN_SCHEMA!r}, got {doc.get('schema')!r}")
    mode = _enum(PlanMode, doc.get("mode"), "plan.mode")
    classes = doc.get("query_classes") or []
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise PlanError("plan.query_classes: expected a list of strings")
    transforms = doc.get("transforms") or []
    if not isinstance(transforms, list):
        raise PlanError("plan.transforms: expected a list")
    parts = _Parts(model)
    for i, t in enumerate(transforms):
        parts.add(t, f"plan.transforms[{i}]")
    return PlanView(plan_id=str(doc.get("plan_id", "")), sha256=plan_sha256(doc), mode=mode,
                    query_classes=tuple(classes), kinds=tuple(parts.kinds),
                    pruned_heads={k: frozenset(v) for k, v in parts.heads.items()},
                    skipped_layers=frozenset(parts.skipped), sparsity_layers=frozenset(parts.sparse),
                    precision_layers=frozenset(parts.precision), touches=tuple(parts.touches),
                    model=model)


class _Parts:
    """Accumulates what the transforms touch, checking each index against the model."""

    def __init__(self, model: ModelFacts):
        self.model = model
        self.kinds: list[TransformKind] = []
        self.heads: dict[int, set[int]] = {}
        self.skipped: set[int] = set()
        self.sparse: set[int] = set()
        self.precision: set[int] = set()
        self.touches: list[Touch] = []

    def add(self, t: Any, where: str) -> None:
        if not isinstance(t, Mapping):
            raise PlanError(f"{where}: expected a mapping")
        kind = _enum(TransformKind, t.get("kind"), f"{where}.kind")
        if kind not in self.kinds:
            self.kinds.append(kind)
        getattr(self, f"_{kind.value}")(t, where)

    def _prune_heads(self, t: Mapping, where: str) -> None:
        for layer, heads in _layer_map(t, "heads", where).items():
            if not isinstance(heads, list) or not heads:
                raise PlanError(f"{where}.heads.{layer}: expected a non-empty list of head indices")
            for h in heads:
                _index(h, self.model.num_heads, f"{where}.heads.{layer}")
            self.heads.setdefault(self._layer(layer, f"{where}.heads"), set()).update(heads)
            self.touches.append(Touch(TransformKind.PRUNE_HEADS, Component.ATTENTION, int(layer)))

    def _skip_layers(self, t: Mapping, where: str) -> None:
        layers = t.get("layers")
        if not isinstance(layers, list):
            raise PlanError(f"{where}.layers: expected a list of layer indices")
        for layer in layers:
            self.skipped.add(_index(layer, self.model.num_layers, f"{where}.layers"))
            self._touch_layer(TransformKind.SKIP_LAYERS, layer)

    def _activation_sparsity(self, t: Mapping, where: str) -> None:
        for layer, thr in _layer_map(t, "thresholds", where).items():
            if isinstance(thr, bool) or not isinstance(thr, (int, float)) or thr < 0:
                raise PlanError(f"{where}.thresholds.{layer}: expected a number >= 0, got {thr!r}")
            self.sparse.add(self._layer(layer, f"{where}.thresholds"))
            self.touches.append(Touch(TransformKind.ACTIVATION_SPARSITY, Component.MLP, int(layer)))

    def _weight_precision(self, t: Mapping, where: str) -> None:
        for key, dtype in _layer_map(t, "layers", where).items():
            if dtype not in PRECISIONS:
                raise PlanError(f"{where}.layers.{key}: expected one of {PRECISIONS}, got {dtype!r}")
            if key in (Component.EMBEDDINGS.value, Component.LM_HEAD.value):
                self.touches.append(Touch(TransformKind.WEIGHT_PRECISION, Component(key), None))
                continue
            self.precision.add(self._layer(key, f"{where}.layers"))
            self._touch_layer(TransformKind.WEIGHT_PRECISION, int(key))

    def _execution(self, t: Mapping, where: str) -> None:
        _check_fields(t, {"kind", "static_kv_cache", "compile"}, where)
        if not isinstance(t.get("static_kv_cache", False), bool):
            raise PlanError(f"{where}.static_kv_cache: expected a bool")
        if t.get("compile", "none") not in COMPILE_MODES:
            raise PlanError(f"{where}.compile: expected one of {COMPILE_MODES}, got {t.get('compile')!r}")

    def _touch_layer(self, kind: TransformKind, layer: int) -> None:
        self.touches.extend(Touch(kind, c, layer) for c in PER_LAYER)

    def _layer(self, key: Any, where: str) -> int:
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise PlanError(f"{where}: layer key {key!r} is not an integer") from None
        return _index(layer, self.model.num_layers, where)


def _layer_map(t: Mapping, name: str, where: str) -> Mapping[str, Any]:
    _check_fields(t, {"kind", name}, where)
    m = t.get(name)
    if not isinstance(m, Mapping) or not m:
        raise PlanError(f"{where}.{name}: expected a non-empty mapping of layer -> value")
    return m


def _check_fields(t: Mapping, known: set[str], where: str) -> None:
    unknown = sorted(set(t) - known)
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {', '.join(unknown)}")


def _index(v: Any, size: int, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < size:
        raise PlanError(f"{where}: index {v!r} is not in [0, {size})")
    return v


def _enum(cls: type[enum.Enum], v: Any, where: str):
    try:
        return cls(v)
    except ValueError:
        raise PlanError(f"{where}: expected one of {[e.value for e in cls]}, got {v!r}") from None
