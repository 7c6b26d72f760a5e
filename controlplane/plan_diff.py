"""A plan's readable diff: what it changes against the unoptimised model, one line per change."""
from __future__ import annotations

from typing import Any, Mapping, Union

from headroom_sidecar.proto.plan import (HEAD_KEY, ActivationSparsity, CompileMode, Execution,
                                         Plan, Precision, PruneHeads, SkipLayers, TransformKind,
                                         WeightPrecision, in_kind_order, parse_plan)
from headroom_sidecar.proto.plan_fit import ModelFacts

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


def plan_diff(doc: Union[Plan, Mapping[str, Any]],
              model_facts: Union[ModelFacts, Mapping[str, Any]]) -> list[str]:
    """Readable lines: what this plan changes against the unoptimised model."""
    plan = doc if isinstance(doc, Plan) else parse_plan(doc)
    facts = ModelFacts.of(model_facts)
    scope = ", ".join(plan.query_classes) if plan.query_classes else "all"
    lines = [f"scope: {plan.mode.value}, query classes: {scope}"]
    for t in in_kind_order(plan.transforms):
        lines += _DIFF[t.kind](t, facts)
    if len(lines) == 1:
        lines.append("no changes: runs the unoptimised model")
    return lines


def _diff_precision(t: WeightPrecision, facts: ModelFacts) -> list[str]:
    base = _DTYPE_SHORT.get(facts.dtype, facts.dtype)
    out = []
    for p in Precision:
        layers = [l for l, q in t.layers.items() if q == p]
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
    return [f"layer {l}: skipped" for l in sorted(t.layers)]


def _diff_execution(t: Execution, facts: ModelFacts) -> list[str]:
    parts = (["static KV cache"] if t.static_kv_cache else []) + \
            ([_COMPILE_WORDS[t.compile]] if t.compile in _COMPILE_WORDS else [])
    lines = [f"execution: {', '.join(parts) if parts else 'unchanged'}"]
    spec = t.speculative
    if spec is not None:
        drafted = "" if not spec.draft_transforms else " under " + "; ".join(
            line for d in in_kind_order(spec.draft_transforms) for line in _DIFF[d.kind](d, facts))
        lines.append(f"execution: speculative decoding, {spec.k} tokens drafted per verify by "
                     f"{spec.draft.value}{drafted}; output stays the verifier's")
    return lines


_DIFF = {TransformKind.WEIGHT_PRECISION: _diff_precision,
         TransformKind.ACTIVATION_SPARSITY: _diff_sparsity,
         TransformKind.PRUNE_HEADS: _diff_heads,
         TransformKind.SKIP_LAYERS: _diff_skip,
         TransformKind.EXECUTION: _diff_execution}
