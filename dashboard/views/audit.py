"""Audit log: the hash chain, searchable, with its verification status."""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from headroom_sidecar.proto.contract import AuditKind
from headroom_sidecar.dashboard import ui
from headroom_sidecar.dashboard.ui import Context

ALL = "(all)"
KINDS = [k.value for k in AuditKind]
_DETAILS_CHARS = 160


def verification(ctx: Context) -> None:
    result = ctx.client.admin(lambda a: a.verify_audit())
    head = result["head"]
    if result["ok"]:
        st.success(f"**Chain verified**: {result['rows_checked']} rows hash-link from the "
                   f"genesis to the head (row {head['seq']}).", icon=":material/verified:")
    else:
        st.error(f"**Chain broken at row {result['first_bad_seq']}**: {result['reason']} "
                 f"({result['rows_checked']} rows checked before it).", icon=":material/gpp_bad:")
    st.caption(f"Head: row {head['seq']}, hash `{head['row_hash']}`. Copy it elsewhere (a "
               "ticket, a commit) to pin the log up to here.")


def search_args(ctx: Context) -> dict:
    row = st.columns([3, 2, 2, 2, 1])
    text = row[0].text_input("search (actor, subject, details)", key="audit-text")
    kind = row[1].selectbox("kind", [ALL] + KINDS, key="audit-kind")
    subject = row[2].text_input("subject (plan id, agent id)", key="audit-subject")
    actor = row[3].text_input("actor (e.g. operator:alice)", key="audit-actor")
    limit = row[4].number_input("rows", 1, 10_000, min(200, ctx.settings.max_rows),
                                key="audit-limit")
    args = {"limit": int(limit)}
    for name, value in (("text", text), ("subject", subject), ("actor_filter", actor)):
        if value.strip():
            args[name] = value.strip()
    if kind != ALL:
        args["kind"] = kind
    return args


def audit_frame(rows: list[dict]) -> pd.DataFrame:
    def details(d: dict) -> str:
        text = json.dumps(d, sort_keys=True, ensure_ascii=False)
        return text if len(text) <= _DETAILS_CHARS else text[:_DETAILS_CHARS] + "…"
    return pd.DataFrame([{"seq": r["seq"], "time": ui.when_us(r["ts_us"]), "kind": r["kind"],
                          "actor": r["actor"], "subject": r["subject"],
                          "details": details(r["details"]), "row_hash": r["row_hash"][:16]}
                         for r in rows])


def render(ctx: Context) -> None:
    st.title("Audit log")
    verification(ctx)
    args = search_args(ctx)
    rows = ctx.client.admin(lambda a: a.list_audit(**args))
    if not rows:
        filtered = len(args) > 1
        st.info("No audit rows match this search; clear a filter." if filtered else
                "The audit log is empty: rows appear when agents connect and plans are "
                "proposed, decided, applied or rolled back.", icon=":material/info:")
        return
    st.caption(f"{len(rows)} row(s), newest first")
    st.dataframe(audit_frame(rows), hide_index=True, width="stretch")
    chosen = st.selectbox("row details", [r["seq"] for r in rows], key="audit-row",
                          format_func=lambda s: f"row {s}")
    row = next(r for r in rows if r["seq"] == chosen)
    with st.expander(f"row {chosen}: {row['kind']} by {row['actor']}", expanded=False):
        st.json(row)
