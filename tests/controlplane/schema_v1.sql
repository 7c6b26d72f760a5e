-- The control plane's tables as version 1 created them (commit 69e253f: schema.py's
-- ddl_statements(), plans.py's _STORE_SCHEMA, audit.py's _SCHEMA before its MAC columns,
-- auth.py's agent_bindings), and jobs before its `objective` column: the oldest
-- version-1 file the migration to version 2 must open.

CREATE TABLE IF NOT EXISTS schema_version (
  version INTEGER NOT NULL,
  applied_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
  agent_id VARCHAR PRIMARY KEY,
  fingerprint VARCHAR,
  model_name VARCHAR,
  architecture VARCHAR,
  num_layers UINTEGER,
  num_heads UINTEGER,
  num_kv_heads UINTEGER,
  head_dim UINTEGER,
  hidden_size UINTEGER,
  intermediate_size UINTEGER,
  num_parameters UBIGINT,
  model_dtype VARCHAR,
  model_device VARCHAR,
  hostname VARCHAR,
  pid UINTEGER,
  agent_version VARCHAR,
  gpu_status VARCHAR,
  settings_json VARCHAR,
  first_seen TIMESTAMP NOT NULL,
  last_seen TIMESTAMP NOT NULL,
  connected BOOLEAN NOT NULL,
  enqueued_records UBIGINT NOT NULL DEFAULT 0,
  dropped_records UBIGINT NOT NULL DEFAULT 0,
  sent_records UBIGINT NOT NULL DEFAULT 0,
  sent_batches UBIGINT NOT NULL DEFAULT 0,
  failed_batches UBIGINT NOT NULL DEFAULT 0,
  reconnects UBIGINT NOT NULL DEFAULT 0,
  queue_len UINTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batches (
  agent_id VARCHAR NOT NULL,
  pid UINTEGER NOT NULL,
  seq UBIGINT NOT NULL,
  received_at TIMESTAMP NOT NULL,
  sent_at_us BIGINT,
  rows_stored UBIGINT NOT NULL,
  bytes UBIGINT NOT NULL,
  PRIMARY KEY (agent_id, pid, seq)
);
CREATE TABLE IF NOT EXISTS jobs (
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
  finished_at_us BIGINT
);
CREATE TABLE IF NOT EXISTS requests (
  agent_id VARCHAR NOT NULL,
  received_at TIMESTAMP NOT NULL,
  request_id UBIGINT,
  start_us BIGINT,
  tenant VARCHAR,
  route VARCHAR,
  query_class VARCHAR,
  traced BOOLEAN,
  batch_size UINTEGER,
  prompt_tokens UINTEGER,
  output_tokens UINTEGER,
  ttft_ms FLOAT,
  tpot_ms FLOAT,
  latency_ms FLOAT
);
CREATE TABLE IF NOT EXISTS head_stats (
  agent_id VARCHAR NOT NULL,
  received_at TIMESTAMP NOT NULL,
  request_id UBIGINT,
  layer USMALLINT,
  head USMALLINT,
  entropy FLOAT,
  max_weight FLOAT,
  out_share FLOAT
);
CREATE TABLE IF NOT EXISTS layer_stats (
  agent_id VARCHAR NOT NULL,
  received_at TIMESTAMP NOT NULL,
  request_id UBIGINT,
  layer USMALLINT,
  influence FLOAT,
  attn_ms FLOAT,
  mlp_ms FLOAT
);
CREATE TABLE IF NOT EXISTS mlp_stats (
  agent_id VARCHAR NOT NULL,
  received_at TIMESTAMP NOT NULL,
  request_id UBIGINT,
  layer USMALLINT,
  frac_below_1e3 FLOAT,
  frac_below_1e2 FLOAT,
  frac_below_1e1 FLOAT,
  q50 FLOAT,
  q90 FLOAT,
  q99 FLOAT
);
CREATE TABLE IF NOT EXISTS gpu_samples (
  agent_id VARCHAR NOT NULL,
  received_at TIMESTAMP NOT NULL,
  ts_us BIGINT,
  device_index UINTEGER,
  available BOOLEAN,
  mem_used_bytes UBIGINT,
  mem_total_bytes UBIGINT,
  util_pct FLOAT,
  power_w FLOAT,
  sm_clock_mhz FLOAT
);
CREATE TABLE IF NOT EXISTS head_stats_hourly (
  agent_id VARCHAR NOT NULL,
  fingerprint VARCHAR,
  query_class VARCHAR,
  hour TIMESTAMP NOT NULL,
  layer USMALLINT,
  head USMALLINT,
  n UBIGINT NOT NULL,
  entropy DOUBLE,
  max_weight DOUBLE,
  out_share DOUBLE
);
CREATE TABLE IF NOT EXISTS layer_stats_hourly (
  agent_id VARCHAR NOT NULL,
  fingerprint VARCHAR,
  query_class VARCHAR,
  hour TIMESTAMP NOT NULL,
  layer USMALLINT,
  n UBIGINT NOT NULL,
  requests UBIGINT NOT NULL,
  influence DOUBLE,
  attn_ms DOUBLE,
  mlp_ms DOUBLE
);
CREATE TABLE IF NOT EXISTS mlp_stats_hourly (
  agent_id VARCHAR NOT NULL,
  fingerprint VARCHAR,
  query_class VARCHAR,
  hour TIMESTAMP NOT NULL,
  layer USMALLINT,
  n UBIGINT NOT NULL,
  frac_below_1e3 DOUBLE,
  frac_below_1e2 DOUBLE,
  frac_below_1e1 DOUBLE,
  q50 DOUBLE,
  q90 DOUBLE,
  q99 DOUBLE
);
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
CREATE TABLE IF NOT EXISTS agent_bindings (agent_id VARCHAR PRIMARY KEY, cert_sha256 VARCHAR NOT NULL, fingerprint VARCHAR NOT NULL, bound_at TIMESTAMP DEFAULT current_timestamp);
