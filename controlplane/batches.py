"""What passes from ingest to the store: a validated batch, one agent message's writes, and
the outcome of storing it. Both ingest.py (which makes them) and store.py (which writes
them) import this module; neither imports the other for these types, so they form no cycle."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

_MAX_STRING_BYTES = 1 << 30   # below int32 offsets' limit


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
    """One agent message's worth of writes: a hello's registration, a decoded batch and/or its
    latest counters (store.Registration, store.Counters; Any here so this module needs
    nothing of the store's). A registration is written before the group's telemetry."""
    agent_id: str
    pid: int
    batch: Optional[DecodedBatch] = None
    counters: Optional[Any] = None
    registration: Optional[Any] = None


def arrow_strings(strings) -> pa.Array:
    """strings (any sequence of str) as an Arrow string array built from its buffers.
    pa.array(list of str) releases and retakes the GIL as it goes, so with a busy Python thread
    beside it each string waits for the GIL; this takes it once. Protobuf has checked they are
    UTF-8."""
    encoded = [v.encode() for v in strings]
    ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
    if len(ends) and ends[-1] >= _MAX_STRING_BYTES:   # int32 offsets: let Arrow chunk it
        return pa.array(list(strings), type=pa.string())
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    offsets[1:] = ends
    return pa.Array.from_buffers(pa.string(), len(encoded),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])


def arrow_numbers(values, dtype: str) -> pa.Array:
    """Python numbers as an Arrow array through numpy and its buffer (as arrow_strings: no
    GIL-releasing conversion). dtype: a numpy dtype name such as "uint64"."""
    array = np.ascontiguousarray(np.asarray(values, dtype=dtype))
    return pa.Array.from_buffers(pa.from_numpy_dtype(array.dtype), len(array),
                                 [None, pa.py_buffer(array)])
