"""A plan's risk level, from what it removes or approximates (formula documented in policies/README.md).

score = 1.00 * layers_removed_fraction        (a skipped block is the largest behaviour change)
      + 0.50 * heads_removed_fraction
      + 0.25 * sparsified_layers_fraction     (activation_sparsity thresholds)
      + 0.10 * int8_layers_fraction           (weight_precision int8, per layer)
      + 0.05 if the plan is dynamic           (behaviour depends on the query class)
      + 0.05 if the lm_head (and a tied embedding) goes int8
fp32_packed rounds nothing (fp32 weights in another layout) and adds nothing.
low: score < 0.05, medium: score < 0.15, high: otherwise. execution-only plans score 0 (low).
"""
from __future__ import annotations

import enum

from headroom_sidecar.controlplane.policy.plan import PlanMode, PlanView

W_LAYERS = 1.0
W_HEADS = 0.5
W_SPARSITY = 0.25
W_PRECISION = 0.1
W_DYNAMIC = 0.05
W_EDGE_PRECISION = 0.05
MEDIUM_AT = 0.05
HIGH_AT = 0.15


class RiskLevel(str, enum.Enum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"

    @property
    def rank(self) -> int:
        return list(RiskLevel).index(self)


def risk_score(plan: PlanView) -> float:
    n_layers = plan.model.num_layers
    score = (W_LAYERS * plan.layers_removed_fraction
             + W_HEADS * plan.heads_removed_fraction
             + W_SPARSITY * len(plan.sparsity_layers) / n_layers
             + W_PRECISION * len(plan.precision_layers) / n_layers
             + (W_DYNAMIC if plan.mode is PlanMode.DYNAMIC else 0.0)
             + (W_EDGE_PRECISION if plan.rounded_head else 0.0))
    return round(score, 6)  # rounded so that a score on a boundary does not flip on float noise


def risk_level(score: float) -> RiskLevel:
    if score < MEDIUM_AT:
        return RiskLevel.LOW
    return RiskLevel.MEDIUM if score < HIGH_AT else RiskLevel.HIGH
