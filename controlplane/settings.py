"""The control plane server's one settings object: argument > HEADROOM_CP_* env > default, validated."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from headroom_sidecar.proto.settings import resolve_settings


@dataclass(frozen=True)
class ServerSettings:
    # The DuckDB file; this process is its only writer.
    db_path: str = field(default=".headroom/headroom.duckdb", metadata={"env": "HEADROOM_CP_DB"})
    host: str = field(default="127.0.0.1", metadata={"env": "HEADROOM_CP_HOST"})
    # 0 picks a free port; RunningServer.port tells which.
    port: int = field(default=50051, metadata={"env": "HEADROOM_CP_PORT"})
    # Largest gRPC message either way (telemetry batches, query replies).
    max_message_bytes: int = field(default=64 * 1024 * 1024,
                                   metadata={"env": "HEADROOM_CP_MAX_MESSAGE_BYTES"})
    # Query RPC: rows returned when the request asks for 0, and the most it may ask for.
    query_default_rows: int = field(default=10_000, metadata={"env": "HEADROOM_CP_QUERY_DEFAULT_ROWS"})
    query_max_rows: int = field(default=1_000_000, metadata={"env": "HEADROOM_CP_QUERY_MAX_ROWS"})
    # A query running longer is interrupted and answered DEADLINE_EXCEEDED.
    query_timeout_s: float = field(default=30.0, metadata={"env": "HEADROOM_CP_QUERY_TIMEOUT_S"})
    # Threads that run Query and Admin calls (the grpc.aio server's migration pool; with an
    # operator port, that server has a pool of this size too). Agent streams hold none: they
    # are read and written on the server's event loop.
    max_workers: int = field(default=16, metadata={"env": "HEADROOM_CP_MAX_WORKERS"})
    # Threads that handle agent messages off the event loop (decode, registration, handing
    # batches to the ingest writer); a message holds one only while it is handled.
    stream_workers: int = field(default=2, metadata={"env": "HEADROOM_CP_STREAM_WORKERS"})
    # A batch or heartbeat up to this size is validated on the event loop instead (a live
    # agent's batch is a few kB: cheaper than two thread hand-offs); 0 = never.
    inline_max_bytes: int = field(default=32 * 1024, metadata={"env": "HEADROOM_CP_INLINE_MAX_BYTES"})
    # Messages waiting to go to one agent (acks, plans, trials); a full queue slows its reader.
    outbound_queue_max: int = field(default=1024, metadata={"env": "HEADROOM_CP_OUTBOUND_QUEUE_MAX"})
    # A batch whose (agent_id, pid, seq) was already stored is acked with rows_stored=0.
    dedupe_batches: bool = field(default=True, metadata={"env": "HEADROOM_CP_DEDUPE_BATCHES"})
    # Ingest: batches waiting for the writer thread (a full queue slows the agents' streams),
    # and the most rows one write transaction groups.
    ingest_queue_batches: int = field(default=64, metadata={"env": "HEADROOM_CP_INGEST_QUEUE_BATCHES"})
    ingest_group_max_rows: int = field(default=1_000_000,
                                       metadata={"env": "HEADROOM_CP_INGEST_GROUP_MAX_ROWS"})
    # DuckDB checkpoints once this much WAL has accumulated.
    checkpoint_mb: int = field(default=128, metadata={"env": "HEADROOM_CP_CHECKPOINT_MB"})
    # DuckDB threads for the store (0 = DuckDB's default: all cores).
    duckdb_threads: int = field(default=0, metadata={"env": "HEADROOM_CP_DUCKDB_THREADS"})
    # Transport security (controlplane/auth.py). TLS: the server's certificate and key, and the
    # CA that signs agents' and operators' client certificates (required on `port`).
    tls_cert_file: str = field(default="", metadata={"env": "HEADROOM_CP_TLS_CERT"})
    tls_key_file: str = field(default="", metadata={"env": "HEADROOM_CP_TLS_KEY"})
    tls_client_ca_file: str = field(default="", metadata={"env": "HEADROOM_CP_TLS_CLIENT_CA"})
    # HMAC key of operator tokens (`controlplane token issue`); "" = no tokens.
    token_key_file: str = field(default="", metadata={"env": "HEADROOM_CP_TOKEN_KEY_FILE"})
    # Query and Admin on a port of their own, so an operator's call does not wait on the
    # event loop of the agents' streams (-1 = none, 0 = a free one). With TLS, clients
    # there present no certificate but a signed token (token_key_file).
    operator_port: int = field(default=-1, metadata={"env": "HEADROOM_CP_OPERATOR_PORT"})
    # Without TLS (loopback only): the secret every call must carry ("" = none needed). The
    # embedded control plane gets a fresh one per process.
    local_token: str = field(default="", metadata={"env": "HEADROOM_CP_LOCAL_TOKEN"})
    # Open Connect streams in all; one more is refused RESOURCE_EXHAUSTED. An idle stream
    # holds no thread, only its buffers.
    max_agent_streams: int = field(default=1024, metadata={"env": "HEADROOM_CP_MAX_AGENT_STREAMS"})
    # Query and Admin calls running at once, apart from agent streams; one more is refused
    # RESOURCE_EXHAUSTED at once rather than queued. At most max_workers.
    max_operator_calls: int = field(default=16, metadata={"env": "HEADROOM_CP_MAX_OPERATOR_CALLS"})
    # Open Connect streams of one authenticated agent (its certificate) at once.
    max_streams_per_client: int = field(default=4,
                                        metadata={"env": "HEADROOM_CP_MAX_STREAMS_PER_CLIENT"})
    # A Connect stream that has not said hello after this long is closed.
    hello_timeout_s: float = field(default=10.0, metadata={"env": "HEADROOM_CP_HELLO_TIMEOUT_S"})
    # Largest Query or Admin request (SQL text, JSON arguments).
    max_operator_request_bytes: int = field(
        default=1024 * 1024, metadata={"env": "HEADROOM_CP_MAX_OPERATOR_REQUEST_BYTES"})

    def __post_init__(self):
        problems = []
        if not self.db_path:
            problems.append("db_path is empty")
        elif (problem := db_path_problem(self.db_path)) is not None:
            problems.append(problem)
        if not self.host:
            problems.append("host is empty")
        if not 0 <= self.port <= 65535:
            problems.append(f"port={self.port} is not in [0, 65535]")
        for name in ("max_message_bytes", "query_default_rows", "query_max_rows", "max_workers",
                     "outbound_queue_max", "ingest_queue_batches", "ingest_group_max_rows",
                     "checkpoint_mb"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be > 0")
        if self.query_timeout_s <= 0:
            problems.append(f"query_timeout_s={self.query_timeout_s} must be > 0")
        if self.query_default_rows > self.query_max_rows:
            problems.append(f"query_default_rows={self.query_default_rows} exceeds "
                            f"query_max_rows={self.query_max_rows}")
        if self.duckdb_threads < 0:
            problems.append(f"duckdb_threads={self.duckdb_threads} must be >= 0")
        if not 0 <= self.inline_max_bytes <= 1 << 20:
            problems.append(f"inline_max_bytes={self.inline_max_bytes} is not in [0, 1048576] "
                            "(larger batches would stall the event loop)")
        problems += self._limit_problems()
        if problems:
            raise ValueError("invalid ServerSettings: " + "; ".join(problems))

    def _limit_problems(self) -> list[str]:
        problems = [f"{n}={getattr(self, n)} must be > 0" for n in
                    ("max_agent_streams", "max_streams_per_client", "max_operator_request_bytes",
                     "max_operator_calls", "stream_workers")
                    if getattr(self, n) <= 0]
        if self.max_operator_calls > self.max_workers:
            problems.append(f"max_operator_calls={self.max_operator_calls} exceeds "
                            f"max_workers={self.max_workers}: each running call needs a thread")
        if not self.hello_timeout_s > 0:
            problems.append(f"hello_timeout_s={self.hello_timeout_s} must be > 0")
        if not -1 <= self.operator_port <= 65535:
            problems.append(f"operator_port={self.operator_port} is not -1 (none) or in [0, 65535]")
        return problems

    @classmethod
    def resolve(cls, **overrides: Any) -> "ServerSettings":
        """Arguments (not None) win, then HEADROOM_CP_* environment variables, then defaults."""
        return resolve_settings(cls, overrides, "server")


# `s3://...`, `gs://...`, `http://...`: DuckDB would create a local directory named `s3:`.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def db_path_problem(db_path: str) -> Optional[str]:
    """Why `db_path` cannot be the store (None: it can): only a local file path is supported."""
    if _URL.match(db_path):
        scheme = db_path.split("://", 1)[0]
        return (f"db_path={db_path!r}: {scheme}:// is not supported; the control plane's "
                "database must be a local file path (e.g. /var/lib/headroom/headroom.duckdb); "
                "use `controlplane export --to DIR` to copy telemetry elsewhere as Parquet")
    return None
