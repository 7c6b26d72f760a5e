"""Fleet scale: N simulated agents on one control plane, with operators querying meanwhile.

For each N it starts `python -m headroom_sidecar.controlplane serve` on 127.0.0.1 with a fresh
DuckDB file (limits raised for N streams), and from THIS one process, on one asyncio loop with
grpc.aio clients, N agents, each on its own connection with a real Connect stream; from a second
process (an operator's, off the agents' busy loop), Query callers and an Admin (ListAgents)
caller measuring latency. After a steady window the agents wait for their last acks and hang up,
and the stored rows are counted with SQL.

Traffic model (printed with the figures; every part is an option): each agent serves --rps
requests/s (default 5) and traces each with probability --sample-rate (the agent's default
sample_rate, 5%) on a --layers x --heads model (4x4; 32x32 for a 7B-class model). It sends what
it has every --flush-ms (the agent's default flush_interval_ms), or sooner when
--batch-max-records (batch_max_records) requests wait, as the agent's exporter does, each batch
built by the agent's own code (agent/wire.batch_to_pb: requests, the traced requests'
head/layer/MLP rows, one GPU sample per --gpu-sample-ms, and the exporter counters, which the
control plane writes per agent). Agents start at random offsets within one flush interval.

Prints per N: agents connected, batches and rows sent / stored (lost must be 0), Query and
Admin p50/p99 ms, ack latency p99 ms, and the server's peak RSS and threads (from /proc). Goal
on a 2-core machine: 1,000 agents with Query p99 < 200 ms, no rows lost, acks bounded.

    python bench/fleet.py [--agents 100,300,1000] [--duration-s 20] [--rps 5] [--heads 32 --layers 32]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import socket
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

from headroom_sidecar.agent.records import GpuSample, RequestRecord, TraceArrays  # noqa: E402
from headroom_sidecar.agent.settings import AgentSettings  # noqa: E402
from headroom_sidecar.agent.wire import ExportCounters, batch_to_pb  # noqa: E402
from headroom_sidecar.proto import headroom_pb2 as pb  # noqa: E402
from headroom_sidecar.proto.query_result import decode_result  # noqa: E402

GOAL_AGENTS, GOAL_QUERY_P99_MS = 1000, 200.0
# Acks bounded: a batch is answered well before the agent's next flush (2 s by default), so no
# backlog grows and the exporter's in-flight window never fills.
GOAL_ACK_P99_MS = 1000.0
SETTLE_S = 5.0               # after the fleet connected, before the measured window
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
    batches_sent: int = 0
    rows_stored: int = -1
    errors: int = 0
    unacked: int = 0
    query_ms: list = field(default_factory=list)
    admin_ms: list = field(default_factory=list)
    ack_ms: list = field(default_factory=list)
    operator_failures: int = 0
    window_rows_per_s: float = 0.0   # rows sent per second in the measured window
    rss_mb: float = 0.0
    threads: int = 0
    steal_pct: float = 0.0           # CPU time the hypervisor took from this VM in the window

    @property
    def lost(self) -> int:
        return self.rows_sent - self.rows_stored


# ---------------------------------------------------------------------- the server process
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, agents: int) -> tuple[subprocess.Popen, str, str]:
    """The server process, the agents' address and the operators' (--operator-port)."""
    operator_port = free_port()
    env = {**os.environ, "HEADROOM_CP_MAX_AGENT_STREAMS": str(agents + 64),
           "HEADROOM_CP_HELLO_TIMEOUT_S": "60", "HEADROOM_CP_DUCKDB_THREADS": "2",
           # Small batches: the writer commits what waits as one group, so let more wait.
           "HEADROOM_CP_INGEST_QUEUE_BATCHES": "512"}
    port_file = tmp / "port"
    proc = subprocess.Popen([sys.executable, "-m", "headroom_sidecar.controlplane", "serve",
                             "--db", str(tmp / "fleet.duckdb"), "--host", "127.0.0.1",
                             "--port", "0", "--port-file", str(port_file),
                             "--operator-port", str(operator_port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"control plane did not start (exit code {proc.poll()})")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}", f"127.0.0.1:{operator_port}"


def cpu_times() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs since boot, from /proc/stat: on a VM, the time the
    hypervisor gave to others (a noisy neighbour slows everything measured here)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (values[7] if len(values) > 7 else 0), sum(values[:8])


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


# ---------------------------------------------------------------------- traffic model
@dataclass(frozen=True)
class Traffic:
    """What one agent sends; defaults are the agent's own settings (agent/settings.py)."""
    rps: float                 # requests served per second
    flush_ms: int              # exporter flush_interval_ms
    batch_max_records: int     # exporter batch_max_records: a full batch goes at once
    sample_rate: float         # share of requests traced
    layers: int
    heads: int
    gpu_sample_ms: int         # one GPU sample per interval (0: no GPU)

    @property
    def requests_per_batch(self) -> float:
        """Mean requests per batch; each batch draws Poisson(mean), at most batch_max_records."""
        return min(float(self.batch_max_records), self.rps * self.flush_ms / 1000)

    @property
    def batch_interval_s(self) -> float:
        """The flush interval, or less when batch_max_records requests fill a batch first."""
        return min(self.flush_ms / 1000, self.batch_max_records / self.rps)

    @property
    def gpu_samples_per_batch(self) -> float:
        return self.batch_interval_s * 1000 / self.gpu_sample_ms if self.gpu_sample_ms else 0.0

    @property
    def rows_per_traced(self) -> int:
        return self.layers * self.heads + 2 * self.layers   # head_stats + layer_stats + mlp_stats

    def rows_per_s(self) -> float:
        """Expected rows per second per agent."""
        per_batch = self.requests_per_batch * (1 + self.sample_rate * self.rows_per_traced)
        return (per_batch + self.gpu_samples_per_batch) / self.batch_interval_s

    def describe(self, agents: int) -> str:
        batches_s = agents / self.batch_interval_s
        return (f"{agents:,} agents x {self.rps:g} req/s ({self.sample_rate:.0%} traced, "
                f"{self.layers}x{self.heads} model, {self.rows_per_traced} stat rows per traced "
                f"request), one batch of {self.requests_per_batch:g} requests (mean) + "
                f"{self.gpu_samples_per_batch:g} GPU samples every {self.batch_interval_s:g} s per "
                f"agent: {batches_s:,.0f} batches/s, {agents * self.rows_per_s():,.0f} rows/s")


# ---------------------------------------------------------------------- one agent
def _trace(rng, layers: int, heads: int) -> TraceArrays:
    share = rng.random((layers, heads), dtype=np.float32) + 0.1
    per_layer = lambda: rng.random(layers, dtype=np.float32)
    sorted3 = lambda: np.sort(rng.random((layers, 3), dtype=np.float32), axis=1)
    return TraceArrays(head_entropy=rng.random((layers, heads), dtype=np.float32) * 3,
                       head_max_weight=rng.random((layers, heads), dtype=np.float32),
                       head_out_share=share / share.sum(axis=1, keepdims=True),
                       layer_influence=per_layer(), layer_attn_ms=per_layer(),
                       layer_mlp_ms=per_layer(), mlp_frac_below=sorted3(), mlp_quantiles=sorted3())


class BatchKinds:
    """Batch tables by (requests, traced requests, GPU samples), built once with the agent's
    own encoder (agent/wire.batch_to_pb) and reused with a new seq and counters (telemetry rows
    have no key)."""

    def __init__(self, traffic: Traffic):
        self.traffic = traffic
        self._built: dict[tuple[int, int, int], tuple[list, int]] = {}

    def get(self, requests: int, traced: int, gpu: int) -> tuple[list, int]:
        """(tables, rows) of such a batch."""
        key = (requests, traced, gpu)
        if key not in self._built:
            self._built[key] = self._build(*key)
        return self._built[key]

    def _build(self, requests: int, traced: int, gpu_samples: int) -> tuple[list, int]:
        t, rng = self.traffic, np.random.default_rng(traced)
        records = [RequestRecord(request_id=i, start_unix_us=1_700_000_000_000_000 + i,
                                 tenant="t0", route="/chat", query_class="short",
                                 prompt_tokens=64, output_tokens=32, ttft_ms=20.0, tpot_ms=5.0,
                                 latency_ms=180.0,
                                 trace=_trace(rng, t.layers, t.heads) if i <= traced else None)
                   for i in range(1, requests + 1)]
        gpu = [GpuSample(ts_unix_us=1_700_000_000_000_000 + i, device_index=0, available=True,
                         mem_used_bytes=1 << 30, mem_total_bytes=80 << 30, util_pct=50.0,
                         power_w=300.0, sm_clock_mhz=1800.0)
               for i in range(gpu_samples)]
        batch = batch_to_pb(0, records, gpu, ExportCounters())
        return list(batch.tables), sum(table.num_rows for table in batch.tables)


def hello(agent_id: str, pid: int, traffic: Traffic) -> pb.AgentMessage:
    return pb.AgentMessage(agent_id=agent_id, hello=pb.AgentHello(
        agent_id=agent_id, hostname="fleet", pid=pid, agent_version="bench",
        model=pb.ModelInfo(fingerprint="fleet-model", num_layers=traffic.layers,
                           num_heads=traffic.heads)))


async def _requests(out: asyncio.Queue):
    while (msg := await out.get()) is not None:
        yield msg


class Agent:
    def __init__(self, i: int, address: str, fig: Figures, kinds: BatchKinds):
        self.agent_id, self.fig, self.kinds = f"fleet-{i:04d}", fig, kinds
        self.rng = np.random.default_rng(i)
        self.sent_records, self.gpu_due = 0, 0.0   # exporter counter; GPU samples not yet sent
        self.channel = grpc.aio.insecure_channel(address)
        self.out: asyncio.Queue = asyncio.Queue()
        self.sent_s: dict[int, float] = {}     # seq -> monotonic send time, until acked
        self.measure_from_s = float("inf")     # acks of batches sent from then on are timed

    async def run(self, stop: asyncio.Event) -> None:
        connect = self.channel.stream_stream(_METHOD + "Connect",
                                             request_serializer=pb.AgentMessage.SerializeToString,
                                             response_deserializer=pb.ControlMessage.FromString)
        call = connect(_requests(self.out))
        self.out.put_nowait(hello(self.agent_id, 1, self.kinds.traffic))
        reader = asyncio.ensure_future(self._read(call))
        await self._send_until(stop)
        await self._wait_acked(reader)
        self.out.put_nowait(None)              # half-close: the server ends the stream
        await asyncio.wait([reader], timeout=DRAIN_S)
        await self.channel.close(grace=1.0)

    def _next_message(self, seq: int) -> tuple[pb.AgentMessage, int]:
        """What the agent's exporter sends at one flush, and its rows: a batch of the requests
        served since the last one (Poisson), each traced at the sample rate, plus the GPU
        samples taken meanwhile; a heartbeat when there is nothing (0 rows)."""
        t = self.kinds.traffic
        requests = min(t.batch_max_records, int(self.rng.poisson(t.requests_per_batch)))
        traced = int(self.rng.binomial(requests, t.sample_rate))
        self.gpu_due += t.gpu_samples_per_batch
        gpu, self.gpu_due = int(self.gpu_due), self.gpu_due - int(self.gpu_due)
        self.sent_records += requests
        counters = pb.ExportCounters(enqueued_records=self.sent_records,
                                     sent_records=self.sent_records, sent_batches=seq)
        if requests == 0 and gpu == 0:
            return pb.AgentMessage(agent_id=self.agent_id,
                                   heartbeat=pb.Heartbeat(counters=counters)), 0
        tables, rows = self.kinds.get(requests, traced, gpu)
        batch = pb.TelemetryBatch(seq=seq, sent_at_us=time.time_ns() // 1000, tables=tables,
                                  counters=counters)
        return pb.AgentMessage(agent_id=self.agent_id, batch=batch), rows

    async def _send_until(self, stop: asyncio.Event) -> None:
        interval_s = self.kinds.traffic.batch_interval_s
        await asyncio.sleep(random.uniform(0, interval_s))   # agents do not flush in step
        seq, next_s = 0, time.monotonic()
        while not stop.is_set():
            msg, rows = self._next_message(seq + 1)
            if msg.HasField("batch"):
                seq += 1
                self.sent_s[seq] = time.monotonic()
                self.fig.rows_sent += rows
                self.fig.batches_sent += 1
            self.out.put_nowait(msg)
            next_s += interval_s
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, next_s - time.monotonic()))
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
def timed_calls(call, request_of, every_s: float, until_s: float) -> tuple[list, list]:
    """Calls `call(request)` every `every_s` until the monotonic time until_s: (latencies in ms,
    failures)."""
    out_ms, failures, n = [], [], 0
    while time.monotonic() < until_s:
        start = time.perf_counter()
        try:
            call(request_of(n), timeout=10.0)
            out_ms.append((time.perf_counter() - start) * 1e3)
        except grpc.RpcError as e:
            failures.append(f"{e.code().name}: {e.details()}")
        n += 1
        time.sleep(every_s)
    return out_ms, failures


def operators(address: str, duration_s: float, conn) -> None:
    """An operator's side, in a process of its own as on an operator's machine (not on the
    simulated agents' busy event loop, whose lag would be counted as the server's): Query
    callers and a ListAgents caller on threads, sync gRPC; sends (query_ms, admin_ms, failures)."""
    from concurrent.futures import ThreadPoolExecutor
    channel = grpc.insecure_channel(address)
    query = channel.unary_unary(_METHOD + "Query", request_serializer=pb.QueryRequest.SerializeToString,
                                response_deserializer=pb.QueryReply.FromString)
    admin = channel.unary_unary(_METHOD + "ListAgents",
                                request_serializer=pb.ListAgentsRequest.SerializeToString,
                                response_deserializer=pb.ListAgentsReply.FromString)
    until_s = time.monotonic() + duration_s
    with ThreadPoolExecutor(QUERY_CALLERS + 1) as pool:
        queries = [pool.submit(timed_calls, query,
                               lambda n, k=k: pb.QueryRequest(sql=QUERIES[(n + k) % len(QUERIES)]),
                               QUERY_EVERY_S, until_s) for k in range(QUERY_CALLERS)]
        listing = pool.submit(timed_calls, admin, lambda n: pb.ListAgentsRequest(),
                              ADMIN_EVERY_S, until_s)
        query_ms = [ms for q in queries for ms in q.result()[0]]
        admin_ms, failures = listing.result()[0], [f for q in (*queries, listing)
                                                    for f in q.result()[1]]
    channel.close()
    conn.send((query_ms, admin_ms, failures))


async def operator_figures(address: str, duration_s: float, fig: Figures) -> None:
    """Runs `operators` in a spawned process (no gRPC state forked) for the window."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=operators, args=(address, duration_s, child), daemon=True)
    proc.start()
    fig.query_ms, fig.admin_ms, failures = await asyncio.get_running_loop().run_in_executor(
        None, parent.recv)
    proc.join(30)
    fig.operator_failures = len(failures)
    for failure in failures:
        print(f"operator call failed: {failure}", file=sys.stderr)


async def count_rows(channel: grpc.aio.Channel, sql: str) -> int:
    query = channel.unary_unary(_METHOD + "Query", request_serializer=pb.QueryRequest.SerializeToString,
                                response_deserializer=pb.QueryReply.FromString)
    reply = await query(pb.QueryRequest(sql=sql), timeout=30.0)
    return int(decode_result(reply.table).column(0)[0].as_py())


STORED_SQL = ("SELECT (SELECT count(*) FROM requests) + (SELECT count(*) FROM head_stats) + "
              "(SELECT count(*) FROM layer_stats) + (SELECT count(*) FROM mlp_stats) + "
              "(SELECT count(*) FROM gpu_samples)")
CONNECTED_SQL = "SELECT count(*) FROM agents WHERE connected"


# ---------------------------------------------------------------------- one run
async def connect_fleet(n: int, address: str, fig: Figures, ops: grpc.aio.Channel,
                        stop: asyncio.Event, traffic: Traffic) -> tuple[list, list]:
    kinds = BatchKinds(traffic)
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


async def run_fleet(n: int, address: str, operator_address: str, pid: int, duration_s: float,
                    traffic: Traffic) -> Figures:
    fig, stop, sampling = Figures(n), asyncio.Event(), asyncio.Event()
    ops = grpc.aio.insecure_channel(address)
    sampler = asyncio.ensure_future(sample_server(pid, fig, sampling))
    agents, runs = await connect_fleet(n, address, fig, ops, stop, traffic)
    await asyncio.sleep(SETTLE_S)   # the hellos' backlog drains: the window is steady state
    for agent in agents:
        agent.measure_from_s = time.monotonic()
    window_start_s, rows_before, cpu_before = time.monotonic(), fig.rows_sent, cpu_times()
    await operator_figures(operator_address, duration_s, fig)   # the window: as long as the operators call
    fig.window_rows_per_s = (fig.rows_sent - rows_before) / (time.monotonic() - window_start_s)
    (steal_a, total_a), (steal_b, total_b) = cpu_before, cpu_times()
    fig.steal_pct = 100.0 * (steal_b - steal_a) / max(1, total_b - total_a)
    stop.set()
    await asyncio.gather(*runs)
    sampling.set()
    await sampler
    fig.rows_stored = await count_rows(ops, STORED_SQL)
    await ops.close()
    return fig


def measure(n: int, duration_s: float, traffic: Traffic, operators_on: str) -> Figures:
    """operators_on: "operator" (the operator port) or "agent" (the agents' port)."""
    with tempfile.TemporaryDirectory(prefix="headroom-fleet-") as tmp:
        proc, address, operator_address = start_server(Path(tmp), n)
        ops = operator_address if operators_on == "operator" else address
        try:
            return asyncio.run(run_fleet(n, address, ops, proc.pid, duration_s, traffic))
        finally:
            proc.terminate()
            proc.wait(60)


# ---------------------------------------------------------------------- report
def pct(values: list, q: float) -> str:
    return f"{np.percentile(values, q):,.1f}" if values else "-"


def report(figs: list[Figures]) -> list[str]:
    head = ("agents", "connected", "connect s", "batches sent", "rows/s sent", "rows sent",
            "rows stored", "lost", "errors",
            "Query p50/p99 ms", "Admin p50/p99 ms", "ack p99 ms", "server RSS MB", "threads",
            "CPU stolen %")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for f in figs:
        lines.append(" | ".join(str(v) for v in (
            f"{f.agents:,}", f"{f.connected:,}", f"{f.connect_s:.1f}", f"{f.batches_sent:,}",
            f"{f.window_rows_per_s:,.0f}", f"{f.rows_sent:,}",
            f"{f.rows_stored:,}", f"{f.lost:,}", f.errors + f.operator_failures,
            f"{pct(f.query_ms, 50)} / {pct(f.query_ms, 99)}",
            f"{pct(f.admin_ms, 50)} / {pct(f.admin_ms, 99)}", pct(f.ack_ms, 99),
            f"{f.rss_mb:,.0f}", f.threads, f"{f.steal_pct:.0f}")))
    return lines


def goal_met(f: Figures) -> bool:
    return (f.connected >= f.agents and f.lost == 0 and f.errors == 0 and f.unacked == 0 and
            bool(f.query_ms) and float(np.percentile(f.query_ms, 99)) < GOAL_QUERY_P99_MS and
            bool(f.ack_ms) and float(np.percentile(f.ack_ms, 99)) < GOAL_ACK_P99_MS)


def parse_agents(text: str) -> list[int]:
    counts = [int(x) for x in text.split(",") if x.strip()]
    bad = [c for c in counts if not 1 <= c <= MAX_AGENTS]
    if not counts or bad:
        raise argparse.ArgumentTypeError(f"--agents {text!r}: counts in [1, {MAX_AGENTS}]")
    return counts


def traffic_args(p: argparse.ArgumentParser) -> None:
    d = AgentSettings()
    p.add_argument("--rps", type=float, default=5.0, help="requests/s per agent (default 5)")
    p.add_argument("--flush-ms", type=int, default=d.flush_interval_ms,
                   help=f"agent flush_interval_ms (default {d.flush_interval_ms})")
    p.add_argument("--batch-max-records", type=int, default=d.batch_max_records,
                   help=f"agent batch_max_records (default {d.batch_max_records})")
    p.add_argument("--sample-rate", type=float, default=d.sample_rate,
                   help=f"share of requests traced (default {d.sample_rate:g})")
    p.add_argument("--layers", type=int, default=4, help="model layers (default 4; 32 for 7B)")
    p.add_argument("--heads", type=int, default=4, help="heads per layer (default 4; 32 for 7B)")
    p.add_argument("--gpu-sample-ms", type=int, default=d.gpu_sample_interval_ms,
                   help=f"agent gpu_sample_interval_ms, 0 = no GPU (default "
                        f"{d.gpu_sample_interval_ms})")


def parse_traffic(p: argparse.ArgumentParser, args) -> Traffic:
    problems = [f"--{name.replace('_', '-')} {getattr(args, name)}: must be > 0"
                for name in ("rps", "flush_ms", "batch_max_records", "layers", "heads")
                if getattr(args, name) <= 0]
    if not 0.0 <= args.sample_rate <= 1.0:
        problems.append(f"--sample-rate {args.sample_rate}: in [0, 1]")
    if args.gpu_sample_ms < 0:
        problems.append(f"--gpu-sample-ms {args.gpu_sample_ms}: must be >= 0")
    if problems:
        p.error("; ".join(problems))
    return Traffic(args.rps, args.flush_ms, args.batch_max_records, args.sample_rate,
                   args.layers, args.heads, args.gpu_sample_ms)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=parse_agents, default=[100, 300, 1000],
                   help="comma-separated fleet sizes (default 100,300,1000)")
    p.add_argument("--duration-s", type=float, default=20.0, help="steady window per size")
    p.add_argument("--operators-on", choices=("operator", "agent"), default="operator",
                   help="where the operators call: the operator port (default, "
                        "HEADROOM_CP_OPERATOR_PORT) or the agents' port")
    traffic_args(p)
    args = p.parse_args()
    if not 1.0 <= args.duration_s <= 120.0:
        p.error(f"--duration-s {args.duration_s}: in [1, 120]")
    traffic = parse_traffic(p, args)
    figs = []
    for n in args.agents:
        print(f"traffic: {traffic.describe(n)}", file=sys.stderr, flush=True)
        figs.append(measure(n, args.duration_s, traffic, args.operators_on))
        print(f"{n} agents done: query p99 {pct(figs[-1].query_ms, 99)} ms, ack p99 "
              f"{pct(figs[-1].ack_ms, 99)} ms, lost {figs[-1].lost}", file=sys.stderr, flush=True)
    print(f"{os.cpu_count()} CPUs, {args.duration_s:g} s steady window per size, operators on "
          f"the {args.operators_on} port; traffic model:")
    for n in args.agents:
        print(f"  {traffic.describe(n)}")
    print("\n".join(report(figs)))
    goal = [f for f in figs if f.agents >= GOAL_AGENTS]
    for f in goal:
        print(f"goal ({GOAL_AGENTS:,} agents, Query p99 < {GOAL_QUERY_P99_MS:g} ms, ack p99 < "
              f"{GOAL_ACK_P99_MS:g} ms, none lost): {'met' if goal_met(f) else 'MISSED'}")
    return 0 if all(goal_met(f) for f in goal) else 1


if __name__ == "__main__":
    sys.exit(main())
