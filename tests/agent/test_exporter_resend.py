"""The exporter keeps what was sent and not acknowledged, and resends it after a reconnect with
its original (pid, seq): with the control plane's de-duplication, every row is stored exactly
once, across a SIGKILL of the control plane, a restart on the same port and DuckDB file, and a
server that stored batches without acking them. Bounded: past the count or byte bound the
oldest unacked batches are lost, and counted."""
from __future__ import annotations

import time

import pytest

from headroom_sidecar.agent import wire
from headroom_sidecar.agent.batching import Inflight
from headroom_sidecar.agent.exporter import BatchExporter
from headroom_sidecar.agent.settings import AgentSettings
from headroom_sidecar.controlplane.server import InboundKind
from tests.agent.test_exporter import (LAYERS, MODEL, check_accounting, record, request_ids,
                                       wait_until)
from tests.controlplane.cpprocess import ControlPlaneProcess

pytestmark = pytest.mark.timeout(180)


def agent_settings(**overrides) -> AgentSettings:
    base = dict(flush_interval_ms=50, batch_max_records=16, queue_max_records=100_000,
                backoff_initial_ms=20, backoff_max_ms=200, shutdown_timeout_ms=5000)
    return AgentSettings(**{**base, **overrides})


def exporter(target: str, settings: AgentSettings = None, **kw) -> BatchExporter:
    settings = settings or agent_settings()
    return BatchExporter(settings, wire.make_hello("agent-r", MODEL, "unavailable: test",
                                                   settings), target, **kw)


def in_flight(ex: BatchExporter) -> int:
    c = ex.counters()
    return c.sent_batches - c.acked_batches - c.failed_batches


# ------------------------------------------------------------------ kill -9 and restart
def test_sigkill_with_batches_in_flight_then_restart_loses_no_row_and_stores_none_twice(tmp_path):
    cp = ControlPlaneProcess(tmp_path / "cp.duckdb")
    ex = exporter(cp.address)
    try:
        for i in range(200):
            ex.submit(record(i, traced=i % 4 == 0))
        assert ex.flush(20_000)
        cp.pause()                         # acks stop: what is sent now stays unacked
        for i in range(200, 300):
            ex.submit(record(i, traced=i % 4 == 0))
        assert wait_until(lambda: in_flight(ex) >= 2), ex.counters()
        cp.kill9()                         # no cleanup runs: the stream just breaks
        assert wait_until(lambda: not ex.counters().connected)
        for i in range(300, 400):          # produced while the control plane is down
            ex.submit(record(i, traced=i % 4 == 0))
        cp.start()                         # same port, same file
        assert ex.flush(30_000), ex.counters()
        c = ex.counters()
    finally:
        ex.shutdown(5000)
        cp.stop()
    ids = [r for (r,) in cp.rows("SELECT request_id FROM requests ORDER BY 1")]
    layers = cp.rows("SELECT count(*), count(DISTINCT (request_id, layer)) FROM layer_stats")[0]
    assert ids == list(range(400))                        # 0 lost, none twice
    assert layers == (100 * LAYERS, 100 * LAYERS)         # traced rows: once each too
    assert c.resent_batches >= 2 and c.resent_records >= 2
    assert (c.lost_records, c.failed_batches, c.dropped_records) == (0, 0, 0)
    assert c.acked_records == 400 and c.reconnects >= 1
    check_accounting(c)


# ------------------------------------------------------------------ stored but not acked
def test_batch_stored_but_not_acked_is_resent_and_stored_once(server):
    """The store lock held: batches reach the writer but no ack comes; the ack timeout breaks
    the stream, the resend goes out on a new one, and when the writer runs it stores the first
    copy and recognises the resent one as a duplicate."""
    ex = exporter(server.address, ack_timeout_s=0.5)
    try:
        # One batch first: the hello (it needs the store lock too) is registered, and the
        # server's first decode (lazy imports) is done before the ack timeout starts to count.
        ex.submit(record(0))
        assert ex.flush(10_000)
        server.store._lock.acquire()
        try:
            for i in range(1, 65):         # 4 batches of 16: the whole in-flight window
                ex.submit(record(i))
            assert wait_until(lambda: ex.counters().resent_batches >= 4), ex.counters()
        finally:
            server.store._lock.release()
        assert ex.flush(20_000)
        c = ex.counters()
        ids = request_ids(server.address)
    finally:
        ex.shutdown(5000)
    assert ids == list(range(65))
    assert server.state.stats.duplicates >= 4
    assert (c.lost_records, c.acked_records) == (0, 65)
    check_accounting(c)


# ------------------------------------------------------------------ the bound
@pytest.mark.parametrize("max_batches, lost_batches", [(4, 0), (3, 1)])
def test_resend_count_bound_drops_the_oldest_past_it(server, max_batches, lost_batches):
    """4 unacked batches when the stream breaks: a bound of exactly 4 keeps all of them."""
    settings = agent_settings(flush_interval_ms=60_000)   # batches go only when full: 16 each
    ex = exporter(server.address, settings, ack_timeout_s=0.5, resend_max_batches=max_batches)
    try:
        for i in range(16):                # one full batch, acked: registered and warm
            ex.submit(record(i))
        assert wait_until(lambda: ex.counters().acked_batches == 1)
        server.store._lock.acquire()
        try:
            for i in range(16, 80):
                ex.submit(record(i))
            assert wait_until(lambda: ex.counters().resent_batches >= 1), ex.counters()
            c = ex.counters()
        finally:
            server.store._lock.release()
    finally:
        ex.shutdown(5000)
    assert c.sent_batches == 5
    assert (c.failed_batches, c.lost_records) == (lost_batches, 16 * lost_batches)
    assert c.resent_batches >= 4 - lost_batches


def _kept_after_trim(ex: BatchExporter, sizes_bytes: list[int]) -> list[int]:
    """Puts unacked batches of these sizes (seq 1..n, oldest first) and applies the bound."""
    buffer = ex._buffer
    with buffer.lock:
        for seq, size in enumerate(sizes_bytes, start=1):
            buffer.inflight[seq] = Inflight(records=1, sent_at=time.monotonic(), size_bytes=size)
    buffer.trim_unacked()
    with buffer.lock:
        kept = list(buffer.inflight)
        buffer.inflight.clear()
    return kept


@pytest.mark.parametrize("sizes, kept", [([100, 100, 100], [1, 2, 3]),      # exactly the bound
                                         ([100, 100, 101], [2, 3]),         # one byte over
                                         ([301], []),                       # alone too big
                                         ([100, 100, 100, 1], [2, 3, 4])])  # count: 4 > 3
def test_resend_byte_and_count_bounds_at_the_boundary(dead_target, sizes, kept):
    ex = exporter(f"127.0.0.1:{dead_target.getsockname()[1]}", resend_max_batches=3,
                  resend_max_bytes=300)
    try:
        assert _kept_after_trim(ex, sizes) == kept
        c = ex.counters()
        assert (c.failed_batches, c.lost_records) == (len(sizes) - len(kept),
                                                      len(sizes) - len(kept))
    finally:
        ex.shutdown(200)


def test_negative_bounds_are_refused():
    with pytest.raises(ValueError, match="resend_max_bytes=-1"):
        exporter("127.0.0.1:1", resend_max_bytes=-1)


# ------------------------------------------------------------------ the hello's active plan
@pytest.mark.parametrize("active, expected", [(("plan-a", "ab" * 32), ("plan-a", "ab" * 32)),
                                              (None, ("", ""))])
def test_every_hello_says_the_plan_the_agent_runs_now(server, active, expected):
    hellos = []
    server.state.on(InboundKind.HELLO, lambda agent, hello: hellos.append(
        (hello.active_plan_id, hello.active_plan_hash)))
    ex = exporter(server.address, active_plan=lambda: active)
    try:
        assert wait_until(lambda: len(hellos) == 1)
    finally:
        ex.shutdown(2000)
    assert hellos == [expected]


def test_every_hello_lists_the_class_plans_and_a_failing_callback_lists_none(server):
    hellos = []
    server.state.on(InboundKind.HELLO, lambda agent, hello: hellos.append(
        [(c.query_class, c.plan_id, c.plan_hash) for c in hello.class_plans]))
    classes = [("code", "plan-c", "cd" * 32), ("grounded", "plan-g", "ef" * 32)]
    for n, callback in enumerate((lambda: classes, lambda: 1 / 0), start=1):
        ex = exporter(server.address, class_plans=callback)
        try:
            assert wait_until(lambda: len(hellos) == n)
        finally:
            ex.shutdown(2000)
    assert hellos == [classes, []]


def test_a_failing_active_plan_callback_still_connects(server):
    hellos = []
    server.state.on(InboundKind.HELLO, lambda agent, hello: hellos.append(hello.active_plan_id))
    ex = exporter(server.address, active_plan=lambda: 1 / 0)
    try:
        ex.submit(record(0))
        assert ex.flush(10_000)
    finally:
        ex.shutdown(2000)
    assert hellos == [""] and request_ids(server.address) == [0]

