"""The planner's one settings object: argument > HEADROOM_PLANNER_* environment > default."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from headroom_sidecar.controlplane.settings import resolve_settings


def _env(name: str) -> dict:
    return {"env": f"HEADROOM_PLANNER_{name}"}


@dataclass(frozen=True)
class PlannerSettings:
    max_trials: int = field(default=40, metadata=_env("MAX_TRIALS"))
    # Activation sparsity: layers tried (most sparse first) and the ladder of thresholds.
    max_sparse_layers: int = field(default=8, metadata=_env("MAX_SPARSE_LAYERS"))
    # A layer is a candidate when at least this fraction of its MLP activations has |a| < 0.1.
    min_zero_fraction: float = field(default=0.3, metadata=_env("MIN_ZERO_FRACTION"))
    # Ladder steps that zero less than this fraction are not worth a trial.
    min_step_fraction: float = field(default=0.1, metadata=_env("MIN_STEP_FRACTION"))
    # Head pruning: at most this many (lowest share first); every layer keeps this many heads.
    max_head_candidates: int = field(default=64, metadata=_env("MAX_HEAD_CANDIDATES"))
    min_heads_per_layer: int = field(default=1, metadata=_env("MIN_HEADS_PER_LAYER"))
    # Layer skipping: candidates tried (lowest influence first) and layers kept skipped.
    skip_candidates: int = field(default=6, metadata=_env("SKIP_CANDIDATES"))
    max_skip_layers: int = field(default=4, metadata=_env("MAX_SKIP_LAYERS"))
    # First trial: fp32_packed on every layer and the output head (the same fp32 weights in
    # the layout of the fastest fp32 GEMM the agent measured); kept only if faster.
    fp32_packed: bool = field(default=True, metadata=_env("FP32_PACKED"))
    # After the per-block int8 stage: one trial of int8 on the output head (lm_head; a tied
    # input embedding shares its int8 matrix), kept if it stays within the quality budget.
    int8_lm_head: bool = field(default=True, metadata=_env("INT8_LM_HEAD"))
    # Last trial (kept for it): static KV cache + compiled decode on top of the best plan,
    # kept when it is faster; dynamic plans never get it.
    compiled_decode: bool = field(default=True, metadata=_env("COMPILED_DECODE"))
    # The first and last blocks carry the embedding and the logits: never skip, prune or
    # sparsify them (int8 is still tried there: weight-only, its quality is measured).
    protect_edge_layers: bool = field(default=True, metadata=_env("PROTECT_EDGE_LAYERS"))
    # Best plan: kept plans whose primary metric (latency ratio, or memory ratio where a
    # policy trades speed for memory) is within this fraction of the best count as tied, and
    # the other metric decides. Back-to-back timing still varies by a few percent.
    latency_tie_fraction: float = field(default=0.03, metadata=_env("LATENCY_TIE_FRACTION"))

    def __post_init__(self):
        problems = [f"{n}={getattr(self, n)} must be >= 0" for n in (
            "max_trials", "max_sparse_layers", "max_head_candidates", "skip_candidates",
            "max_skip_layers") if getattr(self, n) < 0]
        if self.min_heads_per_layer < 1:
            problems.append(f"min_heads_per_layer={self.min_heads_per_layer} must be >= 1")
        for n in ("min_zero_fraction", "min_step_fraction", "latency_tie_fraction"):
            if not 0.0 <= getattr(self, n) <= 1.0:
                problems.append(f"{n}={getattr(self, n)} is not in [0, 1]")
        if problems:
            raise ValueError("invalid PlannerSettings: " + "; ".join(problems))

    @classmethod
    def resolve(cls, **overrides: Any) -> "PlannerSettings":
        return resolve_settings(cls, overrides, "planner")
