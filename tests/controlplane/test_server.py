import threading
import time

import grpc
import numpy as np
import pytest

from headroom_sidecar.controlplane.ingest import ErrorCode
from headroom_sidecar.controlplane.server import InboundKind
from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings
from headroom_sidecar.proto import headroom_pb2 as pb
from tests.controlplane import helpers as h
from tests.controlplane.test_store import BAD


def _sql(server, sql, params=()):
    with server.store.reader() as cur:
        return cur.execute(sql, list(params)).fetchall()


def _connected(server, agent_id="agent-1"):
    rows = _sql(server, "SELECT connected FROM agents WHERE agent_id = ?", [agent_id])
    return rows[0][0] if rows else None


def test_hello_and_batches_are_stored_and_acked(server):
    recs = h.records(6)
    with h.AgentStream(server.address) as agent:
        agent.send(h.hello())
        agent.send(h.batch(1, h.tables(recs[:3], h.gpu_samples(2)), sent_records=3))
        agent.send(h.batch(2, h.tables(recs[3:]), sent_records=6))
        acks = [agent.recv().ack for _ in range(2)]
        # requests 3 + head 2x12 + layer 2x3 + mlp 2x3 + gpu 2; then 3 + 1x12 + 3 + 3
        assert [(a.seq, a.rows_stored) for a in acks] == [(1, 41), (2, 21)]
        assert _connected(server) is True
    counts = {t: _sql(server, f"SELECT count(*) FROM {t} WHERE agent_id = 'agent-1'")[0][0]
              for t in ("requests", "head_stats", "layer_stats", "mlp_stats", "gpu_samples")}
    assert counts == {"requests": 6, "head_stats": 36, "layer_stats": 9, "mlp_stats": 9,
                      "gpu_samples": 2}
    latency = [r[0] for r in _sql(server, "SELECT latency_ms FROM requests ORDER BY request_id")]
    assert latency == [10.0 * r.request_id for r in recs]
    share = _sql(server, "SELECT out_share FROM head_stats WHERE request_id = 5 ORDER BY layer, head")
    np.testing.assert_allclose([r[0] for r in share], recs[4].trace.head_out_share.reshape(-1))
    agent = _sql(server, "SELECT fingerprint, model_name, num_heads, hostname, pid, gpu_status, "
                         "sent_records, queue_len FROM agents")
    assert agent == [("f" * 64, "tiny-llama", 4, "host-a", 4242, "unavailable: no NVML", 6, 1)]


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_batch_gets_error_and_stores_nothing_and_stream_goes_on(server, case):
    table, code, fragment = BAD[case]
    with h.AgentStream(server.address) as agent:
        agent.send(h.hello())
        agent.send(h.batch(1, [h.tables(h.records(2))[-1], table]))   # a good mlp_stats first
        error = agent.recv().error
        assert (error.code, fragment in error.message) == (code.value, True)
        assert repr(table.name) in error.message
        assert _sql(server, "SELECT count(*) FROM mlp_stats")[0][0] == 0
        agent.send(h.batch(2, h.tables(h.records(2))))
        assert agent.recv().ack.seq == 2
    assert _sql(server, "SELECT count(*) FROM requests")[0][0] == 2


@pytest.mark.parametrize("first", [
    h.batch(1, h.tables(h.records(1))),
    pb.AgentMessage(heartbeat=pb.Heartbeat()),
    pb.AgentMessage(),
])
def test_first_message_must_be_hello(server, first):
    with h.AgentStream(server.address) as agent:
        agent.send(first)
        error = agent.recv().error
        assert error.code == ErrorCode.HELLO_REQUIRED.value
        assert agent.recv() is None   # the server ended the stream
    assert _sql(server, "SELECT count(*) FROM agents")[0][0] == 0


def test_hello_without_agent_id_is_refused(server):
    with h.AgentStream(server.address) as agent:
        agent.send(pb.AgentMessage(hello=pb.AgentHello(hostname="x")))
        assert agent.recv().error.code == ErrorCode.AGENT_ID_REQUIRED.value
        assert agent.recv() is None


def test_other_errors_keep_the_stream_open(server):
    with h.AgentStream(server.address) as agent:
        agent.send(h.hello())
        agent.send(h.hello())
        agent.send(pb.AgentMessage())
        agent.send(pb.AgentMessage(agent_id="someone-else", heartbeat=pb.Heartbeat()))
        codes = [agent.recv().error.code for _ in range(3)]
        assert codes == ["DUPLICATE_HELLO", "EMPTY_MESSAGE", "AGENT_ID_MISMATCH"]
        agent.send(h.batch(1, h.tables(h.records(1, traced_every=0))))
        assert agent.recv().ack.rows_stored == 1


def _raw_connect(address):
    channel = grpc.insecure_channel(address)
    return channel, channel.stream_stream("/headroom.v1.Headroom/Connect", request_serializer=None,
                                          response_deserializer=None)


GARBAGE = b"\xff\xff\xff\xff\x0f\x00garbage"


def test_garbage_bytes_get_an_error_and_the_server_keeps_serving(server):
    channel, connect = _raw_connect(server.address)
    replies = list(connect(iter([GARBAGE])))
    error = pb.ControlMessage.FromString(replies[0]).error
    assert error.code == ErrorCode.MALFORMED_MESSAGE.value and "AgentMessage" in error.message
    # After hello, garbage is answered and the stream stays usable.
    messages = [h.hello().SerializeToString(), GARBAGE,
                h.batch(1, h.tables(h.records(1))).SerializeToString()]
    replies = [pb.ControlMessage.FromString(r) for r in connect(iter(messages))]
    assert [r.WhichOneof("body") for r in replies] == ["error", "ack"]
    query = channel.unary_unary("/headroom.v1.Headroom/Query", request_serializer=None,
                                response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        query(GARBAGE, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "QueryRequest" in err.value.details()
    channel.close()
    from headroom_sidecar.controlplane.query import QueryClient
    with QueryClient(server.address) as client:
        assert client.query("SELECT count(*) AS n FROM requests").table["n"].to_pylist() == [1]


def test_disconnect_marks_the_agent_disconnected(server):
    agent = h.AgentStream(server.address)
    agent.send(h.hello())
    agent.send(pb.AgentMessage(heartbeat=pb.Heartbeat(counters=h.counters(sent_records=9))))
    assert h.wait_until(lambda: _sql(server, "SELECT sent_records FROM agents") == [(9,)])
    assert server.state.connected_agents() == ["agent-1"]
    agent.close()
    assert h.wait_until(lambda: _connected(server) is False)
    assert server.state.connected_agents() == []


def test_cancelled_stream_marks_the_agent_disconnected(server):
    agent = h.AgentStream(server.address)
    agent.send(h.hello())
    assert h.wait_until(lambda: _connected(server) is True)
    agent._call.cancel()
    assert h.wait_until(lambda: _connected(server) is False)
    agent.close()


def test_server_pushes_to_a_connected_agent_and_calls_back(server):
    received = []
    got = threading.Event()
    server.state.on(InboundKind.PLAN_STATUS, lambda agent_id, msg: (received.append((agent_id, msg.plan_id)), got.set()))
    server.state.on(InboundKind.TRIAL_RESULT, lambda agent_id, msg: 1 / 0)   # a faulty subscriber
    plan = pb.ControlMessage(apply_plan=pb.Plan(plan_id="p1", version=1))
    assert server.state.send_to_agent("agent-1", plan) is False   # not connected yet
    with h.AgentStream(server.address) as agent:
        agent.send(h.hello())
        assert h.wait_until(lambda: server.state.connected_agents() == ["agent-1"])
        assert server.state.send_to_agent("agent-1", plan) is True
        assert agent.recv().apply_plan.plan_id == "p1"
        agent.send(pb.AgentMessage(trial_result=pb.TrialResult(trial_id="t1")))
        agent.send(pb.AgentMessage(plan_status=pb.PlanStatus(plan_id="p1", state=pb.PlanStatus.APPLIED)))
        assert got.wait(10)
        agent.send(h.batch(1, h.tables(h.records(1))))
        assert agent.recv().ack.seq == 1    # the faulty callback did not cut the stream
    assert received == [("agent-1", "p1")]
    assert h.wait_until(lambda: server.state.send_to_agent("agent-1", plan) is False)


def test_reconnect_replaces_the_route_and_keeps_connected(server):
    first = h.AgentStream(server.address)
    first.send(h.hello())
    assert h.wait_until(lambda: _connected(server) is True)
    with h.AgentStream(server.address) as second:
        second.send(h.hello())
        second.send(h.batch(1, h.tables(h.records(1))))
        assert second.recv().ack.seq == 1
        first.close()   # the older stream ends; the agent is still connected through the newer
        time.sleep(0.3)
        assert _connected(server) is True
        assert server.state.send_to_agent("agent-1", pb.ControlMessage(rollback=pb.Rollback(plan_id="p")))
        assert second.recv().rollback.plan_id == "p"
    assert h.wait_until(lambda: _connected(server) is False)


def test_stop_marks_agents_disconnected_and_closes_the_file(tmp_path):
    settings = ServerSettings(db_path=str(tmp_path / "s.duckdb"), port=0)
    running = start_server(settings)
    agent = h.AgentStream(running.address)
    agent.send(h.hello())
    assert h.wait_until(lambda: _connected(running) is True)
    running.stop(grace_s=0.2)
    agent.close()
    import duckdb
    con = duckdb.connect(settings.db_path, read_only=True)   # the writer lock is released
    assert con.execute("SELECT connected FROM agents").fetchall() == [(False,)]
    con.close()


def test_port_in_use_is_a_clear_error(server, tmp_path):
    settings = ServerSettings(db_path=str(tmp_path / "other.duckdb"), port=server.port)
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        start_server(settings)


def test_oversized_batch_is_refused_by_the_message_limit(tmp_path):
    settings = ServerSettings(db_path=str(tmp_path / "m.duckdb"), port=0, max_message_bytes=4096)
    running = start_server(settings)
    try:
        with h.AgentStream(running.address) as agent:
            agent.send(h.hello())
            agent.send(h.batch(1, h.tables(h.records(40, traced_every=1))))
            assert agent.recv() is None
            assert agent.status == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.stop(grace_s=0.2)
