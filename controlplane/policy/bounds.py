"""The loosest thresholds lint accepts without a stated reason (`allow_unsafe: <why>`).

One table, so a reviewer sees every line in one place. Each bound is the loosest value at
which a plan passing the rule is still one a user would not notice, or evidence is still
worth acting on. A set that goes beyond them (ppl_ratio max 100, mean_kl max 1e6, 1 eval
token, top-1 0.05) approves plans that break the model; lint calls that an error.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from headroom_sidecar.controlplane.policy.schema import RemovalUnit


class Side(str, enum.Enum):
    MIN = "min"   # the rule must say min >= limit
    MAX = "max"   # the rule must say max <= limit


@dataclass(frozen=True)
class SafeBound:
    side: Side
    limit: float
    why: str

    def violated_by(self, value: Optional[float]) -> bool:
        """True if a threshold of `value` on this side is looser than the limit."""
        if value is None:
            return False
        return value < self.limit if self.side is Side.MIN else value > self.limit


# metric_bound: metric -> the side that protects quality and its loosest safe value.
METRIC_BOUNDS: dict[str, SafeBound] = {
    # One next token in ten differing from the unmodified model is visible in every answer.
    "top1_agreement": SafeBound(Side.MIN, 0.9, "below 90 % agreement users see changed answers"),
    # +10 % perplexity is the size of a model generation; beyond it quality is plainly lost.
    "ppl_ratio": SafeBound(Side.MAX, 1.1, "more than +10 % perplexity is a visibly worse model"),
    # 0.1 nats mean KL already moves the top token on a sizeable share of positions.
    "mean_kl": SafeBound(Side.MAX, 0.1, "above 0.1 nats the output distribution has moved"),
    # Top-1 agreement over n tokens has a standard error of ~sqrt(p(1-p)/n): at 512 tokens and
    # p = 0.97 that is 0.75 %, about the margin between a good and a bad plan.
    "eval_tokens": SafeBound(Side.MIN, 512, "fewer held-out tokens is noise, not evidence"),
    # The same cap as removal_cap layers below, when a set states it as a metric.
    "layers_removed_fraction": SafeBound(Side.MAX, 0.25,
                                         "skipping more than a quarter of the blocks breaks models"),
}

# removal_cap: unit -> the largest max_fraction accepted.
REMOVAL_BOUNDS: dict[RemovalUnit, SafeBound] = {
    # Layer-skip studies on Llama-class models lose quality fast past ~25 % of the blocks.
    RemovalUnit.LAYERS: SafeBound(Side.MAX, 0.25,
                                  "skipping more than a quarter of the blocks breaks models"),
}

# latency: a rule without a trade approves slower plans silently past 1.0; a stated trade
# (memory first) still has a limit; fewer back-to-back pairs than 4 cannot tell 5 % apart on a
# shared machine (the pairs' spread on 2 CPU cores is of that order).
LATENCY_UNTRADED_MAX = SafeBound(Side.MAX, 1.0, "a slower plan needs a stated trade (trade + reason)")
LATENCY_TRADED_MAX = SafeBound(Side.MAX, 2.0, "more than twice as slow is an outage, not a trade")
LATENCY_MIN_PAIRS = SafeBound(Side.MIN, 4, "fewer back-to-back pairs is noise, not evidence")
