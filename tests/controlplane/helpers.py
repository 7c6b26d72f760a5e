"""Builders for control plane tests: realistic telemetry via agent.records.to_tables, and a
client side of the Connect stream that can send and receive one message at a time."""
from __future__ import annotations

import queue
import threading
import time
from typing import Optional

import grpc
import numpy as np

from headroom_sidecar.agent.records import GpuSample, RequestRecord, TraceArrays, to_tables
from headroom_sidecar.proto import columnar
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto import headroom_pb2_grpc

MODEL = pb.ModelInfo(fingerprint="f" * 64, name="tiny-llama", architecture="LlamaForCausalLM",
                     num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64,
                     intermediate_size=128, num_parameters=123_456, dtype="float32", device="cpu")


def trace(layers: int = 3, heads: int = 4, seed: int = 0) -> TraceArrays:
    rng = np.random.default_rng(seed)
    share = rng.random((layers, heads), dtype=np.float32) + 0.1        # [L, H]
    return TraceArrays(
        head_entropy=rng.random((layers, heads), dtype=np.float32) * 3,
        head_max_weight=rng.random((layers, heads), dtype=np.float32),
        head_out_share=share / share.sum(axis=1, keepdims=True),
        layer_influence=rng.random(layers, dtype=np.float32),
        layer_attn_ms=rng.random(layers, dtype=np.float32),
        layer_mlp_ms=rng.random(layers, dtype=np.float32),
        mlp_frac_below=np.sort(rng.random((layers, 3), dtype=np.float32), axis=1),
        mlp_quantiles=np.sort(rng.random((layers, 3), dtype=np.float32), axis=1))


def records(n: int = 4, traced_every: int = 2,  # 0: none traced
            first_id: int = 1, **trace_kw) -> list[RequestRecord]:
    out = []
    for i in range(n):
        rid = first_id + i
        out.append(RequestRecord(
            request_id=rid, start_unix_us=1_700_000_000_000_000 + rid, tenant=f"t{rid % 2}",
            route="/chat", query_class="short" if rid % 2 else "long", prompt_tokens=10 + rid,
            output_tokens=5, ttft_ms=1.5 * rid, tpot_ms=0.5, latency_ms=10.0 * rid,
            trace=trace(seed=rid, **trace_kw) if traced_every and i % traced_every == 0 else None))
    return out


def gpu_samples(n: int = 2) -> list[GpuSample]:
    return [GpuSample(ts_unix_us=1_700_000_000_000_000 + i, device_index=0, available=False)
            for i in range(n)]


def tables(recs, gpu=()) -> list[pb.Table]:
    return [columnar.encode_table(name, cols) for name, cols in to_tables(recs, gpu).columns.items()]


def hello(agent_id: str = "agent-1", pid: int = 4242) -> pb.AgentMessage:
    return pb.AgentMessage(agent_id=agent_id, hello=pb.AgentHello(
        agent_id=agent_id, model=MODEL, hostname="host-a", pid=pid, agent_version="0.1.0",
        gpu_status="unavailable: no NVML", settings_json='{"sample_rate": 0.5}'))


def counters(sent_records: int = 0) -> pb.ExportCounters:
    return pb.ExportCounters(enqueued_records=sent_records + 1, dropped_records=0,
                             sent_records=sent_records, sent_batches=1, failed_batches=0,
                             reconnects=0, queue_len=1)


def batch(seq: int, table_msgs, sent_records: int = 0) -> pb.AgentMessage:
    return pb.AgentMessage(batch=pb.TelemetryBatch(seq=seq, tables=table_msgs,
                                                   counters=counters(sent_records),
                                                   sent_at_us=1_700_000_000_000_000))


_END = object()


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    """Polls `predicate` until it holds (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


class AgentStream:
    """The agent's end of one Connect stream: send() and recv() one message at a time, over a
    plaintext channel to `target` (an address) or over the channel given (TLS, credentials)."""

    def __init__(self, target: "str | grpc.Channel"):
        self.channel = grpc.insecure_channel(target) if isinstance(target, str) else target
        self._out: queue.Queue = queue.Queue()
        self._in: queue.Queue = queue.Queue()
        stub = headroom_pb2_grpc.HeadroomStub(self.channel)
        self._call = stub.Connect(iter(self._out.get, _END))
        self.status: Optional[grpc.StatusCode] = None
        self.details = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for msg in self._call:
                self._in.put(msg)
            self.status = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.status, self.details = e.code(), e.details() or ""
        self._in.put(_END)

    def wait_end(self, timeout_s: float = 10.0) -> Optional[grpc.StatusCode]:
        """Drains replies until the server ends the stream; its final status."""
        while self.recv(timeout_s) is not None:
            pass
        self._reader.join(timeout_s)
        return self.status

    def send(self, msg: pb.AgentMessage) -> None:
        self._out.put(msg)

    def recv(self, timeout_s: float = 10.0) -> Optional[pb.ControlMessage]:
        """The next message, or None once the server ended the stream."""
        msg = self._in.get(timeout=timeout_s)
        return None if msg is _END else msg

    def close(self, timeout_s: float = 10.0) -> None:
        """Half-closes our side and waits for the server to end the stream."""
        self._out.put(_END)
        self._reader.join(timeout_s)
        self.channel.close()

    def __enter__(self) -> "AgentStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HeldOperatorCalls:
    """Operator-call slots a test holds (as running Query/Admin calls would); all given back
    on leaving the block."""

    def __init__(self, state):
        self.state, self.taken = state, 0

    def take(self) -> bool:
        """One more slot; False if none was free (then nothing is held)."""
        granted = self.state.operator_call()
        self.taken += granted
        return granted

    def __enter__(self) -> "HeldOperatorCalls":
        return self

    def __exit__(self, *exc) -> None:
        for _ in range(self.taken):
            self.state.operator_call_done()
        self.taken = 0


class Held:
    """A thread parked inside a callback until `release` is set: `schedule(hold)` must make
    that thread call hold (e.g. loop.call_soon_threadsafe, or a writer job's done callback)."""

    def __init__(self, schedule):
        self.entered, self.release = threading.Event(), threading.Event()
        schedule(self._hold)
        assert self.entered.wait(10), "the callback never ran"

    def _hold(self, *_) -> None:
        self.entered.set()
        self.release.wait(30)
