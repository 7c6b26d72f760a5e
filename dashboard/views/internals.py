"""Model internals: what the traced requests say about each head, layer and MLP."""
from __future__ import annotations

import time
from typing import Optional

import pandas as pd
import streamlit as st

from headroom_sidecar.dashboard import charts
from headroom_sidecar.dashboard.sql import TraceFilter, literal, mean, per_request_stats
from headroom_sidecar.dashboard.ui import Context

ALL = "(all)"
TIME_RANGES_S = {"last 15 minutes": 900.0, "last hour": 3600.0, "last 24 hours": 86400.0,
                 "last 7 days": 604800.0, "all time": None}
_LATENCY_POINTS = 60          # about this many buckets across the chosen range
_NO_CLASS = "(none)"


def _distinct(ctx: Context, column: str, agent_id: Optional[str]) -> list[str]:
    where = f"WHERE agent_id = {literal(agent_id)}" if agent_id else ""
    df = ctx.client.query(f"SELECT DISTINCT {column} AS v FROM requests {where} ORDER BY 1")
    return [v for v in df["v"].tolist() if v is not None]


def _pick(column, label: str, options: list[str], key: str) -> Optional[str]:
    choice = column.selectbox(label, [ALL] + options, key=key)
    return None if choice == ALL else choice


def filters(ctx: Context) -> TraceFilter:
    agents = ctx.client.query("SELECT agent_id, model_name FROM agents ORDER BY agent_id")
    ids = agents["agent_id"].tolist()
    row = st.columns(5)
    # One agent by default: agents serving different models do not share a layer x head grid.
    agent = row[0].selectbox("agent", ids + [ALL], key="internals-agent")
    agent_id = None if agent == ALL else agent
    span = row[1].selectbox("time range", list(TIME_RANGES_S), index=len(TIME_RANGES_S) - 1,
                            key="internals-range")
    return TraceFilter(agent_id=agent_id, since_s=TIME_RANGES_S[span],
                       tenant=_pick(row[2], "tenant", _distinct(ctx, "tenant", agent_id),
                                    "internals-tenant"),
                       route=_pick(row[3], "route", _distinct(ctx, "route", agent_id),
                                   "internals-route"),
                       query_class=_pick(row[4], "query class",
                                         _distinct(ctx, "query_class", agent_id),
                                         "internals-class"))


# ---------------------------------------------------------------------- data
def head_grid(ctx: Context, f: TraceFilter) -> pd.DataFrame:
    cols = ", ".join([mean("t.entropy", "entropy"), mean("t.out_share", "attention_share"),
                      mean("t.max_weight", "max_weight")])
    return ctx.client.query(per_request_stats("head_stats", cols, "t.layer, t.head", f))


def layer_table(ctx: Context, f: TraceFilter) -> pd.DataFrame:
    cols = ", ".join([mean("t.influence", "influence"), mean("t.attn_ms", "attn_ms"),
                      mean("t.mlp_ms", "mlp_ms")])
    return ctx.client.query(per_request_stats("layer_stats", cols, "t.layer", f))


def mlp_table(ctx: Context, f: TraceFilter) -> pd.DataFrame:
    cols = ", ".join(mean(f"t.{c}", c) for c in ("frac_below_1e3", "frac_below_1e2",
                                                  "frac_below_1e1"))
    return ctx.client.query(per_request_stats("mlp_stats", cols, "t.layer", f))


def latency_series(ctx: Context, f: TraceFilter) -> pd.DataFrame:
    """Mean latency per time bucket and query class; the bucket fits the data's own span."""
    where = f.request_where("r")
    span = ctx.client.query(f"SELECT min(start_us) AS lo, max(start_us) AS hi, count(*) AS n "
                            f"FROM requests r {where}")
    if int(span["n"].iloc[0]) == 0:
        return pd.DataFrame()
    bucket_us = max(1_000_000, int((span["hi"].iloc[0] - span["lo"].iloc[0]) / _LATENCY_POINTS))
    df = ctx.client.query(
        f"SELECT (r.start_us // {literal(bucket_us)}) * {literal(bucket_us)} AS bucket_us, "
        f"r.query_class, {mean('r.latency_ms', 'latency_ms')}, count(*) AS requests "
        f"FROM requests r {where} GROUP BY 1, 2 ORDER BY 1, 2")
    df["time"] = pd.to_datetime(df["bucket_us"], unit="us", utc=True)
    df["query_class"] = df["query_class"].replace("", _NO_CLASS)
    return df


# ---------------------------------------------------------------------- page
def render(ctx: Context) -> None:
    st.title("Model internals")
    f = filters(ctx)
    t0 = time.perf_counter()
    heads = head_grid(ctx, f)
    if heads.empty:
        st.info("No traced requests match these filters. Widen the time range or clear a "
                "filter; if nothing was ever traced, attach an agent with `sample_rate` > 0 "
                "(e.g. `agent.attach(model, address=..., sample_rate=0.1)`) and serve traffic.",
                icon=":material/info:")
    else:
        _heads(heads)
        _layers(layer_table(ctx, f), mlp_table(ctx, f))
    _latency(latency_series(ctx, f))
    st.caption(f"{int(heads['samples'].max()) if not heads.empty else 0} traced requests; "
               f"queried in {1000 * (time.perf_counter() - t0):.0f} ms through the Query RPC")


def _heads(heads: pd.DataFrame) -> None:
    left, right = st.columns(2)
    entropy = charts.heatmap(heads, "entropy", "Attention entropy (nats), layer x head", "viridis")
    share = charts.heatmap(heads, "attention_share",
                           "Attention share of the layer's output, layer x head", "magma")
    left.altair_chart(entropy, width="stretch")
    right.altair_chart(share, width="stretch")
    low = heads.nsmallest(5, "attention_share")[["layer", "head", "attention_share", "entropy"]]
    st.caption("Heads that carry least (pruning candidates): " + ", ".join(
        f"L{r.layer}H{r.head} ({r.attention_share:.3f})" for r in low.itertuples()))


def _layers(layers: pd.DataFrame, mlp: pd.DataFrame) -> None:
    left, right = st.columns(2)
    left.altair_chart(charts.per_layer_bars(layers, "influence",
                                            "Block influence per layer (1 - cos(in, out))",
                                            "mean influence"), width="stretch")
    long = mlp.melt(id_vars=["layer"], value_vars=["frac_below_1e3", "frac_below_1e2",
                                                   "frac_below_1e1"],
                    var_name="series", value_name="value")
    long["series"] = long["series"].map({"frac_below_1e3": "|a| < 1e-3",
                                         "frac_below_1e2": "|a| < 1e-2",
                                         "frac_below_1e1": "|a| < 1e-1"})
    right.altair_chart(charts.per_layer_lines(long, "MLP activation sparsity per layer",
                                              "fraction of activations"), width="stretch")


def _latency(series: pd.DataFrame) -> None:
    if series.empty:
        st.info("No requests in this range yet: latency over time appears once the agent "
                "serves traffic.", icon=":material/info:")
        return
    st.altair_chart(charts.latency_over_time(series), width="stretch")
