"""Hourly roll-ups of head/layer/MLP statistics, made just before retention deletes raw rows.

Invariant: an hour's rows are rolled up and deleted in one transaction, and raw rows are only
ever deleted a whole hour at a time (hour-aligned cutoffs), so an hour is in raw or in a roll-up,
never both. Readers (planner/candidates.py) therefore take raw UNION ALL roll-ups, weighting
each roll-up mean by its count.
"""
from __future__ import annotations

from datetime import datetime

from headroom_sidecar.controlplane.schema import ROLLUP_TABLES, TELEMETRY_COLUMNS

# Per raw table: the group keys besides agent/class/hour, and the statistics that must all be
# measured (not NULL/NaN) for a row to count in `n`: the same rows the planner's averages use.
KEYS = {"head_stats": ("layer", "head"), "layer_stats": ("layer",), "mlp_stats": ("layer",)}
COUNTED_BY = {"head_stats": ("out_share",),
              "layer_stats": ("influence", "attn_ms", "mlp_ms"),
              "mlp_stats": ("frac_below_1e3", "frac_below_1e2", "frac_below_1e1", "q50", "q90")}


def stats_of(raw: str) -> list[str]:
    return [c for c in TELEMETRY_COLUMNS[raw] if c not in ("request_id", *KEYS[raw])]


def _rollup_sql(raw: str) -> str:
    """INSERT INTO <raw>_hourly the rows of `raw` received before $cutoff, grouped by agent,
    query class, hour and keys. Rows with an unmeasured statistic stay as groups (n may be 0)
    so "which heads exist" survives too."""
    keys = ", ".join(f"s.{k}" for k in KEYS[raw])
    counted = " AND ".join(f"NOT isnan(s.{c})" for c in COUNTED_BY[raw])
    means = ", ".join(f"avg(s.{c}) FILTER (WHERE {counted})" for c in stats_of(raw))
    requests = ", count(DISTINCT s.request_id)" if raw == "layer_stats" else ""
    return f"""
        INSERT INTO {ROLLUP_TABLES[raw]}
        SELECT s.agent_id, any_value(a.fingerprint), r.query_class,
               date_trunc('hour', s.received_at) AS hour, {keys},
               count(*) FILTER (WHERE {counted}){requests}, {means}
        FROM {raw} s
        LEFT JOIN agents a ON a.agent_id = s.agent_id
        LEFT JOIN (SELECT agent_id, request_id, any_value(query_class) AS query_class
                   FROM requests GROUP BY agent_id, request_id) r
               ON r.agent_id = s.agent_id AND r.request_id = s.request_id
        WHERE s.received_at < $cutoff
        GROUP BY s.agent_id, r.query_class, hour, {keys}"""


_ROLLUP_SQL = {raw: _rollup_sql(raw) for raw in ROLLUP_TABLES}


def roll_up_before(cur, cutoff: datetime) -> int:
    """Rolls up every head/layer/MLP row received before `cutoff` (hour-aligned, naive UTC);
    the caller deletes those raw rows in the same transaction. Returns roll-up rows written."""
    if cutoff != cutoff.replace(minute=0, second=0, microsecond=0):
        raise ValueError(f"roll-up cutoff {cutoff} is not on the hour: an hour would be split "
                         "between raw rows and a roll-up")
    written = 0
    for raw in ROLLUP_TABLES:
        written += cur.execute(_ROLLUP_SQL[raw], {"cutoff": cutoff}).fetchone()[0]
    return written
