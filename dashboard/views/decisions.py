"""Decisions: every plan with its status; pick one to read its whole story (views/plan.py)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from headroom_sidecar.proto.contract import PlanStatus
from headroom_sidecar.dashboard import ui
from headroom_sidecar.dashboard.ui import Context
from headroom_sidecar.dashboard.views import plan as plan_view

ALL = "(all)"
STATUSES = [s.value for s in PlanStatus]
TRIGGER_HELP = ("headroom-controlplane plan trigger --agent <agent_id> --address {address} "
                "--as <your identity>")


def plan_frame(plans: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(plans)
    df["model"] = df["fingerprint"].str[:12]
    df["query classes"] = df["query_classes"].map(lambda c: ", ".join(c) or "all")
    df["updated"] = df["updated_at_us"].map(ui.when_us)
    return df[["plan_id", "status", "version", "model", "query classes", "proposed_by", "notes",
               "updated"]]


def render(ctx: Context) -> None:
    st.title("Decisions")
    ui.show_flash()
    status = st.selectbox("status", [ALL] + STATUSES, key="decisions-status")
    args = {"limit": ctx.settings.max_rows, **({} if status == ALL else {"status": status})}
    plans = ctx.client.admin(lambda a: a.list_plans(**args))
    if not plans:
        st.info("No plans yet" + ("" if status == ALL else f" with status {status}") + ". The "
                "planner proposes plans from traced requests; start a planning run:",
                icon=":material/info:")
        st.code(TRIGGER_HELP.format(address=ctx.settings.address), language="bash")
        return
    counts = pd.Series([p["status"] for p in plans]).value_counts()
    st.markdown(" ".join(f"{ui.status_badge(s)} {n}" for s, n in counts.items()))
    st.dataframe(plan_frame(plans), hide_index=True, width="stretch")
    ids = [p["plan_id"] for p in plans]
    wanted = st.query_params.get("plan")
    chosen = st.selectbox("plan", ids, index=ids.index(wanted) if wanted in ids else 0,
                          key="decisions-plan")
    st.query_params["plan"] = chosen
    st.divider()
    plan_view.render(ctx, chosen)
