"""2,000 mutated telemetry batches against a real server on localhost and a real DuckDB file:
every message is answered (ack or error, never INTERNAL), nothing bad is stored, and the
analysis and the planner still read the store. The seed is fixed: a failure replays."""
from __future__ import annotations

import math
import queue
import threading
from typing import Callable

import grpc
import numpy as np
import pytest

from headroom_sidecar.controlplane import analysis
from headroom_sidecar.controlplane.ingest_rules import COLUMN_RULES, MAX_LABEL_CHARS
from headroom_sidecar.controlplane.planner.candidates import CandidateScope, load_candidates
from headroom_sidecar.controlplane.schema import TELEMETRY_COLUMNS
from headroom_sidecar.controlplane.server import SERVICE_NAME
from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings
from headroom_sidecar.proto import headroom_pb2 as pb
from tests.controlplane import helpers as h

BATCHES = 2_000
SEED = 20_240_610
LAYERS, HEADS = h.MODEL.num_layers, h.MODEL.num_heads     # what the agent registers: 3, 4
FLOAT_COLUMNS = {t: [c for c, d in cols.items() if d == pb.FLOAT32]
                 for t, cols in TELEMETRY_COLUMNS.items()}
NULLABLE = {t: {c for c, r in rules.items() if r.nullable} for t, rules in COLUMN_RULES.items()}
_END = object()


# ---------------------------------------------------------------------- a raw agent stream
class RawStream:
    """The agent's end of Connect, sending bytes as they are (garbled ones too)."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 64 << 20)])
        call = self.channel.stream_stream(f"/{SERVICE_NAME}/Connect",
                                          request_serializer=lambda b: b,
                                          response_deserializer=pb.ControlMessage.FromString)
        self._out: queue.Queue = queue.Queue(maxsize=64)   # [bytes]: backpressure, bounded memory
        self.replies: queue.Queue = queue.Queue()
        self._call = call(iter(self._out.get, _END))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for msg in self._call:
                self.replies.put(msg)
        except grpc.RpcError as e:
            self.replies.put(e)

    def send(self, raw: bytes) -> None:
        self._out.put(raw)

    def close(self) -> None:
        self._out.put(_END)
        self._reader.join(10)
        self.channel.close()


# ---------------------------------------------------------------------- mutations
def _pick(rng, table: pb.Table, names=None) -> pb.Column:
    cols = [c for c in table.columns if names is None or c.name in names]
    return cols[int(rng.integers(len(cols)))] if cols else None


def _set_rows(rng, table: pb.Table, col: pb.Column, value) -> None:
    """Some rows of a numeric column get `value` (same dtype, same length)."""
    dt = {pb.FLOAT32: "<f4", pb.UINT16: "<u2", pb.UINT64: "<u8"}.get(col.dtype) if col else None
    if dt is None or not col.data or len(col.data) % np.dtype(dt).itemsize:
        return   # an earlier mutation already broke this column
    arr = np.frombuffer(col.data, dtype=dt).copy()
    rows = rng.choice(len(arr), size=max(1, len(arr) // 3), replace=False)
    arr[rows] = value(len(rows)) if callable(value) else value
    col.data = arr.tobytes()


def m_nan(rng, b):
    t = b.tables[int(rng.integers(len(b.tables)))]
    c = _pick(rng, t, FLOAT_COLUMNS.get(t.name, []))
    if c is not None:
        _set_rows(rng, t, c, rng.choice([np.nan, np.inf, -np.inf]))


def m_null_mask(rng, b):
    t = b.tables[int(rng.integers(len(b.tables)))]
    c = _pick(rng, t)
    rows = min(t.num_rows, 1 << 16)   # num_rows may already be a lie (m_row_count)
    mask = (rng.random(rows) < 0.3).astype(np.uint8)
    c.null_mask = mask.tobytes()


def m_index(rng, b):
    for t in b.tables:
        if t.name in ("head_stats", "layer_stats", "mlp_stats"):
            name = "head" if t.name == "head_stats" and rng.random() < 0.5 else "layer"
            lo = HEADS if name == "head" else LAYERS
            _set_rows(rng, t, _pick(rng, t, {name}),
                      lambda n: rng.choice([lo, 65535, int(rng.integers(lo, 65536))], size=n))


def m_long_string(rng, b):
    t = next((t for t in b.tables if t.name == "requests"), None)
    if t is None:
        return
    c = _pick(rng, t, {"tenant", "route", "query_class"})
    if c is None or not c.strings:
        return
    n = int(rng.choice([MAX_LABEL_CHARS, MAX_LABEL_CHARS + 1, 10_000,
                        int(rng.integers(100_000, 2_000_000))]))
    c.strings[int(rng.integers(len(c.strings)))] = "é" * n


def m_out_of_range(rng, b):
    t = b.tables[int(rng.integers(len(b.tables)))]
    c = _pick(rng, t, FLOAT_COLUMNS.get(t.name, []))
    if c is not None:
        _set_rows(rng, t, c, float(rng.choice([-1.0, -1e-3 - 1e-4, 1.5, 101.0, 3e38])))


def m_truncate(rng, b):
    t = b.tables[int(rng.integers(len(b.tables)))]
    c = _pick(rng, t)
    if c.strings:
        del c.strings[-1]
    else:
        c.data = c.data[:-int(rng.integers(1, 4))]


def m_wrong_type(rng, b):
    c = _pick(rng, b.tables[int(rng.integers(len(b.tables)))])
    c.dtype = int(rng.choice([d for d in pb.DType.values() if d != c.dtype]))


def m_row_count(rng, b):
    t = b.tables[int(rng.integers(len(b.tables)))]
    t.num_rows = int(rng.choice([0, t.num_rows + 1, max(0, t.num_rows - 1), 10**12]))


def m_structure(rng, b):
    t = b.tables[int(rng.integers(len(b.tables)))]
    kind = int(rng.integers(4))
    if kind == 0:
        t.name = "agents"
    elif kind == 1:
        t.columns.add().CopyFrom(t.columns[0])
    elif kind == 2:
        del t.columns[int(rng.integers(len(t.columns)))]
    else:
        b.tables.add().CopyFrom(t)


MUTATIONS: list[Callable] = [m_nan, m_null_mask, m_index, m_long_string, m_out_of_range,
                             m_truncate, m_wrong_type, m_row_count, m_structure]


def garble(rng, raw: bytes) -> bytes:
    data = bytearray(raw)
    if rng.random() < 0.5:
        return bytes(data[:int(rng.integers(len(data)))])
    for i in rng.integers(len(data), size=int(rng.integers(1, 8))):
        data[i] = int(rng.integers(256))
    return bytes(data)


def fuzzed_messages(rng, n: int):
    """n AgentMessage bytes: clean, mutated (1-3 mutations) or garbled."""
    bases = [h.tables(h.records(4, traced_every=2, first_id=10 * k + 1), h.gpu_samples(2))
             for k in range(8)]
    for seq in range(1, n + 1):
        b = pb.TelemetryBatch(seq=seq, tables=bases[seq % len(bases)], counters=h.counters())
        roll = rng.random()
        if roll >= 0.1:
            for m in rng.choice(len(MUTATIONS), size=int(rng.integers(1, 4))):
                MUTATIONS[m](rng, b)
        raw = pb.AgentMessage(batch=b).SerializeToString()
        yield garble(rng, raw) if 0.05 <= roll < 0.1 else raw


# ---------------------------------------------------------------------- the run
def _send_all(stream: RawStream, failed: list) -> None:
    try:
        for raw in fuzzed_messages(np.random.default_rng(SEED), BATCHES):
            stream.send(raw)
    except BaseException as e:   # shown by the fixture, not lost in a thread
        failed.append(e)
        raise


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("fuzz") / "f.duckdb")
    running = start_server(ServerSettings(db_path=db, port=0))
    stream = RawStream(running.address)
    try:
        stream.send(h.hello("fuzzer").SerializeToString())
        failed: list[BaseException] = []
        sender = threading.Thread(target=_send_all, args=(stream, failed), daemon=True)
        sender.start()
        replies = [stream.replies.get(timeout=30) for _ in range(BATCHES)]
        sender.join(10)
        assert not failed, failed
        yield running, replies
    finally:
        stream.close()
        running.stop(grace_s=0.5)


def test_every_batch_is_answered_and_none_crashes(fuzzed):
    running, replies = fuzzed
    assert not [r for r in replies if isinstance(r, Exception)]
    errors = [r.error.code for r in replies if r.WhichOneof("body") == "error"]
    acks = [r.ack for r in replies if r.WhichOneof("body") == "ack"]
    assert len(errors) + len(acks) == BATCHES
    assert "INTERNAL" not in errors and "STORE_FAILED" not in errors, set(errors)
    assert {"MALFORMED_MESSAGE", "BAD_COLUMN", "COLUMN_TYPE", "TOO_MANY_ROWS"} <= set(errors)
    # Acked batches with bad rows say how many and why; the clean ones store everything.
    partial = [a for a in acks if a.rows_rejected]
    assert len(partial) > 100 and all(a.reject_reason for a in partial)
    assert sum(a.rows_stored for a in acks) > 10_000
    assert running.state.stats.errors == len(errors)


def _count(cur, sql: str, params=()) -> int:
    return cur.execute(sql, list(params)).fetchone()[0]


def test_nothing_bad_is_stored(fuzzed):
    running, _ = fuzzed
    with running.store.reader() as cur:
        for table, columns in TELEMETRY_COLUMNS.items():
            assert _count(cur, f"SELECT count(*) FROM {table}") > 0, table
            for col in FLOAT_COLUMNS[table]:
                assert _count(cur, f"SELECT count(*) FROM {table} WHERE isnan({col}) "
                                   f"OR isinf({col})") == 0, f"{table}.{col}"
            for col in set(columns) - NULLABLE.get(table, set()):
                assert _count(cur, f"SELECT count(*) FROM {table} WHERE {col} IS NULL") == 0, \
                    f"{table}.{col}"
            for col, rule in COLUMN_RULES.get(table, {}).items():
                if math.isfinite(rule.lo) or math.isfinite(rule.hi):
                    assert _count(cur, f"SELECT count(*) FROM {table} WHERE {col} < ? "
                                       f"OR {col} > ?", (rule.lo, rule.hi)) == 0, f"{table}.{col}"
        for table in ("head_stats", "layer_stats", "mlp_stats"):
            assert _count(cur, f"SELECT max(layer) FROM {table}") == LAYERS - 1
        assert _count(cur, "SELECT max(head) FROM head_stats") == HEADS - 1
        assert _count(cur, "SELECT max(greatest(length(tenant), length(route), "
                           "length(query_class))) FROM requests") == MAX_LABEL_CHARS


def test_analysis_and_planner_still_read_the_store(fuzzed):
    running, _ = fuzzed
    with running.store.reader() as cur:
        assert analysis.least_used_heads(cur, limit=100)
        assert {x.layer for x in analysis.lowest_influence_layers(cur)} == set(range(LAYERS))
        assert analysis.sparsest_mlps(cur) and analysis.latency_by_query_class(cur)
        cands = load_candidates(cur, CandidateScope(agent_ids=("fuzzer",)))
    assert cands.num_layers == LAYERS and cands.traced_requests > 0
    assert set(cands.heads_per_layer) == set(range(LAYERS))
    assert all(0 <= c.layer < LAYERS and 0 <= c.head < HEADS for c in cands.heads)


# ---------------------------------------------------------------------- the agent hears about it
def test_the_ack_tells_the_agent_what_was_refused_and_the_exporter_counts_it(tmp_path):
    from headroom_sidecar.agent import wire
    from headroom_sidecar.agent.exporter import BatchExporter
    from headroom_sidecar.agent.fingerprint import ModelInfo
    from headroom_sidecar.agent.settings import AgentSettings
    running = start_server(ServerSettings(db_path=str(tmp_path / "cp.duckdb"), port=0))
    # The agent registers 2 layers and then traces 3 (a bug, or a lie): layer 2 is refused.
    model = ModelInfo(**{**{f.name: getattr(h.MODEL, f.name) for f in
                            pb.ModelInfo.DESCRIPTOR.fields}, "num_layers": 2})
    settings = AgentSettings(flush_interval_ms=50, batch_max_records=64, backoff_initial_ms=20,
                             backoff_max_ms=200, shutdown_timeout_ms=5000)
    ex = BatchExporter(settings, wire.make_hello("liar", model, "unavailable: test", settings),
                       running.address)
    try:
        for rec in h.records(4, traced_every=2):   # 2 traced requests x 3 layers x 4 heads
            ex.submit(rec)
        assert ex.flush(10_000)
        c = ex.counters()
        with running.store.reader() as cur:
            assert cur.execute("SELECT max(layer) FROM layer_stats").fetchone()[0] == 1
    finally:
        assert ex.shutdown(5000)
        running.stop(grace_s=0.5)
    assert c.server_rejected_rows == 2 * (4 + 1 + 1)   # per request: 4 heads, 1 layer, 1 mlp row
    assert c.acked_rows == 4 + 2 * 2 * (4 + 1 + 1)


def test_what_slips_past_ingest_does_not_break_analysis_or_the_planner(tmp_path):
    """Rows written straight into the file (an older control plane, a manual INSERT)."""
    from headroom_sidecar.controlplane.ingest import decode_batch
    from headroom_sidecar.controlplane.store import Registration, Store
    store = Store(str(tmp_path / "cp.duckdb"))
    store.register_agent(Registration(agent_id="a", model={"num_layers": LAYERS,
                                                           "num_heads": HEADS}))
    store.store_batch("a", 1, decode_batch(pb.TelemetryBatch(seq=1, tables=h.tables(h.records(4)))))
    with store.transaction() as cur:
        cur.execute("INSERT INTO head_stats VALUES ('a', now(), 1, NULL, 0, 1, 1, 0.0), "
                    "('a', now(), 1, 0, NULL, 1, 1, 0.0), ('a', now(), 1, 65535, 0, 1, 1, 0.0), "
                    "('a', now(), 1, 0, 9, 1, 1, 0.0), ('a', now(), 1, 0, 1, 'nan', 'nan', 'nan')")
        cur.execute("INSERT INTO layer_stats VALUES ('a', now(), 1, NULL, 0.1, 1, 1), "
                    "('a', now(), 1, 65535, 0.0, 1, 1), ('a', now(), 1, 0, 'nan', 'nan', 1)")
        cur.execute("INSERT INTO mlp_stats VALUES ('a', now(), 1, 65535, 1, 1, 1, 0, 0, 0), "
                    "('a', now(), 1, 1, 'nan', 'nan', 'nan', 'nan', 'nan', 'nan')")
    with store.reader() as cur:
        heads = analysis.least_used_heads(cur, limit=100)
        layers = analysis.lowest_influence_layers(cur)
        assert {(x.layer, x.head) for x in heads} == {(l, h_) for l in range(LAYERS)
                                                     for h_ in range(HEADS)}
        assert {x.layer for x in layers} == set(range(LAYERS))
        assert {x.layer for x in analysis.sparsest_mlps(cur)} == set(range(LAYERS))
        cands = load_candidates(cur, CandidateScope(agent_ids=("a",)))
    store.close()
    assert cands.num_layers == LAYERS and set(cands.heads_per_layer) == set(range(LAYERS))
    assert all(math.isfinite(c.mean_out_share) for c in cands.heads)
    assert all(math.isfinite(c.mean_influence) and c.layer < LAYERS for c in cands.layers)
