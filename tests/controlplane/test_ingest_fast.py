"""The small-batch fast paths of ingest and the store: they must decide exactly what the
row-by-row rules decide, and store the same thing.

- ingest_rules.all_clean says "nothing to refuse" only where check_numeric refuses nothing;
- decode_batch with the fast path on equals decode_batch with it forced off, on random
  batches full of boundary values, NaN, Inf, NULLs and out-of-model indices;
- a group of batches with counters writes each agent's own counters in one UPDATE.
"""
import math

import numpy as np
import pytest

from headroom_sidecar.agent.records import to_tables
from headroom_sidecar.controlplane import ingest, ingest_rules
from headroom_sidecar.controlplane.ingest import decode_batch
from headroom_sidecar.controlplane.ingest_rules import (COLUMN_RULES, ModelShape, RowCheck,
                                                        all_clean, check_numeric, rule_for)
from headroom_sidecar.controlplane.store import BatchJob, Counters, Registration, Store
from headroom_sidecar.proto import columnar
from headroom_sidecar.proto import headroom_pb2 as pb
from tests.controlplane import helpers as h

SHAPE = ModelShape(num_layers=3, num_heads=4)
# Values at and around every bound the rules use, and the non-finite ones.
EDGES = np.array([0.0, -0.0, 1.0, 1.001, 1.0011, -0.001, -0.0011, 2.001, 2.0011, 100.0, 100.5,
                  float(np.nextafter(np.float32(0), np.float32(-1))), 0.5, 3.0, 1e30,
                  math.nan, math.inf, -math.inf], dtype=np.float32)


def _numeric_cases():
    for table, rules in COLUMN_RULES.items():
        for column, rule in rules.items():
            if rule.max_chars is None:
                yield table, column, rule


@pytest.mark.parametrize("table, column, rule", list(_numeric_cases()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_all_clean_only_where_the_rules_refuse_nothing(table, column, rule):
    rng = np.random.default_rng(7)
    for trial in range(300):
        n = int(rng.integers(0, 6))
        if rule.index is not None:
            values = rng.integers(0, 6, n).astype(np.uint16)
        else:
            values = rng.choice(EDGES, n)
        for shape in (SHAPE, ModelShape(0, 0), None):
            check = RowCheck(table, n)
            null = check_numeric(check, column, values, np.zeros(n, bool), shape)
            refused_nothing = check.ok.all() and not null.any()
            if all_clean(rule_for(table, column), values, shape):
                assert refused_nothing, (table, column, values, shape)
            elif n and refused_nothing:
                # Not clean but nothing refused: only NaN in a nullable column becomes NULL.
                pytest.fail(f"{table}.{column} {values} {shape}: not clean, nothing refused")


def test_all_clean_at_the_bounds_exactly():
    fraction = rule_for("head_stats", "out_share")
    assert all_clean(fraction, np.array([np.float32(1.001)]), None)        # the bound itself
    assert not all_clean(fraction, np.array([np.float32(1.0011)]), None)
    assert all_clean(rule_for("requests", "ttft_ms"), np.array([0.0], np.float32), None)
    assert not all_clean(rule_for("requests", "ttft_ms"), np.array([-1e-30], np.float32), None)
    layer = rule_for("layer_stats", "layer")
    assert all_clean(layer, np.array([2], np.uint16), SHAPE)                # num_layers - 1
    assert not all_clean(layer, np.array([3], np.uint16), SHAPE)            # == num_layers
    assert not all_clean(layer, np.array([0], np.uint16), ModelShape(0, 0))


def _random_batch(rng) -> pb.TelemetryBatch:
    """h.records' tables with random cells replaced by edge values, some NULL masks."""
    tables = []
    for name, cols in to_tables(h.records(4, traced_every=2), h.gpu_samples(2)).columns.items():
        cols = {k: v.copy() for k, v in cols.items()}
        for k, v in cols.items():
            if v.dtype.kind == "f" and rng.random() < 0.5:
                v[rng.integers(0, len(v))] = rng.choice(EDGES)
            elif v.dtype.kind in "iu" and k in ("layer", "head") and rng.random() < 0.3:
                v[rng.integers(0, len(v))] = rng.integers(0, 6)
            elif v.dtype.kind == "O" and rng.random() < 0.2:
                v[0] = "x" * int(rng.choice([256, 257]))
        table = columnar.encode_table(name, cols)
        if rng.random() < 0.2:
            col = table.columns[int(rng.integers(0, len(table.columns)))]
            mask = np.zeros(table.num_rows, np.uint8)
            mask[rng.integers(0, table.num_rows)] = 1
            col.null_mask = mask.tobytes()
        tables.append(table)
    return pb.TelemetryBatch(seq=1, tables=tables)


def test_fast_path_decodes_exactly_as_the_rules(monkeypatch):
    rng = np.random.default_rng(3)
    batches = [_random_batch(rng) for _ in range(150)]
    fast = [decode_batch(b, SHAPE) for b in batches]
    monkeypatch.setattr(ingest, "all_clean", lambda *a: False)          # row by row only
    monkeypatch.setattr(ingest, "_PY_STRING_ROWS", -1)                  # Arrow lengths only
    slow = [decode_batch(b, SHAPE) for b in batches]
    assert sum(d.rows_rejected for d in slow) > 0 and any(d.reject_reason for d in slow)
    for f, s in zip(fast, slow):
        assert (f.num_rows, f.rows_rejected, f.reject_reason) == \
            (s.num_rows, s.rows_rejected, s.reject_reason)
        assert {k: t.to_pylist() for k, t in f.tables.items()} == \
            {k: t.to_pylist() for k, t in s.tables.items()}


def test_grouped_counters_land_per_agent_in_one_update(tmp_path):
    store = Store(str(tmp_path / "c.duckdb"))
    try:
        for agent in ("a", "b", "c"):
            store.register_agent(Registration(agent_id=agent, model={"num_layers": 3}))
        store.update_counters("c", Counters(sent_records=9, queue_len=1))
        batch = decode_batch(pb.TelemetryBatch(seq=1, tables=h.tables(h.records(2))))
        store.store_batches([
            BatchJob("a", 1, batch, Counters(sent_records=5)),
            BatchJob("b", 1, batch, Counters(sent_records=7, reconnects=2, queue_len=3)),
            BatchJob("a", 1, None, Counters(sent_records=6, sent_batches=2)),   # a's latest
            BatchJob("c", 1, None, None)])                     # last_seen only: counters kept
        with store.reader() as cur:
            rows = cur.execute("SELECT agent_id, sent_records, sent_batches, reconnects, "
                               "queue_len FROM agents ORDER BY agent_id").fetchall()
        assert rows == [("a", 6, 2, 0, 0), ("b", 7, 0, 2, 3), ("c", 9, 0, 0, 1)]
    finally:
        store.close()


def test_rules_table_is_cached_per_column():
    assert ingest._RULES["head_stats"]["out_share"] is ingest_rules.rule_for("head_stats",
                                                                             "out_share")


def test_a_group_attributes_every_row_to_its_agent(tmp_path):
    store = Store(str(tmp_path / "g.duckdb"))
    try:
        sizes = [("a", 1, 2), ("b", 1, 3), ("a", 2, 1), ("c", 1, 4), ("b", 2, 2)]
        jobs = [BatchJob(agent, 1, decode_batch(pb.TelemetryBatch(
                    seq=seq, tables=h.tables(h.records(n, traced_every=1)))))
                for agent, seq, n in sizes]
        store.store_batches(jobs)
        with store.reader() as cur:
            requests = dict(cur.execute("SELECT agent_id, count(*) FROM requests "
                                        "GROUP BY agent_id").fetchall())
            heads = dict(cur.execute("SELECT agent_id, count(*) FROM head_stats "
                                     "GROUP BY agent_id").fetchall())
        assert requests == {"a": 3, "b": 5, "c": 4}
        assert heads == {a: n * 12 for a, n in requests.items()}   # 3 layers x 4 heads each
    finally:
        store.close()


@pytest.mark.parametrize("strings", [[], [""], ["t0", "", "é" * 3, "日本語", "x" * 300],
                                     ["a"] * 1000])
def test_arrow_strings_equal_arrows_own_conversion(strings):
    import pyarrow as pa
    from headroom_sidecar.controlplane.batches import arrow_strings
    got = arrow_strings(strings)
    got.validate(full=True)
    assert got.equals(pa.array(strings, type=pa.string()))


def test_arrow_numbers_keep_type_and_values():
    from headroom_sidecar.controlplane.batches import arrow_numbers
    got = arrow_numbers([0, 7, 2 ** 64 - 1], "uint64")
    assert str(got.type) == "uint64" and got.to_pylist() == [0, 7, 2 ** 64 - 1]
    assert arrow_numbers([], "int32").to_pylist() == []


@pytest.mark.parametrize("inline_max_bytes", [0, 1 << 20])   # workers only / the loop only
def test_batches_and_errors_answered_on_either_path(tmp_path, inline_max_bytes):
    from headroom_sidecar.controlplane.app import start_server
    from headroom_sidecar.controlplane.settings import ServerSettings
    server = start_server(ServerSettings(db_path=str(tmp_path / "p.duckdb"), port=0,
                                         inline_max_bytes=inline_max_bytes))
    try:
        with h.AgentStream(server.address) as agent:
            agent.send(h.hello())
            agent.send(h.batch(1, h.tables(h.records(3))))
            agent.send(h.batch(2, [h.tables(h.records(1))[0]] * 2))   # duplicate table
            agent.send(h.batch(3, h.tables(h.records(2))))
            replies = [agent.recv() for _ in range(3)]
        # A refusal is answered at once, acks once stored: acks in order, one error.
        acks = [r.ack for r in replies if r.HasField("ack")]
        assert [a.seq for a in acks] == [1, 3] and all(a.rows_stored > 0 for a in acks)
        assert [r.error.code for r in replies if r.HasField("error")] == ["DUPLICATE_TABLE"]
    finally:
        server.stop(grace_s=0.5)


def test_inline_limit_is_validated():
    from headroom_sidecar.controlplane.settings import ServerSettings
    with pytest.raises(ValueError, match="inline_max_bytes"):
        ServerSettings(db_path="x.duckdb", inline_max_bytes=(1 << 20) + 1)
