"""End-to-end ingest throughput: agent stream -> gRPC -> validation -> DuckDB, in rows/s.

Starts `headroom-controlplane serve` on localhost with a fresh DuckDB file in a temp dir, streams
pre-encoded TelemetryBatch messages (every request fully traced: head_stats, layer_stats,
mlp_stats, requests) over Connect, waits for every ack, checks the stored row counts with SQL,
and prints the figures.

    python bench/ingest.py [--batches 120] [--requests-per-batch 100] [--layers 30] [--heads 9]
"""
from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headroom_sidecar.controlplane.query import QueryClient  # noqa: E402
from headroom_sidecar.proto import columnar  # noqa: E402
from headroom_sidecar.proto import headroom_pb2 as pb  # noqa: E402

TARGET_HEAD_ROWS_PER_S = 500_000
_F32 = np.float32


def _head_tables(first_id: int, n: int, layers: int, heads: int, rng) -> list[pb.Table]:
    """The columns agent/records.to_tables produces, built vectorised for n traced requests."""
    ids = np.arange(first_id, first_id + n, dtype=np.uint64)
    per_head, per_layer = layers * heads, layers
    head = {"request_id": np.repeat(ids, per_head),
            "layer": np.tile(np.repeat(np.arange(layers, dtype=np.uint16), heads), n),
            "head": np.tile(np.arange(heads, dtype=np.uint16), n * layers),
            "entropy": rng.random(n * per_head, dtype=_F32) * 4,
            "max_weight": rng.random(n * per_head, dtype=_F32),
            "out_share": rng.random(n * per_head, dtype=_F32) / heads}
    layer_idx = {"request_id": np.repeat(ids, per_layer),
                 "layer": np.tile(np.arange(layers, dtype=np.uint16), n)}
    layer = {**layer_idx, **{c: rng.random(n * per_layer, dtype=_F32)
                             for c in ("influence", "attn_ms", "mlp_ms")}}
    mlp = {**layer_idx, **{c: rng.random(n * per_layer, dtype=_F32)
                           for c in ("frac_below_1e3", "frac_below_1e2", "frac_below_1e1",
                                     "q50", "q90", "q99")}}
    requests = {"request_id": ids, "start_us": ids.astype(np.int64),
                "tenant": np.array(["t0"] * n, dtype=object),
                "route": np.array(["/chat"] * n, dtype=object),
                "query_class": np.array(["short", "long"] * (n // 2) + ["short"] * (n % 2), dtype=object),
                "traced": np.ones(n, dtype=bool), "batch_size": np.ones(n, dtype=np.uint32),
                "prompt_tokens": np.full(n, 64, dtype=np.uint32),
                "output_tokens": np.full(n, 32, dtype=np.uint32),
                **{c: rng.random(n, dtype=_F32) * 100 for c in ("ttft_ms", "tpot_ms", "latency_ms")},
                # 0: the request did not speculate (agent/records.py)
                **{c: np.zeros(n, dtype=np.uint32)
                   for c in ("spec_drafted", "spec_accepted", "spec_verify_forwards")}}
    return [columnar.encode_table(name, cols) for name, cols in
            (("requests", requests), ("head_stats", head), ("layer_stats", layer), ("mlp_stats", mlp))]


def _messages(args) -> list[bytes]:
    """Serialized AgentMessages: hello, then the batches (encoded up front: not what we measure)."""
    rng = np.random.default_rng(0)
    hello = pb.AgentMessage(agent_id="bench", hello=pb.AgentHello(
        agent_id="bench", hostname="bench", pid=os.getpid(), model=pb.ModelInfo(
            fingerprint="bench", num_layers=args.layers, num_heads=args.heads)))
    out = [hello.SerializeToString()]
    for seq in range(args.batches):
        tables = _head_tables(seq * args.requests_per_batch, args.requests_per_batch,
                              args.layers, args.heads, rng)
        msg = pb.AgentMessage(batch=pb.TelemetryBatch(seq=seq, tables=tables))
        out.append(msg.SerializeToString())
    return out


def _start_server(db_path: Path, port_file: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "headroom_sidecar.controlplane", "serve", "--db", str(db_path),
                             "--port", "0", "--port-file", str(port_file)],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"control plane did not start (exit code {proc.poll()})")
        time.sleep(0.05)
    return proc


def _stream(address: str, messages: list[bytes], batches: int) -> tuple[float, int]:
    """Sends everything, reads acks until `batches` of them; returns (seconds, rows acked)."""
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
    connect = channel.stream_stream("/headroom.v1.Headroom/Connect", request_serializer=None,
                                    response_deserializer=pb.ControlMessage.FromString)
    done: queue.Queue = queue.Queue()

    def requests():
        yield from messages
        done.get()   # keep our side open until every ack is in

    start = time.perf_counter()
    acks, rows = 0, 0
    responses = connect(requests())
    for reply in responses:
        if reply.HasField("error"):
            raise RuntimeError(f"server error {reply.error.code}: {reply.error.message}")
        acks, rows = acks + 1, rows + reply.ack.rows_stored
        if acks == batches:
            break
    elapsed_s = time.perf_counter() - start
    done.put(None)
    responses.cancel()
    channel.close()
    return elapsed_s, rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=120)
    p.add_argument("--requests-per-batch", type=int, default=100)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    args = p.parse_args()

    messages = _messages(args)
    payload_bytes = sum(len(m) for m in messages[1:])
    with tempfile.TemporaryDirectory(prefix="headroom-bench-") as tmp:
        proc = _start_server(Path(tmp) / "bench.duckdb", Path(tmp) / "port")
        try:
            address = f"127.0.0.1:{(Path(tmp) / 'port').read_text().strip()}"
            elapsed_s, rows_acked = _stream(address, messages, args.batches)
            with QueryClient(address) as client:
                counts = client.query("SELECT (SELECT count(*) FROM head_stats) AS head, "
                                      "(SELECT count(*) FROM layer_stats) + (SELECT count(*) FROM "
                                      "mlp_stats) + (SELECT count(*) FROM requests) AS other").table
        finally:
            proc.terminate()
            proc.wait(30)
    head_rows = counts["head"][0].as_py()
    total_rows = head_rows + counts["other"][0].as_py()
    expected_head = args.batches * args.requests_per_batch * args.layers * args.heads
    if head_rows != expected_head or total_rows != rows_acked:
        print(f"row count mismatch: head_stats {head_rows} (expected {expected_head}), "
              f"all tables {total_rows}, acked {rows_acked}", file=sys.stderr)
        return 1
    head_rate = head_rows / elapsed_s
    rows = [("batches", f"{args.batches}"),
            ("requests per batch", f"{args.requests_per_batch} ({args.layers} layers x {args.heads} heads)"),
            ("head_stats rows", f"{head_rows:,}"), ("rows, all tables", f"{total_rows:,}"),
            ("payload", f"{payload_bytes / 1e6:,.1f} MB"), ("seconds", f"{elapsed_s:.2f}"),
            ("head_stats rows/s", f"{head_rate:,.0f}"),
            ("rows/s, all tables", f"{total_rows / elapsed_s:,.0f}"),
            ("MB/s", f"{payload_bytes / 1e6 / elapsed_s:,.1f}"),
            ("target head_stats rows/s", f"{TARGET_HEAD_ROWS_PER_S:,} "
                                         f"({'met' if head_rate >= TARGET_HEAD_ROWS_PER_S else 'MISSED'})")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
