"""The typed transforms of a plan document (headroom.plan/v1), and the one plan error.

Attribute names are the document's field names (`layers`, `heads`, `thresholds`), so a reader
of a document and of the code sees the same words. Every transform is a frozen dataclass with
`to_doc()` (the normal form: indices sorted, decimal-string layer keys) and `touched_layers()`
(the block indices it changes; the output head is not a layer). Parsing lives in
proto/plan_parse.py, the plan itself in proto/plan.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union

from headroom_sidecar.proto.plandoc import (HEAD_KEY, CompileMode, Precision, SpeculativeDraft,
                                            TransformKind)

# The normal form lists transforms in TransformKind declaration order: it is what the control
# plane hashes and stores, so changing it changes every stored plan's sha256.
KIND_ORDER = {k: i for i, k in enumerate(TransformKind)}

# Order the executor applies kinds in, whatever order the document lists them: skipping first
# makes later per-layer work on skipped layers a no-op; precision last quantises whatever
# linears the structural transforms left; execution settings wrap the finished model.
APPLY_ORDER = (TransformKind.SKIP_LAYERS, TransformKind.PRUNE_HEADS,
               TransformKind.ACTIVATION_SPARSITY, TransformKind.WEIGHT_PRECISION,
               TransformKind.EXECUTION)
_APPLY_RANK = {k: i for i, k in enumerate(APPLY_ORDER)}


class PlanError(ValueError):
    """A plan document that is malformed or does not fit a model.

    `problems`: every reason, each "<path>: <what is wrong>" (path like
    plan.transforms[0].heads.3[1]: list items in brackets, mapping keys after dots);
    `path`: the first problem's path; `plan_id`: the plan's id where known. Parsing reports
    every problem at once; the message is the problems, one a line, each starting with its path.
    """

    def __init__(self, problems: list[str], plan_id: str = ""):
        self.problems = list(problems) or ["plan: refused"]
        self.plan_id = plan_id
        self.path = self.problems[0].split(": ", 1)[0]
        super().__init__("\n".join(self.problems))


def _layer_map(values: Mapping[int, object]) -> dict[str, object]:
    return {str(layer): v for layer, v in sorted(values.items())}


@dataclass(frozen=True)
class PruneHeads:
    heads: Mapping[int, tuple[int, ...]]   # layer -> attention (query) head indices, sorted
    kind = TransformKind.PRUNE_HEADS       # class attribute, not a field

    def to_doc(self) -> dict:
        return {"kind": self.kind.value,
                "heads": {str(l): sorted(h) for l, h in sorted(self.heads.items())}}

    def touched_layers(self) -> set[int]:
        return set(self.heads)


@dataclass(frozen=True)
class SkipLayers:
    layers: tuple[int, ...]                # sorted block indices replaced by the identity
    kind = TransformKind.SKIP_LAYERS

    def to_doc(self) -> dict:
        return {"kind": self.kind.value, "layers": sorted(self.layers)}

    def touched_layers(self) -> set[int]:
        return set(self.layers)


@dataclass(frozen=True)
class ActivationSparsity:
    thresholds: Mapping[int, float]        # layer -> MLP activations with |a| below this are zeroed
    kind = TransformKind.ACTIVATION_SPARSITY

    def to_doc(self) -> dict:
        return {"kind": self.kind.value, "thresholds": _layer_map(self.thresholds)}

    def touched_layers(self) -> set[int]:
        return set(self.thresholds)


@dataclass(frozen=True)
class WeightPrecision:
    layers: Mapping[int, Precision]        # block layer -> weight-only precision
    head: Optional[Precision] = None       # the output head (document key HEAD_KEY); None: unchanged
    kind = TransformKind.WEIGHT_PRECISION

    def to_doc(self) -> dict:
        layers = {k: Precision(p).value for k, p in _layer_map(self.layers).items()}
        if self.head is not None:
            layers[HEAD_KEY] = Precision(self.head).value
        return {"kind": self.kind.value, "layers": layers}

    def touched_layers(self) -> set[int]:
        """Block layers only; the output head is `head`."""
        return set(self.layers)


@dataclass(frozen=True)
class Speculative:
    """execution.speculative (proto/plandoc.py): a draft proposes k tokens, the model verifies."""
    draft: SpeculativeDraft
    k: int                                 # drafted tokens per verify forward
    draft_transforms: tuple = ()           # draft "self": its draft plan, in APPLY_ORDER

    def to_doc(self) -> dict:
        out = {"draft": self.draft.value, "k": self.k}
        if self.draft == SpeculativeDraft.SELF:
            ordered = sorted(self.draft_transforms, key=lambda t: KIND_ORDER[t.kind])
            out["draft_plan"] = {"transforms": [t.to_doc() for t in ordered]}
        return out


@dataclass(frozen=True)
class Execution:
    # Both settings are required in a document (no defaults there): a default would give one
    # plan two spellings and two hashes. In code they default to "unchanged".
    static_kv_cache: bool = False
    compile: CompileMode = CompileMode.NONE
    speculative: Optional[Speculative] = None
    kind = TransformKind.EXECUTION

    def to_doc(self) -> dict:
        out = {"kind": self.kind.value, "static_kv_cache": self.static_kv_cache,
               "compile": CompileMode(self.compile).value}
        if self.speculative is not None:   # absent, not null: older plans keep their hash
            out["speculative"] = self.speculative.to_doc()
        return out

    def touched_layers(self) -> set[int]:
        return set()


Transform = Union[PruneHeads, SkipLayers, ActivationSparsity, WeightPrecision, Execution]


def in_kind_order(transforms) -> tuple:
    return tuple(sorted(transforms, key=lambda t: KIND_ORDER[t.kind]))


def in_apply_order(transforms) -> tuple:
    return tuple(sorted(transforms, key=lambda t: _APPLY_RANK[t.kind]))

