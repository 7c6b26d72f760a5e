"""schema.py owns every table under the schema version; a version-1 file (made by running the
old DDL kept in schema_v1.sql) opens, migrates in place, keeps its rows, records version 2."""
from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest

from headroom_sidecar.controlplane import schema
from headroom_sidecar.controlplane.audit import AuditLog
from headroom_sidecar.controlplane.auth import AgentBindings
from headroom_sidecar.controlplane.plans import PlanStore
from headroom_sidecar.controlplane.store import Store, StoreError

HERE = Path(__file__).parent
CONTROLPLANE = Path(schema.__file__).parent
V1_DDL = (HERE / "schema_v1.sql").read_text()

# One row in a table of each kind a version-1 file held (telemetry, agents, jobs, plans, audit,
# bindings), written with version-1 columns only.
V1_ROWS = [
    "INSERT INTO schema_version VALUES (1, TIMESTAMP '2026-11-01 00:00:00')",
    "INSERT INTO agents (agent_id, first_seen, last_seen, connected, sent_records) VALUES "
    "('a1', TIMESTAMP '2026-11-01 00:00:00', TIMESTAMP '2026-11-01 00:00:01', true, 7)",
    "INSERT INTO requests (agent_id, received_at, request_id, tenant, latency_ms) VALUES "
    "('a1', TIMESTAMP '2026-11-01 00:00:01', 42, 't', 12.5)",
    "INSERT INTO jobs VALUES ('j1', 'plan', 'done', 'finished', 'fp', ['a1'], 'chat', 'admin', "
    "NULL, NULL, NULL, 0, 'ok', NULL, 1, 2, 3)",
    "INSERT INTO plans VALUES ('p1', 1, 'h', 'fp', ['chat'], 'shadow', '{}', 'proposed', 'admin', 1, 1)",
    "INSERT INTO audit_log VALUES (1, 5, 'plan.proposed', 'admin', 'p1', '{}', 'g', 'r')",
    "INSERT INTO agent_bindings (agent_id, cert_sha256, fingerprint) VALUES ('a1', 'c', 'fp')",
]


def _v1_file(path: Path, extra: str = "") -> str:
    con = duckdb.connect(str(path))
    con.execute(V1_DDL + extra)
    for sql in V1_ROWS:
        con.execute(sql)
    con.close()
    return str(path)


def _versions(store: Store) -> list[int]:
    with store.reader() as cur:
        return [v for (v,) in cur.execute("SELECT version FROM schema_version ORDER BY version").fetchall()]


def _columns(store: Store, table: str) -> list[str]:
    with store.reader() as cur:
        return [r[0] for r in cur.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
            "ORDER BY ordinal_position", [table]).fetchall()]


def _tables(con) -> set[str]:
    return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                      "WHERE table_type = 'BASE TABLE'").fetchall()}


def test_version_1_file_migrates_and_keeps_its_rows(tmp_path):
    store = Store(_v1_file(tmp_path / "v1.duckdb"))
    try:
        assert store.migrated_to == [2] and _versions(store) == [1, 2]
        assert "objective" in _columns(store, "jobs")
        assert {"mac"} <= set(_columns(store, "audit_log"))
        assert {"mac", "keyed_since"} <= set(_columns(store, "audit_head"))
        with store.reader() as cur:
            assert cur.execute("SELECT sent_records, connected FROM agents").fetchall() == [(7, False)]
            assert cur.execute("SELECT request_id, latency_ms FROM requests").fetchall() == [(42, 12.5)]
            assert cur.execute("SELECT job_id, objective FROM jobs").fetchall() == [("j1", None)]
            assert cur.execute("SELECT plan_id, status FROM plans").fetchall() == [("p1", "proposed")]
            assert cur.execute("SELECT seq, mac FROM audit_log").fetchall() == [(1, None)]
            assert cur.execute("SELECT agent_id FROM agent_bindings").fetchall() == [("a1",)]
    finally:
        store.close()


def test_migrated_file_reopens_without_another_version(tmp_path):
    path = _v1_file(tmp_path / "v1.duckdb")
    Store(path).close()
    store = Store(path)
    try:
        assert store.migrated_to == [] and _versions(store) == [1, 2]
    finally:
        store.close()


def test_new_file_gets_every_table_at_the_current_version(tmp_path):
    store = Store(str(tmp_path / "new.duckdb"))
    try:
        assert store.migrated_to == [schema.SCHEMA_VERSION] == [2]
        assert _versions(store) == [2]
        with store.reader() as cur:
            created = _tables(cur)
    finally:
        store.close()
    v1 = duckdb.connect()
    v1.execute(V1_DDL)
    # Version 2 adds no table: it brings the ones version 1 made elsewhere under the version.
    assert created == _tables(v1)


def test_components_on_a_bare_connection_create_the_same_tables(tmp_path):
    """plans.py, audit.py and auth.py run schema.py's strings: a bare connection gets exactly
    the tables (and columns) the store makes."""
    con = duckdb.connect()
    PlanStore(con)
    AuditLog(con)
    AgentBindings(con, __import__("threading").RLock())
    store = Store(str(tmp_path / "s.duckdb"))
    try:
        with store.reader() as cur:
            for table in _tables(con):
                assert _columns(store, table) == [r[0] for r in con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                    "ORDER BY ordinal_position", [table]).fetchall()], table
                assert table in _tables(cur)
    finally:
        store.close()


def test_current_version_opens_and_the_next_is_refused(tmp_path):
    path = str(tmp_path / "s.duckdb")
    Store(path).close()
    Store(path).close()                       # exactly SCHEMA_VERSION: opens
    con = duckdb.connect(path)
    con.execute("INSERT INTO schema_version VALUES (?, now())", [schema.SCHEMA_VERSION + 1])
    con.close()
    with pytest.raises(StoreError, match=rf"s\.duckdb.*schema version {schema.SCHEMA_VERSION + 1}, "
                                         r"newer than this control plane's 2"):
        Store(path)


def test_failed_migration_leaves_the_file_at_version_1(tmp_path):
    # A version-1 file whose jobs is a view: the migration cannot add jobs.objective.
    path = tmp_path / "v1.duckdb"
    con = duckdb.connect(str(path))
    con.execute(V1_DDL.replace("CREATE TABLE IF NOT EXISTS jobs", "CREATE TABLE old_jobs"))
    con.execute("CREATE VIEW jobs AS SELECT 1 AS job_id")
    con.execute(V1_ROWS[0])
    con.execute("DROP TABLE plans")
    con.close()
    with pytest.raises(StoreError, match=r"v1\.duckdb to schema version 2"):
        Store(str(path))
    con = duckdb.connect(str(path))
    try:
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
        assert "plans" not in _tables(con)          # rolled back: nothing half-migrated
    finally:
        con.close()


def test_every_table_is_defined_in_schema_py():
    offenders = []
    for path in sorted(CONTROLPLANE.rglob("*.py")):
        if path.name == "schema.py":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"CREATE\s+(OR\s+REPLACE\s+)?TABLE", line, re.IGNORECASE):
                offenders.append(f"{path.relative_to(CONTROLPLANE.parent)}:{lineno}")
    assert not offenders, f"CREATE TABLE outside controlplane/schema.py: {offenders}"
