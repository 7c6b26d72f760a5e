"""Plan documents (typed, validated, hashed), their readable diff, and the plan store.

A plan travels as canonical JSON; its sha256 is the plan hash (proto/plandoc.py, the rule
the agent uses too).
`PlanDoc.to_doc()` is normalised (transforms in a fixed kind order, indices sorted), so two
plans that mean the same thing hash the same.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from headroom_sidecar.proto.plandoc import (HEAD_KEY, PLAN_SCHEMA, CompileMode, PlanMode, Precision,  # noqa: F401
                           TransformKind, canonical_json, plan_hash)
from headroom_sidecar.proto.plandoc import DRAFT_PLAN_KINDS, SPECULATIVE_K_MAX, SpeculativeDraft

SCHEMA = PLAN_SCHEMA
_PLAN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_LAYER_KEY = re.compile(r"^(0|[1-9][0-9]*)$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class PlanValidationError(ValueError):
    """A plan document is malformed; the message starts with the field's path."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path


# ---------------------------------------------------------------- field checks

def _int(value: Any, path: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PlanValidationError(path, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _layer_key(key: Any, path: str, also: str = "") -> int:
    if not isinstance(key, str) or not _LAYER_KEY.match(key):
        raise PlanValidationError(path, f"layer key must be a decimal string like \"3\"{also}, "
                                  f"got {key!r}")
    return int(key)


def _mapping(value: Any, path: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise PlanValidationError(path, f"must be an object, got {type(value).__name__}")
    return value


def _list(value: Any, path: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise PlanValidationError(path, f"must be a list, got {type(value).__name__}")
    return list(value)


def _enum(cls, value: Any, path: str):
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        raise PlanValidationError(path, f"must be one of {allowed}, got {value!r}") from None


def _keys(obj: Mapping, path: str, required: set[str], optional: set[str] = frozenset()) -> None:
    missing = sorted(required - set(obj))
    if missing:
        raise PlanValidationError(f"{path}.{missing[0]}" if path else missing[0], "is required")
    unknown = sorted(set(obj) - required - set(optional))
    if unknown:
        raise PlanValidationError(f"{path}.{unknown[0]}" if path else unknown[0], "unknown field")


def _layers_of(value: Any, path: str) -> tuple[int, ...]:
    layers = [_int(v, f"{path}[{i}]") for i, v in enumerate(_list(value, path))]
    if len(set(layers)) != len(layers):
        raise PlanValidationError(path, "a layer is listed twice")
    return tuple(sorted(layers))


# ---------------------------------------------------------------- transforms

@dataclass(frozen=True)
class PruneHeads:
    heads: Mapping[int, tuple[int, ...]]   # layer -> attention (query) head indices removed
    kind = TransformKind.PRUNE_HEADS

    @classmethod
    def from_doc(cls, d: Mapping, path: str) -> "PruneHeads":
        _keys(d, path, {"kind", "heads"})
        out = {}
        for key, idx in _mapping(d["heads"], f"{path}.heads").items():
            layer = _layer_key(key, f"{path}.heads")
            heads = _layers_of(idx, f"{path}.heads.{key}")
            if not heads:
                raise PlanValidationError(f"{path}.heads.{key}", "empty head list")
            out[layer] = heads
        return cls(out)

    def to_doc(self) -> dict:
        return {"kind": self.kind.value,
                "heads": {str(l): sorted(h) for l, h in sorted(self.heads.items())}}

    def layers(self) -> set[int]:
        return set(self.heads)


@dataclass(frozen=True)
class SkipLayers:
    skipped: tuple[int, ...]
    kind = TransformKind.SKIP_LAYERS

    @classmethod
    def from_doc(cls, d: Mapping, path: str) -> "SkipLayers":
        _keys(d, path, {"kind", "layers"})
        return cls(_layers_of(d["layers"], f"{path}.layers"))

    def to_doc(self) -> dict:
        return {"kind": self.kind.value, "layers": sorted(self.skipped)}

    def layers(self) -> set[int]:
        return set(self.skipped)


@dataclass(frozen=True)
class ActivationSparsity:
    thresholds: Mapping[int, float]   # layer -> |activation| below this is zeroed
    kind = TransformKind.ACTIVATION_SPARSITY

    @classmethod
    def from_doc(cls, d: Mapping, path: str) -> "ActivationSparsity":
        _keys(d, path, {"kind", "thresholds"})
        out = {}
        for key, t in _mapping(d["thresholds"], f"{path}.thresholds").items():
            layer = _layer_key(key, f"{path}.thresholds")
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise PlanValidationError(f"{path}.thresholds.{key}",
                                          f"must be a finite number > 0, got {t!r}")
            out[layer] = float(t)
        return cls(out)

    def to_doc(self) -> dict:
        return {"kind": self.kind.value,
                "thresholds": {str(l): t for l, t in sorted(self.thresholds.items())}}

    def layers(self) -> set[int]:
        return set(self.thresholds)


@dataclass(frozen=True)
class WeightPrecision:
    precisions: Mapping[int, Precision]   # block layer -> weight-only precision
    head: Optional[Precision] = None      # the output head (document key HEAD_KEY); None: unchanged
    kind = TransformKind.WEIGHT_PRECISION

    @classmethod
    def from_doc(cls, d: Mapping, path: str) -> "WeightPrecision":
        _keys(d, path, {"kind", "layers"})
        out, head = {}, None
        for key, p in _mapping(d["layers"], f"{path}.layers").items():
            if key == HEAD_KEY:
                head = _enum(Precision, p, f"{path}.layers.{key}")
                continue
            layer = _layer_key(key, f"{path}.layers", f" or {HEAD_KEY!r}")
            out[layer] = _enum(Precision, p, f"{path}.layers.{key}")
        return cls(out, head)

    def to_doc(self) -> dict:
        layers = {str(l): Precision(p).value for l, p in sorted(self.precisions.items())}
        if self.head is not None:
            layers[HEAD_KEY] = Precision(self.head).value
        return {"kind": self.kind.value, "layers": layers}

    def layers(self) -> set[int]:
        """Block layers only; the head is `head`."""
        return set(self.precisions)


@dataclass(frozen=True)
class Speculative:
    """execution.speculative (proto/plandoc.py): a draft proposes k tokens, the model verifies."""
    draft: SpeculativeDraft
    k: int
    draft_transforms: tuple = ()    # draft "self": the draft plan's transforms, in kind order

    @classmethod
    def from_doc(cls, d: Any, path: str) -> "Speculative":
        d = _mapping(d, path)
        _keys(d, path, {"draft", "k"}, {"draft_plan"})
        draft = _enum(SpeculativeDraft, d["draft"], f"{path}.draft")
        k = _int(d["k"], f"{path}.k", 1)
        if k > SPECULATIVE_K_MAX:
            raise PlanValidationError(f"{path}.k", f"must be at most {SPECULATIVE_K_MAX}, got {k}")
        if draft == SpeculativeDraft.PROMPT_LOOKUP:
            if "draft_plan" in d:
                raise PlanValidationError(f"{path}.draft_plan", "only draft 'self' takes a draft plan")
            return cls(draft, k)
        if "draft_plan" not in d:
            raise PlanValidationError(f"{path}.draft_plan", "is required for draft 'self'")
        return cls(draft, k, _draft_plan(d["draft_plan"], f"{path}.draft_plan"))

    def to_doc(self) -> dict:
        out = {"draft": self.draft.value, "k": self.k}
        if self.draft == SpeculativeDraft.SELF:
            ordered = sorted(self.draft_transforms, key=lambda t: _KIND_ORDER[t.kind])
            out["draft_plan"] = {"transforms": [t.to_doc() for t in ordered]}
        return out


def _draft_plan(value: Any, path: str) -> tuple:
    d = _mapping(value, path)
    _keys(d, path, {"transforms"})
    transforms = _transforms(d["transforms"], f"{path}.transforms")
    if not transforms:
        raise PlanValidationError(f"{path}.transforms", "is empty: the draft would be the "
                                  "verifier itself")
    for i, t in enumerate(transforms):
        if t.kind not in DRAFT_PLAN_KINDS:
            raise PlanValidationError(f"{path}.transforms[{i}].kind", f"{t.kind.value!r} cannot "
                                      "be in a draft plan; allowed: "
                                      + ", ".join(repr(k.value) for k in DRAFT_PLAN_KINDS))
    return tuple(sorted(transforms, key=lambda t: _KIND_ORDER[t.kind]))


@dataclass(frozen=True)
class Execution:
    static_kv_cache: bool = False
    compile: CompileMode = CompileMode.NONE
    speculative: Optional[Speculative] = None
    kind = TransformKind.EXECUTION

    @classmethod
    def from_doc(cls, d: Mapping, path: str) -> "Execution":
        _keys(d, path, {"kind", "static_kv_cache", "compile"}, {"speculative"})
        if not isinstance(d["static_kv_cache"], bool):
            raise PlanValidationError(f"{path}.static_kv_cache",
                                      f"must be true or false, got {d['static_kv_cache']!r}")
        mode = _enum(CompileMode, d["compile"], f"{path}.compile")
        if mode != CompileMode.NONE and not d["static_kv_cache"]:
            raise PlanValidationError(f"{path}.compile", f"{mode.value!r} needs static_kv_cache "
                                      "true (a compiled decode needs fixed cache shapes)")
        spec = None
        if "speculative" in d:
            spec = Speculative.from_doc(d["speculative"], f"{path}.speculative")
            if d["static_kv_cache"] or mode != CompileMode.NONE:
                raise PlanValidationError(f"{path}.speculative", "needs static_kv_cache false and "
                                          "compile 'none' (speculation keeps its own dynamic KV "
                                          "caches and crops them)")
        return cls(d["static_kv_cache"], mode, spec)

    def to_doc(self) -> dict:
        out = {"kind": self.kind.value, "static_kv_cache": self.static_kv_cache,
               "compile": self.compile.value}
        if self.speculative is not None:      # absent, not null: older plans keep their hash
            out["speculative"] = self.speculative.to_doc()
        return out

    def layers(self) -> set[int]:
        return set()


Transform = Union[PruneHeads, SkipLayers, ActivationSparsity, WeightPrecision, Execution]
_TRANSFORMS = {t.kind: t for t in (PruneHeads, SkipLayers, ActivationSparsity, WeightPrecision,
                                   Execution)}
_KIND_ORDER = {k: i for i, k in enumerate(TransformKind)}


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class PlanDoc:
    plan_id: str
    version: int
    model_fingerprint: str
    transforms: tuple[Transform, ...] = ()
    query_classes: tuple[str, ...] = ()     # empty: every query class
    mode: PlanMode = PlanMode.STRUCTURAL
    notes: str = ""

    def __post_init__(self):
        # Constructed in code or parsed: the same checks and the same normal form
        # (sorted indices, transforms in kind order), so a PlanDoc is always valid.
        parsed = PlanDoc.from_doc(self.to_doc())
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, getattr(parsed, f.name))

    @classmethod
    def from_doc(cls, doc: Any) -> "PlanDoc":
        d = _mapping(doc, "plan")
        _keys(d, "", {"schema", "plan_id", "version", "model_fingerprint", "mode", "transforms"},
              {"query_classes", "notes"})
        if d["schema"] != SCHEMA:
            raise PlanValidationError("schema", f"must be {SCHEMA!r}, got {d['schema']!r}")
        plan_id = d["plan_id"]
        if not isinstance(plan_id, str) or not _PLAN_ID.match(plan_id):
            raise PlanValidationError("plan_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : - "
                                      f"starting with a letter or digit, got {plan_id!r}")
        fp = d["model_fingerprint"]
        if not isinstance(fp, str) or not _HEX64.match(fp):
            raise PlanValidationError("model_fingerprint", "must be 64 lowercase hex characters "
                                      f"(the model's sha256), got {fp!r}")
        given = _transforms(d["transforms"])
        mode = _enum(PlanMode, d["mode"], "mode")
        _check_mode(mode, given)   # before sorting, so the error names the index in the document
        transforms = tuple(sorted(given, key=lambda t: _KIND_ORDER[t.kind]))
        return cls._build(plan_id, _int(d["version"], "version", 1), fp, transforms,
                          _query_classes(d.get("query_classes", [])), mode,
                          _notes(d.get("notes", "")))

    @classmethod
    def _build(cls, *args) -> "PlanDoc":
        obj = object.__new__(cls)   # already validated: skip __post_init__'s round trip
        for name, value in zip(("plan_id", "version", "model_fingerprint", "transforms",
                                "query_classes", "mode", "notes"), args):
            object.__setattr__(obj, name, value)
        return obj

    def to_doc(self) -> dict:
        ordered = sorted(self.transforms, key=lambda t: _KIND_ORDER[t.kind])
        return {"schema": SCHEMA, "plan_id": self.plan_id, "version": self.version,
                "model_fingerprint": self.model_fingerprint,
                "query_classes": sorted(self.query_classes),
                "mode": PlanMode(self.mode).value,
                "transforms": [t.to_doc() for t in ordered], "notes": self.notes}

    @property
    def sha256(self) -> str:
        return plan_hash(self.to_doc())

    def transform(self, kind: TransformKind) -> Optional[Transform]:
        return next((t for t in self.transforms if t.kind == kind), None)


def _transforms(value: Any, where: str = "transforms") -> tuple[Transform, ...]:
    out, seen = [], {}
    for i, t in enumerate(_list(value, where)):
        path = f"{where}[{i}]"
        t = _mapping(t, path)
        if "kind" not in t:
            raise PlanValidationError(f"{path}.kind", "is required")
        kind = _enum(TransformKind, t["kind"], f"{path}.kind")
        if kind in seen:
            raise PlanValidationError(f"{path}.kind", f"{kind.value!r} already given at "
                                      f"transforms[{seen[kind]}]; merge them")
        seen[kind] = i
        out.append(_TRANSFORMS[kind].from_doc(t, path))
    return tuple(out)


def _check_mode(mode: PlanMode, transforms: tuple) -> None:
    """Only thresholds can change per request; everything else reshapes the model (as the agent)."""
    if mode != PlanMode.DYNAMIC:
        return
    for i, t in enumerate(transforms):
        if t.kind != TransformKind.ACTIVATION_SPARSITY:
            raise PlanValidationError(f"transforms[{i}].kind", f"{t.kind.value!r} is structural; "
                                      "mode 'dynamic' allows only activation_sparsity")


def _query_classes(value: Any) -> tuple[str, ...]:
    classes = _list(value, "query_classes")
    for i, c in enumerate(classes):
        if not isinstance(c, str) or not c:
            raise PlanValidationError(f"query_classes[{i}]", f"must be a non-empty string, got {c!r}")
    if len(set(classes)) != len(classes):
        raise PlanValidationError("query_classes", "a query class is listed twice")
    return tuple(sorted(classes))


def _notes(value: Any) -> str:
    if not isinstance(value, str):
        raise PlanValidationError("notes", f"must be a string, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- against a model

@dataclass(frozen=True)
class ModelFacts:
    """What the diff and the shape check need to know about the unoptimised model."""
    num_layers: int
    num_heads: int
    dtype: str = "float32"

    @classmethod
    def of(cls, facts: Union["ModelFacts", Mapping[str, Any]]) -> "ModelFacts":
        if isinstance(facts, ModelFacts):
            return facts
        return cls(int(facts["num_layers"]), int(facts["num_heads"]),
                   str(facts.get("dtype", "float32")))


def check_against(plan: PlanDoc, facts: Union[ModelFacts, Mapping[str, Any]]) -> None:
    """Layer and head indices within the model; no layer loses all its heads."""
    facts = ModelFacts.of(facts)
    for i, t in enumerate(sorted(plan.transforms, key=lambda t: _KIND_ORDER[t.kind])):
        _check_transform(t, f"transforms[{i}]", facts)
        spec = getattr(t, "speculative", None)
        if spec is not None:
            _check_draft(spec, f"transforms[{i}].speculative.draft_plan", facts)


def _check_draft(spec: Speculative, path: str, facts: ModelFacts) -> None:
    for j, d in enumerate(spec.draft_transforms):
        _check_transform(d, f"{path}.transforms[{j}]", facts)
        if isinstance(d, SkipLayers) and len(d.layers()) >= facts.num_layers:
            raise PlanValidationError(f"{path}.transforms[{j}].layers", "skips every layer: "
                                      "the draft would be an identity")


def _check_transform(t: "Transform", path: str, facts: ModelFacts) -> None:
    for layer in sorted(t.layers()):
        if layer >= facts.num_layers:
            raise PlanValidationError(path, f"layer {layer} >= the model's {facts.num_layers} layers")
    if isinstance(t, PruneHeads):
        for layer, heads in sorted(t.heads.items()):
            if heads[-1] >= facts.num_heads:
                raise PlanValidationError(f"{path}.heads.{layer}", f"head {heads[-1]} >= the "
                                          f"model's {facts.num_heads} heads")
            if len(heads) >= facts.num_heads:
                raise PlanValidationError(f"{path}.heads.{layer}", "removes every head; "
                                          "skip the layer instead")


_DTYPE_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
_COMPILE_WORDS = {CompileMode.TORCH_COMPILE: "torch.compile", CompileMode.CUDA_GRAPH: "CUDA graphs"}


def layer_ranges(layers) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def plan_diff(doc: Union[PlanDoc, Mapping[str, Any]],
              model_facts: Union[ModelFacts, Mapping[str, Any]]) -> list[str]:
    """Readable lines: what this plan changes against the unoptimised model."""
    plan = doc if isinstance(doc, PlanDoc) else PlanDoc.from_doc(doc)
    facts = ModelFacts.of(model_facts)
    scope = ", ".join(plan.query_classes) if plan.query_classes else "all"
    lines = [f"scope: {plan.mode.value}, query classes: {scope}"]
    for t in sorted(plan.transforms, key=lambda t: _KIND_ORDER[t.kind]):
        lines += _DIFF[t.kind](t, facts)
    if len(lines) == 1:
        lines.append("no changes: runs the unoptimised model")
    return lines


def _diff_precision(t: WeightPrecision, facts: ModelFacts) -> list[str]:
    base = _DTYPE_SHORT.get(facts.dtype, facts.dtype)
    out = []
    for p in Precision:
        layers = [l for l, q in t.precisions.items() if q == p]
        if layers:
            word = "layer" if len(layers) == 1 else "layers"
            out.append(f"{word} {layer_ranges(layers)}: weights {base} -> {p.value}")
    if t.head is not None:
        out.append(f"{HEAD_KEY}: weights {base} -> {t.head.value}")
    return out


def _diff_sparsity(t: ActivationSparsity, facts: ModelFacts) -> list[str]:
    return [f"layer {l} MLP: activations |a| < {th:g} zeroed" for l, th in sorted(t.thresholds.items())]


def _diff_heads(t: PruneHeads, facts: ModelFacts) -> list[str]:
    return [f"layer {l} attention: {facts.num_heads} -> {facts.num_heads - len(h)} heads "
            f"(removed {', '.join(map(str, h))})" for l, h in sorted(t.heads.items())]


def _diff_skip(t: SkipLayers, facts: ModelFacts) -> list[str]:
    return [f"layer {l}: skipped" for l in sorted(t.skipped)]


def _diff_execution(t: Execution, facts: ModelFacts) -> list[str]:
    parts = (["static KV cache"] if t.static_kv_cache else []) + \
            ([_COMPILE_WORDS[t.compile]] if t.compile in _COMPILE_WORDS else [])
    lines = [f"execution: {', '.join(parts) if parts else 'unchanged'}"]
    spec = t.speculative
    if spec is not None:
        drafted = "" if not spec.draft_transforms else " under " + "; ".join(
            line for d in spec.draft_transforms for line in _DIFF[d.kind](d, facts))
        lines.append(f"execution: speculative decoding, {spec.k} tokens drafted per verify by "
                     f"{spec.draft.value}{drafted}; output stays the verifier's")
    return lines


_DIFF = {TransformKind.WEIGHT_PRECISION: _diff_precision,
         TransformKind.ACTIVATION_SPARSITY: _diff_sparsity,
         TransformKind.PRUNE_HEADS: _diff_heads,
         TransformKind.SKIP_LAYERS: _diff_skip,
         TransformKind.EXECUTION: _diff_execution}


# ---------------------------------------------------------------- the store

class PlanStatus(str, enum.Enum):
    PROPOSED = "proposed"
    TRIALLED = "trialled"
    APPROVED = "approved"
    REJECTED = "rejected"
    NEEDS_HUMAN = "needs_human"
    APPLYING = "applying"
    APPLIED = "applied"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    SUPERSEDED = "superseded"


_S = PlanStatus
# Allowed moves. Decisions:
# - approval needs evidence: proposed cannot jump to approved;
# - rolled_back -> applying is NOT allowed: a rolled-back plan was judged unsafe in production,
#   so it needs a fresh trial (-> trialled) and a fresh policy decision before it runs again;
# - failed -> applying is allowed: the agent applies atomically, so a failed apply changed
#   nothing and the approval still holds (a retry, e.g. after an agent restart);
# - rejected and superseded are terminal: a changed idea is a new plan with a new id.
TRANSITIONS: dict[PlanStatus, frozenset[PlanStatus]] = {
    _S.PROPOSED: frozenset({_S.TRIALLED, _S.REJECTED, _S.NEEDS_HUMAN, _S.SUPERSEDED}),
    _S.TRIALLED: frozenset({_S.TRIALLED, _S.APPROVED, _S.REJECTED, _S.NEEDS_HUMAN, _S.SUPERSEDED}),
    _S.NEEDS_HUMAN: frozenset({_S.APPROVED, _S.REJECTED, _S.SUPERSEDED}),
    _S.APPROVED: frozenset({_S.APPLYING, _S.REJECTED, _S.SUPERSEDED}),
    _S.APPLYING: frozenset({_S.APPLIED, _S.FAILED, _S.ROLLED_BACK}),
    _S.APPLIED: frozenset({_S.ROLLED_BACK, _S.SUPERSEDED}),
    _S.FAILED: frozenset({_S.APPLYING, _S.REJECTED, _S.SUPERSEDED}),
    _S.ROLLED_BACK: frozenset({_S.TRIALLED, _S.SUPERSEDED}),
    _S.REJECTED: frozenset(),
    _S.SUPERSEDED: frozenset(),
}


class IllegalTransition(ValueError):
    pass


class DecisionOutcome(str, enum.Enum):
    APPROVE = "approve"
    REJECT = "reject"
    NEEDS_HUMAN = "needs_human"


class RolloutStage(str, enum.Enum):
    CANARY = "canary"
    FLEET = "fleet"


class ApplicationState(str, enum.Enum):
    REQUESTED = "requested"
    APPLIED = "applied"
    FAILED = "failed"
    REFUSED = "refused"       # did not fit the agent's model; nothing touched
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class PlanRecord:
    plan_id: str
    version: int
    sha256: str
    fingerprint: str
    query_classes: tuple[str, ...]
    mode: PlanMode
    doc: dict
    status: PlanStatus
    proposed_by: str
    created_at_us: int
    updated_at_us: int

    @property
    def plan(self) -> PlanDoc:
        return PlanDoc.from_doc(self.doc)


@dataclass(frozen=True)
class Transition:
    plan_id: str
    ts_us: int
    from_status: Optional[PlanStatus]
    to_status: PlanStatus
    actor: str
    reason: str


@dataclass(frozen=True)
class Trial:
    trial_id: str
    plan_id: str
    agent_id: str
    evidence: Optional[dict]
    requested_at_us: int
    finished_at_us: Optional[int]
    error: Optional[str]


@dataclass(frozen=True)
class Decision:
    plan_id: str
    outcome: DecisionOutcome
    rules: list                 # every rule's outcome, measured value, threshold
    policy_revision: str
    policy_hash: str
    actor: str
    reason: str
    decided_at_us: int = 0      # 0: the store stamps it


@dataclass(frozen=True)
class Application:
    plan_id: str
    agent_id: str
    stage: RolloutStage
    state: ApplicationState
    detail: str
    ts_us: int


@dataclass(frozen=True)
class PlanHistory:
    plan: PlanRecord
    transitions: list[Transition]
    trials: list[Trial]
    decisions: list[Decision]
    applications: list[Application]


_STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS plans (
    plan_id VARCHAR PRIMARY KEY, version INTEGER NOT NULL, sha256 VARCHAR NOT NULL,
    fingerprint VARCHAR NOT NULL, query_classes VARCHAR[] NOT NULL, mode VARCHAR NOT NULL,
    doc_json VARCHAR NOT NULL, status VARCHAR NOT NULL, proposed_by VARCHAR NOT NULL,
    created_at_us BIGINT NOT NULL, updated_at_us BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS plan_transitions (
    plan_id VARCHAR NOT NULL, ts_us BIGINT NOT NULL, from_status VARCHAR,
    to_status VARCHAR NOT NULL, actor VARCHAR NOT NULL, reason VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    trial_id VARCHAR PRIMARY KEY, plan_id VARCHAR NOT NULL, agent_id VARCHAR NOT NULL,
    evidence_json VARCHAR, requested_at_us BIGINT NOT NULL, finished_at_us BIGINT, error VARCHAR);
CREATE TABLE IF NOT EXISTS decisions (
    plan_id VARCHAR NOT NULL, outcome VARCHAR NOT NULL, rules_json VARCHAR NOT NULL,
    policy_revision VARCHAR NOT NULL, policy_hash VARCHAR NOT NULL, decided_at_us BIGINT NOT NULL,
    actor VARCHAR NOT NULL, reason VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS applications (
    plan_id VARCHAR NOT NULL, agent_id VARCHAR NOT NULL, stage VARCHAR NOT NULL,
    state VARCHAR NOT NULL, detail VARCHAR NOT NULL, ts_us BIGINT NOT NULL);
"""


def ensure_schema(con) -> None:
    con.execute(_STORE_SCHEMA)


def _now_us() -> int:
    return time.time_ns() // 1000


_PLAN_COLUMNS = ("plan_id, version, sha256, fingerprint, query_classes, mode, doc_json, status, "
                 "proposed_by, created_at_us, updated_at_us")


class PlanStore:
    """Plans, their status history, trials, policy decisions and applications, in DuckDB.

    A plan's document is immutable (its id names one hash; a revision is a new plan_id with a
    higher `version`); only its status moves, along TRANSITIONS, and every move is kept in
    plan_transitions. Everything that uses `con` must share `lock`; do not call these methods
    inside a transaction opened on `con` (they open their own). Timestamps: wall clock, µs.
    """

    def __init__(self, con, lock: Optional[threading.Lock] = None):
        self._con = con
        self._lock = lock if lock is not None else threading.RLock()
        with self._lock:
            ensure_schema(con)

    # ------------------------------------------------------------ plans
    def add(self, plan: Union[PlanDoc, Mapping[str, Any]], actor: str,
            reason: str = "proposed") -> PlanRecord:
        """Store a new plan as proposed. Re-adding the same document is a no-op."""
        plan = plan if isinstance(plan, PlanDoc) else PlanDoc.from_doc(plan)
        doc, now = plan.to_doc(), _now_us()
        with self._lock:
            existing = self._get(plan.plan_id)
            if existing is not None:
                if existing.sha256 != plan.sha256:
                    raise ValueError(f"plan {plan.plan_id!r} exists with a different document "
                                     f"(sha256 {existing.sha256[:12]}); give the new one a new plan_id")
                return existing
            self._in_transaction(
                ("INSERT INTO plans VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 [plan.plan_id, plan.version, plan.sha256, plan.model_fingerprint,
                  list(plan.query_classes), plan.mode.value, canonical_json(doc).decode(),
                  PlanStatus.PROPOSED.value, actor, now, now]),
                ("INSERT INTO plan_transitions VALUES (?, ?, NULL, ?, ?, ?)",
                 [plan.plan_id, now, PlanStatus.PROPOSED.value, actor, reason]))
            return self._get(plan.plan_id)

    def get(self, plan_id: str) -> Optional[PlanRecord]:
        with self._lock:
            return self._get(plan_id)

    def _get(self, plan_id: str) -> Optional[PlanRecord]:
        r = self._con.execute(f"SELECT {_PLAN_COLUMNS} FROM plans WHERE plan_id = ?",
                              [plan_id]).fetchone()
        return None if r is None else _plan_record(r)

    def list(self, status: Optional[PlanStatus] = None, fingerprint: Optional[str] = None,
             query_class: Optional[str] = None, limit: int = 100) -> list[PlanRecord]:
        """Newest first. A plan with no query classes applies to every class and always matches."""
        clauses, params = [], []
        if status is not None:
            clauses.append("status = ?")
            params.append(PlanStatus(status).value)
        if fingerprint is not None:
            clauses.append("fingerprint = ?")
            params.append(fingerprint)
        if query_class is not None:
            clauses.append("(len(query_classes) = 0 OR list_contains(query_classes, ?))")
            params.append(query_class)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._lock:
            rows = self._con.execute(
                f"SELECT {_PLAN_COLUMNS} FROM plans {where} "
                f"ORDER BY created_at_us DESC, plan_id DESC LIMIT ?", params + [limit]).fetchall()
        return [_plan_record(r) for r in rows]

    def transition(self, plan_id: str, to: PlanStatus, actor: str, reason: str) -> PlanRecord:
        to = PlanStatus(to)
        with self._lock:
            current = self._require(plan_id)
            if to not in TRANSITIONS[current.status]:
                allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current.status])) or "none"
                raise IllegalTransition(f"plan {plan_id!r}: {current.status.value} -> {to.value} "
                                        f"is not allowed (from {current.status.value}: {allowed})")
            now = _now_us()
            self._in_transaction(
                ("UPDATE plans SET status = ?, updated_at_us = ? WHERE plan_id = ?",
                 [to.value, now, plan_id]),
                ("INSERT INTO plan_transitions VALUES (?, ?, ?, ?, ?, ?)",
                 [plan_id, now, current.status.value, to.value, actor, reason]))
            return self._get(plan_id)

    # ------------------------------------------------------------ trials
    def start_trial(self, plan_id: str, agent_id: str, trial_id: Optional[str] = None) -> str:
        trial_id = trial_id or f"trial-{uuid.uuid4().hex[:16]}"
        with self._lock:
            self._require(plan_id)
            self._con.execute("INSERT INTO trials VALUES (?, ?, ?, NULL, ?, NULL, NULL)",
                              [trial_id, plan_id, agent_id, _now_us()])
        return trial_id

    def finish_trial(self, trial_id: str, evidence: Optional[dict] = None,
                     error: Optional[str] = None) -> Trial:
        if (evidence is None) == (error is None):
            raise ValueError("finish_trial takes exactly one of evidence or error")
        ev = None if evidence is None else json.dumps(evidence, sort_keys=True, allow_nan=False)
        with self._lock:
            done = self._con.execute("SELECT finished_at_us FROM trials WHERE trial_id = ?",
                                     [trial_id]).fetchone()
            if done is None:
                raise KeyError(f"no trial {trial_id!r}")
            if done[0] is not None:
                raise ValueError(f"trial {trial_id!r} already finished")
            self._con.execute("UPDATE trials SET evidence_json = ?, finished_at_us = ?, error = ? "
                              "WHERE trial_id = ?", [ev, _now_us(), error, trial_id])
            return self._trials("trial_id = ?", trial_id)[0]

    def trials(self, plan_id: str) -> list[Trial]:
        with self._lock:
            return self._trials("plan_id = ?", plan_id)

    def _trials(self, where: str, value: str) -> list[Trial]:
        rows = self._con.execute(
            "SELECT trial_id, plan_id, agent_id, evidence_json, requested_at_us, finished_at_us, "
            f"error FROM trials WHERE {where} ORDER BY requested_at_us, trial_id", [value]).fetchall()
        return [Trial(r[0], r[1], r[2], None if r[3] is None else json.loads(r[3]), r[4], r[5], r[6])
                for r in rows]

    # ------------------------------------------------------------ decisions, applications
    def record_decision(self, d: Decision) -> Decision:
        outcome = DecisionOutcome(d.outcome)
        at = d.decided_at_us or _now_us()
        with self._lock:
            self._require(d.plan_id)
            self._con.execute("INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                              [d.plan_id, outcome.value, json.dumps(d.rules, sort_keys=True),
                               d.policy_revision, d.policy_hash, at, d.actor, d.reason])
        return dataclasses.replace(d, outcome=outcome, decided_at_us=at)

    def decisions(self, plan_id: str) -> list[Decision]:
        with self._lock:
            return self._decisions(plan_id)

    def _decisions(self, plan_id: str) -> list[Decision]:
        rows = self._con.execute(
            "SELECT plan_id, outcome, rules_json, policy_revision, policy_hash, actor, reason, "
            "decided_at_us FROM decisions WHERE plan_id = ? ORDER BY decided_at_us",
            [plan_id]).fetchall()
        return [Decision(r[0], DecisionOutcome(r[1]), json.loads(r[2]), *r[3:]) for r in rows]

    def record_application(self, plan_id: str, agent_id: str, stage: RolloutStage,
                           state: ApplicationState, detail: str = "") -> Application:
        app = Application(plan_id, agent_id, RolloutStage(stage), ApplicationState(state),
                          detail, _now_us())
        with self._lock:
            self._require(plan_id)
            self._con.execute("INSERT INTO applications VALUES (?, ?, ?, ?, ?, ?)",
                              [plan_id, agent_id, app.stage.value, app.state.value, detail, app.ts_us])
        return app

    def applications(self, plan_id: str) -> list[Application]:
        with self._lock:
            return self._applications(plan_id)

    def _applications(self, plan_id: str) -> list[Application]:
        rows = self._con.execute(
            "SELECT plan_id, agent_id, stage, state, detail, ts_us FROM applications "
            "WHERE plan_id = ? ORDER BY ts_us", [plan_id]).fetchall()
        return [Application(r[0], r[1], RolloutStage(r[2]), ApplicationState(r[3]), r[4], r[5])
                for r in rows]

    def history(self, plan_id: str) -> PlanHistory:
        with self._lock:
            plan = self._require(plan_id)
            rows = self._con.execute(
                "SELECT plan_id, ts_us, from_status, to_status, actor, reason FROM plan_transitions "
                "WHERE plan_id = ? ORDER BY ts_us, rowid", [plan_id]).fetchall()
            moves = [Transition(r[0], r[1], None if r[2] is None else PlanStatus(r[2]),
                                PlanStatus(r[3]), r[4], r[5]) for r in rows]
            return PlanHistory(plan, moves, self._trials("plan_id = ?", plan_id),
                               self._decisions(plan_id), self._applications(plan_id))

    # ------------------------------------------------------------ helpers
    def _require(self, plan_id: str) -> PlanRecord:
        """Callers hold the lock (it may be a plain Lock: never taken twice)."""
        plan = self._get(plan_id)
        if plan is None:
            raise KeyError(f"no plan {plan_id!r}")
        return plan

    def _in_transaction(self, *statements: tuple[str, list]) -> None:
        self._con.execute("BEGIN TRANSACTION")
        try:
            for sql, params in statements:
                self._con.execute(sql, params)
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            raise


def _plan_record(r: tuple) -> PlanRecord:
    return PlanRecord(r[0], int(r[1]), r[2], r[3], tuple(r[4]), PlanMode(r[5]), json.loads(r[6]),
                      PlanStatus(r[7]), r[8], int(r[9]), int(r[10]))
