"""agent/exporter.py against the real control plane (gRPC on localhost, a DuckDB file in tmp_path).

Timing assertions are deliberately generous (the CI machine is shared); what they check is
behaviour: the hot path never waits for the network, and every record is accounted for.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from headroom_sidecar.agent import wire
from headroom_sidecar.agent.exporter import BatchExporter, NoopExporter, make_exporter
from headroom_sidecar.agent.fingerprint import ModelInfo
from headroom_sidecar.agent.records import GpuSample, RequestRecord, TraceArrays
from headroom_sidecar.agent.settings import AgentSettings
from headroom_sidecar.controlplane.query import QueryClient
from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings
from tests.controlplane.helpers import wait_until  # noqa: F401 (other agent tests import it here)

LAYERS, HEADS = 2, 3
MODEL = ModelInfo(fingerprint="ab" * 32, name="tiny", architecture="LlamaForCausalLM",
                  num_layers=LAYERS, num_heads=HEADS, num_kv_heads=1, head_dim=8, hidden_size=24,
                  intermediate_size=48, num_parameters=1234, dtype="float32", device="cpu")


# ------------------------------------------------------------------ builders
def agent_settings(**overrides) -> AgentSettings:
    base = dict(flush_interval_ms=50, batch_max_records=64, backoff_initial_ms=20,
                backoff_max_ms=200, shutdown_timeout_ms=5000)
    return AgentSettings(**{**base, **overrides})


def make_trace(seed: int, layers: int = LAYERS, heads: int = HEADS) -> TraceArrays:
    rng = np.random.default_rng(seed)
    share = rng.random((layers, heads), dtype=np.float32) + 0.1              # [L, H]
    return TraceArrays(
        head_entropy=rng.random((layers, heads), dtype=np.float32),
        head_max_weight=rng.random((layers, heads), dtype=np.float32),
        head_out_share=share / share.sum(axis=1, keepdims=True),
        layer_influence=rng.random(layers, dtype=np.float32),
        layer_attn_ms=rng.random(layers, dtype=np.float32),
        layer_mlp_ms=rng.random(layers, dtype=np.float32),
        mlp_frac_below=rng.random((layers, 3), dtype=np.float32),
        mlp_quantiles=rng.random((layers, 3), dtype=np.float32))


def record(i: int, traced: bool = False) -> RequestRecord:
    return RequestRecord(request_id=i, start_unix_us=1_700_000_000_000_000 + i, tenant="t",
                         route="/chat", prompt_tokens=i % 100, output_tokens=3, ttft_ms=1.0,
                         tpot_ms=0.5, latency_ms=2.0, trace=make_trace(i) if traced else None)


def exporter(settings: AgentSettings, target: str, agent_id: str = "agent-x",
             **kw) -> BatchExporter:
    hello = wire.make_hello(agent_id, MODEL, "unavailable: test", settings)
    return BatchExporter(settings, hello, target, **kw)


def query(address: str, sql: str) -> list[dict]:
    with QueryClient(address) as client:
        return client.query(sql).table.to_pylist()


def request_ids(address: str) -> list[int]:
    return [r["request_id"] for r in query(address, "SELECT request_id FROM requests ORDER BY 1")]


def check_accounting(c: wire.ExportCounters) -> None:
    """Every record enqueued is dropped, rejected, sent, or still queued; every sent one acked or lost."""
    assert c.enqueued_records == c.dropped_records + c.rejected_records + c.sent_records + c.queue_len
    assert c.sent_records >= c.acked_records + c.lost_records


# ------------------------------------------------------------------ delivery
@pytest.mark.parametrize("n, traced_every", [(1, 1), (300, 3)])
def test_records_arrive_as_rows(server, n, traced_every):
    ex = exporter(agent_settings(), server.address)
    try:
        for i in range(n):
            ex.submit(record(i, traced=i % traced_every == 0))
        ex.submit_gpu(GpuSample(ts_unix_us=1, device_index=0, available=False))
        assert ex.flush(10_000)
        c = ex.counters()
    finally:
        assert ex.shutdown(5000)
    traced = len(range(0, n, traced_every))
    assert request_ids(server.address) == list(range(n))
    counts = query(server.address, "SELECT (SELECT count(*) FROM head_stats) AS heads, "
                   "(SELECT count(*) FROM layer_stats) AS layers, "
                   "(SELECT count(*) FROM gpu_samples) AS gpu")[0]
    assert counts == {"heads": traced * LAYERS * HEADS, "layers": traced * LAYERS, "gpu": 1}
    assert (c.enqueued_records, c.acked_records, c.dropped_records, c.lost_records) == (n, n, 0, 0)
    assert c.acked_rows == n + traced * LAYERS * (HEADS + 2) + 1   # requests+heads+layers+mlp+gpu
    assert c.sent_batches >= -(-n // 64) and c.connected and c.reconnects == 0
    check_accounting(c)


def test_values_survive_the_trip(server):
    ex = exporter(agent_settings(), server.address, agent_id="agent-values")
    ex.submit(record(7, traced=True))
    assert ex.flush(10_000) and ex.shutdown(5000)
    rows = query(server.address, "SELECT agent_id, layer, head, entropy FROM head_stats "
                 "WHERE request_id = 7 ORDER BY layer, head")
    expected = make_trace(7).head_entropy.reshape(-1)                      # [L * H]
    assert [r["agent_id"] for r in rows] == ["agent-values"] * LAYERS * HEADS
    assert [(r["layer"], r["head"]) for r in rows] == [(l, h) for l in range(LAYERS) for h in range(HEADS)]
    np.testing.assert_allclose([r["entropy"] for r in rows], expected, rtol=1e-6)
    agent = query(server.address, "SELECT fingerprint, num_layers, gpu_status FROM agents")
    assert agent == [{"fingerprint": MODEL.fingerprint, "num_layers": LAYERS,
                      "gpu_status": "unavailable: test"}]


def test_malformed_record_is_rejected_and_the_rest_delivered(server):
    bad = record(1, traced=True)
    bad.trace.layer_influence = np.zeros(LAYERS + 5, dtype=np.float32)   # wrong length: [L + 5]
    ex = exporter(agent_settings(), server.address)
    for r in (record(0), bad, record(2)):
        ex.submit(r)
    assert ex.flush(10_000) and ex.shutdown(5000)
    c = ex.counters()
    assert request_ids(server.address) == [0, 2]
    assert (c.rejected_records, c.acked_records) == (1, 2)
    check_accounting(c)


def test_heartbeats_update_counters_in_the_db(server):
    ex = exporter(agent_settings(), server.address, agent_id="agent-hb")
    try:
        for i in range(10):
            ex.submit(record(i))
        assert ex.flush(10_000)

        # The batch carried counters taken before it was sent (sent_records=0); only a later
        # heartbeat can bring sent_records=10 to the agents table.
        def stored():
            row = query(server.address, "SELECT enqueued_records, sent_records, connected "
                                        "FROM agents WHERE agent_id = 'agent-hb'")
            return row[0] if row else {}
        assert wait_until(lambda: stored() == {"enqueued_records": 10, "sent_records": 10,
                                               "connected": True}), stored()
        assert ex.counters().heartbeats >= 1
    finally:
        ex.shutdown(5000)


# ------------------------------------------------------------------ queue and hot path
def test_queue_drops_the_oldest_when_full(tmp_path, dead_target):
    port = dead_target.getsockname()[1]
    ex = exporter(agent_settings(queue_max_records=100), f"127.0.0.1:{port}")
    try:
        for i in range(250):
            ex.submit(record(i))
        c = ex.counters()
        assert (c.enqueued_records, c.dropped_records, c.queue_len) == (250, 150, 100)
        assert wait_until(lambda: ex.counters().connect_failures >= 1)
        # The control plane comes up on that address: what was kept is the newest 100.
        dead_target.close()
        running = start_server(ServerSettings(db_path=str(tmp_path / "cp.duckdb"), port=port))
        try:
            assert ex.flush(15_000)
            assert request_ids(running.address) == list(range(150, 250))
        finally:
            ex.shutdown(5000)
            running.stop(0.5)
    finally:
        ex.shutdown(1000)
    check_accounting(ex.counters())


@pytest.fixture(params=["refused", "silent"])
def unreachable(request, dead_target):
    """refused: nothing listens; silent: TCP accepts (backlog) but HTTP/2 never answers."""
    if request.param == "silent":
        dead_target.listen(64)
    return f"127.0.0.1:{dead_target.getsockname()[1]}"


def test_submit_never_waits_for_an_unreachable_control_plane(unreachable):
    ex = exporter(agent_settings(queue_max_records=1000), unreachable)
    try:
        started = time.perf_counter()
        for i in range(10_000):
            ex.submit(record(i))
        elapsed_s = time.perf_counter() - started
        c = ex.counters()
    finally:
        ex.shutdown(500)
    # ~10 ms of work; a submit that waited on a connect attempt (tens of ms to 5 s) would not fit.
    assert elapsed_s < 2.0, f"10,000 submits took {elapsed_s:.2f} s"
    assert (c.enqueued_records, c.dropped_records, c.queue_len) == (10_000, 9_000, 1_000)
    assert c.sent_records == 0 and not c.connected


@pytest.mark.parametrize("deadline_ms", [300, 1500])
def test_shutdown_returns_by_its_deadline_when_unreachable(unreachable, deadline_ms):
    ex = exporter(agent_settings(), unreachable)
    for i in range(50):
        ex.submit(record(i))
    started = time.monotonic()
    delivered = ex.shutdown(deadline_ms)
    elapsed_ms = (time.monotonic() - started) * 1000
    assert not delivered
    assert elapsed_ms < deadline_ms + 250, f"shutdown({deadline_ms}) took {elapsed_ms:.0f} ms"
    assert not ex._worker.is_alive()
    assert ex.counters().queue_len == 50   # never sent, still accounted for


# ------------------------------------------------------------------ outages
def test_control_plane_restart_on_the_same_port_and_file(tmp_path):
    db = str(tmp_path / "cp.duckdb")
    first = start_server(ServerSettings(db_path=db, port=0))
    port = first.port
    ex = exporter(agent_settings(queue_max_records=200), first.address)
    try:
        for i in range(100):
            ex.submit(record(i))
        assert ex.flush(10_000)
        for i in range(100, 150):          # some of these may be in flight when it dies
            ex.submit(record(i))
        first.stop(grace_s=0)
        assert wait_until(lambda: not ex.counters().connected)
        for i in range(150, 600):          # while down: queued, oldest dropped
            ex.submit(record(i))
            if i % 50 == 0:
                time.sleep(0.02)
        second = start_server(ServerSettings(db_path=db, port=port))
        try:
            assert ex.flush(15_000)
            c = ex.counters()
            ids = request_ids(second.address)
        finally:
            ex.shutdown(5000)
            second.stop(0.5)
    finally:
        ex.shutdown(500)
    assert c.reconnects >= 1 and c.connect_failures >= 1
    assert c.enqueued_records == 600 and c.queue_len == 0
    check_accounting(c)
    # Stored rows are exactly the acked ones, plus lost ones the server stored before dying.
    assert c.acked_records <= len(ids) <= c.acked_records + c.lost_records
    assert len(ids) == len(set(ids))                     # nothing stored twice
    assert c.dropped_records >= 600 - 150 - 200          # the queue held at most 200 while down
    assert ids[-200:] == list(range(400, 600))          # the newest records made it after restart
    assert len(ids) + c.dropped_records + c.lost_records >= 600


def test_stalled_control_plane_times_out_and_the_batch_in_flight_is_resent(server):
    """A server that stops acking: the stream is dropped after ack_timeout_s, the unacked batch
    is resent on the next stream with its seq, and the server stores it once (de-duplication
    by (agent, pid, seq)): nothing lost, nothing twice."""
    ex = exporter(agent_settings(), server.address, ack_timeout_s=0.5)
    try:
        ex.submit(record(0))
        assert ex.flush(10_000)
        server.store._lock.acquire()   # the store's write lock: no batch is stored or acked now
        try:
            for i in range(1, 11):
                ex.submit(record(i))
            assert wait_until(lambda: ex.counters().resent_batches >= 1)
        finally:
            server.store._lock.release()
        for i in range(11, 21):
            ex.submit(record(i))
        assert ex.flush(10_000)
        c = ex.counters()
        ids = request_ids(server.address)
    finally:
        ex.shutdown(5000)
    assert c.reconnects >= 1 and c.lost_records == 0 and c.failed_batches == 0
    check_accounting(c)
    assert ids == list(range(21))                        # each once: the resend was de-duplicated
    assert c.acked_records == 21 and server.state.stats.duplicates >= 1


# ------------------------------------------------------------------ control messages
def test_control_messages_reach_on_control_and_replies_reach_the_server(server):
    from headroom_sidecar.controlplane.server import InboundKind
    from headroom_sidecar.proto import headroom_pb2 as pb
    got, statuses = [], []
    server.state.on(InboundKind.PLAN_STATUS, lambda agent, msg: statuses.append((agent, msg)))
    ex = exporter(agent_settings(), server.address, agent_id="agent-ctl", on_control=got.append)
    try:
        assert wait_until(lambda: "agent-ctl" in server.state.connected_agents())
        plan = pb.Plan(plan_id="p1", version=2, document_json="{}", sha256="00" * 32)
        assert server.state.send_to_agent("agent-ctl", pb.ControlMessage(apply_plan=plan))
        assert server.state.send_to_agent("agent-ctl", pb.ControlMessage(
            rollback=pb.Rollback(plan_id="p1", reason="quality")))
        assert wait_until(lambda: len(got) == 2)
        assert got == [wire.ApplyPlan(wire.PlanMessage("p1", 2, "{}", "00" * 32)),
                       wire.Rollback("p1", "quality")]
        ex.send_reply(wire.PlanStatusReport("p1", "00" * 32, wire.PlanState.APPLIED, "ok"))
        assert wait_until(lambda: len(statuses) == 1)
        agent, msg = statuses[0]
        assert (agent, msg.plan_id, msg.state, msg.detail) == ("agent-ctl", "p1",
                                                               pb.PlanStatus.APPLIED, "ok")
    finally:
        ex.shutdown(5000)


# ------------------------------------------------------------------ factory
def test_make_exporter_disabled_is_a_noop():
    ex = make_exporter(agent_settings(export_enabled=False), wire.make_hello(
        "a", MODEL, "", agent_settings()), target=None)
    assert isinstance(ex, NoopExporter)
    ex.submit(record(0))
    ex.submit_gpu(GpuSample(ts_unix_us=0, device_index=0, available=False))
    assert ex.counters() == wire.ExportCounters() and ex.flush(0) and ex.shutdown(0)


def test_make_exporter_enabled_needs_a_target():
    with pytest.raises(ValueError, match="no control plane address"):
        make_exporter(agent_settings(), wire.make_hello("a", MODEL, "", agent_settings()), "")
