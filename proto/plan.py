"""The plan: one typed model of a headroom.plan/v1 document, parsed and validated once.

    plan = parse_plan(doc, where="plan")        # PlanError naming every bad field's path
    plan.to_doc()                               # the normal form; parse_plan(plan.to_doc()) == plan
    Plan("p-1", 1, fingerprint, (SkipLayers((3,)),))   # built in code: the same checks

The agent (applies it to modules), the control plane (stores, diffs, signs it) and the policy
engine (reads what it touches) all use this type; the rules are in proto/plan_parse.py, the
fit to a model in proto/plan_fit.py, the vocabulary and hash rule in proto/plandoc.py.

Two hashes, both sha256 of canonical JSON (plandoc.plan_hash):
- `sha256`: of the normal form (transforms in kind order, indices sorted, query classes
  sorted, every optional field written). The plan's identity; what the control plane stores,
  signs and sends. Two documents that mean the same thing have the same sha256.
- `hash`: of the document exactly as parsed (`doc`), so a receiver checks the bytes it was
  sent, never a re-serialisation. Equal to `sha256` for anything the control plane sent.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from headroom_sidecar.proto.plan_parse import (Reader, check_mode, read_top,
                                               read_transforms)
from headroom_sidecar.proto.plan_types import (APPLY_ORDER, KIND_ORDER,
                                               ActivationSparsity, Execution, PlanError,
                                               PruneHeads, SkipLayers, Speculative, Transform,
                                               WeightPrecision, in_apply_order, in_kind_order)
from headroom_sidecar.proto.plandoc import (HEAD_KEY, PLAN_SCHEMA, CompileMode,
                                            PlanMode, Precision, SpeculativeDraft,
                                            TransformKind, canonical_json, plan_hash)

__all__ = [  # the model's public names: import them from here, not from plan_types/plandoc
    "APPLY_ORDER", "KIND_ORDER", "HEAD_KEY", "PLAN_SCHEMA", "ActivationSparsity", "CompileMode",
    "Execution", "Plan", "PlanError", "PlanMode", "Precision", "PruneHeads", "SkipLayers",
    "Speculative", "SpeculativeDraft", "Transform", "TransformKind", "WeightPrecision",
    "canonical_json", "in_apply_order", "in_kind_order", "parse_plan",
    "plan_from_json", "plan_hash", "replace"]

_FIELDS = ("plan_id", "version", "model_fingerprint", "transforms", "query_classes", "mode",
           "notes")


@dataclass(frozen=True)
class Plan:
    plan_id: str
    version: int
    model_fingerprint: str
    transforms: tuple[Transform, ...] = ()      # normal form: TransformKind declaration order
    query_classes: tuple[str, ...] = ()         # scope, sorted; empty: every query class
    mode: PlanMode = PlanMode.STRUCTURAL
    notes: str = ""
    # The document as parsed (JSON types), for `hash`; None when built in code.
    source: Optional[dict] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        # Built in code: the same checks and normal form as a parsed document, so a Plan is
        # always valid. (parse_plan builds through _build and skips this round trip.)
        try:
            doc = self.to_doc()
        except (ValueError, TypeError, AttributeError) as e:
            raise PlanError([f"plan: cannot be written as a document: {e}"]) from e
        parsed = parse_plan(doc)
        for name in _FIELDS:
            object.__setattr__(self, name, getattr(parsed, name))

    @classmethod
    def _build(cls, values: Mapping[str, Any], source: Optional[dict]) -> "Plan":
        obj = object.__new__(cls)
        for name in _FIELDS:
            object.__setattr__(obj, name, values[name])
        object.__setattr__(obj, "source", source)
        return obj

    # ------------------------------------------------------------ documents and hashes
    def to_doc(self) -> dict:
        """The normal form (a new dict each call)."""
        return {"schema": PLAN_SCHEMA, "plan_id": self.plan_id, "version": self.version,
                "model_fingerprint": self.model_fingerprint,
                "query_classes": _sorted_if_list(self.query_classes),
                "mode": PlanMode(self.mode).value,
                "transforms": [t.to_doc() for t in in_kind_order(self.transforms)],
                "notes": self.notes}

    @property
    def doc(self) -> dict:
        """The document as parsed, or the normal form for a plan built in code."""
        return self.source if self.source is not None else self.to_doc()

    @property
    def sha256(self) -> str:
        return plan_hash(self.to_doc())

    @property
    def hash(self) -> str:
        return plan_hash(self.doc)

    def to_json(self) -> str:
        return canonical_json(self.doc).decode()

    # ------------------------------------------------------------ reading
    def get(self, kind: TransformKind) -> Optional[Transform]:
        return next((t for t in self.transforms if t.kind == kind), None)

    def ordered(self) -> list[Transform]:
        """Transforms in the order the executor applies them (APPLY_ORDER)."""
        return list(in_apply_order(self.transforms))

    @staticmethod
    def from_doc(doc: Any, where: str = "plan") -> "Plan":
        return parse_plan(doc, where)

    @staticmethod
    def from_json(text: str | bytes, where: str = "plan") -> "Plan":
        return plan_from_json(text, where)


def _sorted_if_list(value: Any) -> Any:
    """Sorted, or as given so that validation reports it (a str is not a list of classes)."""
    return sorted(value) if isinstance(value, (list, tuple)) else value


def parse_plan(doc: Any, where: str = "plan") -> Plan:
    """The one parser: a Plan, or PlanError listing every problem as "<where>.<field>: ..."."""
    r = Reader()
    top = read_top(r, doc, where)
    if top is None:
        raise PlanError(r.problems)
    items = doc.get("transforms", [])
    transforms = read_transforms(r, items, f"{where}.transforms")
    check_mode(r, top["mode"], items, where)
    if r.problems:
        plan_id = top["plan_id"] if isinstance(top["plan_id"], str) else ""
        raise PlanError(r.problems, plan_id)
    values = {**top, "transforms": in_kind_order(transforms)}
    return Plan._build(values, json.loads(canonical_json(doc)))


def plan_from_json(text: str | bytes, where: str = "plan") -> Plan:
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        at = f"line {e.lineno}, column {e.colno}: {e.msg}" if hasattr(e, "lineno") else str(e)
        raise PlanError([f"{where}: not JSON: {at}"]) from e
    return parse_plan(doc, where)


def replace(plan: Plan, **changes) -> Plan:
    """dataclasses.replace, validated like any plan built in code (the source is dropped)."""
    return dataclasses.replace(plan, source=None, **changes)
