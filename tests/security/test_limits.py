"""Resources: agent streams and operator calls have separate limits (neither starves the other),
a stream that never says hello is closed at the deadline, one agent certificate holds a bounded
number of streams, and oversized Query/Admin requests are refused."""
import time

import grpc
import pytest

from headroom_sidecar.controlplane.query import QueryError
from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings
from headroom_sidecar.proto import headroom_pb2 as pb
from tests.controlplane import helpers
from tests.security.conftest import SecureWorld, tls_settings

MAX_AGENT_STREAMS = 4


@pytest.fixture
def tight(pki, tmp_path):
    """4 agent streams, 4 Query/Admin calls at once; hello within 1.5 s."""
    settings = tls_settings(pki, str(tmp_path / "tight.duckdb"), max_workers=8,
                            max_operator_calls=8 - MAX_AGENT_STREAMS,
                            max_agent_streams=MAX_AGENT_STREAMS, max_streams_per_client=100,
                            hello_timeout_s=1.5, max_operator_request_bytes=4096)
    running = start_server(settings)
    yield SecureWorld(running, pki)
    running.stop(grace_s=0.5)


def test_idle_streams_beyond_the_limit_are_refused_and_query_still_answers(tight):
    streams = [tight.agent("agent-1") for _ in range(MAX_AGENT_STREAMS + 3)]   # never say hello
    try:
        assert helpers.wait_until(lambda: sum(s.status is not None for s in streams) == 3)
        refused = [s for s in streams if s.status is not None]
        assert {s.status for s in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert "max_agent_streams=4" in refused[0].details
        assert tight.server.state.agent_streams() == MAX_AGENT_STREAMS   # exactly the limit
        with tight.query_client() as q:     # operators keep their threads meanwhile
            assert q.query("SELECT 7 AS x").table.to_pylist() == [{"x": 7}]
        with tight.admin("vera") as admin:
            assert len(admin.list_agents().agents) == 0
        held = [s for s in streams if s.status is None]
        assert {s.wait_end(timeout_s=15) for s in held} == {grpc.StatusCode.DEADLINE_EXCEEDED}
        assert "no hello within hello_timeout_s=1.5" in held[0].details
        assert helpers.wait_until(lambda: tight.server.state.agent_streams() == 0)
    finally:
        for s in streams:
            s.close()
    with tight.agent("agent-1") as fresh:          # the slots are free again
        fresh.send(helpers.hello("agent-1"))
        fresh.send(helpers.batch(1, helpers.tables(helpers.records(1))))
        assert fresh.recv().ack.seq == 1


def test_a_stream_that_said_hello_outlives_the_deadline(tight):
    with tight.agent("agent-1") as s:
        s.send(helpers.hello("agent-1"))
        time.sleep(2.0)                             # past hello_timeout_s=1.5
        s.send(helpers.batch(1, helpers.tables(helpers.records(1))))
        assert s.recv().ack.seq == 1 and s.status is None


def test_per_client_stream_limit(pki, tmp_path):
    settings = tls_settings(pki, str(tmp_path / "pc.duckdb"), max_streams_per_client=2)
    running = start_server(settings)
    world = SecureWorld(running, pki)
    streams = [world.agent("agent-1") for _ in range(2)]
    try:
        assert helpers.wait_until(lambda: running.state.agent_streams() == 2)
        with world.agent("agent-1") as third:
            assert third.wait_end() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_streams_per_client=2" in third.details
        with world.agent("agent-2") as other:       # another agent is not affected
            other.send(helpers.hello("agent-2"))
            other.send(helpers.batch(1, helpers.tables(helpers.records(1))))
            assert other.recv().ack.seq == 1
    finally:
        for s in streams:
            s.close()
        running.stop(grace_s=0.5)


def test_operator_calls_beyond_their_share_are_refused(tight):
    share = tight.server.state.settings.max_operator_calls
    assert share == 8 - MAX_AGENT_STREAMS
    with helpers.HeldOperatorCalls(tight.server.state) as held, tight.query_client() as q:
        for _ in range(share - 1):                  # one slot left: the call goes through
            assert held.take()
        assert q.query("SELECT 1 AS ok").table.to_pylist() == [{"ok": 1}]
        assert held.take()                          # none left: refused at once
        with pytest.raises(QueryError, match="Query/Admin calls are running"):
            q.query("SELECT 1")


def _query_of_size(size_bytes: int) -> str:
    """SQL whose QueryRequest encodes to exactly size_bytes."""
    base = "SELECT 1 AS ok --"
    for pad in range(size_bytes):
        sql = base + "x" * pad
        n = pb.QueryRequest(sql=sql).ByteSize()
        if n == size_bytes:
            return sql
        assert n < size_bytes
    raise AssertionError(size_bytes)


def test_operator_request_size_limit_boundary(tight):
    with tight.query_client() as q:
        assert q.query(_query_of_size(4096)).table.to_pylist() == [{"ok": 1}]
        with pytest.raises(QueryError, match="exceeds max_operator_request_bytes=4096"):
            q.query(_query_of_size(4097))


@pytest.mark.parametrize("calls, ok", [(64, True), (65, False)])
def test_operator_calls_need_a_thread_each(tmp_path, calls, ok):
    # Agent streams hold no thread (grpc.aio): their limit is independent of max_workers.
    make = lambda: ServerSettings(db_path=str(tmp_path / "x.duckdb"), max_workers=64,
                                  max_operator_calls=calls, max_agent_streams=10_000)
    if ok:
        assert make().max_operator_calls == calls
    else:
        with pytest.raises(ValueError, match="max_operator_calls=65 exceeds max_workers=64"):
            make()
