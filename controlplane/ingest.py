"""TelemetryBatch -> validated Arrow tables, ready for one INSERT ... SELECT each.

Everything in a batch is checked before anything is stored. A malformed table or column
(unknown name, wrong dtype, wrong length) rejects the whole batch and the error names the
table and the column; a well-formed row that breaks a column rule (ingest_rules: NaN key,
layer outside the registered model, over-long label, ...) is left out and counted in the ack.
"""
from __future__ import annotations

import enum
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from headroom_sidecar.controlplane.batches import BatchJob, DecodedBatch, StoredBatch, arrow_strings
from headroom_sidecar.controlplane.ingest_rules import (MAX_BATCH_ROWS, ModelShape, RowCheck,
                                                        all_clean, check_lengths, check_numeric,
                                                        rule_for, summarize)
from headroom_sidecar.controlplane.schema import TELEMETRY_COLUMNS
from headroom_sidecar.controlplane.store import Store
from headroom_sidecar.proto import columnar
from headroom_sidecar.proto import headroom_pb2 as pb

_POLL_S = 0.2   # how often a blocked submit looks at whether its stream is still alive
_PY_STRING_ROWS = 256   # string columns up to this many rows are measured in Python
# Little-endian numeric dtypes whose bytes are already Arrow's layout (not bool: Arrow packs bits).
_ARROW_TYPES = {np.dtype(t): pa.from_numpy_dtype(np.dtype(t))
                for t in ("<f4", "<f8", "<i4", "<i8", "<u2", "<u4", "<u8")}
# table -> column -> its rule, looked up once: decode runs per column of every batch.
_RULES = {table: {column: rule_for(table, column) for column in columns}
          for table, columns in TELEMETRY_COLUMNS.items()}


class ErrorCode(str, enum.Enum):
    """ErrorReply.code values the control plane sends."""
    HELLO_REQUIRED = "HELLO_REQUIRED"
    AGENT_ID_REQUIRED = "AGENT_ID_REQUIRED"
    AGENT_ID_MISMATCH = "AGENT_ID_MISMATCH"
    DUPLICATE_HELLO = "DUPLICATE_HELLO"
    MALFORMED_MESSAGE = "MALFORMED_MESSAGE"
    EMPTY_MESSAGE = "EMPTY_MESSAGE"
    UNKNOWN_TABLE = "UNKNOWN_TABLE"
    DUPLICATE_TABLE = "DUPLICATE_TABLE"
    UNKNOWN_COLUMN = "UNKNOWN_COLUMN"
    MISSING_COLUMN = "MISSING_COLUMN"
    COLUMN_TYPE = "COLUMN_TYPE"
    BAD_COLUMN = "BAD_COLUMN"
    TOO_MANY_ROWS = "TOO_MANY_ROWS"
    STORE_FAILED = "STORE_FAILED"
    INTERNAL = "INTERNAL"


class IngestError(ValueError):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def reply(self) -> pb.ControlMessage:
        return pb.ControlMessage(error=pb.ErrorReply(code=self.code.value, message=self.message))


def _dtype_name(code: int) -> str:
    return pb.DType.Name(code) if code in pb.DType.values() else str(code)


def _check_columns(table: pb.Table) -> None:
    expected = TELEMETRY_COLUMNS[table.name]
    seen = set()
    for col in table.columns:
        if col.name not in expected:
            raise IngestError(ErrorCode.UNKNOWN_COLUMN,
                              f"table {table.name!r}: unknown column {col.name!r} "
                              f"(expected {', '.join(expected)})")
        if col.name in seen:
            raise IngestError(ErrorCode.BAD_COLUMN,
                              f"table {table.name!r}: duplicate column {col.name!r}")
        seen.add(col.name)
        if col.dtype != expected[col.name]:
            raise IngestError(ErrorCode.COLUMN_TYPE,
                              f"table {table.name!r} column {col.name!r}: dtype "
                              f"{_dtype_name(col.dtype)}, expected {_dtype_name(expected[col.name])}")
    missing = [name for name in expected if name not in seen]
    if missing:
        raise IngestError(ErrorCode.MISSING_COLUMN,
                          f"table {table.name!r}: missing column(s) {', '.join(map(repr, missing))}")


def _null_mask(table: pb.Table, col: pb.Column) -> np.ndarray:
    """[N] bool: the column's null_mask, all False when it has none."""
    if not col.null_mask:
        return np.zeros(table.num_rows, dtype=bool)
    if len(col.null_mask) != table.num_rows:
        raise IngestError(ErrorCode.BAD_COLUMN,
                          f"table {table.name!r} column {col.name!r}: null_mask has "
                          f"{len(col.null_mask)} bytes, expected {table.num_rows}")
    return np.frombuffer(col.null_mask, dtype=np.uint8) != 0


def _char_counts(strings, values: pa.Array) -> np.ndarray:
    """[N] characters (code points) per string. Small columns (a live agent's batch holds a
    few dozen requests) count in Python: Arrow's compute call costs more than it saves there."""
    if len(strings) <= _PY_STRING_ROWS:
        return np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))
    return pc.utf8_length(values).to_numpy(zero_copy_only=False)


def _string_column(table: pb.Table, col: pb.Column, check: RowCheck) -> pa.Array:
    if len(col.strings) != table.num_rows:
        raise IngestError(ErrorCode.BAD_COLUMN,
                          f"table {table.name!r} column {col.name!r}: {len(col.strings)} "
                          f"values, expected {table.num_rows}")
    values = arrow_strings(col.strings)
    check_lengths(check, col.name, _char_counts(col.strings, values))
    if col.null_mask:
        check.refuse(col.name, _null_mask(table, col), "NULL")
    return values


def _arrow_column(table: pb.Table, col: pb.Column, check: RowCheck,
                  shape: Optional[ModelShape]) -> pa.Array:
    """One column as Arrow, its bad rows marked in `check`; numerics without NULLs stay a
    zero-copy view of the message bytes."""
    if col.dtype == pb.STRING:
        return _string_column(table, col, check)
    try:
        values = columnar.decode_column(table.name, table.num_rows, col)
    except columnar.ColumnError as e:
        raise IngestError(ErrorCode.BAD_COLUMN, str(e)) from None
    if not col.null_mask and all_clean(_RULES[table.name][col.name], values, shape):
        return _arrow_view(values)   # nothing to refuse, nothing NULL: the common case
    null = check_numeric(check, col.name, values, _null_mask(table, col), shape)
    return pa.array(values, mask=null) if null.any() else _arrow_view(values)


def _arrow_view(values: np.ndarray) -> pa.Array:
    """A numeric column without NULLs as an Arrow array over the same bytes, without
    pa.array's per-call conversion work (this runs per column of every batch). Arrow packs
    booleans as bits, so those are converted."""
    arrow_type = _ARROW_TYPES.get(values.dtype)
    if arrow_type is None:
        return pa.array(values)
    return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(values)])


def decode_table(table: pb.Table, shape: Optional[ModelShape] = None) -> tuple[pa.Table, RowCheck]:
    """Validates one telemetry table against the schema and the column rules: the Arrow table
    of its good rows (schema order), and which rows were left out why.

    shape: the structure the sending agent registered; None skips the index checks."""
    if table.name not in TELEMETRY_COLUMNS:
        raise IngestError(ErrorCode.UNKNOWN_TABLE,
                          f"unknown table {table.name!r} (expected one of "
                          f"{', '.join(TELEMETRY_COLUMNS)})")
    _check_columns(table)
    check = RowCheck(table.name, table.num_rows)
    by_name = {col.name: _arrow_column(table, col, check, shape) for col in table.columns}
    names = list(TELEMETRY_COLUMNS[table.name])
    out = pa.table([by_name[n] for n in names], names=names)
    return (out if check.ok.all() else out.filter(pa.array(check.ok))), check


def _check_row_count(batch: pb.TelemetryBatch) -> None:
    rows = sum(t.num_rows for t in batch.tables)
    if rows > MAX_BATCH_ROWS:
        raise IngestError(ErrorCode.TOO_MANY_ROWS,
                          f"batch seq={batch.seq} has {rows} rows; at most {MAX_BATCH_ROWS} "
                          f"per batch: send smaller batches")


def decode_batch(batch: pb.TelemetryBatch, shape: Optional[ModelShape] = None) -> DecodedBatch:
    """Every table validated; bad rows are left out and counted (rows_rejected, reject_reason),
    a malformed table or column refuses the whole batch (IngestError)."""
    _check_row_count(batch)
    tables: dict[str, pa.Table] = {}
    reasons: Counter = Counter()
    num_bytes = 0
    for table in batch.tables:
        if table.name in tables:
            raise IngestError(ErrorCode.DUPLICATE_TABLE,
                              f"table {table.name!r} appears twice in batch seq={batch.seq}")
        tables[table.name], check = decode_table(table, shape)
        reasons.update(check.reasons)
        num_bytes += table.ByteSize()
    tables = {name: t for name, t in tables.items() if t.num_rows > 0}
    rejected = sum(batch_table.num_rows for batch_table in batch.tables) - \
        sum(t.num_rows for t in tables.values())
    return DecodedBatch(seq=batch.seq, sent_at_us=batch.sent_at_us, tables=tables,
                        num_rows=sum(t.num_rows for t in tables.values()), num_bytes=num_bytes,
                        rows_rejected=rejected, reject_reason=summarize(reasons))


# ---------------------------------------------------------------------- the writer thread
# Done callback: the StoredBatch, or the exception that kept the job from being stored.
DoneCallback = Callable[[Union[StoredBatch, Exception]], None]


@dataclass
class _Pending:
    job: BatchJob
    done: DoneCallback


class IngestWriter:
    """The one thread that writes telemetry: it takes whatever batches are waiting (from every
    stream), stores them in one transaction, and reports each outcome through its callback.

    Stream readers keep parsing and validating while DuckDB writes, and a busy server commits
    (and checkpoints) once per group instead of once per batch.
    """

    def __init__(self, store: Store, max_pending: int, group_max_rows: int):
        self.store = store
        self.group_max_rows = group_max_rows
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="headroom-ingest-writer", daemon=True)
        self._thread.start()

    def submit(self, job: BatchJob, done: DoneCallback, alive: Callable[[], bool]) -> bool:
        """Queues a job; blocks while the queue is full (backpressure), False if `alive()` turns false."""
        while alive():
            try:
                self._queue.put(_Pending(job, done), timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def try_submit(self, job: BatchJob, done: DoneCallback) -> bool:
        """Queues a job if there is room now; never blocks (for the event loop)."""
        try:
            self._queue.put_nowait(_Pending(job, done))
            return True
        except queue.Full:
            return False

    def pending_batches(self) -> int:
        """Batches queued for the writer thread (approximate: another thread may change it)."""
        return self._queue.qsize()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stores what is queued, then stops the thread."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _take_group(self, first: _Pending) -> tuple[list[_Pending], bool]:
        group, rows = [first], _rows(first)
        while rows < self.group_max_rows:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return group, False
            if item is None:
                return group, True
            group.append(item)
            rows += _rows(item)
        return group, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            group, stopping = self._take_group(first)
            for item, outcome in zip(group, self._store(group)):
                item.done(outcome)

    def _store(self, group: list[_Pending]) -> list:
        try:
            return self.store.store_batches([p.job for p in group])
        except Exception as e:
            if len(group) == 1:
                return [e]
        # One failing batch must not sink the others: store them one by one.
        return [self._store([p])[0] for p in group]


def _rows(item: _Pending) -> int:
    return item.job.batch.num_rows if item.job.batch is not None else 0
