"""The plan document's vocabulary and hash rule: part of the contract, so both sides share it.

A plan travels as canonical JSON (sorted keys, no spaces, UTF-8) plus the sha256 of those
bytes; the agent and the control plane each parse it into their own types.
"""
from __future__ import annotations

import enum
import hashlib
import json
from typing import Any, Mapping

PLAN_SCHEMA = "headroom.plan/v1"


class TransformKind(str, enum.Enum):
    # Declaration order = the order of transforms in a normalised document (control plane);
    # the executor applies them in its own APPLY_ORDER.
    WEIGHT_PRECISION = "weight_precision"
    ACTIVATION_SPARSITY = "activation_sparsity"
    PRUNE_HEADS = "prune_heads"
    SKIP_LAYERS = "skip_layers"
    EXECUTION = "execution"


class PlanMode(str, enum.Enum):
    STRUCTURAL = "structural"
    DYNAMIC = "dynamic"


class Precision(str, enum.Enum):
    INT8 = "int8"


# weight_precision.layers is keyed by block index ("0".."N-1") and, for the output head, by
# this key: {"kind": "weight_precision", "layers": {"3": "int8", "lm_head": "int8"}}.
HEAD_KEY = "lm_head"


class CompileMode(str, enum.Enum):
    NONE = "none"
    TORCH_COMPILE = "torch_compile"
    CUDA_GRAPH = "cuda_graph"


def canonical_json(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def plan_hash(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(doc)).hexdigest()
