"""The plan document's vocabulary and hash rule: part of the contract, so both sides share it.

A plan travels as canonical JSON (sorted keys, no spaces, UTF-8) plus the sha256 of those
bytes. Every part reads it into the one typed model, proto/plan.py (rules: proto/plan_parse.py,
fit to a model: proto/plan_fit.py); this module is its vocabulary. There is no int4: a
precision exists here only once an executor can run it.
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
    INT8 = "int8"                   # weight-only int8, one scale per output channel (lossy)
    FP32_PACKED = "fp32_packed"     # fp32 weights in the layout of the fastest fp32 GEMM measured
                                    # on the agent's CPU (summation order only; fp32 models only)

    @property
    def rounds(self) -> bool:
        """Whether the weights lose bits (what risk counts); fp32_packed only reorders them."""
        return self is Precision.INT8


# weight_precision.layers is keyed by block index ("0".."N-1") and, for the output head, by
# this key: {"kind": "weight_precision", "layers": {"3": "int8", "lm_head": "int8"}}.
HEAD_KEY = "lm_head"


class CompileMode(str, enum.Enum):
    NONE = "none"
    TORCH_COMPILE = "torch_compile"
    CUDA_GRAPH = "cuda_graph"


class SpeculativeDraft(str, enum.Enum):
    """Who drafts the tokens the model verifies (execution.speculative.draft)."""
    PROMPT_LOOKUP = "prompt_lookup"   # copied from n-grams of the prompt and the output so far
    SELF = "self"                     # the same model under a cheaper plan (draft_plan)


# execution.speculative: drafted tokens per verify forward, 1..SPECULATIVE_K_MAX. A plan of
# draft "self" carries its draft plan as {"transforms": [...]}, of these kinds only (execution
# settings of its own would nest speculation). Speculation runs its own dynamic KV caches,
# cropped after a rejection, so it needs static_kv_cache false and compile "none".
#   {"kind": "execution", "static_kv_cache": false, "compile": "none",
#    "speculative": {"draft": "self", "k": 4,
#                    "draft_plan": {"transforms": [{"kind": "skip_layers", "layers": [3]}]}}}
SPECULATIVE_K_MAX = 16
DRAFT_PLAN_KINDS = (TransformKind.WEIGHT_PRECISION, TransformKind.ACTIVATION_SPARSITY,
                    TransformKind.PRUNE_HEADS, TransformKind.SKIP_LAYERS)


def canonical_json(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def plan_hash(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(doc)).hexdigest()


# ---------------------------------------------------------------- plan signatures
# What the control plane's Ed25519 key signs: a domain tag, the purpose, the sha256 hex, and
# the canonical document bytes exactly as they travel in Plan.document_json. The tag keeps a
# plan signature from being valid for anything else signed with the same key; the purpose
# keeps a trial's plan (any candidate, applied only for the trial) from being replayed as an
# ApplyPlan (only approved plans are signed for APPLY).
SIGNATURE_DOMAIN = b"headroom.plan.signature/v1\n"
ED25519_PUBLIC_KEY_BYTES = 32


class PlanPurpose(str, enum.Enum):
    APPLY = "apply"     # ControlMessage.apply_plan: an approved plan, kept until rolled back
    TRIAL = "trial"     # TrialRequest.plan: applied for the trial's measurements, then undone


def signing_payload(purpose: PlanPurpose, sha256: str, document_json: str) -> bytes:
    return (SIGNATURE_DOMAIN + purpose.value.encode() + b"\n" + sha256.encode("utf-8") + b"\n"
            + document_json.encode("utf-8"))


def key_id(public_key_raw: bytes) -> str:
    """A key's short name: the first 16 hex digits of sha256(raw 32-byte Ed25519 public key)."""
    if len(public_key_raw) != ED25519_PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {ED25519_PUBLIC_KEY_BYTES} bytes, "
                         f"got {len(public_key_raw)}")
    return hashlib.sha256(public_key_raw).hexdigest()[:16]
