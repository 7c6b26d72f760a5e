"""What every page shares: the settings and client of this session, the connection state,
guarded rendering (an unreachable control plane is a message, not a stack trace), formatting."""
from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import streamlit as st

from headroom_sidecar.dashboard.client import CommandFailed, ControlPlaneClient, Unreachable
from headroom_sidecar.dashboard.settings import DashboardSettings

_CTX_KEY = "headroom_ctx"
_FLASH_KEY = "headroom_flash"
_clients: dict[DashboardSettings, ControlPlaneClient] = {}
_clients_lock = threading.Lock()


@dataclass(frozen=True)
class Context:
    settings: DashboardSettings
    client: ControlPlaneClient


def make_context(settings: DashboardSettings) -> Context:
    """One client (and gRPC channel) per settings, shared by every browser session."""
    with _clients_lock:
        client = _clients.get(settings)
        if client is None:
            client = _clients[settings] = ControlPlaneClient(settings)
    ctx = Context(settings, client)
    st.session_state[_CTX_KEY] = ctx
    return ctx


def context() -> Context:
    """The context app.py made for this run (pages run after it)."""
    ctx = st.session_state.get(_CTX_KEY)
    if ctx is None:
        st.error("This page runs inside the dashboard: start it with "
                 "`streamlit run dashboard/app.py`.")
        st.stop()
    return ctx


# ---------------------------------------------------------------------- connection and errors
def unreachable_message(ctx: Context, why: str) -> None:
    st.error(f"**The control plane at `{ctx.settings.address}` is unreachable.** Pages show "
             f"data again as soon as it answers.\n\n{why}", icon=":material/cloud_off:")
    st.markdown("Start one (it owns the DuckDB file), or point the dashboard at the right "
                "address with `--address` or `HEADROOM_ADDRESS`:")
    st.code(f"headroom-controlplane serve --db .headroom/demo.duckdb --port "
            f"{ctx.settings.address.rpartition(':')[2]}", language="bash")
    st.button("Retry", key="retry-connection", icon=":material/refresh:")


def guarded(ctx: Context, render: Callable[[Context], None]) -> None:
    """Runs a page; the control plane's absence or refusal becomes a message on the page."""
    try:
        render(ctx)
    except Unreachable as e:
        unreachable_message(ctx, str(e))
    except CommandFailed as e:
        st.error(f"The control plane refused: {e.message}", icon=":material/error:")


def sidebar_status(ctx: Context) -> bool:
    """The connection state and who acts; True when the control plane answers."""
    problem = ctx.client.ping()
    with st.sidebar:
        if problem is None:
            st.success(f"Connected to `{ctx.settings.address}`", icon=":material/link:")
        else:
            st.error(f"Unreachable: `{ctx.settings.address}`", icon=":material/link_off:")
        if ctx.settings.can_act:
            st.caption(f"Acting as **operator:{ctx.settings.operator}** (configured identity)")
        else:
            st.caption("Read-only: set `HEADROOM_OPERATOR` (or `--operator`) to approve, "
                       "reject or roll back")
    return problem is None


# ---------------------------------------------------------------------- flash messages
def flash(kind: str, text: str) -> None:
    """A message shown once on the next run (after an action and st.rerun)."""
    st.session_state[_FLASH_KEY] = (kind, text)


def show_flash() -> None:
    got = st.session_state.pop(_FLASH_KEY, None)
    if got is not None:
        kind, text = got
        (st.success if kind == "success" else st.error)(text)


# ---------------------------------------------------------------------- formatting
def when_us(ts_us: Optional[float]) -> str:
    if ts_us is None or ts_us != ts_us or ts_us <= 0:
        return ""
    return dt.datetime.fromtimestamp(ts_us / 1e6, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} days ago"


_ROW_PX = 35


def table_height(rows: int) -> int:
    """Pixels for a st.dataframe that shows every row (header included) without scrolling."""
    return (rows + 1) * _ROW_PX + 3


# Streamlit badge colours per plan status (plain text in tables: no emoji font needed).
STATUS_COLOURS = {"proposed": "gray", "trialled": "blue", "approved": "green", "rejected": "red",
                  "needs_human": "orange", "applying": "blue", "applied": "green",
                  "failed": "red", "rolled_back": "violet", "superseded": "gray"}


def status_badge(status: str) -> str:
    """Markdown for a coloured status badge."""
    return f":{STATUS_COLOURS.get(status, 'gray')}-badge[{status}]"
