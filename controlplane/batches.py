"""What passes from ingest to the store: a validated batch, one agent message's writes, and
the outcome of storing it. Both ingest.py (which makes them) and store.py (which writes
them) import this module; neither imports the other for these types, so they form no cycle."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa


@dataclass
class DecodedBatch:
    seq: int
    sent_at_us: int
    tables: dict[str, pa.Table]   # only tables with rows
    num_rows: int
    num_bytes: int                # serialized size of the batch's tables
    rows_rejected: int = 0        # rows that broke a column rule: not stored
    reject_reason: str = ""       # ingest_rules.summarize() of why


@dataclass(frozen=True)
class StoredBatch:
    rows_stored: int
    duplicate: bool   # the same (agent_id, pid, seq) was stored before: nothing written


@dataclass
class BatchJob:
    """One agent message's worth of writes: a decoded batch and/or its latest counters
    (store.Counters; Any here so this module needs nothing of the store's)."""
    agent_id: str
    pid: int
    batch: Optional[DecodedBatch] = None
    counters: Optional[Any] = None
