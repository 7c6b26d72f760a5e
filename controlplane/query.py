"""Read-only SQL: the check, the execution, and Arrow <-> columnar Table in both directions.

Used by the server's Query RPC, by `controlplane query`, and by any client (the dashboard)
through QueryClient.
"""
from __future__ import annotations

import enum
import json
import threading
from dataclasses import dataclass

import duckdb
import grpc
import numpy as np
import pyarrow as pa

from proto import columnar
from proto import headroom_pb2 as pb
from proto import headroom_pb2_grpc

# SHOW, DESCRIBE and SUMMARIZE parse as SELECT. EXPLAIN ANALYZE runs its statement, so every
# query also runs inside a transaction that is rolled back.
_READ_ONLY_TYPES = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)
_FETCH_ROWS = 8192


class QueryErrorKind(enum.Enum):
    INVALID = "invalid"          # unparsable, several statements, or not read-only
    FAILED = "failed"            # DuckDB refused to run it (unknown table, type error, ...)
    TIMEOUT = "timeout"


class QueryError(ValueError):
    def __init__(self, kind: QueryErrorKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class QueryResult:
    table: pa.Table
    truncated: bool


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raises QueryError unless `sql` is exactly one SELECT-like statement."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(QueryErrorKind.INVALID, f"cannot parse SQL: {e}") from None
    if len(statements) != 1:
        raise QueryError(QueryErrorKind.INVALID,
                         f"expected exactly one statement, got {len(statements)}")
    kind = statements[0].type
    if kind not in _READ_ONLY_TYPES:
        raise QueryError(QueryErrorKind.INVALID,
                         f"read-only queries only (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN): "
                         f"got a {kind.name} statement")


def _fetch(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int) -> QueryResult:
    reader = con.sql(sql).to_arrow_reader(_FETCH_ROWS)
    batches, rows = [], 0
    for batch in reader:
        batches.append(batch)
        rows += batch.num_rows
        if rows > max_rows:
            break
    table = pa.Table.from_batches(batches, schema=reader.schema)
    return QueryResult(table=table.slice(0, max_rows), truncated=rows > max_rows)


def run_query(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int,
              timeout_s: float) -> QueryResult:
    """Runs one read-only statement on `con` (a cursor of its own), at most `max_rows` rows."""
    check_read_only(con, sql)
    timer = threading.Timer(timeout_s, con.interrupt)
    timer.start()
    con.begin()
    try:
        return _fetch(con, sql, max_rows)
    except duckdb.InterruptException:
        raise QueryError(QueryErrorKind.TIMEOUT, f"query ran past {timeout_s:g} s") from None
    except duckdb.Error as e:
        raise QueryError(QueryErrorKind.FAILED, str(e)) from None
    finally:
        timer.cancel()
        con.rollback()


def open_read_only(db_path: str) -> duckdb.DuckDBPyConnection:
    """A local read-only connection, for `controlplane query --db` when no server holds the file."""
    try:
        return duckdb.connect(db_path, read_only=True, config={"enable_external_access": False})
    except duckdb.Error as e:
        raise QueryError(QueryErrorKind.FAILED, f"cannot open {db_path} read-only: {e}") from None


# ---------------------------------------------------------------------- Arrow -> Table
def _as_wire_array(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Casts a column to a type the columnar codec carries: numbers, bools, strings."""
    t = col.type
    if pa.types.is_int8(t) or pa.types.is_int16(t):
        return col.cast(pa.int32())
    if pa.types.is_uint8(t):
        return col.cast(pa.uint16())
    if pa.types.is_float16(t) or pa.types.is_decimal(t):
        return col.cast(pa.float64())
    if (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            or pa.types.is_string(t) or pa.types.is_large_string(t)):
        return col
    try:   # timestamps, dates, uuids, blobs: their text form
        return col.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        text = [None if v is None else json.dumps(v, default=str) for v in col.to_pylist()]
        return pa.chunked_array([pa.array(text, type=pa.string())])


def _column_numpy(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray | None]:
    nulls = col.null_count > 0
    mask = col.is_null().to_numpy(zero_copy_only=False) if nulls else None
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        values = np.array(col.fill_null("").to_pylist() if nulls else col.to_pylist(), dtype=object)
    else:
        filled = col.fill_null(pa.scalar(False if pa.types.is_boolean(col.type) else 0,
                                         col.type)) if nulls else col
        values = filled.to_numpy()
    return values, mask


def encode_result(name: str, table: pa.Table) -> pb.Table:
    """Arrow -> columnar Table, nulls in each Column's null_mask."""
    if len(set(table.column_names)) != len(table.column_names):
        raise QueryError(QueryErrorKind.INVALID,
                         f"result has duplicate column names {table.column_names}; alias them")
    columns, masks = {}, {}
    for col_name, col in zip(table.column_names, table.columns):
        columns[col_name], masks[col_name] = _column_numpy(_as_wire_array(col))
    out = columnar.encode_table(name, columns)
    if not columns:
        out.num_rows = table.num_rows
    for wire_col in out.columns:
        if masks[wire_col.name] is not None:
            wire_col.null_mask = masks[wire_col.name].astype(np.uint8).tobytes()
    return out


# ---------------------------------------------------------------------- Table -> Arrow
def decode_result(table: pb.Table) -> pa.Table:
    """The inverse of encode_result: columnar Table -> Arrow, null_mask rows as nulls."""
    arrays = columnar.decode_table(table)
    out = {}
    for col in table.columns:
        values = arrays[col.name]
        mask = (np.frombuffer(col.null_mask, dtype=np.uint8) != 0) if col.null_mask else None
        if col.dtype == pb.STRING:
            out[col.name] = pa.array(values.tolist(), type=pa.string(), mask=mask)
        else:
            out[col.name] = pa.array(values, mask=mask)
    return pa.table(out)


class QueryClient:
    """Read-only SQL against a running control plane."""

    def __init__(self, address: str, max_message_bytes: int = 64 * 1024 * 1024):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        self._channel = grpc.insecure_channel(address, options=options)
        self._stub = headroom_pb2_grpc.HeadroomStub(self._channel)
        self.address = address

    def query(self, sql: str, max_rows: int = 0, timeout_s: float = 60.0) -> QueryResult:
        try:
            reply = self._stub.Query(pb.QueryRequest(sql=sql, max_rows=max_rows), timeout=timeout_s)
        except grpc.RpcError as e:
            raise QueryError(_KIND_BY_STATUS.get(e.code(), QueryErrorKind.FAILED),
                             f"{self.address}: {e.details() or e.code().name}") from None
        return QueryResult(table=decode_result(reply.table), truncated=reply.truncated)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "QueryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_KIND_BY_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: QueryErrorKind.INVALID,
                   grpc.StatusCode.DEADLINE_EXCEEDED: QueryErrorKind.TIMEOUT}
