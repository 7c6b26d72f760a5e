"""Plan documents: parsing, schema validation, fit-to-model validation and the canonical hash.

A plan is data (see DESIGN.md, Plans). The control plane and the agent hash the same bytes:
canonical JSON = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
UTF-8 encoded; the plan hash is the sha256 hex of those bytes. The hash is taken over the
document as received, never over a re-serialisation of the parsed form, so both sides agree.

Two validation stages, both listing every problem at once in a `PlanError`:
- `Plan.from_doc(doc)`: the document's own shape (fields, types, known kinds);
- `check_fit(plan, structure, fingerprint, head_reason=...)`: does it fit this model (indices,
  fingerprint, an output head that int8 can replace, nothing that would delete the whole
  network). Returns notes for legal-but-odd combinations.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping


from headroom_sidecar.agent.adapters.base import ModelStructure
from headroom_sidecar.proto.plandoc import (HEAD_KEY, PLAN_SCHEMA, CompileMode, PlanMode, Precision,  # noqa: F401
                           TransformKind, canonical_json, plan_hash)
from headroom_sidecar.proto.plandoc import DRAFT_PLAN_KINDS, SPECULATIVE_K_MAX, SpeculativeDraft  # noqa: F401

SCHEMA = PLAN_SCHEMA
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class PlanError(ValueError):
    """A plan that cannot be parsed or does not fit the model; `problems` lists every reason."""

    def __init__(self, problems: list[str], plan_id: str = ""):
        self.problems = list(problems)
        self.plan_id = plan_id
        head = f"plan {plan_id!r}" if plan_id else "plan"
        super().__init__(f"{head} refused ({len(self.problems)} problem(s)):\n  - "
                         + "\n  - ".join(self.problems))


# Order the executor applies kinds in, whatever order the document lists them: skipping first
# makes later per-layer work on skipped layers a no-op; precision last quantises whatever
# linears the structural transforms left; execution settings wrap the finished model.
APPLY_ORDER = (TransformKind.SKIP_LAYERS, TransformKind.PRUNE_HEADS,
               TransformKind.ACTIVATION_SPARSITY, TransformKind.WEIGHT_PRECISION,
               TransformKind.EXECUTION)


@dataclass(frozen=True)
class PruneHeads:
    heads: dict[int, tuple[int, ...]]   # layer -> query head indices, sorted
    kind: TransformKind = TransformKind.PRUNE_HEADS


@dataclass(frozen=True)
class SkipLayers:
    layers: tuple[int, ...]
    kind: TransformKind = TransformKind.SKIP_LAYERS


@dataclass(frozen=True)
class ActivationSparsity:
    thresholds: dict[int, float]
    kind: TransformKind = TransformKind.ACTIVATION_SPARSITY


@dataclass(frozen=True)
class WeightPrecision:
    layers: dict[int, Precision]        # transformer blocks only
    head: Precision | None = None       # the output head (document key HEAD_KEY), None: unchanged
    kind: TransformKind = TransformKind.WEIGHT_PRECISION


@dataclass(frozen=True)
class Speculative:
    """execution.speculative: `draft` proposes k tokens, the model verifies them in one forward."""
    draft: SpeculativeDraft
    k: int                                        # drafted tokens per verify forward
    draft_transforms: tuple["Transform", ...] = ()   # draft "self": the draft plan, in APPLY_ORDER


@dataclass(frozen=True)
class Execution:
    static_kv_cache: bool
    compile: CompileMode
    speculative: Speculative | None = None
    kind: TransformKind = TransformKind.EXECUTION


Transform = PruneHeads | SkipLayers | ActivationSparsity | WeightPrecision | Execution


@dataclass(frozen=True)
class Plan:
    plan_id: str
    version: int
    model_fingerprint: str
    query_classes: tuple[str, ...]
    mode: PlanMode
    transforms: tuple[Transform, ...]
    notes: str
    doc: dict = field(repr=False, compare=False)   # the document as received, for the hash

    @property
    def hash(self) -> str:
        return plan_hash(self.doc)

    def to_json(self) -> str:
        return canonical_json(self.doc).decode()

    def get(self, kind: TransformKind) -> Transform | None:
        return next((t for t in self.transforms if t.kind == kind), None)

    def ordered(self) -> list[Transform]:
        """Transforms in the order the executor applies them (APPLY_ORDER)."""
        return [t for k in APPLY_ORDER if (t := self.get(k)) is not None]

    @staticmethod
    def from_json(text: str | bytes) -> "Plan":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError([f"not JSON: line {e.lineno}, column {e.colno}: {e.msg}"]) from e
        return Plan.from_doc(doc)

    @staticmethod
    def from_doc(doc: Any) -> "Plan":
        return _Parser().plan(doc)


# ---------------------------------------------------------------------------------- parsing

_TOP_REQUIRED = {"schema", "plan_id", "version", "model_fingerprint", "mode", "transforms"}
_TOP_OPTIONAL = {"query_classes", "notes"}
_FIELDS = {
    TransformKind.PRUNE_HEADS: {"heads"},
    TransformKind.SKIP_LAYERS: {"layers"},
    TransformKind.ACTIVATION_SPARSITY: {"thresholds"},
    TransformKind.WEIGHT_PRECISION: {"layers"},
    TransformKind.EXECUTION: {"static_kv_cache", "compile"},
}
_OPTIONAL_FIELDS = {TransformKind.EXECUTION: {"speculative"}}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Parser:
    """Collects every problem instead of stopping at the first."""

    def __init__(self):
        self.problems: list[str] = []

    def bad(self, msg: str) -> None:
        self.problems.append(msg)

    def plan(self, doc: Any) -> Plan:
        if not isinstance(doc, dict):
            raise PlanError([f"plan document must be a JSON object, got {type(doc).__name__}"])
        self._top_fields(doc)
        plan_id = doc.get("plan_id") if isinstance(doc.get("plan_id"), str) else ""
        transforms = self._transforms(doc.get("transforms"))
        mode = self._enum(PlanMode, doc.get("mode"), "mode")
        if self.problems:
            raise PlanError(self.problems, plan_id)
        return Plan(plan_id=plan_id, version=doc["version"],
                    model_fingerprint=doc["model_fingerprint"],
                    query_classes=tuple(doc.get("query_classes", [])), mode=mode,
                    transforms=tuple(transforms), notes=doc.get("notes", ""),
                    doc=json.loads(canonical_json(doc)))

    def _top_fields(self, doc: dict) -> None:
        for k in sorted(_TOP_REQUIRED - doc.keys()):
            self.bad(f"missing field {k!r}")
        for k in sorted(doc.keys() - _TOP_REQUIRED - _TOP_OPTIONAL):
            self.bad(f"unknown field {k!r}")
        if "schema" in doc and doc["schema"] != SCHEMA:
            self.bad(f"schema: expected {SCHEMA!r}, got {doc['schema']!r}")
        if "plan_id" in doc and not (isinstance(doc["plan_id"], str) and doc["plan_id"]):
            self.bad("plan_id: must be a non-empty string")
        if "version" in doc and not (_is_int(doc["version"]) and doc["version"] >= 1):
            self.bad(f"version: must be an integer >= 1, got {doc['version']!r}")
        fp = doc.get("model_fingerprint")
        if "model_fingerprint" in doc and not (isinstance(fp, str) and _HEX64.match(fp)):
            self.bad("model_fingerprint: must be 64 lowercase hex characters (sha256)")
        qc = doc.get("query_classes", [])
        if not (isinstance(qc, list) and all(isinstance(q, str) for q in qc)):
            self.bad("query_classes: must be a list of strings")
        if not isinstance(doc.get("notes", ""), str):
            self.bad("notes: must be a string")

    def _enum(self, cls, value, where: str):
        try:
            return cls(value)
        except ValueError:
            if value is not None or where == "mode":
                self.bad(f"{where}: {value!r} is not one of {[m.value for m in cls]}")
            return None

    def _transforms(self, items: Any) -> list[Transform]:
        if items is None:
            return []
        if not isinstance(items, list):
            self.bad("transforms: must be a list")
            return []
        out, seen = [], {}
        for i, item in enumerate(items):
            t = self._transform(i, item)
            if t is None:
                continue
            if t.kind in seen:
                self.bad(f"transforms[{i}] ({t.kind.value}): duplicate kind, already in "
                         f"transforms[{seen[t.kind]}]; merge them into one")
            seen[t.kind] = i
            out.append(t)
        return out

    def _transform(self, i: int, item: Any, prefix: str = "transforms") -> Transform | None:
        where = f"{prefix}[{i}]"
        if not isinstance(item, dict):
            self.bad(f"{where}: must be an object with a 'kind'")
            return None
        try:
            kind = TransformKind(item.get("kind"))
        except ValueError:
            self.bad(f"{where}: unknown kind {item.get('kind')!r}; known: "
                     f"{[k.value for k in TransformKind]}")
            return None
        where = f"{where} ({kind.value})"
        fields = item.keys() - {"kind"}
        optional = _OPTIONAL_FIELDS.get(kind, set())
        for k in sorted(fields - _FIELDS[kind] - optional):
            self.bad(f"{where}: unknown field {k!r}")
        for k in sorted(_FIELDS[kind] - fields):
            self.bad(f"{where}: missing field {k!r}")
        if not _FIELDS[kind] <= fields <= _FIELDS[kind] | optional:
            return None
        return getattr(self, f"_{kind.value}")(where, item)

    def _layer_map(self, where: str, value: Any, named: tuple[str, ...] = ()) -> dict[int, Any]:
        """{"<layer>": v} with decimal string (or int) keys -> {layer: v}; keys in `named`
        (e.g. HEAD_KEY) are left for the caller."""
        if not isinstance(value, dict):
            self.bad(f"{where}: must be an object keyed by layer index")
            return {}
        out = {}
        also = "".join(f" or {n!r}" for n in named)
        for key, v in value.items():
            text = str(key)
            if key in named:
                continue
            if not (_is_int(key) or (isinstance(key, str) and text.isdigit())):
                self.bad(f"{where}: layer key {key!r} is not a non-negative integer{also}")
                continue
            if int(text) in out:
                self.bad(f"{where}: layer {int(text)} given twice")
            out[int(text)] = v
        return out

    def _prune_heads(self, where: str, item: dict) -> PruneHeads:
        heads = {}
        for layer, hs in self._layer_map(f"{where}.heads", item["heads"]).items():
            w = f"{where}.heads[{layer}]"
            if not (isinstance(hs, list) and all(_is_int(h) and h >= 0 for h in hs)):
                self.bad(f"{w}: must be a list of non-negative head indices")
                continue
            if len(set(hs)) != len(hs):
                self.bad(f"{w}: duplicate head indices {sorted(h for h in set(hs) if hs.count(h) > 1)}")
            heads[layer] = tuple(sorted(set(hs)))
        return PruneHeads(heads=heads)

    def _skip_layers(self, where: str, item: dict) -> SkipLayers:
        layers = item["layers"]
        if not (isinstance(layers, list) and all(_is_int(x) and x >= 0 for x in layers)):
            self.bad(f"{where}.layers: must be a list of non-negative layer indices")
            return SkipLayers(layers=())
        dups = sorted(x for x in set(layers) if layers.count(x) > 1)
        if dups:
            self.bad(f"{where}.layers: duplicate layers {dups}")
        return SkipLayers(layers=tuple(sorted(set(layers))))

    def _activation_sparsity(self, where: str, item: dict) -> ActivationSparsity:
        out = {}
        for layer, t in self._layer_map(f"{where}.thresholds", item["thresholds"]).items():
            if not (isinstance(t, (int, float)) and not isinstance(t, bool)
                    and math.isfinite(t) and t >= 0):
                self.bad(f"{where}.thresholds[{layer}]: must be a finite number >= 0, got {t!r}")
                continue
            out[layer] = float(t)
        return ActivationSparsity(thresholds=out)

    def _weight_precision(self, where: str, item: dict) -> WeightPrecision:
        layers, out = item["layers"], {}
        for layer, p in self._layer_map(f"{where}.layers", layers, (HEAD_KEY,)).items():
            prec = self._precision(p, f"{where}.layers[{layer}]")
            if prec is not None:
                out[layer] = prec
        head = None
        if isinstance(layers, dict) and HEAD_KEY in layers:
            head = self._precision(layers[HEAD_KEY], f"{where}.layers[{HEAD_KEY}]")
        return WeightPrecision(layers=out, head=head)

    def _precision(self, p: Any, where: str) -> Precision | None:
        prec = self._enum(Precision, p, where)
        if prec is None and p is None:
            self.bad(f"{where}: precision missing")
        return prec

    def _execution(self, where: str, item: dict) -> Execution:
        static = item["static_kv_cache"]
        if not isinstance(static, bool):
            self.bad(f"{where}.static_kv_cache: must be true or false")
        compile_mode = self._enum(CompileMode, item["compile"], f"{where}.compile")
        if compile_mode is None and item["compile"] is None:
            self.bad(f"{where}.compile: must be one of {[m.value for m in CompileMode]}")
        if compile_mode not in (None, CompileMode.NONE) and static is False:
            self.bad(f"{where}: compile={compile_mode.value} needs static_kv_cache=true "
                     "(a compiled decode needs fixed cache shapes)")
        spec = None
        if "speculative" in item:
            spec = self._speculative(f"{where}.speculative", item["speculative"])
            if spec is not None and (static is not False or compile_mode != CompileMode.NONE):
                self.bad(f"{where}.speculative: needs static_kv_cache=false and compile='none' "
                         "(speculation keeps its own dynamic KV caches and crops them)")
        return Execution(static_kv_cache=bool(static), compile=compile_mode or CompileMode.NONE,
                         speculative=spec)

    def _speculative(self, where: str, spec: Any) -> Speculative | None:
        if not isinstance(spec, dict):
            self.bad(f"{where}: must be an object with 'draft' and 'k'")
            return None
        for k in sorted(spec.keys() - {"draft", "k", "draft_plan"}):
            self.bad(f"{where}: unknown field {k!r}")
        for k in sorted({"draft", "k"} - spec.keys()):
            self.bad(f"{where}: missing field {k!r}")
        draft = self._enum(SpeculativeDraft, spec.get("draft"), f"{where}.draft")
        if "draft" in spec and spec["draft"] is None:
            self.bad(f"{where}.draft: must be one of {[d.value for d in SpeculativeDraft]}")
        k = spec.get("k")
        if "k" in spec and not (_is_int(k) and 1 <= k <= SPECULATIVE_K_MAX):
            self.bad(f"{where}.k: must be an integer from 1 to {SPECULATIVE_K_MAX}, got {k!r}")
        if draft == SpeculativeDraft.PROMPT_LOOKUP and "draft_plan" in spec:
            self.bad(f"{where}.draft_plan: only draft 'self' takes a draft plan")
        if draft == SpeculativeDraft.SELF and "draft_plan" not in spec:
            self.bad(f"{where}: missing field 'draft_plan' (draft 'self' runs the model under it)")
        drafted = self._draft_plan(f"{where}.draft_plan", spec["draft_plan"]) \
            if draft == SpeculativeDraft.SELF and "draft_plan" in spec else ()
        if draft is None or not (_is_int(k) and 1 <= k <= SPECULATIVE_K_MAX):
            return None
        order = {kind: n for n, kind in enumerate(APPLY_ORDER)}
        return Speculative(draft, k, tuple(sorted(drafted, key=lambda t: order[t.kind])))

    def _draft_plan(self, where: str, value: Any) -> tuple[Transform, ...]:
        if not (isinstance(value, dict) and set(value) == {"transforms"}):
            self.bad(f"{where}: must be an object with exactly one field 'transforms'")
            return ()
        items = value["transforms"]
        if not (isinstance(items, list) and items):
            self.bad(f"{where}.transforms: must be a non-empty list (an empty draft plan drafts "
                     "with the verifier itself)")
            return ()
        out, seen = [], {}
        for i, item in enumerate(items):
            t = self._transform(i, item, f"{where}.transforms")
            if t is None:
                continue
            if t.kind not in DRAFT_PLAN_KINDS:
                self.bad(f"{where}.transforms[{i}]: kind {t.kind.value!r} cannot be in a draft "
                         f"plan; allowed: {[k.value for k in DRAFT_PLAN_KINDS]}")
            elif t.kind in seen:
                self.bad(f"{where}.transforms[{i}] ({t.kind.value}): duplicate kind, already in "
                         f"transforms[{seen[t.kind]}]")
            else:
                seen[t.kind] = i
                out.append(t)
        return tuple(out)


# ---------------------------------------------------------------------------- fit to model

_HEAD_UNCHECKED = "no model was given to check its output head against"


def check_fit(plan: Plan, structure: ModelStructure, fingerprint: str,
              supported: Mapping[TransformKind, str | None] | None = None,
              head_reason: str | None = _HEAD_UNCHECKED) -> list[str]:
    """Raises PlanError with every reason `plan` cannot run on this model; returns notes.

    `supported` maps a kind to None (supported here) or the reason it is not (from the executor).
    `head_reason`: head_int8_support(unoptimised model); a plan that sets the output head's
    precision is refused unless it is None.
    """
    problems, notes = [], []
    if plan.model_fingerprint != fingerprint:
        problems.append(f"model_fingerprint {plan.model_fingerprint[:12]}… does not match this "
                        f"model ({fingerprint[:12]}…): the plan was made for another model")
    for t in plan.transforms:
        reason = (supported or {}).get(t.kind)
        if reason:
            problems.append(f"{t.kind.value}: not supported for {structure.architecture}: {reason}")
    if plan.mode == PlanMode.DYNAMIC:
        static_kinds = [t.kind.value for t in plan.transforms
                        if t.kind != TransformKind.ACTIVATION_SPARSITY]
        if static_kinds:
            problems.append(f"mode 'dynamic': only activation_sparsity can be dynamic; "
                            f"{static_kinds} are structural")
    _check_layers(plan, structure, problems, notes)
    _check_draft(plan, structure, supported or {}, head_reason, problems)
    precision = plan.get(TransformKind.WEIGHT_PRECISION)
    if precision is not None and precision.head is not None and head_reason:
        i = next(i for i, t in enumerate(plan.transforms) if t is precision)
        problems.append(f"transforms[{i}] (weight_precision).layers[{HEAD_KEY}]: "
                        f"cannot set the output head to {precision.head.value}: {head_reason}")
    if problems:
        raise PlanError(problems, plan.plan_id)
    return notes


def _check_draft(plan: Plan, s: ModelStructure, supported: Mapping[TransformKind, str | None],
                 head_reason: str | None, problems: list[str]) -> None:
    """execution.speculative.draft_plan: the same fit rules as the plan's own transforms."""
    ex = plan.get(TransformKind.EXECUTION)
    spec = ex.speculative if ex is not None else None
    if spec is None or not spec.draft_transforms:
        return
    where, n = "execution.speculative.draft_plan", s.num_layers
    for t in spec.draft_transforms:
        if supported.get(t.kind):
            problems.append(f"{where}: {t.kind.value}: not supported for {s.architecture}: "
                            f"{supported[t.kind]}")
        bad = sorted(x for x in layers_of(t) if x >= n)
        if bad:
            problems.append(f"{where}: {t.kind.value}: layer(s) {bad} out of range "
                            f"(model has {n} layers)")
        if isinstance(t, WeightPrecision) and t.head is not None and head_reason:
            problems.append(f"{where}: weight_precision.layers[{HEAD_KEY}]: {head_reason}")
        if isinstance(t, PruneHeads) and any(h >= s.num_heads for hs in t.heads.values() for h in hs):
            problems.append(f"{where}: prune_heads: head index out of range "
                            f"(model has {s.num_heads} query heads)")
        if isinstance(t, SkipLayers) and set(t.layers) >= set(range(n)):
            problems.append(f"{where}: skip_layers: all {n} layers skipped; the draft would be "
                            "an identity")


def layers_of(t: Transform) -> tuple[int, ...]:
    """The layers a transform touches (none for execution settings)."""
    if isinstance(t, PruneHeads):
        return tuple(sorted(t.heads))
    if isinstance(t, ActivationSparsity):
        return tuple(sorted(t.thresholds))
    if isinstance(t, (SkipLayers, WeightPrecision)):
        return tuple(sorted(t.layers))
    return ()


def _check_layers(plan: Plan, s: ModelStructure, problems: list[str], notes: list[str]) -> None:
    n = s.num_layers
    skip = plan.get(TransformKind.SKIP_LAYERS)
    skipped = set(skip.layers) if skip else set()
    for t in plan.transforms:
        layers = layers_of(t)
        bad = sorted(x for x in layers if x >= n)
        if bad:
            problems.append(f"{t.kind.value}: layer(s) {bad} out of range (model has {n} layers)")
        overlap = sorted(set(layers) & skipped) if t.kind != TransformKind.SKIP_LAYERS else []
        if overlap:
            notes.append(f"{t.kind.value}: layer(s) {overlap} are skipped; this has no effect there")
    if skipped and skipped >= set(range(n)):
        problems.append(f"skip_layers: all {n} layers skipped; the model would be an identity")
    prune = plan.get(TransformKind.PRUNE_HEADS)
    if prune:
        _check_heads(prune, s, skipped, problems, notes)


def _check_heads(prune: PruneHeads, s: ModelStructure, skipped: set[int],
                 problems: list[str], notes: list[str]) -> None:
    h = s.num_heads
    for layer, heads in sorted(prune.heads.items()):
        bad = [x for x in heads if x >= h]
        if bad:
            problems.append(f"prune_heads: layer {layer}: head(s) {bad} out of range "
                            f"(model has {h} query heads)")
        elif len(heads) == h and layer < s.num_layers:
            notes.append(f"prune_heads: layer {layer}: all {h} heads pruned; its attention "
                         "contributes nothing")
    emptied = {l for l, hs in prune.heads.items() if len(set(hs)) == h}
    if (emptied | skipped) >= set(range(s.num_layers)):
        problems.append("prune_heads: every layer would be left without attention")
