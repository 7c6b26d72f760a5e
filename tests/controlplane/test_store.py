import duckdb
import numpy as np
import pytest

from headroom_sidecar.agent.records import to_tables
from headroom_sidecar.controlplane.ingest import ErrorCode, IngestError, decode_batch
from headroom_sidecar.controlplane.ingest_rules import MAX_BATCH_ROWS, ModelShape
from headroom_sidecar.controlplane.schema import TELEMETRY_COLUMNS
from headroom_sidecar.controlplane.store import Counters, Registration, Store, StoreError
from headroom_sidecar.proto import columnar
from headroom_sidecar.proto import headroom_pb2 as pb
from tests.controlplane import helpers as h


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "s.duckdb"))
    yield s
    s.close()


def _decoded(seq, recs, gpu=()):
    return decode_batch(pb.TelemetryBatch(seq=seq, tables=h.tables(recs, gpu)))


def _column(store, table, col, agent_id="a"):
    with store.reader() as cur:
        rows = cur.execute(f"SELECT {col} FROM {table} WHERE agent_id = ? ORDER BY rowid",
                           [agent_id]).fetchall()
    return np.array([r[0] for r in rows])


def test_batch_lands_in_every_table_with_the_wire_values(store):
    recs, gpu = h.records(5), h.gpu_samples(3)
    stored = store.store_batch("a", 1, _decoded(1, recs, gpu))
    expected = to_tables(recs, gpu).columns
    assert stored.rows_stored == sum(len(next(iter(c.values()))) for c in expected.values())
    for table, columns in expected.items():
        for col, values in columns.items():
            got = _column(store, table, col)
            if values.dtype.kind == "f":
                np.testing.assert_array_equal(got.astype(np.float32), values, err_msg=f"{table}.{col}")
            else:
                assert got.tolist() == values.tolist(), f"{table}.{col}"


def test_table_columns_follow_the_schema(store):
    with store.reader() as cur:
        for table, columns in TELEMETRY_COLUMNS.items():
            names = [r[0] for r in cur.execute(f"DESCRIBE {table}").fetchall()]
            assert names == ["agent_id", "received_at", *columns]


def test_resent_seq_is_acked_but_not_stored_twice(store):
    assert store.store_batch("a", 1, _decoded(7, h.records(2))).rows_stored > 0
    again = store.store_batch("a", 1, _decoded(7, h.records(2)))
    assert (again.rows_stored, again.duplicate) == (0, True)
    assert len(_column(store, "requests", "request_id")) == 2
    # Another process of the same agent id starts its seqs over: stored.
    assert store.store_batch("a", 2, _decoded(7, h.records(2))).rows_stored > 0


def test_dedupe_off_stores_a_resend(tmp_path):
    store = Store(str(tmp_path / "d.duckdb"), dedupe_batches=False)
    for _ in range(2):
        store.store_batch("a", 1, _decoded(1, h.records(2)))
    assert len(_column(store, "requests", "request_id")) == 4
    store.close()


def test_grouped_batches_keep_each_agents_rows(store):
    from headroom_sidecar.controlplane.store import BatchJob
    jobs = [BatchJob("a", 1, _decoded(1, h.records(2))), BatchJob("b", 1, _decoded(1, h.records(3))),
            BatchJob("a", 1, _decoded(1, h.records(2)))]   # a repeat inside the group
    results = store.store_batches(jobs)
    assert [r.duplicate for r in results] == [False, False, True]
    assert len(_column(store, "requests", "request_id", "a")) == 2
    assert len(_column(store, "requests", "request_id", "b")) == 3


def _registration(agent_id="a", name="m1"):
    return Registration(agent_id=agent_id, model={"fingerprint": "fp", "name": name, "num_layers": 3},
                        hostname="h", pid=9)


def test_agent_upsert_keeps_first_seen_and_counters(store):
    store.register_agent(_registration())
    store.update_counters("a", Counters(sent_records=5, queue_len=2))
    store.register_agent(_registration(name="m2"))
    with store.reader() as cur:
        row = cur.execute("SELECT model_name, num_layers, first_seen < last_seen, connected, "
                          "sent_records, queue_len FROM agents").fetchall()
    assert row == [("m2", 3, True, True, 5, 2)]


def test_reopening_marks_agents_disconnected(tmp_path):
    store = Store(str(tmp_path / "r.duckdb"))
    store.register_agent(_registration())
    store._con.close()   # as if the process died without closing cleanly
    store._closed = True
    again = Store(str(tmp_path / "r.duckdb"))
    with again.reader() as cur:
        assert cur.execute("SELECT connected FROM agents").fetchall() == [(False,)]
    again.close()


def test_other_schema_version_is_refused(tmp_path):
    path = str(tmp_path / "v.duckdb")
    Store(path).close()
    con = duckdb.connect(path)
    con.execute("UPDATE schema_version SET version = 99")
    con.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(path)


def test_null_mask_rows_are_null(store):
    table = h.tables(h.records(3, traced_every=0))[0]   # requests only
    next(c for c in table.columns if c.name == "latency_ms").null_mask = bytes([0, 1, 0])
    store.store_batch("a", 1, decode_batch(pb.TelemetryBatch(seq=1, tables=[table])))
    assert _column(store, "requests", "latency_ms").tolist() == [10.0, None, 30.0]


def _short_strings(requests: pb.Table) -> pb.Table:
    t = pb.Table()
    t.CopyFrom(requests)
    tenant = next(c for c in t.columns if c.name == "tenant")
    del tenant.strings[1:]
    return t


def _bad_tables():
    good = h.tables(h.records(2))
    head = next(t for t in good if t.name == "head_stats")

    def edit(fn):
        t = pb.Table()
        t.CopyFrom(head)
        fn(t)
        return t

    def retype(t):
        col = next(c for c in t.columns if c.name == "entropy")
        col.dtype, col.data = pb.FLOAT64, np.zeros(t.num_rows, np.float64).tobytes()

    return {
        "unknown table": (columnar.encode_table("heads", {"x": np.zeros(1)}), ErrorCode.UNKNOWN_TABLE, "'heads'"),
        "unknown column": (edit(lambda t: t.columns.add(name="bogus", dtype=pb.FLOAT32,
                                                        data=np.zeros(t.num_rows, np.float32).tobytes())),
                           ErrorCode.UNKNOWN_COLUMN, "'bogus'"),
        "missing column": (edit(lambda t: t.columns.pop()), ErrorCode.MISSING_COLUMN, "'out_share'"),
        "mistyped column": (edit(retype), ErrorCode.COLUMN_TYPE, "'entropy': dtype FLOAT64, expected FLOAT32"),
        "short column": (edit(lambda t: setattr(t.columns[3], "data", t.columns[3].data[:-4])),
                         ErrorCode.BAD_COLUMN, "'entropy'"),
        "short strings": (_short_strings(good[0]), ErrorCode.BAD_COLUMN, "'tenant': 1 values, expected 2"),
        "bad null mask": (edit(lambda t: setattr(t.columns[3], "null_mask", b"\x01")),
                          ErrorCode.BAD_COLUMN, "null_mask"),
    }


BAD = _bad_tables()


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_table_names_table_and_column(case):
    table, code, fragment = BAD[case]
    with pytest.raises(IngestError) as err:
        decode_batch(pb.TelemetryBatch(seq=1, tables=[h.tables(h.records(2))[-1], table]))
    assert err.value.code == code
    assert fragment in err.value.message
    assert repr(table.name) in err.value.message


def test_duplicate_table_in_one_batch_is_refused():
    tables = h.tables(h.records(2))
    with pytest.raises(IngestError) as err:
        decode_batch(pb.TelemetryBatch(seq=3, tables=[tables[0], tables[0]]))
    assert err.value.code == ErrorCode.DUPLICATE_TABLE and "'requests'" in err.value.message


# ---------------------------------------------------------------------- column rules (ingest_rules)
SHAPE = ModelShape(num_layers=3, num_heads=4)


def _one_table(name: str, **columns) -> pb.TelemetryBatch:
    """One table of h.records' traces with `columns` replaced (same length)."""
    base = to_tables(h.records(1, traced_every=1)).columns[name]   # 1 request, 3 layers, 4 heads
    cols = {**base, **{k: np.asarray(v, dtype=base[k].dtype) for k, v in columns.items()}}
    return pb.TelemetryBatch(seq=1, tables=[columnar.encode_table(name, cols)])


def _kept(batch: pb.TelemetryBatch, shape=SHAPE) -> tuple[list, str]:
    decoded = decode_batch(batch, shape)
    table = next(iter(decoded.tables.values()), None)
    return ([] if table is None else table.to_pylist()), decoded.reject_reason


@pytest.mark.parametrize("layer, kept", [(2, True), (3, False), (65535, False)])
def test_layer_must_lie_inside_the_registered_model(layer, kept):
    rows, reason = _kept(_one_table("layer_stats", layer=[0, 1, layer]))
    assert len(rows) == (3 if kept else 2)
    assert reason == ("" if kept else "layer_stats.layer: 1 row >= num_layers 3 registered at hello")


@pytest.mark.parametrize("head, kept", [(3, True), (4, False)])
def test_head_must_lie_inside_the_registered_model(head, kept):
    heads = np.tile(np.arange(4), 3)
    heads[5] = head
    rows, _ = _kept(_one_table("head_stats", head=heads))
    assert len(rows) == (12 if kept else 11)


def test_an_agent_without_a_registered_model_gets_no_per_layer_rows():
    batch = pb.TelemetryBatch(seq=1, tables=h.tables(h.records(2, traced_every=1)))
    decoded = decode_batch(batch, ModelShape(0, 0))
    assert set(decoded.tables) == {"requests"} and decoded.rows_rejected == 2 * (12 + 3 + 3)
    assert "registered no model structure" in decoded.reject_reason


@pytest.mark.parametrize("chars, kept", [(256, True), (257, False), (1_000_000, False)])
def test_labels_are_capped_at_256_characters(chars, kept):
    rows, reason = _kept(_one_table("requests", tenant=np.array(["é" * chars], dtype=object)))
    assert len(rows) == int(kept)
    assert kept or reason == "requests.tenant: 1 row longer than 256 characters"


@pytest.mark.parametrize("value, stored", [
    (float("nan"), None),                       # not measured: NULL
    (0.0, 0.0),                                 # the lower bound itself
    (float(np.nextafter(np.float32(0), np.float32(-1))), "rejected"),
    (float("inf"), "rejected"), (float("-inf"), "rejected"),
])
def test_times_are_finite_and_not_negative_nan_is_null(value, stored):
    rows, reason = _kept(_one_table("requests", tpot_ms=[value]))
    if stored == "rejected":
        assert rows == [] and reason.startswith("requests.tpot_ms: 1 row ")
    else:
        assert [r["tpot_ms"] for r in rows] == [stored]


@pytest.mark.parametrize("value, kept", [(1.001, True), (1.0011, False), (-0.001, True),
                                         (-0.0011, False)])
def test_fractions_allow_float_rounding_and_no_more(value, kept):
    shares = np.full(12, 0.25, np.float32)
    shares[0] = value
    rows, _ = _kept(_one_table("head_stats", out_share=shares))
    assert len(rows) == (12 if kept else 11)


@pytest.mark.parametrize("column", ["request_id", "layer", "head"])
def test_a_null_key_rejects_the_row_a_null_statistic_is_stored(column):
    batch = _one_table("head_stats")
    mask = np.zeros(12, np.uint8)
    mask[[1, 7]] = 1
    for col in batch.tables[0].columns:
        if col.name in (column, "entropy"):
            col.null_mask = mask.tobytes()
    rows, reason = _kept(batch)
    assert len(rows) == 10 and reason == f"head_stats.{column}: 2 rows NULL"
    assert all(r["entropy"] is not None for r in rows)


def test_batch_row_cap():
    table = pb.Table(name="requests", num_rows=MAX_BATCH_ROWS)
    with pytest.raises(IngestError) as at_cap:
        decode_batch(pb.TelemetryBatch(seq=1, tables=[table]))
    table.num_rows = MAX_BATCH_ROWS + 1
    with pytest.raises(IngestError) as over:
        decode_batch(pb.TelemetryBatch(seq=1, tables=[table]))
    assert at_cap.value.code is not ErrorCode.TOO_MANY_ROWS   # at the cap: judged on its columns
    assert over.value.code is ErrorCode.TOO_MANY_ROWS and "at most 4000000" in over.value.message


def test_model_shape_comes_from_the_registration(tmp_path):
    path = str(tmp_path / "shape.duckdb")
    store = Store(path)
    store.register_agent(Registration(agent_id="a", model={"num_layers": 3, "num_heads": 4}))
    assert store.model_shape("a") == ModelShape(3, 4)
    assert store.model_shape("never-said-hello") == ModelShape(0, 0)
    store.close()
    store = Store(path)   # after a restart, from the agents table until the agent's next hello
    assert store.model_shape("a") == ModelShape(3, 4)
    store.close()
