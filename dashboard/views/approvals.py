"""Approvals: plans a policy rule sent to a human. Approve or reject, with a reason, as the
configured operator; the control plane records it (plan.approve / plan.reject -> audit log)."""
from __future__ import annotations

import enum

import pandas as pd
import streamlit as st

from headroom_sidecar.dashboard import ui
from headroom_sidecar.dashboard.ui import Context
from headroom_sidecar.dashboard.views.plan import diff_lines, evidence_rows, rule_frame
from headroom_sidecar.proto.client import AdminClient
from headroom_sidecar.proto.contract import PlanStatus


class Verdict(str, enum.Enum):
    APPROVE = "approve"
    REJECT = "reject"

    @property
    def done(self) -> str:
        return {Verdict.APPROVE: "Approved", Verdict.REJECT: "Rejected"}[self]


def render(ctx: Context) -> None:
    st.title("Approvals")
    ui.show_flash()
    if ctx.settings.can_act:
        st.caption(f"You act as **operator:{ctx.settings.operator}**, the identity this "
                   "dashboard was started with; every decision is recorded under it.")
    else:
        st.warning("This dashboard has no operator identity, so it cannot approve or reject. "
                   "Restart it with `HEADROOM_OPERATOR=<you>` (or `-- --operator <you>`).",
                   icon=":material/lock:")
    pending = ctx.client.admin(lambda a: a.list_plans(status=PlanStatus.NEEDS_HUMAN.value,
                                                      limit=ctx.settings.max_rows))
    if not pending:
        st.info("Nothing waits for a human. A plan lands here when a policy rule answers "
                "`needs_human` (e.g. `on_fail: needs_human` in `policies/*.yaml`); past "
                "decisions are on the Decisions page.", icon=":material/task_alt:")
        return
    st.caption(f"{len(pending)} plan(s) wait for a decision, newest first.")
    for plan in pending:
        _card(ctx, plan)


def _card(ctx: Context, plan: dict) -> None:
    plan_id = plan["plan_id"]
    shown = ctx.client.admin(lambda a: a.show_plan(plan_id))
    with st.container(border=True):
        st.subheader(plan_id)
        st.code("\n".join(diff_lines(shown["diff"])), language="diff")
        decision = next((d for d in reversed(shown["decisions"]) if d["rules"]), None)
        if decision is not None:
            asks = [r for r in decision["rules"] if r["outcome"] != "pass"]
            st.markdown(f"**Why a human:** {decision['reason']}")
            st.dataframe(rule_frame(asks or decision["rules"]), hide_index=True, width="stretch")
        trials = [t for t in shown["trials"] if t.get("evidence")]
        if trials:
            st.dataframe(pd.DataFrame(evidence_rows(trials[-1]["evidence"])), hide_index=True,
                         width="stretch")
        st.page_link("screens/decisions.py", label="Full history on the Decisions page",
                     query_params={"plan": plan_id}, icon=":material/history:")
        if ctx.settings.can_act:
            _form(ctx, plan_id)


def _form(ctx: Context, plan_id: str) -> None:
    with st.form(f"verdict-{plan_id}"):
        reason = st.text_area("reason (recorded in the audit log)", key=f"reason-{plan_id}")
        left, right = st.columns(2)
        approve = left.form_submit_button("Approve", type="primary", key=f"approve-{plan_id}")
        reject = right.form_submit_button("Reject", key=f"reject-{plan_id}")
    verdict = Verdict.APPROVE if approve else Verdict.REJECT if reject else None
    if verdict is None:
        return
    if not reason.strip():
        st.error("Give a reason: it is recorded with your decision.")
        return
    decide = {Verdict.APPROVE: AdminClient.approve_plan, Verdict.REJECT: AdminClient.reject_plan}
    result = ctx.client.admin(lambda a: decide[verdict](a, plan_id, reason.strip()))
    follow = (f"rollout job {result['job_id']} started" if verdict is Verdict.APPROVE
              else f"status {result['status']}")
    ui.flash("success", f"{verdict.done} {plan_id} as "
                        f"operator:{ctx.settings.operator}: {follow}.")
    st.rerun()
