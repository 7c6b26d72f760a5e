"""Reads a plan document's fields into typed values, collecting every problem with its path.

The one set of rules for headroom.plan/v1 (agent, control plane and policy engine all parse
through here); proto/plan.py assembles the result into a Plan. Rules decided once:
- layer keys are decimal strings without leading zeros ("3"), as JSON objects have them;
  weight_precision also takes HEAD_KEY ("lm_head") for the output head; nothing else
  ("embeddings" included) is a key;
- precisions are the vocabulary's only (Precision: int8); "int4" is refused;
- execution needs both static_kv_cache and compile: no defaults (see Execution);
- thresholds are finite numbers >= 0; head lists are non-empty; no index appears twice;
- a kind appears at most once per plan (and per draft plan); mode "dynamic" allows only
  activation_sparsity (nothing else can change per request).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional

from headroom_sidecar.proto.plan_types import (ActivationSparsity, Execution, PruneHeads,
                                               SkipLayers, Speculative, Transform,
                                               WeightPrecision, in_apply_order)
from headroom_sidecar.proto.plandoc import (DRAFT_PLAN_KINDS, HEAD_KEY, PLAN_SCHEMA,
                                            SPECULATIVE_K_MAX, CompileMode, PlanMode, Precision,
                                            SpeculativeDraft, TransformKind)

PLAN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_LAYER_KEY = re.compile(r"^(0|[1-9][0-9]*)$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
TOP_REQUIRED = ("schema", "plan_id", "version", "model_fingerprint", "mode", "transforms")
TOP_OPTIONAL = ("query_classes", "notes")
_FIELDS = {TransformKind.PRUNE_HEADS: ({"heads"}, set()),
           TransformKind.SKIP_LAYERS: ({"layers"}, set()),
           TransformKind.ACTIVATION_SPARSITY: ({"thresholds"}, set()),
           TransformKind.WEIGHT_PRECISION: ({"layers"}, set()),
           TransformKind.EXECUTION: ({"static_kv_cache", "compile"}, {"speculative"})}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _allowed(cls) -> str:
    return ", ".join(repr(m.value) for m in cls)


class Reader:
    """Collects "<path>: <problem>" lines; every check returns None when it failed."""

    def __init__(self):
        self.problems: list[str] = []

    def bad(self, path: str, problem: str) -> None:
        self.problems.append(f"{path}: {problem}")

    def keys(self, obj: Mapping, path: str, required, optional=()) -> bool:
        """Reports missing and unknown fields; True when there were none."""
        missing = [k for k in sorted(required) if k not in obj]
        unknown = sorted(str(k) for k in set(obj) - set(required) - set(optional))
        for k in missing:
            self.bad(f"{path}.{k}", "is required (missing field)")
        for k in unknown:
            self.bad(f"{path}.{k}", "unknown field")
        return not missing and not unknown

    def mapping(self, value: Any, path: str) -> Optional[Mapping]:
        if isinstance(value, Mapping):
            return value
        self.bad(path, f"must be an object, got {type(value).__name__}")
        return None

    def enum(self, cls, value: Any, path: str):
        try:
            return cls(value)
        except ValueError:
            self.bad(path, f"must be one of {_allowed(cls)}, got {value!r}")
            return None

    def int_at_least(self, value: Any, path: str, minimum: int) -> Optional[int]:
        if _is_int(value) and value >= minimum:
            return value
        self.bad(path, f"must be an integer >= {minimum}, got {value!r}")
        return None

    def layer_key(self, key: Any, path: str, also: str = "") -> Optional[int]:
        if isinstance(key, str) and _LAYER_KEY.match(key):
            return int(key)
        self.bad(path, f"layer key must be a decimal string like \"3\"{also}, got {key!r}")
        return None

    def indices(self, value: Any, path: str, what: str) -> Optional[tuple[int, ...]]:
        """A list of distinct non-negative integers -> sorted tuple."""
        if not isinstance(value, (list, tuple)):
            self.bad(path, f"must be a list of {what} indices, got {type(value).__name__}")
            return None
        ok = [self.int_at_least(v, f"{path}[{i}]", 0) for i, v in enumerate(value)]
        if any(v is None for v in ok):
            return None
        dups = sorted(v for v in set(ok) if ok.count(v) > 1)
        if dups:
            self.bad(path, f"duplicate {what} indices {dups}")
            return None
        return tuple(sorted(ok))


# ---------------------------------------------------------------- top-level fields

def read_top(r: Reader, doc: Any, where: str) -> Optional[dict]:
    """The plan's own fields (not its transforms) -> {field: typed value}; None if malformed."""
    d = r.mapping(doc, where)
    if d is None:
        return None
    r.keys(d, where, TOP_REQUIRED, TOP_OPTIONAL)
    out = {"schema": d.get("schema"), "plan_id": d.get("plan_id"),
           "model_fingerprint": d.get("model_fingerprint")}
    if "schema" in d and d["schema"] != PLAN_SCHEMA:
        r.bad(f"{where}.schema", f"must be {PLAN_SCHEMA!r}, got {d['schema']!r}")
    if "plan_id" in d and not (isinstance(d["plan_id"], str) and PLAN_ID.match(d["plan_id"])):
        r.bad(f"{where}.plan_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : - starting "
              f"with a letter or digit, got {d['plan_id']!r}")
    fp = d.get("model_fingerprint")
    if "model_fingerprint" in d and not (isinstance(fp, str) and _HEX64.match(fp)):
        r.bad(f"{where}.model_fingerprint", "must be 64 lowercase hex characters (the model's "
              f"sha256), got {fp!r}")
    out["version"] = r.int_at_least(d["version"], f"{where}.version", 1) if "version" in d else None
    out["mode"] = r.enum(PlanMode, d["mode"], f"{where}.mode") if "mode" in d else None
    out["query_classes"] = read_query_classes(r, d.get("query_classes", []), where)
    out["notes"] = d.get("notes", "")
    if not isinstance(out["notes"], str):
        r.bad(f"{where}.notes", f"must be a string, got {type(out['notes']).__name__}")
    return out


def read_query_classes(r: Reader, value: Any, where: str) -> tuple[str, ...]:
    """The plan's scope: empty = the default plan for every query class."""
    path = f"{where}.query_classes"
    if not isinstance(value, (list, tuple)):
        r.bad(path, f"must be a list of query class names, got {type(value).__name__}")
        return ()
    for i, c in enumerate(value):
        if not (isinstance(c, str) and c):
            r.bad(f"{path}[{i}]", f"must be a non-empty string, got {c!r}")
    names = [c for c in value if isinstance(c, str) and c]
    dups = sorted(c for c in set(names) if names.count(c) > 1)
    if dups:
        r.bad(path, f"query class(es) {dups} listed twice")
    return tuple(sorted(set(names)))


# ---------------------------------------------------------------- transforms

def read_transforms(r: Reader, value: Any, path: str, allowed=None) -> list[Transform]:
    """A list of transforms, each kind at most once; `allowed` limits the kinds (draft plans)."""
    if not isinstance(value, (list, tuple)):
        r.bad(path, f"must be a list, got {type(value).__name__}")
        return []
    out, seen = [], {}
    for i, item in enumerate(value):
        t = read_transform(r, item, f"{path}[{i}]")
        if t is None:
            continue
        if allowed is not None and t.kind not in allowed:
            r.bad(f"{path}[{i}].kind", f"{t.kind.value!r} cannot be in a draft plan; allowed: "
                  + ", ".join(repr(k.value) for k in allowed))
        elif t.kind in seen:
            r.bad(f"{path}[{i}].kind", f"{t.kind.value!r} already given at {path}[{seen[t.kind]}]; "
                  "merge them (duplicate kind)")
        else:
            seen[t.kind] = i
            out.append(t)
    return out


def read_transform(r: Reader, item: Any, path: str) -> Optional[Transform]:
    d = r.mapping(item, path)
    if d is None:
        return None
    if "kind" not in d:
        r.bad(f"{path}.kind", "is required (missing field)")
        return None
    kind = r.enum(TransformKind, d["kind"], f"{path}.kind")
    if kind is None:
        return None
    required, optional = _FIELDS[kind]
    if not r.keys(d, path, required | {"kind"}, optional):
        return None
    return _READERS[kind](r, d, path)


def _prune_heads(r: Reader, d: Mapping, path: str) -> Optional[PruneHeads]:
    m, n, out = r.mapping(d["heads"], f"{path}.heads"), len(r.problems), {}
    for key, value in (m or {}).items():
        layer = r.layer_key(key, f"{path}.heads")
        heads = r.indices(value, f"{path}.heads.{key}", "head")
        if heads == ():
            r.bad(f"{path}.heads.{key}", "empty head list; leave the layer out")
        elif layer is not None and heads is not None:
            out[layer] = heads
    return None if m is None or len(r.problems) > n else PruneHeads(out)


def _skip_layers(r: Reader, d: Mapping, path: str) -> Optional[SkipLayers]:
    layers = r.indices(d["layers"], f"{path}.layers", "layer")
    return None if layers is None else SkipLayers(layers)


def _activation_sparsity(r: Reader, d: Mapping, path: str) -> Optional[ActivationSparsity]:
    m, n, out = r.mapping(d["thresholds"], f"{path}.thresholds"), len(r.problems), {}
    for key, t in (m or {}).items():
        layer = r.layer_key(key, f"{path}.thresholds")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            r.bad(f"{path}.thresholds.{key}", f"must be a finite number >= 0, got {t!r}")
        elif layer is not None:
            out[layer] = float(t)
    return None if m is None or len(r.problems) > n else ActivationSparsity(out)


def _weight_precision(r: Reader, d: Mapping, path: str) -> Optional[WeightPrecision]:
    m, n, out, head = r.mapping(d["layers"], f"{path}.layers"), len(r.problems), {}, None
    for key, p in (m or {}).items():
        prec = r.enum(Precision, p, f"{path}.layers.{key}")
        if key == HEAD_KEY:
            head = prec
            continue
        layer = r.layer_key(key, f"{path}.layers", f" or {HEAD_KEY!r}")
        if layer is not None and prec is not None:
            out[layer] = prec
    return None if m is None or len(r.problems) > n else WeightPrecision(out, head)


def _execution(r: Reader, d: Mapping, path: str) -> Optional[Execution]:
    n, static = len(r.problems), d["static_kv_cache"]
    if not isinstance(static, bool):
        r.bad(f"{path}.static_kv_cache", f"must be true or false, got {static!r}")
    mode = r.enum(CompileMode, d["compile"], f"{path}.compile")
    if mode not in (None, CompileMode.NONE) and static is False:
        r.bad(f"{path}.compile", f"{mode.value!r} needs static_kv_cache true (a compiled decode "
              "needs fixed cache shapes)")
    spec = _speculative(r, d["speculative"], f"{path}.speculative") if "speculative" in d else None
    if spec is not None and (static is not False or mode != CompileMode.NONE):
        r.bad(f"{path}.speculative", "needs static_kv_cache false and compile 'none' "
              "(speculation keeps its own dynamic KV caches and crops them)")
    return None if len(r.problems) > n else Execution(static, mode, spec)


def _speculative(r: Reader, value: Any, path: str) -> Optional[Speculative]:
    d, n = r.mapping(value, path), len(r.problems)
    if d is None or not r.keys(d, path, {"draft", "k"}, {"draft_plan"}):
        return None
    draft = r.enum(SpeculativeDraft, d["draft"], f"{path}.draft")
    k = d["k"]
    if not (_is_int(k) and 1 <= k <= SPECULATIVE_K_MAX):
        r.bad(f"{path}.k", f"must be an integer from 1 to {SPECULATIVE_K_MAX}, got {k!r}")
    drafted = ()
    if draft == SpeculativeDraft.PROMPT_LOOKUP and "draft_plan" in d:
        r.bad(f"{path}.draft_plan", "only draft 'self' takes a draft plan")
    elif draft == SpeculativeDraft.SELF and "draft_plan" not in d:
        r.bad(f"{path}.draft_plan", "is required for draft 'self' (it runs the model under it)")
    elif draft == SpeculativeDraft.SELF:
        drafted = _draft_plan(r, d["draft_plan"], f"{path}.draft_plan")
    return None if len(r.problems) > n else Speculative(draft, k, drafted)


def _draft_plan(r: Reader, value: Any, path: str) -> tuple:
    d = r.mapping(value, path)
    if d is None or not r.keys(d, path, {"transforms"}):
        return ()
    items = d["transforms"]
    if isinstance(items, (list, tuple)) and not items:
        r.bad(f"{path}.transforms", "is empty: the draft would be the verifier itself")
        return ()
    return in_apply_order(read_transforms(r, items, f"{path}.transforms", DRAFT_PLAN_KINDS))


_READERS = {TransformKind.PRUNE_HEADS: _prune_heads, TransformKind.SKIP_LAYERS: _skip_layers,
            TransformKind.ACTIVATION_SPARSITY: _activation_sparsity,
            TransformKind.WEIGHT_PRECISION: _weight_precision, TransformKind.EXECUTION: _execution}


def check_mode(r: Reader, mode: Optional[PlanMode], items: Any, where: str) -> None:
    """Only thresholds can change per request; everything else reshapes the model. Checked on
    the document's list, so the path names the index as written."""
    if mode != PlanMode.DYNAMIC or not isinstance(items, (list, tuple)):
        return
    structural = {k.value for k in TransformKind} - {TransformKind.ACTIVATION_SPARSITY.value}
    for i, item in enumerate(items):
        kind = item.get("kind") if isinstance(item, Mapping) else None
        if isinstance(kind, str) and kind in structural:
            r.bad(f"{where}.transforms[{i}].kind", f"{kind!r} is structural; mode 'dynamic' "
                  "allows only activation_sparsity")
