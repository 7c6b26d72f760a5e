"""Fleet scale: N simulated agents on one control plane, with operators querying meanwhile.

For each N it starts `python -m headroom_sidecar.controlplane serve` on 127.0.0.1 with a fresh
DuckDB file (limits raised for N streams), and from THIS one process, on one asyncio loop with
grpc.aio clients: N agents, each on its own connection with a real Connect stream (hello, then
one small telemetry batch every 1-2 s - 3 requests of a 4-layer x 4-head model, one of them
traced in every 7th batch (~5% of requests, the agent's sampling), so 3 or 27 rows - and a
heartbeat every 5 s), plus Query callers and an Admin (ListAgents) caller measuring
latency. After a steady window the agents wait for their last acks and hang up, and the stored
rows are counted with SQL.

Prints per N: agents connected, rows sent / acked / stored (lost must be 0), Query and Admin
p50/p99 ms, ack latency p99 ms, and the server's peak RSS and threads (from /proc). Goal on a
2-core machine: 1,000 agents with Query p99 < 200 ms and no rows lost.

    python bench/fleet.py [--agents 100,300,1000] [--duration-s 20]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headroom_sidecar.agent.records import RequestRecord, TraceArrays, to_tables  # noqa: E402
from headroom_sidecar.proto import columnar  # noqa: E402
from headroom_sidecar.proto import headroom_pb2 as pb  # noqa: E402
from headroom_sidecar.proto.query_result import decode_result  # noqa: E402

GOAL_AGENTS, GOAL_QUERY_P99_MS = 1000, 200.0
LAYERS, HEADS, REQUESTS_PER_BATCH = 4, 4, 3
TRACED_EVERY = 7             # one batch in 7 carries a traced request
SETTLE_S = 5.0               # after the fleet connected, before the measured window
HEARTBEAT_EVERY_S = 5.0
QUERY_CALLERS, QUERY_EVERY_S, ADMIN_EVERY_S = 2, 0.25, 0.5
MAX_AGENTS = 2000            # bounded: this is a localhost benchmark, not a load generator
CONNECT_S, DRAIN_S = 90.0, 30.0
_METHOD = "/headroom.v1.Headroom/"
# The operators' reads: what a dashboard asks while the fleet streams.
QUERIES = ("SELECT count(*) AS n FROM requests",
           "SELECT agent_id, count(*) AS n FROM requests GROUP BY agent_id ORDER BY n DESC LIMIT 10",
           "SELECT count(*) AS n FROM agents WHERE connected")


@dataclass
class Figures:
    agents: int
    connected: int = 0
    connect_s: float = 0.0
    rows_sent: int = 0
    rows_acked: int = 0
    rows_stored: int = -1
    errors: int = 0
    unacked: int = 0
    query_ms: list = field(default_factory=list)
    admin_ms: list = field(default_factory=list)
    ack_ms: list = field(default_factory=list)
    operator_failures: int = 0
    rss_mb: float = 0.0
    threads: int = 0

    @property
    def lost(self) -> int:
        return self.rows_sent - self.rows_stored


# ---------------------------------------------------------------------- the server process
def start_server(tmp: Path, agents: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "HEADROOM_CP_MAX_AGENT_STREAMS": str(agents + 64),
           "HEADROOM_CP_HELLO_TIMEOUT_S": "60", "HEADROOM_CP_DUCKDB_THREADS": "2",
           # Small batches: the writer commits what waits as one group, so let more wait.
           "HEADROOM_CP_INGEST_QUEUE_BATCHES": "512"}
    port_file = tmp / "port"
    proc = subprocess.Popen([sys.executable, "-m", "headroom_sidecar.controlplane", "serve",
                             "--db", str(tmp / "fleet.duckdb"), "--host", "127.0.0.1",
                             "--port", "0", "--port-file", str(port_file)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"control plane did not start (exit code {proc.poll()})")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def proc_status(pid: int) -> tuple[float, int]:
    """(RSS in MB, threads) of a process, from /proc/<pid>/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


async def sample_server(pid: int, fig: Figures, stop: asyncio.Event) -> None:
    while not stop.is_set():
        rss_mb, threads = proc_status(pid)
        fig.rss_mb, fig.threads = max(fig.rss_mb, rss_mb), max(fig.threads, threads)
        await asyncio.sleep(1.0)


# ---------------------------------------------------------------------- one agent
def _trace(rng) -> TraceArrays:
    share = rng.random((LAYERS, HEADS), dtype=np.float32) + 0.1
    per_layer = lambda: rng.random(LAYERS, dtype=np.float32)
    sorted3 = lambda: np.sort(rng.random((LAYERS, 3), dtype=np.float32), axis=1)
    return TraceArrays(head_entropy=rng.random((LAYERS, HEADS), dtype=np.float32) * 3,
                       head_max_weight=rng.random((LAYERS, HEADS), dtype=np.float32),
                       head_out_share=share / share.sum(axis=1, keepdims=True),
                       layer_influence=per_layer(), layer_attn_ms=per_layer(),
                       layer_mlp_ms=per_layer(), mlp_frac_below=sorted3(), mlp_quantiles=sorted3())


def batch_tables(traced: bool) -> tuple[list[pb.Table], int]:
    """One small batch's tables, built as the agent builds them (agent/records.to_tables), reused
    with a new seq (telemetry tables have no key), and its row count. traced: the first request
    carries a trace."""
    rng = np.random.default_rng(0)
    records = [RequestRecord(request_id=i, start_unix_us=1_700_000_000_000_000 + i, tenant="t0",
                             route="/chat", query_class="short", prompt_tokens=64,
                             output_tokens=32, ttft_ms=20.0, tpot_ms=5.0, latency_ms=180.0,
                             trace=_trace(rng) if traced and i == 1 else None)
               for i in range(1, REQUESTS_PER_BATCH + 1)]
    tables = [columnar.encode_table(name, cols)
              for name, cols in to_tables(records, []).columns.items()]
    return tables, sum(t.num_rows for t in tables)


def hello(agent_id: str, pid: int) -> pb.AgentMessage:
    return pb.AgentMessage(agent_id=agent_id, hello=pb.AgentHello(
        agent_id=agent_id, hostname="fleet", pid=pid, agent_version="bench",
        model=pb.ModelInfo(fingerprint="fleet-model", num_layers=LAYERS, num_heads=HEADS)))


async def _requests(out: asyncio.Queue):
    while (msg := await out.get()) is not None:
        yield msg


class Agent:
    def __init__(self, i: int, address: str, fig: Figures, kinds: list):
        # kinds: [(tables, rows) plain, (tables, rows) traced]
        self.agent_id, self.fig, self.kinds = f"fleet-{i:04d}", fig, kinds
        self.channel = grpc.aio.insecure_channel(address)
        self.out: asyncio.Queue = asyncio.Queue()
        self.sent_s: dict[int, float] = {}     # seq -> monotonic send time, until acked
        self.measure_from_s = float("inf")     # acks of batches sent from then on are timed

    async def run(self, stop: asyncio.Event) -> None:
        connect = self.channel.stream_stream(_METHOD + "Connect",
                                             request_serializer=pb.AgentMessage.SerializeToString,
                                             response_deserializer=pb.ControlMessage.FromString)
        call = connect(_requests(self.out))
        self.out.put_nowait(hello(self.agent_id, 1))
        reader = asyncio.ensure_future(self._read(call))
        await self._send_until(stop)
        await self._wait_acked(reader)
        self.out.put_nowait(None)              # half-close: the server ends the stream
        await asyncio.wait([reader], timeout=DRAIN_S)
        await self.channel.close(grace=1.0)

    async def _send_until(self, stop: asyncio.Event) -> None:
        await asyncio.sleep(random.uniform(0, 2.0))   # agents do not start in step
        seq, next_beat_s = 0, time.monotonic() + HEARTBEAT_EVERY_S
        while not stop.is_set():
            seq += 1
            tables, rows = self.kinds[seq % TRACED_EVERY == 0]
            self.sent_s[seq] = time.monotonic()
            self.out.put_nowait(pb.AgentMessage(batch=pb.TelemetryBatch(seq=seq, tables=tables)))
            self.fig.rows_sent += rows
            if time.monotonic() >= next_beat_s:
                self.out.put_nowait(pb.AgentMessage(heartbeat=pb.Heartbeat()))
                next_beat_s += HEARTBEAT_EVERY_S
            try:
                await asyncio.wait_for(stop.wait(), random.uniform(1.0, 2.0))
            except asyncio.TimeoutError:
                pass

    async def _wait_acked(self, reader: asyncio.Future) -> None:
        deadline = time.monotonic() + DRAIN_S
        while self.sent_s and not reader.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.fig.unacked += len(self.sent_s)

    async def _read(self, call) -> None:
        try:
            async for reply in call:
                if reply.HasField("ack"):
                    sent = self.sent_s.pop(reply.ack.seq, None)
                    self.fig.rows_acked += reply.ack.rows_stored
                    if sent is not None and sent >= self.measure_from_s:
                        self.fig.ack_ms.append((time.monotonic() - sent) * 1e3)
                elif reply.HasField("error"):
                    self.fig.errors += 1
                    print(f"{self.agent_id}: error {reply.error.code}: {reply.error.message}",
                          file=sys.stderr)
        except grpc.aio.AioRpcError as e:
            self.fig.errors += 1
            print(f"{self.agent_id}: stream ended {e.code().name}: {e.details()}", file=sys.stderr)


# ---------------------------------------------------------------------- operators
async def timed_calls(call, request_of, every_s: float, out_ms: list, fig: Figures,
                      stop: asyncio.Event) -> None:
    """Calls `call(request)` every `every_s` until stop; each latency into out_ms."""
    n = 0
    while not stop.is_set():
        start = time.perf_counter()
        try:
            await call(request_of(n), timeout=10.0)
            out_ms.append((time.perf_counter() - start) * 1e3)
        except grpc.aio.AioRpcError as e:
            fig.operator_failures += 1
            print(f"operator call failed: {e.code().name}: {e.details()}", file=sys.stderr)
        n += 1
        await asyncio.sleep(every_s)


def operator_calls(channel: grpc.aio.Channel, fig: Figures, stop: asyncio.Event) -> list:
    query = channel.unary_unary(_METHOD + "Query", request_serializer=pb.QueryRequest.SerializeToString,
                                response_deserializer=pb.QueryReply.FromString)
    admin = channel.unary_unary(_METHOD + "ListAgents",
                                request_serializer=pb.ListAgentsRequest.SerializeToString,
                                response_deserializer=pb.ListAgentsReply.FromString)
    tasks = [timed_calls(query, lambda n, k=k: pb.QueryRequest(sql=QUERIES[(n + k) % len(QUERIES)]),
                         QUERY_EVERY_S, fig.query_ms, fig, stop) for k in range(QUERY_CALLERS)]
    tasks.append(timed_calls(admin, lambda n: pb.ListAgentsRequest(), ADMIN_EVERY_S,
                             fig.admin_ms, fig, stop))
    return [asyncio.ensure_future(t) for t in tasks]


async def count_rows(channel: grpc.aio.Channel, sql: str) -> int:
    query = channel.unary_unary(_METHOD + "Query", request_serializer=pb.QueryRequest.SerializeToString,
                                response_deserializer=pb.QueryReply.FromString)
    reply = await query(pb.QueryRequest(sql=sql), timeout=30.0)
    return int(decode_result(reply.table).column(0)[0].as_py())


STORED_SQL = ("SELECT (SELECT count(*) FROM requests) + (SELECT count(*) FROM head_stats) + "
              "(SELECT count(*) FROM layer_stats) + (SELECT count(*) FROM mlp_stats)")
CONNECTED_SQL = "SELECT count(*) FROM agents WHERE connected"


# ---------------------------------------------------------------------- one run
async def connect_fleet(n: int, address: str, fig: Figures, ops: grpc.aio.Channel,
                        stop: asyncio.Event) -> tuple[list, list]:
    kinds = [batch_tables(False), batch_tables(True)]
    agents = [Agent(i, address, fig, kinds) for i in range(n)]
    start = time.monotonic()
    runs = []
    for i, agent in enumerate(agents):
        runs.append(asyncio.ensure_future(agent.run(stop)))
        if i % 100 == 99:
            await asyncio.sleep(0.1)    # a fleet (re)connects within seconds, not at one instant
    while time.monotonic() - start < CONNECT_S:
        fig.connected = await count_rows(ops, CONNECTED_SQL)
        if fig.connected >= n:
            break
        await asyncio.sleep(0.5)
    fig.connect_s = time.monotonic() - start
    return agents, runs


async def run_fleet(n: int, address: str, pid: int, duration_s: float) -> Figures:
    fig, stop, sampling = Figures(n), asyncio.Event(), asyncio.Event()
    ops = grpc.aio.insecure_channel(address)
    sampler = asyncio.ensure_future(sample_server(pid, fig, sampling))
    agents, runs = await connect_fleet(n, address, fig, ops, stop)
    await asyncio.sleep(SETTLE_S)   # the hellos' backlog drains: the window is steady state
    for agent in agents:
        agent.measure_from_s = time.monotonic()
    operators = operator_calls(ops, fig, stop)
    await asyncio.sleep(duration_s)
    stop.set()
    await asyncio.gather(*operators, *runs)
    sampling.set()
    await sampler
    fig.rows_stored = await count_rows(ops, STORED_SQL)
    await ops.close()
    return fig


def measure(n: int, duration_s: float) -> Figures:
    with tempfile.TemporaryDirectory(prefix="headroom-fleet-") as tmp:
        proc, address = start_server(Path(tmp), n)
        try:
            return asyncio.run(run_fleet(n, address, proc.pid, duration_s))
        finally:
            proc.terminate()
            proc.wait(60)


# ---------------------------------------------------------------------- report
def pct(values: list, q: float) -> str:
    return f"{np.percentile(values, q):,.1f}" if values else "-"


def report(figs: list[Figures]) -> list[str]:
    head = ("agents", "connected", "connect s", "rows sent", "rows stored", "lost", "errors",
            "Query p50/p99 ms", "Admin p50/p99 ms", "ack p99 ms", "server RSS MB", "threads")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for f in figs:
        lines.append(" | ".join(str(v) for v in (
            f"{f.agents:,}", f"{f.connected:,}", f"{f.connect_s:.1f}", f"{f.rows_sent:,}",
            f"{f.rows_stored:,}", f"{f.lost:,}", f.errors + f.operator_failures,
            f"{pct(f.query_ms, 50)} / {pct(f.query_ms, 99)}",
            f"{pct(f.admin_ms, 50)} / {pct(f.admin_ms, 99)}", pct(f.ack_ms, 99),
            f"{f.rss_mb:,.0f}", f.threads)))
    return lines


def goal_met(f: Figures) -> bool:
    return (f.connected >= f.agents and f.lost == 0 and f.errors == 0 and f.query_ms and
            float(np.percentile(f.query_ms, 99)) < GOAL_QUERY_P99_MS)


def parse_agents(text: str) -> list[int]:
    counts = [int(x) for x in text.split(",") if x.strip()]
    bad = [c for c in counts if not 1 <= c <= MAX_AGENTS]
    if not counts or bad:
        raise argparse.ArgumentTypeError(f"--agents {text!r}: counts in [1, {MAX_AGENTS}]")
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=parse_agents, default=[100, 300, 1000],
                   help="comma-separated fleet sizes (default 100,300,1000)")
    p.add_argument("--duration-s", type=float, default=20.0, help="steady window per size")
    args = p.parse_args()
    if not 1.0 <= args.duration_s <= 120.0:
        p.error(f"--duration-s {args.duration_s}: in [1, 120]")
    figs = []
    for n in args.agents:
        figs.append(measure(n, args.duration_s))
        print(f"{n} agents done: query p99 {pct(figs[-1].query_ms, 99)} ms, "
              f"lost {figs[-1].lost}", file=sys.stderr, flush=True)
    print(f"{os.cpu_count()} CPUs, {args.duration_s:g} s steady window per size, each agent one "
          f"batch of {batch_tables(False)[1]} rows (every {TRACED_EVERY}th: "
          f"{batch_tables(True)[1]}) every 1-2 s")
    print("\n".join(report(figs)))
    goal = [f for f in figs if f.agents >= GOAL_AGENTS]
    for f in goal:
        print(f"goal ({GOAL_AGENTS:,} agents, Query p99 < {GOAL_QUERY_P99_MS:g} ms, none lost): "
              f"{'met' if goal_met(f) else 'MISSED'}")
    return 0 if all(goal_met(f) for f in goal) else 1


if __name__ == "__main__":
    sys.exit(main())
