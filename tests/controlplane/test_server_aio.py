"""The grpc.aio control plane: an idle agent stream holds no thread, Query answers while many
are open, agent streams and operator calls have separate limits (exactly at a limit accepted,
one more refused RESOURCE_EXHAUSTED), and server.py is wired from outside (no import of
admin/loop/rollout/trials, and none of them imports it)."""
from __future__ import annotations

import ast
import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest

from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.query import QueryClient, QueryError
from headroom_sidecar.controlplane.settings import ServerSettings
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto import headroom_pb2_grpc
from tests.controlplane import helpers as h

ROOT = Path(__file__).resolve().parents[2]
IDLE_STREAMS = 200
CHANNELS = 4   # streams spread over a few HTTP/2 connections, as many agents would be


class AioAgents:
    """Many agents' Connect streams on one event loop thread of the test process, so that the
    process's thread count shows the server's threads, not one client thread per stream."""

    def __init__(self, address: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.address = address
        self.channels, self.calls, self.outs = [], [], []
        self.ended: dict[int, grpc.StatusCode] = {}   # stream index -> final status
        self.details: dict[int, str] = {}
        self._run(self._open_channels())

    def _run(self, coro, timeout_s: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    async def _open_channels(self) -> None:
        self.channels = [grpc.aio.insecure_channel(self.address) for _ in range(CHANNELS)]

    def open(self, n: int, hello: bool = True) -> None:
        self._run(self._open(n, hello))

    async def _open(self, n: int, hello: bool) -> None:
        for _ in range(n):
            i = len(self.calls)
            out: asyncio.Queue = asyncio.Queue()
            stub = headroom_pb2_grpc.HeadroomStub(self.channels[i % CHANNELS])
            call = stub.Connect(_drain(out))
            self.calls.append(call)
            self.outs.append(out)
            asyncio.ensure_future(self._watch(i, call))
            if hello:
                out.put_nowait(h.hello(f"aio-{i}", pid=1000 + i))

    async def _watch(self, i: int, call) -> None:
        try:
            async for _ in call:
                pass
            self.ended[i] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            self.ended[i], self.details[i] = e.code(), e.details() or ""

    def close(self) -> None:
        async def shut():
            for out in self.outs:
                out.put_nowait(None)
            for channel in self.channels:
                await channel.close(grace=1.0)
        self._run(shut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


async def _drain(out: asyncio.Queue):
    while (msg := await out.get()) is not None:
        yield msg


def _wait(predicate, timeout_s: float = 30.0) -> bool:
    return h.wait_until(predicate, timeout_s)


def _connected_in_store(server) -> int:
    with server.store.reader() as cur:
        return cur.execute("SELECT count(*) FROM agents WHERE connected").fetchone()[0]


@pytest.fixture
def agents_of():
    made = []

    def make(server):
        made.append(AioAgents(server.address))
        return made[-1]
    yield make
    for agents in made:
        agents.close()


def test_idle_streams_hold_no_thread_and_query_answers(tmp_path, agents_of):
    settings = ServerSettings(db_path=str(tmp_path / "aio.duckdb"), port=0, stream_workers=2)
    server = start_server(settings)
    try:
        agents = agents_of(server)
        agents.open(20)
        assert _wait(lambda: len(server.state.connected_agents()) == 20)
        threads_at_20 = threading.active_count()
        agents.open(IDLE_STREAMS - 20)
        # Registered in the store too (a hello is attached, then written).
        assert _wait(lambda: _connected_in_store(server) == IDLE_STREAMS)
        assert server.state.agent_streams() == IDLE_STREAMS and not agents.ended
        # Only stream workers may start while more agents say hello: at most stream_workers.
        assert threading.active_count() <= threads_at_20 + settings.stream_workers
        start_s = time.monotonic()
        with QueryClient(server.address) as q:
            rows = q.query("SELECT count(*) AS n FROM agents WHERE connected").table.to_pylist()
        assert rows == [{"n": IDLE_STREAMS}] and time.monotonic() - start_s < 5.0
        # A message pushed from this (non-loop) thread reaches its agent's stream.
        assert server.state.send_to_agent("aio-7", pb.ControlMessage(rollback=pb.Rollback(
            plan_id="p")))
    finally:
        server.stop(grace_s=0.5)
    assert _wait(lambda: len(agents.ended) == IDLE_STREAMS, 10)


@pytest.mark.parametrize("limit", [1, 3])
def test_agent_stream_limit_boundary(tmp_path, agents_of, limit):
    server = start_server(ServerSettings(db_path=str(tmp_path / "lim.duckdb"), port=0,
                                         max_agent_streams=limit))
    try:
        agents = agents_of(server)
        agents.open(limit)                     # exactly at the limit: all accepted
        assert _wait(lambda: len(server.state.connected_agents()) == limit)
        # One more: refused. It sends nothing, as the aio client may report a refusal that
        # races its own first write as INTERNAL ("Internal error from Core").
        agents.open(1, hello=False)
        assert _wait(lambda: limit in agents.ended)
        assert agents.ended == {limit: grpc.StatusCode.RESOURCE_EXHAUSTED}, agents.details
        assert f"max_agent_streams={limit}" in agents.details[limit]
        assert server.state.agent_streams() == limit
    finally:
        server.stop(grace_s=0.5)


def test_closed_streams_free_their_slots(tmp_path):
    server = start_server(ServerSettings(db_path=str(tmp_path / "free.duckdb"), port=0,
                                         max_agent_streams=2))
    try:
        for round_ in range(3):    # 3 x 2 streams through 2 slots
            streams = [h.AgentStream(server.address) for _ in range(2)]
            for i, s in enumerate(streams):
                s.send(h.hello(f"a{round_}-{i}"))
                s.send(h.batch(1, h.tables(h.records(1))))
                assert s.recv().ack.seq == 1
            for s in streams:
                s.close()
            assert _wait(lambda: server.state.agent_streams() == 0, 10)
    finally:
        server.stop(grace_s=0.5)


def test_operator_call_limit_boundary(tmp_path):
    server = start_server(ServerSettings(db_path=str(tmp_path / "op.duckdb"), port=0,
                                         max_workers=4, max_operator_calls=2))
    try:
        with h.HeldOperatorCalls(server.state) as held, QueryClient(server.address) as q:
            assert held.take()                 # 1 of 2 held: the call takes the last slot
            assert q.query("SELECT 1 AS ok").table.to_pylist() == [{"ok": 1}]
            assert held.take()                 # 2 of 2 held: refused at once
            with pytest.raises(QueryError, match="max_operator_calls=2"):
                q.query("SELECT 1")
    finally:
        server.stop(grace_s=0.5)


def test_stop_leaves_no_thread_behind(tmp_path):
    before = {t.ident for t in threading.enumerate()}
    server = start_server(ServerSettings(db_path=str(tmp_path / "stop.duckdb"), port=0))
    with h.AgentStream(server.address) as agent:
        agent.send(h.hello())
        agent.send(h.batch(1, h.tables(h.records(2))))
        assert agent.recv().ack.seq == 1
        server.stop(grace_s=0.5)
    assert _wait(lambda: not [t for t in threading.enumerate()
                              if t.ident not in before and t.name.startswith("headroom")], 10)


@pytest.mark.parametrize("env, field, value", [
    ("HEADROOM_CP_MAX_AGENT_STREAMS", "max_agent_streams", 5000),
    ("HEADROOM_CP_MAX_OPERATOR_CALLS", "max_operator_calls", 3),
    ("HEADROOM_CP_STREAM_WORKERS", "stream_workers", 6),
])
def test_limits_come_from_the_environment(monkeypatch, env, field, value):
    monkeypatch.setenv(env, str(value))
    assert getattr(ServerSettings.resolve(), field) == value
    assert getattr(ServerSettings.resolve(**{field: 1}), field) == 1   # an argument wins


@pytest.mark.parametrize("field", ["max_agent_streams", "max_operator_calls", "stream_workers"])
def test_limits_must_be_positive(tmp_path, field):
    assert getattr(ServerSettings(db_path=str(tmp_path / "x.duckdb"), **{field: 1}), field) == 1
    with pytest.raises(ValueError, match=f"{field}=0 must be > 0"):
        ServerSettings(db_path=str(tmp_path / "x.duckdb"), **{field: 0})


# ---------------------------------------------------------------------- wiring in one place
def _imports(relpath: str) -> set[str]:
    """Every module a file imports, anywhere in it (lazy imports and TYPE_CHECKING included)."""
    tree = ast.parse((ROOT / relpath).read_text(), relpath)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


CP = "headroom_sidecar.controlplane"
BUILT_ON_SERVER = ("admin", "loop", "rollout", "trials")


def test_server_imports_none_of_what_is_built_on_it():
    imported = _imports("controlplane/server.py") | _imports("controlplane/stream.py") | \
        _imports("controlplane/aiohost.py")
    assert not {f"{CP}.{m}" for m in BUILT_ON_SERVER + ("app",)} & imported


@pytest.mark.parametrize("module", BUILT_ON_SERVER)
def test_what_is_built_on_the_server_does_not_import_it(module):
    assert not {f"{CP}.server", f"{CP}.app"} & _imports(f"controlplane/{module}.py")
