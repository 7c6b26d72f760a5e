"""Bytes on disk per traced request: synthetic TraceArrays through the real ingest path
(agent/records.to_tables -> proto columnar encoding -> controlplane decode_batch -> Store), then
the DuckDB file's size delta after CHECKPOINT, divided by the requests stored.

    python bench/storage.py [--requests 2000] [--per-batch 100] [--layers 32] [--heads 32]

Random statistics compress worse than real ones (which repeat more), so this is an upper bound.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headroom_sidecar.agent.records import RequestRecord, TraceArrays, to_tables  # noqa: E402
from headroom_sidecar.controlplane.ingest import decode_batch  # noqa: E402
from headroom_sidecar.controlplane.retention import used_bytes  # noqa: E402
from headroom_sidecar.controlplane.store import Store  # noqa: E402
from headroom_sidecar.proto import columnar  # noqa: E402
from headroom_sidecar.proto import headroom_pb2 as pb  # noqa: E402

_F32 = np.float32


def _trace(layers: int, heads: int, rng) -> TraceArrays:
    share = rng.random((layers, heads), dtype=_F32) + 0.1                 # [L, H]
    return TraceArrays(
        head_entropy=rng.random((layers, heads), dtype=_F32) * 3,
        head_max_weight=rng.random((layers, heads), dtype=_F32),
        head_out_share=share / share.sum(axis=1, keepdims=True),
        layer_influence=rng.random(layers, dtype=_F32),                   # [L]
        layer_attn_ms=rng.random(layers, dtype=_F32),
        layer_mlp_ms=rng.random(layers, dtype=_F32),
        mlp_frac_below=np.sort(rng.random((layers, 3), dtype=_F32), axis=1),   # [L, 3]
        mlp_quantiles=np.sort(rng.random((layers, 3), dtype=_F32), axis=1))


def _batch(seq: int, first_id: int, n: int, layers: int, heads: int, rng) -> pb.TelemetryBatch:
    recs = [RequestRecord(request_id=first_id + i, start_unix_us=1_700_000_000_000_000 + i,
                          tenant="t", route="/chat", query_class="chat", prompt_tokens=100,
                          output_tokens=50, ttft_ms=20.0, tpot_ms=5.0, latency_ms=270.0,
                          trace=_trace(layers, heads, rng)) for i in range(n)]
    tables = [columnar.encode_table(name, cols) for name, cols in to_tables(recs).columns.items()]
    return pb.TelemetryBatch(seq=seq, tables=tables)


def measure(requests: int, per_batch: int, layers: int, heads: int) -> dict:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(os.path.join(tmp, "bench.duckdb"))
        store.checkpoint()
        file0, used0 = os.path.getsize(store.db_path), used_bytes(store)
        for seq, first in enumerate(range(0, requests, per_batch)):
            n = min(per_batch, requests - first)
            store.store_batch("bench", 1, decode_batch(_batch(seq, first, n, layers, heads, rng)))
        store.checkpoint()
        file1, used1 = os.path.getsize(store.db_path), used_bytes(store)
        store.close()
    return {"file_bytes_per_request": (file1 - file0) / requests,
            "used_bytes_per_request": (used1 - used0) / requests,
            "head_rows_per_request": layers * heads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--per-batch", type=int, default=100)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    a = p.parse_args()
    if min(a.requests, a.per_batch, a.layers, a.heads) <= 0:
        p.error("--requests, --per-batch, --layers and --heads must be > 0")
    got = measure(a.requests, a.per_batch, a.layers, a.heads)
    print(f"{a.requests} traced requests at {a.layers} layers x {a.heads} heads: "
          f"{got['file_bytes_per_request']:.0f} bytes/request on disk "
          f"({got['used_bytes_per_request']:.0f} in used blocks), "
          f"{got['head_rows_per_request']} head_stats rows each")


if __name__ == "__main__":
    main()
