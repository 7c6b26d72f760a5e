"""Fleet: every agent, the model it serves, the plan it runs, and its health."""
from __future__ import annotations

import enum
import os
import time

import pandas as pd
import streamlit as st

from headroom_sidecar.dashboard import ui
from headroom_sidecar.dashboard.ui import Context

# Latest application state per agent that is not a bare request: 'applied' means it runs that plan.
_RUNNING_SQL = """
SELECT agent_id, plan_id, stage, state, ts_us FROM (
  SELECT agent_id, plan_id, stage, state, ts_us,
         row_number() OVER (PARTITION BY agent_id ORDER BY ts_us DESC) AS rn
  FROM applications WHERE state <> 'requested') WHERE rn = 1
"""
_AGENTS_SQL = """
SELECT agent_id, fingerprint, model_name, architecture, num_layers, num_heads, model_dtype,
       model_device, hostname, pid, agent_version, gpu_status,
       epoch_us(first_seen) AS first_seen_us, epoch_us(last_seen) AS last_seen_us,
       enqueued_records, sent_records, dropped_records, failed_batches, reconnects, queue_len
FROM agents ORDER BY agent_id
"""
_TRAFFIC_SQL = """
SELECT agent_id, count(*) AS requests, count(*) FILTER (WHERE traced) AS traced,
       max(start_us) AS last_request_us
FROM requests GROUP BY agent_id
"""

ATTACH_HELP = """\
from headroom_sidecar import agent
handle = agent.attach(model, address="{address}")   # one line in the serving process
with handle.request(tenant="acme", route="/chat", query_class="qa"):
    output = model.generate(...)
"""


class Health(str, enum.Enum):
    HEALTHY = "healthy"
    DROPPING = "dropping records"
    DISCONNECTED = "disconnected"


_SHORT_NAMES = {"agent_id": "agent", "dropped_records": "dropped", "failed_batches": "failed batches",
                "queue_len": "queue"}
_HEALTH_BADGE = {Health.HEALTHY: "green", Health.DROPPING: "orange", Health.DISCONNECTED: "red"}


def health(row: pd.Series) -> str:
    if not row["connected"]:
        return Health.DISCONNECTED.value
    if row["dropped_records"] > 0 or row["failed_batches"] > 0:
        return Health.DROPPING.value
    return Health.HEALTHY.value


def running_plan(row: pd.Series) -> str:
    if row.get("state") == "applied" and isinstance(row.get("plan_id"), str):
        return f"{row['plan_id']} ({row['stage']})"
    return "unoptimised"


def fleet_frame(ctx: Context) -> pd.DataFrame:
    live = {a["agent_id"]: a["connected"] for a in ctx.client.admin(lambda c: c.list_agents())}
    agents = ctx.client.query(_AGENTS_SQL)
    if agents.empty:
        return agents
    agents["connected"] = agents["agent_id"].map(live).fillna(False).astype(bool)
    agents = agents.merge(ctx.client.query(_RUNNING_SQL), on="agent_id", how="left")
    agents = agents.merge(ctx.client.query(_TRAFFIC_SQL), on="agent_id", how="left")
    agents["plan"] = agents.apply(running_plan, axis=1)
    agents["health"] = agents.apply(health, axis=1)
    now_s = time.time()
    agents["last seen"] = agents["last_seen_us"].map(lambda us: ui.ago(now_s - us / 1e6))
    # Models loaded from a folder are named by its path (its last part says which model);
    # models built in code have no name, so their architecture says what they are.
    names = agents["model_name"].fillna("").map(lambda n: os.path.basename(n.rstrip("/")))
    names = names.where(names != "", agents["architecture"])
    agents["model"] = names + " · " + agents["fingerprint"].str[:12]
    return agents


def render(ctx: Context) -> None:
    st.title("Fleet")
    agents = fleet_frame(ctx)
    if agents.empty:
        st.info("No agent has registered with this control plane yet. Attach one in your "
                "serving process; it appears here within a second.", icon=":material/info:")
        st.code(ATTACH_HELP.format(address=ctx.settings.address), language="python")
        return
    connected = int(agents["connected"].sum())
    cols = st.columns(4)
    cols[0].metric("agents", len(agents), f"{connected} connected", delta_color="off",
                   delta_arrow="off")
    cols[1].metric("models", agents["fingerprint"].nunique())
    cols[2].metric("running a plan", int((agents["plan"] != "unoptimised").sum()))
    cols[3].metric("dropped records", int(agents["dropped_records"].sum()))
    agents["host"] = agents["hostname"] + ":" + agents["pid"].astype(str)
    table = agents[["agent_id", "health", "last seen", "model", "plan", "host", "requests",
                    "traced", "dropped_records", "failed_batches", "reconnects", "queue_len"]]
    st.dataframe(table.rename(columns=_SHORT_NAMES), hide_index=True, width="stretch")
    for _, row in agents.iterrows():
        _details(row)


def _details(row: pd.Series) -> None:
    with st.expander(f"{row['agent_id']} · {row['health']}"):
        left, right = st.columns(2)
        colour = _HEALTH_BADGE[Health(row["health"])]
        left.markdown(f":{colour}-badge[{row['health']}] last seen {row['last seen']}")
        left.markdown(f"**Model** {row['model']} ({row['architecture']}), "
                      f"{row['num_layers']} layers x {row['num_heads']} heads, "
                      f"{row['model_dtype']} on {row['model_device']}  \n"
                      f"**Fingerprint** `{row['fingerprint']}`")
        right.markdown(f"**Host** {row['hostname']} pid {row['pid']}, agent "
                       f"{row['agent_version']}  \n**GPU** {row['gpu_status'] or 'n/a'}  \n"
                       f"**First seen** {ui.when_us(row['first_seen_us'])}  \n"
                       f"**Last seen** {ui.when_us(row['last_seen_us'])}")
