"""A hello's registration goes through the ingest writer (controlplane/server.py `_register`):
while it waits for the store, the stream holds no worker, so a fleet's hellos wait together
and are written in a few transactions; the stream reads on only once it is stored; a stream
that ends meanwhile leaves its agent marked disconnected; a failed registration ends the
stream with STORE_FAILED."""
from __future__ import annotations


import duckdb
import grpc
import pytest

from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings
from headroom_sidecar.controlplane.store import BatchJob, Store
from tests.controlplane import helpers as h

AGENTS = 3


@pytest.fixture
def server(tmp_path):
    # One stream worker: were a waiting registration to hold it, the others could not say hello.
    running = start_server(ServerSettings(db_path=str(tmp_path / "reg.duckdb"), port=0,
                                          stream_workers=1))
    yield running
    running.stop(grace_s=0.5)


def _waiting(server) -> int:
    """Streams whose registration is queued and not stored yet."""
    with server.state._lock:
        sessions = list(server.state._open)
    return sum(1 for s in sessions if s.registration is not None and not s.registration.done())


def _agents(server) -> dict:
    with server.store.reader() as cur:
        return dict(cur.execute("SELECT agent_id, connected FROM agents").fetchall())


def test_hellos_wait_for_the_store_together_holding_no_worker(server):
    streams = [h.AgentStream(server.address) for _ in range(AGENTS)]
    try:
        with server.store.transaction():        # a long write: the writer cannot store
            for i, stream in enumerate(streams):
                stream.send(h.hello(f"agent-{i}", pid=100 + i))
            assert h.wait_until(lambda: _waiting(server) == AGENTS, 10)
            assert _agents(server) == {}
        assert h.wait_until(lambda: _agents(server) == {f"agent-{i}": True
                                                         for i in range(AGENTS)}, 10)
        streams[0].send(h.batch(1, h.tables(h.records(2))))
        assert streams[0].recv().ack.rows_stored > 0
    finally:
        for stream in streams:
            stream.close()


def test_a_batch_after_hello_is_read_only_once_the_hello_is_stored(server):
    with h.AgentStream(server.address) as stream:
        with server.store.transaction():
            stream.send(h.hello())
            stream.send(h.batch(1, h.tables(h.records(2))))
            assert h.wait_until(lambda: _waiting(server) == 1, 10)
            w = server.state.writer
            assert h.wait_until(lambda: w.pending_batches() == 0, 10)   # registration taken
            assert not h.wait_until(lambda: w.pending_batches() > 0, 0.5)   # batch not read
        assert stream.recv().ack.seq == 1
        assert _agents(server) == {"agent-1": True}


def test_a_stream_that_ends_before_its_hello_is_stored_leaves_the_agent_disconnected(server):
    # The writer parked in a job's callback: the store's lock stays free (a closing stream
    # could mark its agent disconnected at once) but nothing more is written.
    held = h.Held(lambda hold: server.state.writer.submit(BatchJob("nobody", 0), hold,
                                                          alive=lambda: True))
    try:
        stream = h.AgentStream(server.address)
        stream.send(h.hello())
        assert h.wait_until(lambda: _waiting(server) == 1, 10)
        stream.close(timeout_s=0.5)
        assert _agents(server) == {}
    finally:
        held.release.set()
    # The closing stream waited for the registration, then marked the agent disconnected.
    assert h.wait_until(lambda: _agents(server) == {"agent-1": False}, 10)
    assert h.wait_until(lambda: server.state.agent_streams() == 0, 10)


def test_a_registration_the_store_refuses_ends_the_stream(server, monkeypatch):
    def refuse(self, cur, reg, now):
        raise duckdb.IOException("disk full (test)")
    monkeypatch.setattr(Store, "_register", refuse)
    with h.AgentStream(server.address) as stream:
        stream.send(h.hello())
        reply = stream.recv()
        assert reply.error.code == "STORE_FAILED" and "disk full (test)" in reply.error.message
        assert stream.wait_end() is grpc.StatusCode.OK
    assert _agents(server) == {}
