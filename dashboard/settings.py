"""The dashboard's one settings object: command line > HEADROOM_* env > default, validated.

    headroom-dashboard --address 127.0.0.1:50051 --operator alice

The operator identity is configuration (who runs this dashboard process), never text typed
into the UI: approvals and rollbacks are recorded in the audit log under it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from headroom_sidecar.proto.settings import resolve_settings

DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True)
class DashboardSettings:
    # host:port of the control plane's gRPC API (Admin + Query).
    address: str = field(default=DEFAULT_ADDRESS, metadata={"env": "HEADROOM_ADDRESS"})
    # Who approves, rejects and rolls back from this dashboard; "" = read-only dashboard.
    operator: str = field(default="", metadata={"env": "HEADROOM_OPERATOR"})
    # Deadline of one Admin or Query call; an unreachable plane answers within it.
    timeout_s: float = field(default=10.0, metadata={"env": "HEADROOM_DASHBOARD_TIMEOUT_S"})
    # Most rows one table on a page asks for (plans, audit rows).
    max_rows: int = field(default=500, metadata={"env": "HEADROOM_DASHBOARD_MAX_ROWS"})

    def __post_init__(self):
        problems = []
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(f"address={self.address!r} is not host:port")
        if self.operator != self.operator.strip():
            problems.append(f"operator={self.operator!r} has surrounding spaces")
        if not self.timeout_s > 0:
            problems.append(f"timeout_s={self.timeout_s} must be > 0")
        if self.max_rows <= 0:
            problems.append(f"max_rows={self.max_rows} must be > 0")
        if problems:
            raise ValueError("invalid DashboardSettings: " + "; ".join(problems))

    @property
    def can_act(self) -> bool:
        return bool(self.operator)

    @classmethod
    def resolve(cls, argv: Optional[Sequence[str]] = None, **overrides: Any) -> "DashboardSettings":
        """Keyword overrides > --flags in argv > environment variables > defaults."""
        given = {**_parse_argv(argv or []), **{k: v for k, v in overrides.items() if v is not None}}
        return resolve_settings(cls, given, "dashboard")


def _parse_argv(argv: Sequence[str]) -> dict:
    # Only our flags: under pytest or streamlit, argv holds other programs' arguments too.
    p = argparse.ArgumentParser(prog="dashboard", allow_abbrev=False, add_help=False)
    p.add_argument("--address")
    p.add_argument("--operator")
    p.add_argument("--timeout-s", dest="timeout_s", type=float)
    p.add_argument("--max-rows", dest="max_rows", type=int)
    known, _ = p.parse_known_args(list(argv))
    return {k: v for k, v in vars(known).items() if v is not None}
