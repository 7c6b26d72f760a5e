"""The Query RPC is read-only for real, against a real server on localhost and its DuckDB file
(controlplane/query.py): no setting changes (which killed ingest until restart), no file or
settings reads, no unbounded result in memory, no file paths in errors."""
from __future__ import annotations

import duckdb
import pytest

from headroom_sidecar.controlplane.query import (QueryClient, QueryError, QueryErrorKind, QuerySettings, run_query,
                                scrub)
from tests.controlplane import helpers as h

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def loaded(server):
    with h.AgentStream(server.address) as agent:
        agent.send(h.hello())
        agent.send(h.batch(1, h.tables(h.records(4))))
        assert agent.recv().ack.rows_stored > 0
    with QueryClient(server.address) as client:
        yield server, client


def _setting(server, name: str):
    with server.store.reader() as cur:
        return cur.execute(f"SELECT current_setting('{name}')").fetchone()[0]


def _ingest_works(server, seq: int) -> bool:
    with h.AgentStream(server.address) as agent:
        agent.send(h.hello("after"))
        agent.send(h.batch(seq, h.tables(h.records(2, first_id=100 + seq))))
        return agent.recv().ack.rows_stored > 0


SETTING_ATTACKS = [
    "EXPLAIN ANALYZE SET GLOBAL memory_limit='1MB'",
    "EXPLAIN SET threads = 1",
    "SET GLOBAL memory_limit='1MB'",
    "SET threads = 1",
    "SET lock_configuration = true",
    "SET enable_external_access = true",
    "RESET memory_limit",
    "CHECKPOINT",
    "FORCE CHECKPOINT",
    "VACUUM",
    "VACUUM ANALYZE requests",
    "PRAGMA memory_limit='1MB'",
    "CALL pragma_version()",
    "ATTACH ':memory:' AS m",
    "COPY requests TO 'x.csv'",
    "EXPORT DATABASE 'dump'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "EXPLAIN ANALYZE DELETE FROM requests",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    "PIVOT requests ON tenant USING count(*)",
]


@pytest.mark.parametrize("sql", SETTING_ATTACKS)
def test_statements_that_change_the_server_are_refused(loaded, sql):
    server, client = loaded
    memory_before = _setting(server, "memory_limit")
    with pytest.raises(QueryError) as err:
        client.query(sql)
    assert err.value.kind is QueryErrorKind.INVALID
    assert _setting(server, "memory_limit") == memory_before
    assert client.query("SELECT count(*) AS n FROM requests").table["n"].to_pylist() == [4]
    assert _ingest_works(server, seq=7)


READ_ATTACKS = [
    ("SELECT * FROM duckdb_settings()", "table function duckdb_settings()"),
    ("SELECT path FROM duckdb_databases()", "table function duckdb_databases()"),
    ("SELECT * FROM (SELECT 1) JOIN duckdb_extensions() ON true", "duckdb_extensions()"),
    ("SELECT current_setting('temp_directory') AS t", "function current_setting()"),
    ("SHOW databases", "SHOW databases"),
    ("SELECT * FROM read_csv('/etc/hostname')", "table function read_csv()"),
    ("SELECT * FROM read_parquet('x.parquet')", "table function read_parquet()"),
    ("SELECT * FROM read_json('x.json')", "table function read_json()"),
    ("SELECT * FROM read_text('/etc/hostname')", "table function read_text()"),
    ("SELECT * FROM glob('/*')", "table function glob()"),
    ("SELECT * FROM '/etc/passwd'", "table '/etc/passwd'"),
    ("SELECT * FROM query('SET threads = 1')", "table function query()"),
    ("SELECT * FROM system.main.duckdb_settings", "table 'system.main.duckdb_settings'"),
    ("SELECT * FROM information_schema.schemata", "table 'information_schema.schemata'"),
    ("SELECT * FROM agent_bindings", "table 'agent_bindings'"),
    ("WITH x AS (SELECT * FROM duckdb_settings()) SELECT * FROM x", "duckdb_settings()"),
    ("SELECT (SELECT value FROM duckdb_settings() LIMIT 1) AS v", "duckdb_settings()"),
    ("EXPLAIN ANALYZE SELECT * FROM duckdb_settings()", "duckdb_settings()"),
    ("DESCRIBE SELECT * FROM glob('/*')", "glob()"),
]


@pytest.mark.parametrize("sql, named", READ_ATTACKS)
def test_settings_and_files_are_not_readable(loaded, sql, named):
    server, client = loaded
    with pytest.raises(QueryError) as err:
        client.query(sql)
    assert err.value.kind is QueryErrorKind.INVALID and named in err.value.message
    assert str(server.store.db_path) not in err.value.message


GOOD = [
    ("SELECT request_id FROM requests ORDER BY 1", 4),
    ("FROM requests", 4),
    ("WITH r AS (SELECT * FROM requests) SELECT count(*) AS n FROM r", 1),
    ("SELECT * FROM requests r JOIN agents a USING (agent_id)", 4),
    ("SHOW TABLES", None),
    ("DESCRIBE requests", None),
    ("SHOW requests", None),
    ("SUMMARIZE head_stats", None),
    ("EXPLAIN ANALYZE SELECT count(*) FROM requests", 1),
    ("SELECT * FROM range(3)", 3),
    ("VALUES (1), (2)", 2),
    ("SELECT unnest([1, 2, 3]) AS u", 3),
]


@pytest.mark.parametrize("sql, rows", GOOD)
def test_reads_of_the_store_still_work(loaded, sql, rows):
    _, client = loaded
    table = client.query(sql).table
    assert rows is None or table.num_rows == rows


def test_configuration_is_locked_after_the_first_query(loaded):
    """Defence in depth: even SQL that slipped past the check could change no setting."""
    server, client = loaded
    client.query("SELECT 1 AS one")
    with server.store.reader() as cur:
        with pytest.raises(duckdb.Error, match="configuration has been locked"):
            cur.execute("SET threads = 1")
    assert _ingest_works(server, seq=9)


def test_a_huge_result_stops_at_the_byte_cap_while_fetching(server):
    """Was: 0.25 -> 5.26 GB of server memory before the size check."""
    rss_before = _rss_bytes()
    with QueryClient(server.address) as client:
        with pytest.raises(QueryError) as err:
            client.query("SELECT repeat('x', 1000) AS s FROM range(1000000)", max_rows=1_000_000)
    assert err.value.kind is QueryErrorKind.TOO_LARGE and "max_result_bytes" in err.value.message
    assert _rss_bytes() - rss_before < 512 * 1024 * 1024   # the cap is 32 MiB (+ one batch)


@pytest.mark.parametrize("slack, ok", [(0, True), (-1, False)])
def test_byte_cap_boundary(server, monkeypatch, slack, ok):
    """range(100) as BIGINT is one batch of exactly 813 bytes (800 of values, a 13-byte
    validity bitmap): a cap of 813 passes, 812 does not."""
    monkeypatch.setenv("HEADROOM_CP_QUERY_MAX_BYTES", str(813 + slack))
    with QueryClient(server.address) as client:
        if ok:
            assert client.query("SELECT range AS i FROM range(100)").table.num_rows == 100
        else:
            with pytest.raises(QueryError, match="max_result_bytes=812") as err:
                client.query("SELECT range AS i FROM range(100)")
            assert err.value.kind is QueryErrorKind.TOO_LARGE


def test_errors_carry_no_paths(tmp_path):
    con = duckdb.connect(str(tmp_path / "p.duckdb"))
    with pytest.raises(QueryError) as err:
        run_query(con.cursor(), "SELECT CAST('/secret/dir/file.duckdb' AS INTEGER) AS x", 10, 5,
                  QuerySettings())
    assert err.value.kind is QueryErrorKind.FAILED and "/secret" not in err.value.message
    assert "<path>" in err.value.message
    assert scrub("IO Error: cannot open /var/lib/headroom/cp.duckdb.wal: x") == \
        "IO Error: cannot open <path>: x"


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
