"""One plan: its diff against the unoptimised model, trial evidence before and after, the
policy evaluation rule by rule, the rollout history, rollbacks with their cause."""
from __future__ import annotations

import json
import os
from typing import Any

import pandas as pd
import streamlit as st

from headroom_sidecar.proto.contract import AuditKind, PlanStatus
from headroom_sidecar.dashboard import charts, ui
from headroom_sidecar.dashboard.ui import Context

_MB = 1024 * 1024
_ROLLBACK_KINDS = (AuditKind.ROLLBACK_REQUESTED.value, AuditKind.ROLLED_BACK.value)


def render(ctx: Context, plan_id: str) -> None:
    shown = ctx.client.admin(lambda a: a.show_plan(plan_id))
    record = shown["plan"]
    st.header(plan_id)
    running = ", ".join(f"{a} ({s})" for a, s in shown["running_on"].items()) or "no agent"
    st.markdown(f"{ui.status_badge(record['status'])} version {record['version']} · proposed by `{record['proposed_by']}` on "
                f"{ui.when_us(record['created_at_us'])} · model `{record['fingerprint'][:16]}` · "
                f"sha256 `{record['sha256'][:16]}` · running on {running}")
    if shown["doc"].get("notes"):
        st.caption(shown["doc"]["notes"])
    st.subheader("What it changes against the unoptimised model")
    st.code("\n".join(diff_lines(shown["diff"])), language="diff")
    _evidence(shown["trials"])
    _policy(shown["decisions"])
    _rollout(shown["history"], shown["applications"])
    _rollbacks(ctx.client.admin(lambda a: a.list_audit(subject=plan_id, oldest_first=True,
                                                       limit=1000)))
    if record["status"] in (PlanStatus.APPLIED.value, PlanStatus.APPLYING.value):
        _rollback_form(ctx, plan_id)


def diff_lines(diff: list[str]) -> list[str]:
    """The first line is the plan's scope; every other line is one change."""
    return [f"@@ {diff[0]} @@"] + [f"+ {line}" for line in diff[1:]] if diff else []


# ---------------------------------------------------------------------- trials
def evidence_rows(ev: dict) -> list[dict]:
    """Before (the unoptimised model) and after (the plan), as the agent measured them."""
    def row(metric, before, after):
        # NaN travels as null (e.g. a perplexity the eval set could not measure).
        known = before is not None and after is not None and before != 0
        return {"metric": metric, "before": before, "after": after,
                "relative change": f"{after / before - 1:+.1%}" if known else ""}
    return [row("latency (ms / token)", ev["latency_ms_per_token_base"],
                ev["latency_ms_per_token_plan"]),
            row("weights (MiB)", ev["weight_bytes_base"] / _MB, ev["weight_bytes_plan"] / _MB),
            row("perplexity", ev.get("ppl_base"), ev.get("ppl_plan")),
            row("top-1 agreement", 1.0, ev["top1_agreement"]),
            row("greedy exact match", 1.0, ev["exact_match"]),
            {"metric": "mean KL (nats)", "before": 0.0, "after": ev["mean_kl"], "relative change": ""}]


def latency_caption(ev: dict) -> str:
    """How the latency ratio was measured: back-to-back pairs, their spread, where, warm-up."""
    pairs = ev.get("latency_pairs") or 0
    if not pairs:
        return "latency: not timed in back-to-back pairs (an older agent, or nothing to time)"
    where = ev.get("timed_on") or "an unknown thread"
    return (f"latency ratio {ev['latency_ratio']:.3f} (plan / unoptimised): median of {pairs} "
            f"back-to-back pairs, {ev['latency_ratio_min']:.3f}-{ev['latency_ratio_max']:.3f}, "
            f"timed on {where}; warm-up (incl. any compile) {ev['warmup_ms_plan']:.0f} ms, "
            f"not in the figures")


def _evidence(trials: list[dict]) -> None:
    st.subheader("Trial evidence")
    done = [t for t in trials if t.get("evidence")]
    for t in trials:
        if t.get("error"):
            st.warning(f"trial {t['trial_id']} on {t['agent_id']} failed: {t['error']}")
    if not done:
        st.info("No trial has finished for this plan yet: the planner asks an agent to measure "
                "it before any policy can decide.", icon=":material/info:")
        return
    latest = done[-1]
    st.caption(f"{len(done)} trial(s); latest {latest['trial_id']} on {latest['agent_id']}, "
               f"{latest['evidence']['eval_tokens']} eval tokens, "
               f"{latest['evidence']['n_prompts']} prompts")
    st.caption(latency_caption(latest["evidence"]))
    table = pd.DataFrame(evidence_rows(latest["evidence"]))
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"before": st.column_config.NumberColumn(format="%.4f"),
                                "after": st.column_config.NumberColumn(format="%.4f")})
    latency, memory = [], []
    for i, t in enumerate(done, start=1):
        ev, name = t["evidence"], f"trial {i}"
        latency += [{"trial": name, "side": "before", "value": ev["latency_ms_per_token_base"]},
                    {"trial": name, "side": "after", "value": ev["latency_ms_per_token_plan"]}]
        memory += [{"trial": name, "side": "before", "value": ev["weight_bytes_base"] / _MB},
                   {"trial": name, "side": "after", "value": ev["weight_bytes_plan"] / _MB}]
    left, right = st.columns(2)
    left.altair_chart(charts.before_after(pd.DataFrame(latency), "Latency", "ms / token"))
    right.altair_chart(charts.before_after(pd.DataFrame(memory), "Weight memory", "MiB"))


# ---------------------------------------------------------------------- policy
def show_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {show_value(v)}" for k, v in value.items())
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def rule_frame(rules: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"rule": r["rule_id"], "kind": r["kind"],
                          "measured": show_value(r.get("measured")),
                          "threshold": show_value(r.get("threshold")), "outcome": r["outcome"],
                          "message": r.get("message", ""),
                          "where": f"{os.path.basename(r.get('file', ''))}:{r.get('line', '')}"}
                         for r in rules])


def _policy(decisions: list[dict]) -> None:
    st.subheader("Policy evaluation")
    if not decisions:
        st.info("No decision yet: the policy engine evaluates a plan once a trial has measured "
                "it.", icon=":material/info:")
        return
    for d in decisions:
        by = d["actor"]
        head = f"**{d['outcome']}** by `{by}` on {ui.when_us(d['decided_at_us'])}"
        if d["rules"]:
            st.markdown(f"{head} · policy revision `{d['policy_revision']}` · hash "
                        f"`{d['policy_hash'][:16]}`")
            st.dataframe(rule_frame(d["rules"]), hide_index=True, width="stretch",
                         height=ui.table_height(len(d["rules"])))
        else:
            st.markdown(f"{head} (operator decision)")
        st.caption(f"reason: {d['reason']}")


# ---------------------------------------------------------------------- rollout
def _rollout(history: list[dict], applications: list[dict]) -> None:
    st.subheader("Rollout history")
    moves = pd.DataFrame([{"time": ui.when_us(h["ts_us"]),
                           "change": f"{h['from_status'] or '∅'} → {h['to_status']}",
                           "actor": h["actor"], "reason": h["reason"]} for h in history])
    st.dataframe(moves, hide_index=True, width="stretch")
    if applications:
        apps = pd.DataFrame([{"time": ui.when_us(a["ts_us"]), "agent": a["agent_id"],
                              "stage": a["stage"], "state": a["state"], "detail": a["detail"]}
                             for a in applications])
        st.dataframe(apps, hide_index=True, width="stretch")
    else:
        st.caption("Never sent to an agent.")


def rollback_rows(audit_rows: list[dict]) -> list[dict]:
    out = []
    for r in audit_rows:
        if r["kind"] not in _ROLLBACK_KINDS:
            continue
        d = r["details"]
        cause = d.get("cause") or d.get("reason", "")
        out.append({"time": ui.when_us(r["ts_us"]), "event": r["kind"], "actor": r["actor"],
                    "cause": cause, "stage": d.get("stage", ""),
                    "detail": show_value(d.get("detail") or d.get("agents") or "")})
    return out


def _rollbacks(audit_rows: list[dict]) -> None:
    rows = rollback_rows(audit_rows)
    if rows:
        st.subheader("Rollbacks")
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def _rollback_form(ctx: Context, plan_id: str) -> None:
    st.subheader("Roll back")
    if not ctx.settings.can_act:
        st.caption("Set HEADROOM_OPERATOR to roll plans back from here.")
        return
    with st.form(f"rollback-{plan_id}"):
        reason = st.text_input("reason (recorded in the audit log)", key=f"rollback-reason-{plan_id}")
        go = st.form_submit_button(f"Roll back as operator:{ctx.settings.operator}",
                                   type="primary")
    if go:
        if not reason.strip():
            st.error("Give a reason: it is recorded with the rollback.")
            return
        result = ctx.client.admin(lambda a: a.rollback_plan(plan_id, reason.strip()))
        ui.flash("success", f"Rolled back {plan_id}: {result.get('message', result.get('status'))}")
        st.rerun()
