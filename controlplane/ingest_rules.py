"""What a stored telemetry row may hold: one rule per column, checked row by row at ingest.

A row that breaks a rule is left out (and counted, and named in the batch's ack); the rest
of its batch is stored. What the rules guarantee for everything in the store:
- keys and indices are never NULL; layer < num_layers and head < num_heads of the model the
  agent registered at hello;
- floats are finite or NULL: NaN means "not measured" (tpot_ms of a one-token request, a
  layer a plan skipped, an unavailable GPU) and is stored as NULL; +-Inf is refused;
- every finite statistic lies in its column's range (fractions in [0, 1], times >= 0, ...);
- labels are at most MAX_LABEL_CHARS characters.
"""
from __future__ import annotations

import enum
import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np

MAX_LABEL_CHARS = 256           # tenant, route, query_class
MAX_BATCH_ROWS = 4_000_000      # all tables of one batch; a 64 MiB message holds ~2.8 M stat rows
MAX_REASONS_SHOWN = 3           # the ack names the first few reasons, the log the rest
_FRACTION_SLACK = 1e-3          # float32 sums and means can land a hair above 1 (or below 0)


class Index(str, enum.Enum):
    """Which registered dimension an index column counts along."""
    LAYER = "num_layers"
    HEAD = "num_heads"


@dataclass(frozen=True)
class ModelShape:
    """The structure an agent registered at hello; 0 = it registered none."""
    num_layers: int
    num_heads: int


@dataclass(frozen=True)
class ColumnRule:
    nullable: bool = False        # floats only: NaN or a null-mask entry is stored as NULL
    lo: float = -math.inf         # inclusive bounds for finite values
    hi: float = math.inf
    index: Optional[Index] = None
    max_chars: Optional[int] = None


_KEY = ColumnRule()
_MS = ColumnRule(nullable=True, lo=0.0)
_FRACTION = ColumnRule(nullable=True, lo=-_FRACTION_SLACK, hi=1.0 + _FRACTION_SLACK)
_NON_NEGATIVE = ColumnRule(nullable=True, lo=0.0)
_LABEL = ColumnRule(max_chars=MAX_LABEL_CHARS)
_PER_LAYER = {"request_id": _KEY, "layer": ColumnRule(index=Index.LAYER)}

# table -> column -> rule; a column not listed must be non-null and nothing more.
COLUMN_RULES: dict[str, dict[str, ColumnRule]] = {
    "requests": {"tenant": _LABEL, "route": _LABEL, "query_class": _LABEL,
                 "ttft_ms": _MS, "tpot_ms": _MS, "latency_ms": _MS},
    "head_stats": {**_PER_LAYER, "head": ColumnRule(index=Index.HEAD),
                   "entropy": _NON_NEGATIVE, "max_weight": _FRACTION, "out_share": _FRACTION},
    # influence = 1 - cos(block input, block output): in [0, 2].
    "layer_stats": {**_PER_LAYER, "attn_ms": _MS, "mlp_ms": _MS,
                    "influence": ColumnRule(nullable=True, lo=-_FRACTION_SLACK,
                                            hi=2.0 + _FRACTION_SLACK)},
    "mlp_stats": {**_PER_LAYER, "frac_below_1e3": _FRACTION, "frac_below_1e2": _FRACTION,
                  "frac_below_1e1": _FRACTION, "q50": _NON_NEGATIVE, "q90": _NON_NEGATIVE,
                  "q99": _NON_NEGATIVE},
    "gpu_samples": {"util_pct": ColumnRule(nullable=True, lo=0.0, hi=100.0),
                    "power_w": _NON_NEGATIVE, "sm_clock_mhz": _NON_NEGATIVE},
}


def rule_for(table: str, column: str) -> ColumnRule:
    return COLUMN_RULES.get(table, {}).get(column, _KEY)


def all_clean(rule: ColumnRule, values: np.ndarray, shape: Optional[ModelShape]) -> bool:
    """True if no row of a numeric column without a null mask can break `rule` (no NaN, no
    +-Inf, every value in range and below its index bound): the common case, decided with two
    reductions instead of one mask per rule. False means "look row by row" (check_numeric),
    never "bad": every refusal is still made, and counted, by check_numeric. values: [N]."""
    if len(values) == 0:
        return True
    if values.dtype.kind == "f":
        lo, hi = values.min(), values.max()   # NaN propagates into both: then not clean
        if not (math.isfinite(lo) and math.isfinite(hi) and rule.lo <= lo and hi <= rule.hi):
            return False
    if rule.index is None:
        return True
    bound = getattr(shape, rule.index.value) if shape is not None else None
    return bound is None or (bound > 0 and values.max() < bound)


class RowCheck:
    """Accumulates, for one table, which rows pass and why the others do not."""

    def __init__(self, table: str, num_rows: int):
        self.table = table
        self.ok = np.ones(num_rows, dtype=bool)   # [N]
        self.reasons: Counter = Counter()          # "table.column: why" -> rows

    def refuse(self, column: str, bad: np.ndarray, why: str) -> None:
        """bad: [N] bool; only rows not refused yet are counted, so each row counts once."""
        new = bad & self.ok
        n = int(new.sum())
        if n:
            self.ok &= ~bad
            self.reasons[f"{self.table}.{column}: {why}"] += n

    @property
    def rejected(self) -> int:
        return int((~self.ok).sum())


def check_numeric(check: RowCheck, column: str, values: np.ndarray, null: np.ndarray,
                  shape: Optional[ModelShape]) -> np.ndarray:
    """Refuses bad rows of one numeric column; returns the NULL mask to store. [N] each."""
    rule = rule_for(check.table, column)
    if values.dtype.kind == "f":
        nan = np.isnan(values)
        if rule.nullable:
            null = null | nan
        else:
            check.refuse(column, nan & ~null, "NaN")
        check.refuse(column, np.isinf(values) & ~null, "not finite")
        _check_range(check, column, rule, values, null)
    if not rule.nullable:
        check.refuse(column, null, "NULL")
    if rule.index is not None:
        _check_index(check, column, rule.index, values, shape)
    return null


def _check_range(check: RowCheck, column: str, rule: ColumnRule, values: np.ndarray,
                 null: np.ndarray) -> None:
    with np.errstate(invalid="ignore"):   # NaN compares False: it is handled above
        if rule.lo > -math.inf:
            check.refuse(column, (values < rule.lo) & ~null, f"below {rule.lo:g}")
        if rule.hi < math.inf:
            check.refuse(column, (values > rule.hi) & ~null, f"above {rule.hi:g}")


def _check_index(check: RowCheck, column: str, index: Index, values: np.ndarray,
                 shape: Optional[ModelShape]) -> None:
    if shape is None:
        return   # decoded outside a stream (tests, tools): no registration to check against
    bound = getattr(shape, index.value)
    if bound <= 0:
        check.refuse(column, np.ones(len(values), dtype=bool),
                     f"the agent registered no model structure ({index.value}) at hello")
    else:
        check.refuse(column, values >= bound, f">= {index.value} {bound} registered at hello")


def check_lengths(check: RowCheck, column: str, chars: np.ndarray) -> None:
    """chars: [N] characters per string."""
    limit = rule_for(check.table, column).max_chars
    if limit is not None:
        check.refuse(column, chars > limit, f"longer than {limit} characters")


def summarize(reasons: Counter) -> str:
    """The first few reasons, most rows first: 'head_stats.layer: 3 rows >= num_layers 3; ...'."""
    ranked = reasons.most_common()
    parts = [f"{why.split(': ', 1)[0]}: {n} row{'s' * (n != 1)} {why.split(': ', 1)[1]}"
             for why, n in ranked[:MAX_REASONS_SHOWN]]
    more = len(ranked) - MAX_REASONS_SHOWN
    return "; ".join(parts) + (f"; and {more} more reason(s)" if more > 0 else "")
