"""The agent's one settings object: argument > environment variable > default, validated."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from headroom_sidecar.proto.settings import resolve_settings  # noqa: F401 (agent parts import it here)


@dataclass(frozen=True)
class AgentSettings:
    # Control plane address host:port; None starts an embedded one on localhost.
    address: Optional[str] = field(default=None, metadata={"env": "HEADROOM_ADDRESS"})
    # DuckDB file of the embedded control plane.
    embedded_db_path: str = field(default=".headroom/headroom.duckdb", metadata={"env": "HEADROOM_DB"})
    # Fraction of requests fully traced (per-head, per-layer, MLP stats); the rest get cheap metrics.
    sample_rate: float = field(default=0.05, metadata={"env": "HEADROOM_SAMPLE_RATE"})
    sample_seed: int = field(default=0, metadata={"env": "HEADROOM_SAMPLE_SEED"})
    # In a traced request, attention stats are taken at prefill and every Nth decode step.
    attn_decode_stride: int = field(default=8, metadata={"env": "HEADROOM_ATTN_DECODE_STRIDE"})
    # Export: bounded queue (oldest dropped and counted), batching, reconnect backoff.
    export_enabled: bool = field(default=True, metadata={"env": "HEADROOM_EXPORT"})
    queue_max_records: int = field(default=10_000, metadata={"env": "HEADROOM_QUEUE_MAX_RECORDS"})
    batch_max_records: int = field(default=256, metadata={"env": "HEADROOM_BATCH_MAX_RECORDS"})
    # A batch goes every flush_interval_ms (or at once when batch_max_records wait, or on
    # flush()). 2 s, not 0.5 s: the control plane's cost is per message (parse, validate, ack),
    # so 1,000 agents at 0.5 s meant 2,000 batches/s on its 2 cores for the same rows; at 2 s
    # it is 500/s and rows still reach the store within ~2 s (OpenTelemetry's batch processor
    # waits 5 s). Idle, the exporter heartbeats at the same interval.
    flush_interval_ms: int = field(default=2_000, metadata={"env": "HEADROOM_FLUSH_INTERVAL_MS"})
    backoff_initial_ms: int = field(default=100, metadata={"env": "HEADROOM_BACKOFF_INITIAL_MS"})
    backoff_max_ms: int = field(default=5_000, metadata={"env": "HEADROOM_BACKOFF_MAX_MS"})
    shutdown_timeout_ms: int = field(default=5_000, metadata={"env": "HEADROOM_SHUTDOWN_TIMEOUT_MS"})
    gpu_sample_interval_ms: int = field(default=1_000, metadata={"env": "HEADROOM_GPU_SAMPLE_INTERVAL_MS"})
    agent_id: Optional[str] = field(default=None, metadata={"env": "HEADROOM_AGENT_ID"})
    # Transport security (agent/credentials.py): with tls_ca_file set the agent speaks TLS and
    # presents its client certificate (CN = agent id); the control plane binds the id to it.
    tls_ca_file: Optional[str] = field(default=None, metadata={"env": "HEADROOM_TLS_CA"})
    tls_cert_file: Optional[str] = field(default=None, metadata={"env": "HEADROOM_TLS_CERT"})
    tls_key_file: Optional[str] = field(default=None, metadata={"env": "HEADROOM_TLS_KEY"})
    tls_server_name: Optional[str] = field(default=None, metadata={"env": "HEADROOM_TLS_SERVER_NAME"})
    # Plaintext loopback: the control plane's local secret (the embedded one is handed over
    # in-process through HEADROOM_LOCAL_TOKEN without being set here).
    local_token: Optional[str] = field(default=None, metadata={"env": "HEADROOM_LOCAL_TOKEN"})
    # Live quality guard while a plan is active: every Nth finished request (0 = off) is re-run
    # teacher-forced with and without the plan at the next boundary; top-1 agreement below
    # guard_min_top1 rolls the plan back. At most guard_max_tokens (the last ones) are checked.
    guard_every_n_requests: int = field(default=8, metadata={"env": "HEADROOM_GUARD_EVERY_N_REQUESTS"})
    guard_min_top1: float = field(default=0.9, metadata={"env": "HEADROOM_GUARD_MIN_TOP1"})
    guard_max_tokens: int = field(default=128, metadata={"env": "HEADROOM_GUARD_MAX_TOKENS"})
    # Trials: unoptimised-side measurements kept per eval set (host memory: eval_tokens * vocab * 4 B each).
    trial_baseline_cache_entries: int = field(default=2,
                                              metadata={"env": "HEADROOM_TRIAL_BASELINE_CACHE_ENTRIES"})
    # Trials run on a thread that serves requests (the next request, or an idle loop in
    # handle.serve_pending()); after this long with neither, the control thread runs them.
    trial_handoff_s: float = field(default=10.0, metadata={"env": "HEADROOM_TRIAL_HANDOFF_S"})
    # Per query class, the prompts (token ids) of its last N unpadded single-sequence requests,
    # kept in this process's memory only (never exported), so that a trial asked for
    # `traffic_prompts` measures speculation on what the class really asks. 0 = keep none.
    recent_prompts_per_class: int = field(default=4,
                                          metadata={"env": "HEADROOM_RECENT_PROMPTS_PER_CLASS"})

    # Control plane public keys whose plan signatures this agent accepts (agent/verify.py):
    # comma-separated file paths or base64 raw Ed25519 keys. None: plans from the network are
    # refused, except from the embedded control plane (trusted in process).
    plan_verify_keys: Optional[str] = field(default=None, metadata={"env": "HEADROOM_PLAN_VERIFY_KEYS"})

    def __post_init__(self):
        problems = []
        if self.plan_verify_keys:
            from headroom_sidecar.agent.verify import parse_trusted_keys   # verify does not import settings
            try:
                parse_trusted_keys(self.plan_verify_keys)
            except ValueError as e:
                problems.append(f"plan_verify_keys: {e}")
        if not 0.0 <= self.sample_rate <= 1.0:
            problems.append(f"sample_rate={self.sample_rate} is not in [0, 1]")
        for name in ("attn_decode_stride", "queue_max_records", "batch_max_records",
                     "flush_interval_ms", "backoff_initial_ms", "backoff_max_ms",
                     "shutdown_timeout_ms", "gpu_sample_interval_ms"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be > 0")
        if not 0.0 <= self.guard_min_top1 <= 1.0:
            problems.append(f"guard_min_top1={self.guard_min_top1} is not in [0, 1]")
        if self.guard_every_n_requests < 0:
            problems.append(f"guard_every_n_requests={self.guard_every_n_requests} must be >= 0 (0 = off)")
        if self.guard_max_tokens < 2:
            problems.append(f"guard_max_tokens={self.guard_max_tokens} must be >= 2")
        if self.recent_prompts_per_class < 0:
            problems.append(f"recent_prompts_per_class={self.recent_prompts_per_class} must be >= 0 (0 = off)")
        if self.trial_baseline_cache_entries < 0:
            problems.append(f"trial_baseline_cache_entries={self.trial_baseline_cache_entries} must be >= 0")
        if not 0.0 <= self.trial_handoff_s <= 3600.0:
            problems.append(f"trial_handoff_s={self.trial_handoff_s} is not in [0, 3600]")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            problems.append("tls_cert_file and tls_key_file go together (HEADROOM_TLS_CERT, "
                            "HEADROOM_TLS_KEY)")
        if self.tls_cert_file and not self.tls_ca_file:
            problems.append("tls_cert_file needs tls_ca_file (HEADROOM_TLS_CA): the CA of the "
                            "control plane's certificate")
        if self.backoff_max_ms < self.backoff_initial_ms:
            problems.append("backoff_max_ms must be >= backoff_initial_ms")
        if problems:
            raise ValueError("invalid AgentSettings: " + "; ".join(problems))

    @classmethod
    def resolve(cls, **overrides: Any) -> "AgentSettings":
        """Arguments win, then HEADROOM_* environment variables, then defaults."""
        return resolve_settings(cls, overrides, "agent")
