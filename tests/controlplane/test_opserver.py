"""The operator port (controlplane/opserver.py): Query and Admin served apart from the agents'
event loop. Shown without timing: with the loop held still, the operator port answers and the
agents' port does not; Connect is not served there; a taken port fails the start and frees
what was opened; the local token is checked there as on the agents' port."""
from __future__ import annotations

import socket

import grpc
import pytest

from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.query import QueryClient, QueryError
from headroom_sidecar.controlplane.settings import ServerSettings
from headroom_sidecar.proto import headroom_pb2_grpc
from headroom_sidecar.proto.client import AdminClient
from headroom_sidecar.proto.credentials import ClientCredentials
from tests.controlplane import helpers as h


def _settings(tmp_path, **overrides) -> ServerSettings:
    return ServerSettings(**{"db_path": str(tmp_path / "op.duckdb"), "port": 0,
                             "operator_port": 0, **overrides})


@pytest.fixture
def server(tmp_path):
    running = start_server(_settings(tmp_path))
    yield running
    running.stop(grace_s=0.5)


def _operator_address(running) -> str:
    return f"127.0.0.1:{running.operator_port}"


def test_operator_port_answers_while_the_agents_loop_is_held(server):
    held = h.Held(server.host_loop.loop.call_soon_threadsafe)   # the agents' loop, still
    try:
        with QueryClient(_operator_address(server)) as q:
            assert q.query("SELECT 42 AS x", timeout_s=10).table.to_pylist() == [{"x": 42}]
        with AdminClient(_operator_address(server), timeout_s=10) as admin:
            assert list(admin.list_agents().agents) == []
        with QueryClient(server.address) as q:    # the agents' port waits on the held loop
            with pytest.raises(QueryError, match="Deadline|DEADLINE"):
                q.query("SELECT 1", timeout_s=1.0)
    finally:
        held.release.set()
    with QueryClient(server.address) as q:
        assert q.query("SELECT 1 AS one").table.to_pylist() == [{"one": 1}]


def test_both_ports_see_one_store(server):
    with h.AgentStream(server.address) as agent:
        agent.send(h.hello())
        agent.send(h.batch(1, h.tables(h.records(3))))
        assert agent.recv().ack.seq == 1
    with QueryClient(_operator_address(server)) as q:
        assert q.query("SELECT count(*) AS n FROM requests").table.to_pylist() == [{"n": 3}]


def test_connect_is_not_served_on_the_operator_port(server):
    with grpc.insecure_channel(_operator_address(server)) as channel:
        call = headroom_pb2_grpc.HeadroomStub(channel).Connect(iter([h.hello()]), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            next(call)
    assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_no_operator_port_unless_asked(tmp_path):
    running = start_server(_settings(tmp_path, operator_port=-1))
    try:
        assert running.operator_port == -1 and running.operators is None
    finally:
        running.stop(grace_s=0.5)


def test_a_taken_operator_port_fails_the_start_and_frees_the_agents_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"operator port: .*cannot listen on 127.0.0.1:{port}"):
            start_server(_settings(tmp_path, operator_port=port))
    running = start_server(_settings(tmp_path, operator_port=-1))   # the file was closed
    running.stop(grace_s=0.5)


def test_the_local_token_is_checked_on_the_operator_port(tmp_path):
    running = start_server(_settings(tmp_path, local_token="s3cret-s3cret"))
    try:
        address = _operator_address(running)
        with QueryClient(address, credentials=ClientCredentials()) as q:
            with pytest.raises(QueryError, match="local token"):
                q.query("SELECT 1")
        with QueryClient(address, credentials=ClientCredentials(local_token="s3cret-s3cret")) as q:
            assert q.query("SELECT 1 AS one").table.to_pylist() == [{"one": 1}]
    finally:
        running.stop(grace_s=0.5)


def test_operator_calls_share_the_limit_across_ports(tmp_path):
    running = start_server(_settings(tmp_path, max_workers=4, max_operator_calls=1))
    try:
        with h.HeldOperatorCalls(running.state) as held, \
                QueryClient(_operator_address(running)) as q:
            assert held.take()                           # the one slot, held elsewhere
            with pytest.raises(QueryError, match="max_operator_calls=1"):
                q.query("SELECT 1")
        with QueryClient(_operator_address(running)) as q:
            assert q.query("SELECT 1 AS one").table.to_pylist() == [{"one": 1}]
    finally:
        running.stop(grace_s=0.5)
