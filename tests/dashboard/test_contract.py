"""What the dashboard depends on: proto/ only: no controlplane import, and its SQL names only
tables of the contract (proto/tables.py Table); a private table of the control plane fails here."""
import ast
import re
from pathlib import Path

from headroom_sidecar.proto.tables import Table

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboard"
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


def test_tables_named_in_the_dashboards_sql_are_in_the_contract():
    named = set()
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                named |= set(_TABLE.findall(node.value))   # "FROM {table} t": a parameter
    assert named, "no SQL found: the scan is broken"
    assert named - {t.value for t in Table} == set(), named
