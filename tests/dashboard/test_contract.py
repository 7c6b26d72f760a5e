"""What the dashboard depends on besides proto/: no controlplane import, and a known, pinned set
of store tables named in its SQL (a new dependency on a private table shows up here)."""
import ast
import re
from pathlib import Path

from headroom_sidecar.controlplane.schema import TELEMETRY_COLUMNS

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboard"
# Control-plane tables the pages read that no proto/ contract names yet (agents: registration
# and counters; applications: rollout state per agent; plans, trials: the per-class view).
# Telemetry tables are the agent's (controlplane/schema.py TELEMETRY_COLUMNS).
NOT_YET_IN_THE_CONTRACT = {"agents", "applications", "plans", "trials"}
_TABLE = re.compile(r"\b(?:FROM|JOIN)\s+([a-z_][a-z0-9_]*)")   # SQL keywords are upper case here


def _sources() -> list[Path]:
    return sorted(DASHBOARD.rglob("*.py"))


def test_the_dashboard_imports_nothing_from_the_control_plane():
    offenders = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names
                          if "controlplane" in n.split(".")]
    assert offenders == []


def test_tables_named_in_the_dashboards_sql_are_telemetry_or_pinned():
    named = set()
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                named |= set(_TABLE.findall(node.value))   # "FROM {table} t": a parameter
    assert named - set(TELEMETRY_COLUMNS) == NOT_YET_IN_THE_CONTRACT, named
