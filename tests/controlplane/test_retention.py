"""Storage lifecycle on a real DuckDB file: retention by age and size, hourly roll-ups that keep
the planner's candidates, Parquet export, and the refusal of non-local --db values."""
import time
from datetime import datetime, timedelta

import pyarrow.parquet as pq
import pytest

from headroom_sidecar.controlplane import cli
from headroom_sidecar.controlplane.export import EXPORT_TABLES
from headroom_sidecar.controlplane.ingest import decode_batch
from headroom_sidecar.controlplane.planner.candidates import CandidateScope, load_candidates
from headroom_sidecar.controlplane.planner.settings import PlannerSettings
from headroom_sidecar.controlplane.retention import (RAW_TABLES, RetentionSettings, RetentionWorker, run_retention,
                                    used_bytes)
from headroom_sidecar.controlplane.schema import ROLLUP_TABLES
from headroom_sidecar.controlplane.settings import ServerSettings
from headroom_sidecar.controlplane.store import Registration, Store, utc_now
from headroom_sidecar.proto import headroom_pb2 as pb
from tests.controlplane import helpers as h

# The retention pass's clock, and floor_hour(NOW - 14 days): well before the real clock, so the
# rows a test just stored are the only ones dated after it.
NOW = datetime(2025, 6, 15, 12, 30)
CUTOFF = datetime(2025, 6, 1, 12, 0)
PLANNER = PlannerSettings(min_zero_fraction=0.0, min_step_fraction=0.0)
SCOPES = (CandidateScope(), CandidateScope(query_class="short"), CandidateScope(agent_ids=("a",)))


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "cp.duckdb"))
    s.register_agent(Registration("a", model={"fingerprint": "f" * 64, "num_layers": 3,
                                              "num_heads": 4}))
    yield s
    s.close()


def ingest(store, seq: int, received_at: datetime, n: int = 6, **trace_kw) -> None:
    """n requests (every other one traced) through the real decode + store path, then dated."""
    recs = h.records(n, first_id=seq * 1000, **trace_kw)
    stored_at = utc_now()
    store.store_batch("a", 1, decode_batch(pb.TelemetryBatch(seq=seq, tables=h.tables(recs))))
    with store.transaction() as cur:   # every older row is dated before the real clock
        for t in RAW_TABLES:
            cur.execute(f"UPDATE {t} SET received_at = ? WHERE received_at >= ?",
                        [received_at, stored_at])


def count(store, table: str) -> int:
    with store.reader() as cur:
        return cur.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def candidates(store, scope: CandidateScope):
    with store.reader() as cur:
        return load_candidates(cur, scope, PLANNER)


def assert_same(before, after) -> None:
    """Same structure and ranking; means equal up to float summation order."""
    assert (after.num_layers, after.heads_per_layer, after.traced_requests) == \
        (before.num_layers, before.heads_per_layer, before.traced_requests)
    assert [(c.layer, c.head, c.samples) for c in after.heads] == \
        [(c.layer, c.head, c.samples) for c in before.heads]
    assert [c.mean_out_share for c in after.heads] == \
        pytest.approx([c.mean_out_share for c in before.heads], rel=1e-9)
    assert [c.layer for c in after.layers] == [c.layer for c in before.layers]
    assert [v for c in after.layers for v in (c.mean_influence, c.mean_ms)] == \
        pytest.approx([v for c in before.layers for v in (c.mean_influence, c.mean_ms)], rel=1e-9)
    assert [(c.layer, [s.threshold for s in c.ladder]) for c in after.sparse_layers] == \
        [(c.layer, [s.threshold for s in c.ladder]) for c in before.sparse_layers]
    assert [s.est_zero_fraction for c in after.sparse_layers for s in c.ladder] == \
        pytest.approx([s.est_zero_fraction for c in before.sparse_layers for s in c.ladder],
                      rel=1e-9)


def test_age_retention_rolls_up_first_and_keeps_candidates(store):
    ingest(store, 1, CUTOFF - timedelta(days=2))
    ingest(store, 2, CUTOFF - timedelta(hours=5))
    ingest(store, 3, NOW - timedelta(hours=1))
    with store.transaction() as cur:   # unmeasured statistics in a row bound to be rolled up
        cur.execute("UPDATE layer_stats SET attn_ms = NULL WHERE request_id = 1000 AND layer = 1")
        cur.execute("UPDATE head_stats SET out_share = NULL WHERE request_id = 1000 AND head = 2")
    before = {s: candidates(store, s) for s in SCOPES}
    assert before[SCOPES[0]].traced_requests == 9 and before[SCOPES[0]].heads
    report = run_retention(store, RetentionSettings(days=14), now=NOW)
    # Batches 1 and 2 went (6 requests each + their stats); batch 3 stayed.
    assert count(store, "requests") == 6
    with store.reader() as cur:
        assert cur.execute("SELECT min(received_at) FROM head_stats").fetchone()[0] >= CUTOFF
        # Roll-ups: 2 hours x 3 layers x 4 heads, 2 query classes (traced ids are all "long"/"short").
        hours = cur.execute("SELECT count(DISTINCT hour) FROM head_stats_hourly").fetchone()[0]
    assert hours == 2 and report.rolled_up_rows > 0 and report.deleted_rows > 0
    for scope, was in before.items():
        assert_same(was, candidates(store, scope))
    # Everything expires: the candidates come from roll-ups alone, still unchanged.
    run_retention(store, RetentionSettings(days=14), now=NOW + timedelta(days=30))
    assert sum(count(store, t) for t in RAW_TABLES) == 0
    for scope, was in before.items():
        assert_same(was, candidates(store, scope))


def test_age_cutoff_is_exclusive_on_the_hour(store):
    ingest(store, 1, CUTOFF - timedelta(microseconds=1))   # 1 us too old: goes
    ingest(store, 2, CUTOFF)                               # exactly at the cutoff: stays
    run_retention(store, RetentionSettings(days=14), now=NOW)
    with store.reader() as cur:
        assert cur.execute("SELECT DISTINCT received_at FROM requests").fetchall() == [(CUTOFF,)]


def test_non_data_tables_are_untouched(store):
    with store.transaction() as cur:   # a job row dated long before any cutoff
        cur.execute("INSERT INTO jobs VALUES ('j1', 'plan', 'done', 'done', 'f', ['a'], '', 'op', "
                    "NULL, NULL, NULL, 0, '', NULL, 0, 0, 0, NULL)")
    ingest(store, 1, CUTOFF - timedelta(days=100))
    keep = [t for t in _tables(store) if t not in RAW_TABLES and t not in ROLLUP_TABLES.values()]
    assert {"agents", "jobs", "schema_version"} <= set(keep)
    before = {t: _rows(store, t) for t in keep}
    run_retention(store, RetentionSettings(days=14, max_bytes=1), now=NOW)  # both limits bite
    assert {t: _rows(store, t) for t in keep} == before


def _tables(store) -> list[str]:
    with store.reader() as cur:
        return [r[0] for r in cur.execute("SELECT table_name FROM duckdb_tables()").fetchall()]


def _rows(store, table: str) -> list:
    with store.reader() as cur:
        return sorted(map(str, cur.execute(f"SELECT * FROM {table}").fetchall()))


def test_size_limit_drops_oldest_hours_until_under(store):
    for i in range(8):   # 8 hours x 100 traced requests at 32 layers x 32 heads
        ingest(store, i + 1, CUTOFF + timedelta(hours=i), n=200, layers=32, heads=32)
    store.checkpoint()
    full_bytes = used_bytes(store)
    # Exactly at the limit: nothing goes.
    run_retention(store, RetentionSettings(days=0, max_bytes=full_bytes), now=NOW)
    assert count(store, "requests") == 8 * 200
    limit_bytes = full_bytes // 2
    report = run_retention(store, RetentionSettings(days=0, max_bytes=limit_bytes), now=NOW)
    assert report.used_bytes <= limit_bytes and used_bytes(store) <= limit_bytes
    with store.reader() as cur:
        kept = cur.execute("SELECT DISTINCT received_at FROM requests ORDER BY 1").fetchall()
    assert 0 < len(kept) < 8 and kept[-1][0] == CUTOFF + timedelta(hours=7)   # newest kept
    # More hours of ingest then a pass: the file grows no further (freed blocks are reused).
    file_bytes = _file_bytes(store)
    for i in range(8, 12):
        ingest(store, i + 1, CUTOFF + timedelta(hours=i), n=200, layers=32, heads=32)
        run_retention(store, RetentionSettings(days=0, max_bytes=limit_bytes), now=NOW)
    assert used_bytes(store) <= limit_bytes and _file_bytes(store) <= file_bytes * 1.1


def _file_bytes(store) -> int:
    import os
    return os.path.getsize(store.db_path)


def test_retention_thread_runs_at_start_and_stops_when_told(tmp_path):
    s = Store(str(tmp_path / "w.duckdb"))
    ingest(s, 1, datetime(2020, 1, 1))
    worker = RetentionWorker(s, RetentionSettings(days=14, interval_s=3600)).start()
    deadline = time.monotonic() + 10
    while count(s, "requests") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count(s, "requests") == 0
    worker.stop()   # wakes the thread sleeping out its hour
    assert not worker._thread.is_alive()
    s.close()


def test_the_server_stops_retention_before_it_closes_the_store(tmp_path):
    from headroom_sidecar.controlplane.app import start_server
    from headroom_sidecar.controlplane.settings import ServerSettings
    running = start_server(ServerSettings(db_path=str(tmp_path / "srv.duckdb"), port=0))
    worker = running.retention
    assert worker is not None and worker._thread.is_alive()
    running.stop(grace_s=0.1)
    assert not worker._thread.is_alive()


@pytest.mark.parametrize("bad", ["days=-1", "max_bytes=-1", "interval_s=0"])
def test_bad_retention_settings_are_refused(bad):
    name, value = bad.split("=")
    with pytest.raises(ValueError, match=f"invalid RetentionSettings: {name}="):
        RetentionSettings(**{name: float(value) if name != "max_bytes" else int(value)})


@pytest.mark.parametrize("url", ["s3://bucket/h.duckdb", "gs://b/h.duckdb",
                                 "https://x/h.duckdb", "md://h"])
def test_non_local_db_is_refused_clearly(url, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="is not supported.*local file path"):
        ServerSettings(db_path=url)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["serve", "--db", url, "--port", "0"]) == cli.EXIT_ERROR
    assert "must be a local file path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []   # no directory named "s3:" or the like


def test_local_paths_with_a_colon_are_accepted():
    assert ServerSettings(db_path="C:/data/h.duckdb").db_path == "C:/data/h.duckdb"
    assert ServerSettings(db_path="./s3:/h.duckdb").db_path == "./s3:/h.duckdb"


def test_export_writes_readable_parquet_per_table(store, tmp_path, capsys):
    ingest(store, 1, CUTOFF - timedelta(days=30))
    ingest(store, 2, CUTOFF + timedelta(days=1))
    ingest(store, 3, NOW)
    run_retention(store, RetentionSettings(days=14), now=NOW)   # batch 1 -> roll-ups
    since = CUTOFF - timedelta(days=40)
    expected = {}
    with store.reader() as cur:
        for table, column in EXPORT_TABLES.items():
            expected[table] = cur.execute(f"SELECT count(*) FROM {table} WHERE {column} >= ?",
                                          [NOW]).fetchone()[0]
    store.close()
    out = tmp_path / "export"
    assert cli.main(["export", "--db", store.db_path, "--since", NOW.isoformat() + "Z",
                     "--to", str(out)]) == 0
    got = {t: pq.read_table(out / f"{t}.parquet").num_rows for t in EXPORT_TABLES}
    assert got == expected and got["requests"] == 6   # only batch 3 is at or after NOW
    assert cli.main(["export", "--db", store.db_path, "--since", since.date().isoformat(),
                     "--to", str(out)]) == 0
    table = pq.read_table(out / "head_stats_hourly.parquet")
    assert table.num_rows > 0 and "out_share" in table.column_names
    assert pq.read_table(out / "requests.parquet").num_rows == 12
    capsys.readouterr()
    assert cli.main(["export", "--db", store.db_path, "--since", "last tuesday",
                     "--to", str(out)]) == cli.EXIT_ERROR
    assert "not an ISO 8601" in capsys.readouterr().err
