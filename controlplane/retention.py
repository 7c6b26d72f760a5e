"""Retention of raw telemetry: by age and by database size, rolling statistics up first.

Only raw telemetry goes (RAW_TABLES); plans, decisions, audit, jobs, agents and the hourly
roll-ups are never touched. Raw rows are deleted a whole hour at a time, in the transaction
that rolls them up (controlplane/rollup.py), so the planner's candidates keep their history.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Optional

import duckdb

from headroom_sidecar.controlplane.rollup import roll_up_before
from headroom_sidecar.controlplane.schema import TELEMETRY_COLUMNS
from headroom_sidecar.controlplane.settings import resolve_settings
from headroom_sidecar.controlplane.store import Store, utc_now


log = logging.getLogger("headroom.controlplane.retention")

# Every table here has received_at; nothing else is ever deleted by retention.
RAW_TABLES = (*TELEMETRY_COLUMNS, "batches")
_HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class RetentionSettings:
    # Raw rows older than this many days go (0 = no age limit).
    days: float = field(default=14.0, metadata={"env": "HEADROOM_CP_RETENTION_DAYS"})
    # Used database bytes above this: the oldest raw hours go until under (0 = no size limit).
    # The file itself does not shrink: DuckDB reuses the freed blocks for new rows.
    max_bytes: int = field(default=0, metadata={"env": "HEADROOM_CP_RETENTION_MAX_BYTES"})
    # Seconds between passes of the server's retention thread.
    interval_s: float = field(default=3600.0, metadata={"env": "HEADROOM_CP_RETENTION_INTERVAL_S"})

    def __post_init__(self):
        problems = []
        if not self.days >= 0:
            problems.append(f"days={self.days} must be >= 0 (0 = no age limit)")
        if self.max_bytes < 0:
            problems.append(f"max_bytes={self.max_bytes} must be >= 0 (0 = no size limit)")
        if not self.interval_s > 0:
            problems.append(f"interval_s={self.interval_s} must be > 0")
        if problems:
            raise ValueError("invalid RetentionSettings: " + "; ".join(problems))

    @classmethod
    def resolve(cls, **overrides: Any) -> "RetentionSettings":
        return resolve_settings(cls, overrides, "retention")


@dataclass(frozen=True)
class RetentionReport:
    deleted_rows: int
    rolled_up_rows: int
    used_bytes: int          # after the pass (after a CHECKPOINT when a size limit is set)


def floor_hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def used_bytes(store: Store) -> int:
    """Bytes the database uses: its used blocks plus the WAL not yet checkpointed."""
    with store.reader() as cur:
        block_bytes, used_blocks = cur.execute(
            "SELECT block_size, used_blocks FROM pragma_database_size() "
            "WHERE database_name = current_database()").fetchone()
    wal = store.db_path + ".wal"
    return int(block_bytes) * int(used_blocks) + (os.path.getsize(wal) if os.path.exists(wal) else 0)


def expire_before(store: Store, cutoff: datetime) -> tuple[int, int]:
    """Rolls up, then deletes, every raw row received before `cutoff` (on the hour), in one
    transaction. Returns (raw rows deleted, roll-up rows written)."""
    with store.transaction() as cur:
        rolled = roll_up_before(cur, cutoff)
        deleted = sum(cur.execute(f"DELETE FROM {t} WHERE received_at < ?", [cutoff]).fetchone()[0]
                      for t in RAW_TABLES)
    return int(deleted), int(rolled)


def _oldest_raw(store: Store) -> Optional[datetime]:
    with store.reader() as cur:
        union = " UNION ALL ".join(f"SELECT min(received_at) AS t FROM {t}" for t in RAW_TABLES)
        return cur.execute(f"SELECT min(t) FROM ({union})").fetchone()[0]


def run_retention(store: Store, settings: RetentionSettings,
                  now: Optional[datetime] = None) -> RetentionReport:
    """One pass: the age limit, then the size limit (the oldest raw hour at a time)."""
    now = now or utc_now()
    deleted = rolled = 0
    if settings.days > 0:
        deleted, rolled = expire_before(store, floor_hour(now - timedelta(days=settings.days)))
    if not settings.max_bytes:
        return RetentionReport(deleted, rolled, used_bytes(store))
    store.checkpoint()
    while (size := used_bytes(store)) > settings.max_bytes:
        oldest = _oldest_raw(store)
        if oldest is None:
            log.warning("database uses %d bytes > max_bytes=%d with no raw telemetry left: "
                        "roll-ups and control data alone exceed the limit", size, settings.max_bytes)
            break
        d, r = expire_before(store, floor_hour(oldest) + _HOUR)
        deleted, rolled = deleted + d, rolled + r
        store.checkpoint()
    return RetentionReport(deleted, rolled, used_bytes(store))


class RetentionWorker:
    """The server's retention thread: a pass at start, then every interval_s until stopped."""

    def __init__(self, store: Store, settings: RetentionSettings):
        self.store, self.settings = store, settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="headroom-retention", daemon=True)

    def start(self) -> "RetentionWorker":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                report = run_retention(self.store, self.settings)
                log.info("retention: %s", report)
            except (duckdb.Error, RuntimeError, OSError) as e:   # StoreError is a RuntimeError
                if self._stop.is_set():
                    return   # the store closed under a running pass: shutting down
                log.warning("retention pass failed: %s", e)
            self._stop.wait(self.settings.interval_s)

    def stop(self, deadline_s: float = 10.0) -> None:
        """Wakes the thread and waits at most deadline_s for a running pass to end."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=deadline_s)
            if self._thread.is_alive():
                log.warning("retention pass still running after %.1fs at shutdown", deadline_s)
