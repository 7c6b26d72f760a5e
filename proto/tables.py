"""The tables of the contract: what an agent sends (telemetry columns and wire dtypes, in the
order agent/records.py to_tables() produces them) and what a Query client may read.

The control plane's DDL (controlplane/schema.py) is built from TELEMETRY_COLUMNS, and a test
checks that every QUERYABLE_TABLES entry exists there with those columns; the dashboard's SQL
names only tables listed here (tests/dashboard/test_contract.py).
"""
from __future__ import annotations

import enum

from headroom_sidecar.proto import headroom_pb2 as pb

_PER_LAYER = {"request_id": pb.UINT64, "layer": pb.UINT16}

# table -> column -> wire dtype, in the order to_tables() produces them.
TELEMETRY_COLUMNS: dict[str, dict[str, int]] = {
    "requests": {
        "request_id": pb.UINT64, "start_us": pb.INT64, "tenant": pb.STRING, "route": pb.STRING,
        "query_class": pb.STRING, "traced": pb.BOOL, "batch_size": pb.UINT32,
        "prompt_tokens": pb.UINT32, "output_tokens": pb.UINT32, "ttft_ms": pb.FLOAT32,
        "tpot_ms": pb.FLOAT32, "latency_ms": pb.FLOAT32,
        # speculative decoding per request (0: it did not speculate); agent/records.py
        "spec_drafted": pb.UINT32, "spec_accepted": pb.UINT32, "spec_verify_forwards": pb.UINT32,
    },
    "head_stats": {
        **_PER_LAYER, "head": pb.UINT16,
        "entropy": pb.FLOAT32, "max_weight": pb.FLOAT32, "out_share": pb.FLOAT32,
    },
    "layer_stats": {
        **_PER_LAYER, "influence": pb.FLOAT32, "attn_ms": pb.FLOAT32, "mlp_ms": pb.FLOAT32,
    },
    "mlp_stats": {
        **_PER_LAYER,
        "frac_below_1e3": pb.FLOAT32, "frac_below_1e2": pb.FLOAT32, "frac_below_1e1": pb.FLOAT32,
        "q50": pb.FLOAT32, "q90": pb.FLOAT32, "q99": pb.FLOAT32,
    },
    "gpu_samples": {
        "ts_us": pb.INT64, "device_index": pb.UINT32, "available": pb.BOOL,
        "mem_used_bytes": pb.UINT64, "mem_total_bytes": pb.UINT64, "util_pct": pb.FLOAT32,
        "power_w": pb.FLOAT32, "sm_clock_mhz": pb.FLOAT32,
    },
}

# ExportCounters fields (proto ExportCounters), as the agents table stores the latest of them.
COUNTER_COLUMNS = ("enqueued_records", "dropped_records", "sent_records", "sent_batches",
                   "failed_batches", "reconnects", "queue_len")


class Table(str, enum.Enum):
    """Tables a Query client (CLI, dashboard) may read. The control plane adds `agent_id` and
    `received_at` to every telemetry table; the others are its records of agents and plans."""
    REQUESTS = "requests"
    HEAD_STATS = "head_stats"
    LAYER_STATS = "layer_stats"
    MLP_STATS = "mlp_stats"
    GPU_SAMPLES = "gpu_samples"
    AGENTS = "agents"              # registration, model facts, latest COUNTER_COLUMNS
    PLANS = "plans"                # plan_id, status, query_classes, doc_json, ...
    TRIALS = "trials"              # one row per trial: evidence JSON (proto/evidence.py)
    DECISIONS = "decisions"        # policy decisions per plan
    APPLICATIONS = "applications"  # rollout state per (plan, agent)
    AUDIT_LOG = "audit_log"


# Columns a client may rely on in the non-telemetry tables (others may be added, none removed).
QUERYABLE_COLUMNS: dict[Table, tuple[str, ...]] = {
    Table.AGENTS: ("agent_id", "fingerprint", "model_name", "connected", "last_seen", *COUNTER_COLUMNS),
    Table.PLANS: ("plan_id", "status", "query_classes", "doc_json", "created_at_us", "updated_at_us"),
    Table.TRIALS: ("trial_id", "plan_id", "agent_id", "evidence_json", "finished_at_us", "error"),
    Table.DECISIONS: ("plan_id", "outcome", "rules_json", "policy_revision", "decided_at_us",
                      "actor", "reason"),
    Table.APPLICATIONS: ("plan_id", "agent_id", "stage", "state", "detail", "ts_us"),
    Table.AUDIT_LOG: ("seq", "ts_us", "kind", "actor", "subject", "details_json"),
}
