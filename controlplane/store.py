"""The control plane's DuckDB file: one writer (this process), any number of readers.

Writes go through one lock on one writer cursor, one transaction per telemetry batch;
reads get their own cursor each (DuckDB: one connection per thread), so a slow query never
holds up ingestion.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional, Sequence

import duckdb
import numpy as np
import pyarrow as pa

from headroom_sidecar.controlplane.batches import (BatchJob, DecodedBatch, StoredBatch,
                                                   arrow_numbers, arrow_strings)
from headroom_sidecar.controlplane.ingest_rules import ModelShape
from headroom_sidecar.controlplane.schema import (COUNTER_COLUMNS, HELLO_COLUMNS, MODEL_COLUMNS,
                                                  SCHEMA_VERSION, TELEMETRY_COLUMNS, SchemaError,
                                                  migrate)

__all__ = ["BatchJob", "Counters", "DecodedBatch", "Registration", "Store", "StoreError",
           "StoredBatch", "utc_now"]


class StoreError(RuntimeError):
    """The database cannot be opened or written; the message says which file and why."""


@dataclass(frozen=True)
class Counters:
    """ExportCounters, cumulative since the agent started."""
    enqueued_records: int = 0
    dropped_records: int = 0
    sent_records: int = 0
    sent_batches: int = 0
    failed_batches: int = 0
    reconnects: int = 0
    queue_len: int = 0


@dataclass(frozen=True)
class Registration:
    """What an AgentHello says; `model` is keyed by ModelInfo field name."""
    agent_id: str
    model: dict = field(default_factory=dict)
    hostname: str = ""
    pid: int = 0
    agent_version: str = ""
    gpu_status: str = ""
    settings_json: str = ""


def utc_now() -> datetime:
    """Naive UTC, as the TIMESTAMP columns hold it."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _insert_sql(table: str) -> str:
    cols = ", ".join(TELEMETRY_COLUMNS[table])
    return (f"INSERT INTO {table} (agent_id, received_at, {cols}) "
            f"SELECT agent_id, $received_at, {cols} FROM _incoming")


_INSERT_SQL = {table: _insert_sql(table) for table in TELEMETRY_COLUMNS}


def _upsert_agent_sql() -> str:
    cols = ["agent_id", *(c for c, _ in MODEL_COLUMNS.values()), *HELLO_COLUMNS,
            "first_seen", "last_seen", "connected"]
    updates = ", ".join(f"{c} = excluded.{c}" for c in cols[1:] if c != "first_seen")
    return (f"INSERT INTO agents ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
            f"ON CONFLICT (agent_id) DO UPDATE SET {updates}")


_UPSERT_AGENT_SQL = _upsert_agent_sql()


class Store:
    def __init__(self, db_path: str, *, duckdb_threads: int = 0, dedupe_batches: bool = True,
                 checkpoint_mb: int = 128):
        self.db_path = str(db_path)
        self.dedupe_batches = dedupe_batches
        Path(self.db_path).parent.mkdir(parents=True, exist_ok=True)
        # The store reads and writes only its own file; SQL that names other files is refused.
        # A larger WAL before each checkpoint: fewer, bigger checkpoints under steady ingest.
        config = {"enable_external_access": False, "checkpoint_threshold": f"{checkpoint_mb}MB"}
        if duckdb_threads:
            config["threads"] = duckdb_threads
        try:
            self._con = duckdb.connect(self.db_path, config=config)
        except duckdb.Error as e:
            raise StoreError(f"cannot open DuckDB file {self.db_path}: {e}") from None
        self._lock = threading.RLock()
        self._cursor_lock = threading.Lock()
        self._writer = self._con.cursor()
        self._closed = False
        self._shapes: dict[str, ModelShape] = {}   # agent_id -> its latest hello's structure
        self.migrated_to = self._migrate()   # versions this open applied ([] if current)
        self.mark_all_disconnected()   # nobody is connected to a server that just started

    # ------------------------------------------------------------------ lifecycle
    def _migrate(self) -> list[int]:
        """Every table (schema.py owns them), the file brought to SCHEMA_VERSION in one
        transaction: a failed migration leaves the file as it was, and closed."""
        try:
            with self.transaction() as cur:
                return migrate(cur, self.db_path, utc_now())
        except (SchemaError, duckdb.Error) as e:
            self._closed = True
            self._writer.close()
            self._con.close()
            raise StoreError(f"cannot migrate DuckDB file {self.db_path} to schema version "
                             f"{SCHEMA_VERSION}: {e}") from None

    def checkpoint(self) -> None:
        """Writes the WAL into the file, so freed blocks show and can be reused."""
        with self._lock:
            if self._closed:
                raise StoreError(f"store {self.db_path} is closed")
            self._writer.execute("CHECKPOINT")

    def close(self) -> None:
        """Closes the file once; idempotent even when a close failed half way (a reader on
        another thread still inside a call), so a later close never touches it again."""
        with self._lock:
            if self._closed:
                return
            try:
                self.mark_all_disconnected()
            finally:
                self._closed = True
                self._writer.close()
                self._con.close()

    # ------------------------------------------------------------------ access
    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The writer cursor, under the write lock, in one transaction (rolled back on error)."""
        with self._lock:
            if self._closed:
                raise StoreError(f"store {self.db_path} is closed")
            self._writer.begin()
            try:
                yield self._writer
            except BaseException:
                self._writer.rollback()
                raise
            self._writer.commit()

    def control_cursor(self) -> tuple[duckdb.DuckDBPyConnection, threading.RLock]:
        """A cursor for the plan store and the audit log, and the write lock they share with
        ingest (one writer at a time on this file); the caller closes the cursor."""
        with self._cursor_lock:
            if self._closed:
                raise StoreError(f"store {self.db_path} is closed")
            return self._con.cursor(), self._lock

    @contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A fresh cursor of this database for one read; close it by leaving the block."""
        with self._cursor_lock:
            if self._closed:
                raise StoreError(f"store {self.db_path} is closed")
            cur = self._con.cursor()
        try:
            yield cur
        finally:
            cur.close()

    # ------------------------------------------------------------------ agents
    def register_agent(self, reg: Registration) -> None:
        with self.transaction() as cur:
            self._register(cur, reg, utc_now())

    def _register(self, cur, reg: Registration, now: datetime) -> None:
        model = [reg.model.get(f) for f in MODEL_COLUMNS]
        hello = [reg.hostname, reg.pid, reg.agent_version, reg.gpu_status, reg.settings_json]
        cur.execute(_UPSERT_AGENT_SQL, [reg.agent_id, *model, *hello, now, now, True])
        self._shapes[reg.agent_id] = ModelShape(int(reg.model.get("num_layers") or 0),
                                                int(reg.model.get("num_heads") or 0))

    def model_shape(self, agent_id: str) -> ModelShape:
        """The structure the agent registered (0 layers/heads: none, or it never said hello);
        ingest checks layer and head indices against it. Lock-free on the hot path: the
        stream's hello put it in the dict before its first batch."""
        shape = self._shapes.get(agent_id)
        if shape is None:
            with self.reader() as cur:
                got = cur.execute("SELECT num_layers, num_heads FROM agents WHERE agent_id = ?",
                                  [agent_id]).fetchone()
            shape = ModelShape(*(int(v or 0) for v in (got or (0, 0))))
        return shape

    def set_connected(self, agent_id: str, connected: bool) -> None:
        with self.transaction() as cur:
            cur.execute("UPDATE agents SET connected = ?, last_seen = ? WHERE agent_id = ?",
                        [connected, utc_now(), agent_id])

    def mark_all_disconnected(self) -> None:
        with self.transaction() as cur:
            cur.execute("UPDATE agents SET connected = false WHERE connected")

    def update_counters(self, agent_id: str, counters: Optional[Counters]) -> None:
        """The latest ExportCounters and last_seen; None refreshes last_seen only."""
        with self.transaction() as cur:
            self._write_latest_counters(cur, {agent_id: counters}, utc_now())

    # ------------------------------------------------------------------ telemetry
    def store_batch(self, agent_id: str, pid: int, batch: DecodedBatch,
                    counters: Optional[Counters] = None) -> StoredBatch:
        """All of the batch's tables in one transaction: every row is stored, or none."""
        return self.store_batches([BatchJob(agent_id, pid, batch, counters)])[0]

    def store_batches(self, jobs: Sequence[BatchJob]) -> list[StoredBatch]:
        """Several agents' registrations and batches in one transaction and one INSERT per
        table (group commit): a fleet's hellos cost a few transactions, not one each."""
        now = utc_now()
        try:
            with self.transaction() as cur:
                for job in jobs:
                    if job.registration is not None:
                        self._register(cur, job.registration, now)
                fresh = self._fresh(cur, jobs)
                tables = _group_tables([j for j, new in zip(jobs, fresh) if new])
                for name, table in tables.items():
                    self._insert(cur, name, table, now)
                self._record_batches(cur, [j for j, new in zip(jobs, fresh) if new], now)
                self._write_latest_counters(cur, _latest_counters(jobs), now)
        except duckdb.Error as e:
            what = ", ".join(f"{j.agent_id}/{j.batch.seq}" if j.batch is not None else
                             f"{j.agent_id}/hello" for j in jobs
                             if j.batch is not None or j.registration is not None)
            raise StoreError(f"storing batches {what} in {self.db_path}: {e}") from None
        return [StoredBatch(rows_stored=j.batch.num_rows if new and j.batch else 0,
                            duplicate=j.batch is not None and not new)
                for j, new in zip(jobs, fresh)]

    def _fresh(self, cur, jobs: Sequence[BatchJob]) -> list[bool]:
        """Per job: True if its batch is to be stored (not seen before, not a repeat in `jobs`)."""
        keys = {(j.agent_id, j.pid, j.batch.seq) for j in jobs if j.batch is not None}
        stored = set()
        if self.dedupe_batches and keys:
            stored = {tuple(r) for r in cur.execute(
                "SELECT agent_id, pid, seq FROM batches WHERE agent_id IN (SELECT unnest(?)) "
                "AND seq BETWEEN ? AND ?",
                [sorted({k[0] for k in keys}), min(k[2] for k in keys),
                 max(k[2] for k in keys)]).fetchall()}
        out = []
        for j in jobs:
            key = None if j.batch is None else (j.agent_id, j.pid, j.batch.seq)
            out.append(key is not None and key not in stored)
            if key is not None and self.dedupe_batches:
                stored.add(key)
        return out

    @staticmethod
    def _write_latest_counters(cur, latest: dict, now: datetime) -> None:
        # Two UPDATEs per group whatever its size: one for the agents that sent no counters,
        # one joined to a columnar table of the others' (every batch of a live agent carries
        # its counters; an UPDATE per agent would be hundreds of statements per group in a
        # fleet).
        seen_only = sorted(a for a, c in latest.items() if c is None)
        if seen_only:
            cur.execute("UPDATE agents SET last_seen = ? WHERE agent_id IN (SELECT unnest(?))",
                        [now, seen_only])
        with_counters = {a: c for a, c in latest.items() if c is not None}
        if with_counters:
            _update_counters(cur, with_counters, now)

    @staticmethod
    def _record_batches(cur, jobs: Sequence[BatchJob], now: datetime) -> None:
        # One columnar INSERT (executemany runs a statement per row).
        if not jobs:
            return
        col = lambda f, kind: arrow_numbers([f(j) for j in jobs], kind)
        table = pa.table({"agent_id": arrow_strings([j.agent_id for j in jobs]),
                          "pid": col(lambda j: j.pid, "uint32"),
                          "seq": col(lambda j: j.batch.seq, "uint64"),
                          "sent_at_us": col(lambda j: j.batch.sent_at_us, "int64"),
                          "rows_stored": col(lambda j: j.batch.num_rows, "uint64"),
                          "bytes": col(lambda j: j.batch.num_bytes, "uint64")})
        with _registered(cur, "_new_batches", table):
            cur.execute("INSERT OR IGNORE INTO batches SELECT agent_id, pid, seq, ?, sent_at_us, "
                        "rows_stored, bytes FROM _new_batches", [now])

    @staticmethod
    def _insert(cur, name: str, table: pa.Table, now: datetime) -> None:
        # Columnar: DuckDB scans the Arrow table in one INSERT ... SELECT.
        with _registered(cur, "_incoming", table):
            cur.execute(_INSERT_SQL[name], {"received_at": now})


def _group_tables(jobs: Sequence[BatchJob]) -> dict[str, pa.Table]:
    """table name -> all jobs' rows of it, with an agent_id column in front.

    agent_id is one dictionary column per table (index = the job's agent, repeated over its
    rows): no per-row string and no per-job Arrow call, which cost more than the rows in a
    fleet's group of hundreds of small batches."""
    parts: dict[str, list[pa.Table]] = {}
    owners: dict[str, list[tuple[str, int]]] = {}   # table -> [(agent_id, rows)] per part
    for job in jobs:
        for name, table in job.batch.tables.items():
            parts.setdefault(name, []).append(table)
            owners.setdefault(name, []).append((job.agent_id, table.num_rows))
    # One chunk each: DuckDB scans a table of a thousand small chunks much more slowly.
    return {name: pa.concat_tables(tables).combine_chunks().add_column(
                0, "agent_id", _agent_column(owners[name]))
            for name, tables in parts.items()}


def _agent_column(owners: list[tuple[str, int]]) -> pa.DictionaryArray:
    """owners: [(agent_id, rows)] in row order -> a dictionary array of the agent ids."""
    ids = list(dict.fromkeys(agent for agent, _ in owners))
    position = {agent: i for i, agent in enumerate(ids)}
    indices = np.repeat(np.fromiter((position[a] for a, _ in owners), np.int32, len(owners)),
                        np.fromiter((n for _, n in owners), np.int64, len(owners)))
    return pa.DictionaryArray.from_arrays(arrow_numbers(indices, "int32"), arrow_strings(ids))


_COUNTERS_FROM_SQL = ("UPDATE agents SET last_seen = $now, "
                      + ", ".join(f"{c} = _counters.{c}" for c in COUNTER_COLUMNS)
                      + " FROM _counters WHERE agents.agent_id = _counters.agent_id")


def _update_counters(cur, counters_by_agent: dict[str, Counters], now: datetime) -> None:
    """One UPDATE ... FROM a registered Arrow table: agent_id + COUNTER_COLUMNS, a row each."""
    agents = list(counters_by_agent)
    columns = {"agent_id": arrow_strings(agents)}
    for c in COUNTER_COLUMNS:
        columns[c] = arrow_numbers([getattr(counters_by_agent[a], c) for a in agents], "uint64")
    with _registered(cur, "_counters", pa.table(columns)):
        cur.execute(_COUNTERS_FROM_SQL, {"now": now})


@contextmanager
def _registered(cur, name: str, table: pa.Table) -> Iterator[None]:
    """`table` is the view `name` on this cursor for the block's queries."""
    cur.register(name, table)
    try:
        yield
    finally:
        cur.unregister(name)


def _latest_counters(jobs: Sequence[BatchJob]) -> dict[str, Optional[Counters]]:
    """Per agent, the last counters in `jobs` (None: only last_seen is refreshed)."""
    out: dict[str, Optional[Counters]] = {}
    for job in jobs:
        if job.counters is not None or job.agent_id not in out:
            out[job.agent_id] = job.counters
    return out
