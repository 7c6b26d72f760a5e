"""What the agent hands from the model's thread to the exporter: one record per request.

The table and column names below are the wire contract (proto/headroom.proto `Table`) and the
control plane's DuckDB column names; the control plane adds `agent_id` from the stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

# Fixed |activation| thresholds for MLP sparsity, and magnitude quantiles (columns below).
SPARSITY_THRESHOLDS = (1e-3, 1e-2, 1e-1)
MAGNITUDE_QUANTILES = (0.5, 0.9, 0.99)
SPARSITY_COLUMNS = ("frac_below_1e3", "frac_below_1e2", "frac_below_1e1")
QUANTILE_COLUMNS = ("q50", "q90", "q99")


@dataclass
class TraceArrays:
    """Per-layer statistics of one fully traced request, already on the host."""
    head_entropy: np.ndarray     # [L, H] float32, nats; mean over the sampled query positions
    head_max_weight: np.ndarray  # [L, H] float32; mean over sampled queries of max attention weight
    head_out_share: np.ndarray   # [L, H] float32; head's share of the o_proj output norm, rows sum to 1
    layer_influence: np.ndarray  # [L] float32; mean over tokens of 1 - cos(block input, block output)
    layer_attn_ms: np.ndarray    # [L] float32; attention time summed over the request's forwards
    layer_mlp_ms: np.ndarray     # [L] float32; MLP time summed over the request's forwards
    mlp_frac_below: np.ndarray   # [L, len(SPARSITY_THRESHOLDS)] float32
    mlp_quantiles: np.ndarray    # [L, len(MAGNITUDE_QUANTILES)] float32; of |activation|


@dataclass
class RequestRecord:
    request_id: int              # per agent, increasing
    start_unix_us: int           # wall clock at the request's start
    tenant: str = ""
    route: str = ""
    query_class: str = ""
    # Padding excluded (the attention_mask of the first top-level forward, else generate()'s;
    # without a mask every position counts). A batch's figures are totals over its sequences:
    batch_size: int = 1          # sequences with at least one real (unpadded) prompt token
    prompt_tokens: int = 0       # real prompt tokens, summed over those sequences
    output_tokens: int = 0       # decode steps (top-level forwards) x batch_size; a sequence that
                                 # stopped early in a batch still counts the steps it was padded
    ttft_ms: float = math.nan    # request start -> end of the first forward (first token's logits)
    tpot_ms: float = math.nan    # mean time per decode step after the first; nan if < 2 steps
    latency_ms: float = math.nan
    # Speculative decoding (execution.speculative, the default's or the class's plan); 0 when the
    # request did not speculate. acceptance = accepted / drafted; tokens per verify forward =
    # output_tokens / verify_forwards (output_tokens then counts emitted tokens, not forwards).
    spec_drafted: int = 0        # drafted tokens offered to the verifier
    spec_accepted: int = 0       # of those, kept
    spec_verify_forwards: int = 0   # verifier forwards (the first is the prefill)
    trace: Optional[TraceArrays] = None   # None when the request was not sampled for tracing

    @property
    def traced(self) -> bool:
        return self.trace is not None


@dataclass
class GpuSample:
    ts_unix_us: int
    device_index: int
    available: bool
    mem_used_bytes: int = 0
    mem_total_bytes: int = 0
    util_pct: float = math.nan
    power_w: float = math.nan
    sm_clock_mhz: float = math.nan


@dataclass
class Tables:
    """Columns per table name, ready for proto.columnar.encode_table."""
    columns: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def rows(self, name: str) -> int:
        cols = self.columns.get(name)
        return len(next(iter(cols.values()))) if cols else 0


def _request_columns(recs: Sequence[RequestRecord]) -> dict[str, np.ndarray]:
    def col(attr, dtype):
        return np.array([getattr(r, attr) for r in recs], dtype=dtype)
    return {
        "request_id": col("request_id", np.uint64), "start_us": col("start_unix_us", np.int64),
        "tenant": col("tenant", object), "route": col("route", object),
        "query_class": col("query_class", object), "traced": col("traced", np.bool_),
        "batch_size": col("batch_size", np.uint32), "prompt_tokens": col("prompt_tokens", np.uint32),
        "output_tokens": col("output_tokens", np.uint32), "ttft_ms": col("ttft_ms", np.float32),
        "tpot_ms": col("tpot_ms", np.float32), "latency_ms": col("latency_ms", np.float32),
        "spec_drafted": col("spec_drafted", np.uint32), "spec_accepted": col("spec_accepted", np.uint32),
        "spec_verify_forwards": col("spec_verify_forwards", np.uint32),
    }


def _per_layer(recs: Sequence[RequestRecord], per_head: bool) -> dict[str, np.ndarray]:
    """request_id, layer (and head) index columns, flattened in the same order as the stats."""
    ids, layers, heads = [], [], []
    for r in recs:
        n_layers, n_heads = r.trace.head_entropy.shape
        n = n_layers * n_heads if per_head else n_layers
        ids.append(np.full(n, r.request_id, dtype=np.uint64))
        if per_head:
            layers.append(np.repeat(np.arange(n_layers, dtype=np.uint16), n_heads))
            heads.append(np.tile(np.arange(n_heads, dtype=np.uint16), n_layers))
        else:
            layers.append(np.arange(n_layers, dtype=np.uint16))
    out = {"request_id": np.concatenate(ids), "layer": np.concatenate(layers)}
    if per_head:
        out["head"] = np.concatenate(heads)
    return out


def _stat(recs, attr: str, column: int | None = None) -> np.ndarray:
    arrays = [getattr(r.trace, attr) for r in recs]
    if column is not None:
        arrays = [a[:, column] for a in arrays]
    return np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float32)


def _traced_tables(traced: Sequence[RequestRecord]) -> dict[str, dict[str, np.ndarray]]:
    heads = _per_layer(traced, per_head=True)
    heads.update(entropy=_stat(traced, "head_entropy"), max_weight=_stat(traced, "head_max_weight"),
                 out_share=_stat(traced, "head_out_share"))
    layers = _per_layer(traced, per_head=False)
    layers.update(influence=_stat(traced, "layer_influence"),
                  attn_ms=_stat(traced, "layer_attn_ms"), mlp_ms=_stat(traced, "layer_mlp_ms"))
    mlp = _per_layer(traced, per_head=False)
    for i, name in enumerate(SPARSITY_COLUMNS):
        mlp[name] = _stat(traced, "mlp_frac_below", i)
    for i, name in enumerate(QUANTILE_COLUMNS):
        mlp[name] = _stat(traced, "mlp_quantiles", i)
    return {"head_stats": heads, "layer_stats": layers, "mlp_stats": mlp}


def _gpu_columns(samples: Sequence[GpuSample]) -> dict[str, np.ndarray]:
    def col(attr, dtype):
        return np.array([getattr(s, attr) for s in samples], dtype=dtype)
    return {"ts_us": col("ts_unix_us", np.int64), "device_index": col("device_index", np.uint32),
            "available": col("available", np.bool_), "mem_used_bytes": col("mem_used_bytes", np.uint64),
            "mem_total_bytes": col("mem_total_bytes", np.uint64), "util_pct": col("util_pct", np.float32),
            "power_w": col("power_w", np.float32), "sm_clock_mhz": col("sm_clock_mhz", np.float32)}


def to_tables(records: Sequence[RequestRecord], gpu: Sequence[GpuSample] = ()) -> Tables:
    """Columnar form of a batch: requests, head_stats, layer_stats, mlp_stats, gpu_samples."""
    out = Tables()
    if records:
        out.columns["requests"] = _request_columns(records)
        traced = [r for r in records if r.traced]
        if traced:
            out.columns.update(_traced_tables(traced))
    if gpu:
        out.columns["gpu_samples"] = _gpu_columns(gpu)
    return out
