"""Trial evidence: what the agent measured for a plan against the same model without it
(agent/trial.py measures it), as TrialResult.evidence_json. The agent writes it with
Evidence.to_json; the control plane reads it with parse_evidence_doc (controlplane/trials.py),
so both sides share one list of fields.

JSON: every Evidence field, plus the derived latency_ratio and memory_ratio; a figure that was
not measured (NaN) is null, never a bare NaN.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

DERIVED_FIELDS = ("latency_ratio", "memory_ratio")


class EvidenceError(ValueError):
    """evidence_json refused; `problems` names each bad field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("evidence refused: " + "; ".join(self.problems))


@dataclass
class Evidence:
    plan_id: str
    plan_hash: str
    top1_agreement: float
    mean_kl: float
    ppl_ratio: float
    exact_match: float
    latency_ms_per_token_base: float     # median over the interleaved samples
    latency_ms_per_token_plan: float
    weight_bytes_base: int
    weight_bytes_plan: int
    eval_tokens: int
    n_prompts: int
    heads_removed_fraction: float
    layers_removed_fraction: float
    ppl_base: float = float("nan")
    ppl_plan: float = float("nan")
    notes: list[str] = field(default_factory=list)
    # Spread of the interleaved timing (agent/latency.py); NaN / 0 where nothing was timed.
    latency_pairs: int = 0
    latency_ratio_median: float = float("nan")   # median of the pairs' plan/base
    latency_ratio_min: float = float("nan")
    latency_ratio_max: float = float("nan")
    latency_ms_per_token_base_min: float = float("nan")
    latency_ms_per_token_base_max: float = float("nan")
    latency_ms_per_token_plan_min: float = float("nan")
    latency_ms_per_token_plan_max: float = float("nan")
    warmup_ms_base: float = float("nan")         # first generate, whole; excluded above
    warmup_ms_plan: float = float("nan")         # includes any compile
    timed_on: str = ""                           # the thread (and site) that timed it
    kernels: dict = field(default_factory=dict)  # module path -> the kernel chosen, its timings

    @property
    def latency_ratio(self) -> float:
        """Median of back-to-back pairs when timed that way; else the ratio of the medians."""
        if self.latency_pairs > 0:
            return self.latency_ratio_median
        return self.latency_ms_per_token_plan / self.latency_ms_per_token_base

    @property
    def memory_ratio(self) -> float:
        return self.weight_bytes_plan / self.weight_bytes_base

    def to_json(self) -> str:
        """Strict JSON: a figure that was not measured (NaN) is null, never a bare NaN."""
        d = asdict(self)
        d.update(latency_ratio=self.latency_ratio, memory_ratio=self.memory_ratio)
        d = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()}
        return json.dumps(d, sort_keys=True, allow_nan=False)

    @staticmethod
    def from_json(text: str) -> "Evidence":
        d = json.loads(text)
        d.pop("latency_ratio", None), d.pop("memory_ratio", None)
        return Evidence(**{k: float("nan") if v is None else v for k, v in d.items()})


FIELD_TYPES: dict[str, type] = {f.name: {"float": float, "int": int, "str": str,
                                         "list[str]": list, "dict": dict}[str(f.type)]
                                for f in dataclasses.fields(Evidence)}
FIELD_TYPES.update({name: float for name in DERIVED_FIELDS})


def _type_problem(name: str, value: Any) -> str | None:
    kind = FIELD_TYPES[name]
    if kind is float:
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        return None if ok else f"{name}: must be a number or null, got {value!r}"
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{name}: must be an integer, got {value!r}"
    return None if isinstance(value, kind) else \
        f"{name}: must be a {kind.__name__}, got {type(value).__name__}"


def parse_evidence_doc(text: str) -> dict:
    """The evidence document as a dict, every field present checked (unknown fields and wrong
    types refused, naming the field). Fields may be missing: a policy rule on a figure that is
    not there judges it missing."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise EvidenceError([f"not JSON: {e}"]) from None
    if not isinstance(doc, dict):
        raise EvidenceError([f"must be a JSON object, got {type(doc).__name__}"])
    problems = [f"unknown field {k!r}" for k in sorted(doc) if k not in FIELD_TYPES]
    problems += [p for k, v in sorted(doc.items()) if k in FIELD_TYPES
                 for p in [_type_problem(k, v)] if p]
    if problems:
        raise EvidenceError(problems)
    return doc
