"""Every table of the control plane's DuckDB file, and its schema version: the one owner of
the DDL. Telemetry column names and wire dtypes are the contract in proto/tables.py (what the
agent's to_tables() sends); the store adds `agent_id` and `received_at` in front of them. The plan store (plans.py), the
audit log (audit.py) and the agent bindings (auth.py) run their part of these strings on a
bare connection; the store creates them all, and migrates an older file, when it opens.

Version history:
  1: telemetry, agents, batches, jobs and roll-ups here; plans, audit and agent_bindings
     created by their own modules, outside the version (jobs.objective and the audit MAC
     columns were added to version-1 files without a bump).
  2: every table here, under the version; migrating from 1 adds what a version-1 file may
     lack (those tables, the audit MAC columns, jobs.objective) and keeps every row.
"""
from __future__ import annotations

from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto.tables import COUNTER_COLUMNS, TELEMETRY_COLUMNS  # noqa: F401  (re-used here)

SCHEMA_VERSION = 2

# Wire dtype -> DuckDB type.
DUCKDB_TYPES = {
    pb.FLOAT32: "FLOAT", pb.FLOAT64: "DOUBLE", pb.INT32: "INTEGER", pb.INT64: "BIGINT",
    pb.UINT16: "USMALLINT", pb.UINT32: "UINTEGER", pb.UINT64: "UBIGINT", pb.BOOL: "BOOLEAN",
    pb.STRING: "VARCHAR",
}

# ModelInfo field -> agents column (name/dtype/device get a model_ prefix to stay unambiguous).
MODEL_COLUMNS = {
    "fingerprint": ("fingerprint", "VARCHAR"), "name": ("model_name", "VARCHAR"),
    "architecture": ("architecture", "VARCHAR"), "num_layers": ("num_layers", "UINTEGER"),
    "num_heads": ("num_heads", "UINTEGER"), "num_kv_heads": ("num_kv_heads", "UINTEGER"),
    "head_dim": ("head_dim", "UINTEGER"), "hidden_size": ("hidden_size", "UINTEGER"),
    "intermediate_size": ("intermediate_size", "UINTEGER"),
    "num_parameters": ("num_parameters", "UBIGINT"), "dtype": ("model_dtype", "VARCHAR"),
    "device": ("model_device", "VARCHAR"),
}

HELLO_COLUMNS = {"hostname": "VARCHAR", "pid": "UINTEGER", "agent_version": "VARCHAR",
                 "gpu_status": "VARCHAR", "settings_json": "VARCHAR"}


def _agents_ddl() -> str:
    cols = ["agent_id VARCHAR PRIMARY KEY"]
    cols += [f"{col} {sql_type}" for col, sql_type in MODEL_COLUMNS.values()]
    cols += [f"{col} {sql_type}" for col, sql_type in HELLO_COLUMNS.items()]
    cols += ["first_seen TIMESTAMP NOT NULL", "last_seen TIMESTAMP NOT NULL",
             "connected BOOLEAN NOT NULL"]
    cols += [f"{col} {'UINTEGER' if col == 'queue_len' else 'UBIGINT'} NOT NULL DEFAULT 0"
             for col in COUNTER_COLUMNS]
    return "CREATE TABLE IF NOT EXISTS agents (\n  " + ",\n  ".join(cols) + "\n)"


def _telemetry_ddl(table: str, columns: dict[str, int]) -> str:
    cols = ["agent_id VARCHAR NOT NULL", "received_at TIMESTAMP NOT NULL"]
    cols += [f"{name} {DUCKDB_TYPES[code]}" for name, code in columns.items()]
    return f"CREATE TABLE IF NOT EXISTS {table} (\n  " + ",\n  ".join(cols) + "\n)"


# One row per stored TelemetryBatch: ingest accounting, and the key that makes a resend a no-op.
_BATCHES_DDL = """CREATE TABLE IF NOT EXISTS batches (
  agent_id VARCHAR NOT NULL,
  pid UINTEGER NOT NULL,
  seq UBIGINT NOT NULL,
  received_at TIMESTAMP NOT NULL,
  sent_at_us BIGINT,
  rows_stored UBIGINT NOT NULL,
  bytes UBIGINT NOT NULL,
  PRIMARY KEY (agent_id, pid, seq)
)"""

_VERSION_DDL = """CREATE TABLE IF NOT EXISTS schema_version (
  version INTEGER NOT NULL,
  applied_at TIMESTAMP NOT NULL
)"""


# Control-plane jobs (planning, rollouts), written on every change so a restart finds them:
# one running when the process died is marked interrupted at start (controlplane/jobs.py).
JOBS_DDL = """CREATE TABLE IF NOT EXISTS jobs (
  job_id VARCHAR PRIMARY KEY,
  kind VARCHAR NOT NULL,
  state VARCHAR NOT NULL,
  stage VARCHAR NOT NULL,
  fingerprint VARCHAR NOT NULL,
  agent_ids VARCHAR[] NOT NULL,
  query_class VARCHAR NOT NULL,
  actor VARCHAR NOT NULL,
  plan_id VARCHAR,
  decision VARCHAR,
  plan_status VARCHAR,
  trials UINTEGER NOT NULL,
  message VARCHAR NOT NULL,
  last_error VARCHAR,
  started_at_us BIGINT NOT NULL,
  updated_at_us BIGINT NOT NULL,
  finished_at_us BIGINT,
  objective VARCHAR
)"""


# Hourly roll-ups of the traced statistics (controlplane/rollup.py), written in the same
# transaction that deletes the raw rows they summarize: an hour is in raw or in a roll-up,
# never both. Each statistic column holds the mean over the `n` rows the planner counts.
ROLLUP_TABLES = {"head_stats": "head_stats_hourly", "layer_stats": "layer_stats_hourly",
                 "mlp_stats": "mlp_stats_hourly"}


def _rollup_ddl(raw: str, hourly: str) -> str:
    keys = ["layer USMALLINT", "head USMALLINT"] if raw == "head_stats" else ["layer USMALLINT"]
    stats = [c for c in TELEMETRY_COLUMNS[raw] if c not in ("request_id", "layer", "head")]
    cols = ["agent_id VARCHAR NOT NULL", "fingerprint VARCHAR", "query_class VARCHAR",
            "hour TIMESTAMP NOT NULL", *keys, "n UBIGINT NOT NULL"]
    if raw == "layer_stats":
        cols.append("requests UBIGINT NOT NULL")   # distinct traced requests in the group
    cols += [f"{c} DOUBLE" for c in stats]
    return f"CREATE TABLE IF NOT EXISTS {hourly} (\n  " + ",\n  ".join(cols) + "\n)"


# Plans, their status history, trials, policy decisions and rollout applications (plans.py).
PLAN_TABLES_DDL = """
CREATE TABLE IF NOT EXISTS plans (
    plan_id VARCHAR PRIMARY KEY, version INTEGER NOT NULL, sha256 VARCHAR NOT NULL,
    fingerprint VARCHAR NOT NULL, query_classes VARCHAR[] NOT NULL, mode VARCHAR NOT NULL,
    doc_json VARCHAR NOT NULL, status VARCHAR NOT NULL, proposed_by VARCHAR NOT NULL,
    created_at_us BIGINT NOT NULL, updated_at_us BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS plan_transitions (
    plan_id VARCHAR NOT NULL, ts_us BIGINT NOT NULL, from_status VARCHAR,
    to_status VARCHAR NOT NULL, actor VARCHAR NOT NULL, reason VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    trial_id VARCHAR PRIMARY KEY, plan_id VARCHAR NOT NULL, agent_id VARCHAR NOT NULL,
    evidence_json VARCHAR, requested_at_us BIGINT NOT NULL, finished_at_us BIGINT, error VARCHAR);
CREATE TABLE IF NOT EXISTS decisions (
    plan_id VARCHAR NOT NULL, outcome VARCHAR NOT NULL, rules_json VARCHAR NOT NULL,
    policy_revision VARCHAR NOT NULL, policy_hash VARCHAR NOT NULL, decided_at_us BIGINT NOT NULL,
    actor VARCHAR NOT NULL, reason VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS applications (
    plan_id VARCHAR NOT NULL, agent_id VARCHAR NOT NULL, stage VARCHAR NOT NULL,
    state VARCHAR NOT NULL, detail VARCHAR NOT NULL, ts_us BIGINT NOT NULL);
"""

# The hash-chained audit log and its head (audit.py). mac / keyed_since: the HMAC chain; a
# file from before the key has them NULL on older rows ("unkeyed before seq N").
AUDIT_DDL = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq BIGINT PRIMARY KEY,
    ts_us BIGINT NOT NULL,
    kind VARCHAR NOT NULL,
    actor VARCHAR NOT NULL,
    subject VARCHAR NOT NULL,
    details_json VARCHAR NOT NULL,
    prev_hash VARCHAR NOT NULL,
    row_hash VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY,
    seq BIGINT NOT NULL,
    row_hash VARCHAR NOT NULL
);
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS mac VARCHAR;
ALTER TABLE audit_head ADD COLUMN IF NOT EXISTS mac VARCHAR;
ALTER TABLE audit_head ADD COLUMN IF NOT EXISTS keyed_since BIGINT;
"""

# agent id -> the certificate and model it first connected with (auth.AgentBindings).
AGENT_BINDINGS_DDL = """CREATE TABLE IF NOT EXISTS agent_bindings (
  agent_id VARCHAR PRIMARY KEY,
  cert_sha256 VARCHAR NOT NULL,
  fingerprint VARCHAR NOT NULL,
  bound_at TIMESTAMP DEFAULT current_timestamp
)"""


def ddl_statements() -> list[str]:
    """Every table at SCHEMA_VERSION; each statement is idempotent (IF NOT EXISTS)."""
    out = [_VERSION_DDL, _agents_ddl(), _BATCHES_DDL, JOBS_DDL]
    out += [_telemetry_ddl(t, cols) for t, cols in TELEMETRY_COLUMNS.items()]
    out += [_rollup_ddl(raw, hourly) for raw, hourly in ROLLUP_TABLES.items()]
    out += [PLAN_TABLES_DDL, AUDIT_DDL, AGENT_BINDINGS_DDL]
    return out


# version -> what takes a file of version-1 to it, run after ddl_statements() (which creates
# the tables a file lacks). Columns added to an existing table go here.
MIGRATIONS: dict[int, list[str]] = {
    2: ["ALTER TABLE jobs ADD COLUMN IF NOT EXISTS objective VARCHAR"]
       + [f"ALTER TABLE requests ADD COLUMN IF NOT EXISTS {c} UINTEGER DEFAULT 0"
          for c in ("spec_drafted", "spec_accepted", "spec_verify_forwards")],
}


class SchemaError(RuntimeError):
    """The file's schema version is one this code cannot open."""


def migrate(cur, db_path: str, now) -> list[int]:
    """Brings the file on `cur` (inside the caller's transaction) to SCHEMA_VERSION and records
    each version applied; returns them ([] when already current). A file without a version row
    is new: it gets SCHEMA_VERSION. `now`: the naive-UTC applied_at."""
    for ddl in ddl_statements():
        cur.execute(ddl)
    versions = [v for (v,) in cur.execute("SELECT version FROM schema_version").fetchall()]
    if not versions:
        cur.execute("INSERT INTO schema_version VALUES (?, ?)", [SCHEMA_VERSION, now])
        return [SCHEMA_VERSION]
    found = max(versions)
    if found > SCHEMA_VERSION:
        raise SchemaError(f"{db_path}: schema version {found}, newer than this control plane's "
                          f"{SCHEMA_VERSION}: upgrade the control plane")
    applied = list(range(found + 1, SCHEMA_VERSION + 1))
    for version in applied:
        for statement in MIGRATIONS.get(version, []):
            cur.execute(statement)
        cur.execute("INSERT INTO schema_version VALUES (?, ?)", [version, now])
    return applied
