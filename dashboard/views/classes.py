"""Query classes: per class, the plan it runs, how well its speculation drafts and how much
faster its plan measured.

- active plan: the latest application of a class-scoped plan on an agent, if it is 'applied'
  (a class without one runs the agent's default plan);
- acceptance rate = accepted / drafted tokens and tokens per verify forward = output tokens /
  verify forwards, over the class's requests that speculated (requests.spec_* columns);
- measured speed-up = 1 / the latency ratio of the plan's trial (interleaved pairs against the
  unoptimised model, on the class's own prompts).
"""
from __future__ import annotations

import json
import math

import pandas as pd
import streamlit as st

from headroom_sidecar.dashboard.ui import Context

_TRAFFIC_SQL = """
SELECT query_class, count(*) AS requests,
       count(*) FILTER (WHERE spec_verify_forwards > 0) AS speculated,
       sum(spec_drafted) AS drafted, sum(spec_accepted) AS accepted,
       sum(spec_verify_forwards) AS verify_forwards,
       sum(output_tokens) FILTER (WHERE spec_verify_forwards > 0) AS spec_tokens
FROM requests WHERE query_class <> '' GROUP BY query_class
"""
# The latest non-request application per (agent, class) of class-scoped plans.
_ACTIVE_SQL = """
SELECT query_class, agent_id, plan_id, stage FROM (
  SELECT c.query_class, a.agent_id, a.plan_id, a.stage, a.state,
         row_number() OVER (PARTITION BY a.agent_id, c.query_class ORDER BY a.ts_us DESC) AS rn
  FROM applications a
  JOIN (SELECT plan_id, unnest(query_classes) AS query_class FROM plans) c USING (plan_id)
  WHERE a.state <> 'requested')
WHERE rn = 1 AND state = 'applied'
"""
_TRIALS_SQL = """
SELECT t.plan_id, t.evidence_json FROM trials t JOIN plans p USING (plan_id)
WHERE len(p.query_classes) > 0 AND t.evidence_json IS NOT NULL
"""
COLUMNS = ["query class", "requests", "active plan", "acceptance rate", "tokens per forward",
           "measured speed-up"]


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b and not pd.isna(b) and not pd.isna(a) else math.nan


def _speedup(evidence_json: str) -> float:
    try:
        ratio = float(json.loads(evidence_json).get("latency_ratio"))
    except (TypeError, ValueError, AttributeError):
        return math.nan
    return 1.0 / ratio if math.isfinite(ratio) and ratio > 0 else math.nan


def _active(active: pd.DataFrame) -> dict[str, str]:
    """class -> "plan (stage) on agent", every agent that runs one."""
    out: dict[str, list[str]] = {}
    for r in active.itertuples():
        out.setdefault(r.query_class, []).append(f"{r.plan_id} ({r.stage}) on {r.agent_id}")
    return {c: "; ".join(v) for c, v in out.items()}


def class_frame(traffic: pd.DataFrame, active: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """One row per query class seen in traffic or holding a plan."""
    plans = _active(active)
    speedup = {r.plan_id: _speedup(r.evidence_json) for r in trials.itertuples()}
    by_class = {r.query_class: r for r in traffic.itertuples()}
    rows = []
    for c in sorted(set(by_class) | set(plans)):
        t = by_class.get(c)
        plan_ids = active.loc[active["query_class"] == c, "plan_id"].tolist() if len(active) else []
        rows.append({
            "query class": c, "requests": int(t.requests) if t is not None else 0,
            "active plan": plans.get(c, "default plan"),
            "acceptance rate": _ratio(t.accepted, t.drafted) if t is not None else math.nan,
            "tokens per forward": _ratio(t.spec_tokens, t.verify_forwards) if t is not None else math.nan,
            "measured speed-up": max((speedup.get(p, math.nan) for p in plan_ids), default=math.nan)})
    return pd.DataFrame(rows, columns=COLUMNS)


def render(ctx: Context) -> None:
    st.title("Query classes")
    frame = class_frame(ctx.client.query(_TRAFFIC_SQL), ctx.client.query(_ACTIVE_SQL),
                        ctx.client.query(_TRIALS_SQL))
    if frame.empty:
        st.info("No labelled requests yet: label them with handle.request(query_class=...), "
                "then trigger a plan for a class (plan trigger --query-class ...).",
                icon=":material/info:")
        return
    st.caption("A class without its own plan runs the agent's default plan. Its own plan may "
               "only change how it speculates: weights serve every class.")
    st.dataframe(frame, hide_index=True, width="stretch",
                 column_config={"acceptance rate": st.column_config.NumberColumn(format="%.2f"),
                                "tokens per forward": st.column_config.NumberColumn(format="%.2f"),
                                "measured speed-up": st.column_config.NumberColumn(format="%.2fx")})
