import duckdb
import numpy as np
import pyarrow as pa
import pytest

from headroom_sidecar.controlplane.query import (QueryClient, QueryError, QueryErrorKind, decode_result,
                                encode_result)
from tests.controlplane import helpers as h


@pytest.fixture
def loaded(server):
    with h.AgentStream(server.address) as agent:
        agent.send(h.hello())
        agent.send(h.batch(1, h.tables(h.records(4))))
        assert agent.recv().ack.rows_stored > 0
    with QueryClient(server.address) as client:
        yield server, client


WRITES = [
    "INSERT INTO requests (agent_id, received_at) VALUES ('x', now())",
    "UPDATE agents SET connected = true",
    "DELETE FROM requests",
    "DROP TABLE requests",
    "CREATE TABLE evil (a INT)",
    "ALTER TABLE requests ADD COLUMN x INT",
    "COPY requests TO '/tmp/headroom-leak.csv'",
    "ATTACH '/tmp/headroom-other.duckdb' AS other",
    "DETACH other",
    "SET threads = 1",
    "PRAGMA enable_profiling",
    "CALL checkpoint()",
    "CHECKPOINT",
    "VACUUM",
    "EXPORT DATABASE '/tmp/headroom-export'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SELECT 1; DROP TABLE requests",
    "",
    "SELEC nonsense",
]


@pytest.mark.parametrize("sql", WRITES)
def test_anything_but_a_read_is_invalid_argument(loaded, sql):
    server, client = loaded
    with pytest.raises(QueryError) as err:
        client.query(sql)
    assert err.value.kind == QueryErrorKind.INVALID
    assert client.query("SELECT count(*) AS n FROM requests").table["n"].to_pylist() == [4]


def test_explain_analyze_of_a_write_is_refused(loaded):
    server, client = loaded
    with pytest.raises(QueryError, match="got a DELETE statement") as err:
        client.query("EXPLAIN ANALYZE DELETE FROM requests")
    assert err.value.kind == QueryErrorKind.INVALID
    assert client.query("SELECT count(*) AS n FROM requests").table["n"].to_pylist() == [4]
    assert client.query("EXPLAIN ANALYZE SELECT count(*) FROM requests").table.num_rows == 1


def test_files_outside_the_store_are_not_readable(loaded):
    _, client = loaded
    with pytest.raises(QueryError, match=r"table function read_csv\(\)") as err:
        client.query("SELECT * FROM read_csv('/etc/hostname')")
    assert err.value.kind == QueryErrorKind.INVALID


def test_results_are_typed_columns(loaded):
    _, client = loaded
    result = client.query("SELECT request_id, query_class, latency_ms, traced, received_at "
                          "FROM requests ORDER BY request_id")
    t = result.table
    assert not result.truncated
    assert t.column_names == ["request_id", "query_class", "latency_ms", "traced", "received_at"]
    assert t["request_id"].type == pa.uint64() and t["request_id"].to_pylist() == [1, 2, 3, 4]
    assert t["query_class"].to_pylist() == ["short", "long", "short", "long"]
    assert t["latency_ms"].type == pa.float32() and t["latency_ms"].to_pylist() == [10, 20, 30, 40]
    assert t["traced"].to_pylist() == [True, False, True, False]
    assert all(s.startswith("20") for s in t["received_at"].to_pylist())   # timestamps as text


def test_show_describe_and_ctes_are_reads(loaded):
    _, client = loaded
    tables = client.query("SHOW TABLES").table["name"].to_pylist()
    assert {"agents", "requests", "head_stats", "batches"} <= set(tables)
    assert "out_share" in client.query("DESCRIBE head_stats").table["column_name"].to_pylist()
    n = client.query("WITH x AS (SELECT * FROM head_stats) SELECT count(*) AS n FROM x").table
    assert n["n"].to_pylist() == [24]


def test_truncated_at_max_rows(loaded):
    server, client = loaded
    result = client.query("SELECT * FROM head_stats", max_rows=5)
    assert (result.table.num_rows, result.truncated) == (5, True)
    exact = client.query("SELECT * FROM head_stats", max_rows=24)
    assert (exact.table.num_rows, exact.truncated) == (24, False)


def test_server_caps_max_rows(tmp_path):
    from headroom_sidecar.controlplane.app import start_server
    from headroom_sidecar.controlplane.settings import ServerSettings
    running = start_server(ServerSettings(db_path=str(tmp_path / "c.duckdb"), port=0,
                                          query_default_rows=3, query_max_rows=4))
    try:
        with QueryClient(running.address) as client:
            assert client.query("SELECT * FROM range(10)").table.num_rows == 3
            assert client.query("SELECT * FROM range(10)", max_rows=100).table.num_rows == 4
    finally:
        running.stop(grace_s=0.2)


def test_unknown_table_is_a_clear_error(loaded):
    _, client = loaded
    with pytest.raises(QueryError, match="nosuchtable"):
        client.query("SELECT * FROM nosuchtable")


def test_nulls_nans_and_odd_types_round_trip():
    con = duckdb.connect()
    table = con.sql("SELECT * FROM (VALUES (1::TINYINT, NULL::VARCHAR, 'nan'::FLOAT, [1, 2], 1.5::DECIMAL(4,2), NULL::BIGINT),"
                    " (NULL, 'x', 2.0, NULL, NULL, 7)) t(i8, s, f, l, d, n)").to_arrow_table()
    out = decode_result(encode_result("r", table))
    assert out["i8"].to_pylist() == [1, None]
    assert out["s"].to_pylist() == [None, "x"]
    assert np.isnan(out["f"][0].as_py()) and out["f"][1].as_py() == 2.0
    assert out["l"].to_pylist() == ["[1, 2]", None]
    assert out["d"].to_pylist() == [1.5, None]
    assert out["n"].to_pylist() == [None, 7]


def test_duplicate_result_columns_are_refused(loaded):
    _, client = loaded
    with pytest.raises(QueryError, match="duplicate column names"):
        client.query("SELECT 1 AS a, 2 AS a")
