"""Read-only SQL: the check, the execution, and Arrow <-> columnar Table in both directions.

Used by the server's Query RPC, by `headroom-controlplane query`, and by any client (the dashboard)
through QueryClient.

What "read-only" means here (check_read_only walks DuckDB's own parse tree,
json_serialize_sql, and fails closed on anything it does not know):
- exactly one statement: SELECT / WITH ... SELECT / VALUES, SHOW TABLES, DESCRIBE / SHOW /
  SUMMARIZE of an allowed table or a SELECT, or EXPLAIN [ANALYZE] of such a SELECT. Nothing
  else (SET, PRAGMA, CALL, ATTACH, COPY, EXPORT, CHECKPOINT, VACUUM, INSTALL, LOAD, writes);
- tables: only QUERYABLE_TABLES (and the query's own CTEs); a quoted file name is a table name
  here and is refused like any other unknown table;
- table functions: only ALLOWED_TABLE_FUNCTIONS (no read_csv / glob / duckdb_settings /
  duckdb_databases / query(...)); scalar functions that read settings are refused.
Then it runs on its own cursor (a connection of its own) inside a transaction that is rolled
back, interrupted after timeout_s, with the database's configuration locked (lock_down: no
statement can change a setting, external access off), and its result counted in bytes while it
is fetched: past QuerySettings.max_result_bytes it stops and answers TOO_LARGE. DuckDB's
memory_limit and threads are per database, not per connection: QuerySettings.memory_limit_mb
(0 = unchanged) sets the whole store's limit once. Error messages carry no file paths.
"""
from __future__ import annotations

import enum
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import duckdb
import grpc
import numpy as np
import pyarrow as pa

from headroom_sidecar.controlplane.metrics import QueryOutcome, record_query
from headroom_sidecar.controlplane.settings import resolve_settings
from headroom_sidecar.proto import columnar
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto import headroom_pb2_grpc
from headroom_sidecar.proto.query_result import decode_result  # noqa: F401 (QueryClient; re-exported)

_FETCH_ROWS = 2048   # rows per fetched batch: the byte cap overshoots by at most one batch

# Tables and views operators may read: telemetry, agents, plans and their history, the audit
# log. Not agent_bindings (certificate pins) nor anything added later until listed here.
QUERYABLE_TABLES = frozenset({
    "schema_version", "agents", "batches", "jobs", "requests", "head_stats", "layer_stats",
    "mlp_stats", "gpu_samples", "plans", "plan_transitions", "trials", "applications",
    "decisions", "audit_log", "audit_head"})
ALLOWED_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})
DENIED_FUNCTIONS = frozenset({"current_setting", "getenv", "getvariable"})
_SHOW_SPECIAL = frozenset({'"tables"', "__show_tables_expanded"})   # SHOW TABLES, SHOW ALL TABLES
_USER_SCHEMAS = ("", "main")
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:ANALYZE\s+)?(?P<inner>.*)$", re.IGNORECASE | re.DOTALL)
_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[/\\](?:[\w.\-]+[/\\])*[\w.\-]+")


class QueryErrorKind(enum.Enum):
    INVALID = "invalid"          # unparsable, several statements, or not read-only
    FAILED = "failed"            # DuckDB refused to run it (unknown table, type error, ...)
    TIMEOUT = "timeout"
    TOO_LARGE = "too_large"      # the result passed max_result_bytes while it was fetched


class QueryError(ValueError):
    def __init__(self, kind: QueryErrorKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class QueryResult:
    table: pa.Table
    truncated: bool


def _env(name: str) -> dict:
    return {"env": f"HEADROOM_CP_QUERY_{name}"}


@dataclass(frozen=True)
class QuerySettings:
    # Result bytes (Arrow buffers, counted while fetching) past which a query is refused.
    max_result_bytes: int = field(default=32 * 1024 * 1024, metadata=_env("MAX_BYTES"))
    # DuckDB memory_limit for the whole store, set once before the configuration is locked;
    # 0 = DuckDB's default (DuckDB has no per-connection memory limit).
    memory_limit_mb: int = field(default=0, metadata=_env("MEMORY_LIMIT_MB"))

    def __post_init__(self):
        bad = [f"{n}={getattr(self, n)} must be > 0" for n in ("max_result_bytes",)
               if getattr(self, n) <= 0]
        bad += [f"{n}={getattr(self, n)} must be >= 0" for n in ("memory_limit_mb",)
                if getattr(self, n) < 0]
        if bad:
            raise ValueError("invalid QuerySettings: " + "; ".join(bad))

    @classmethod
    def resolve(cls, **overrides: Any) -> "QuerySettings":
        return resolve_settings(cls, overrides, "query")


def scrub(message: str) -> str:
    """An error message without file system paths (the store's file, temp dirs)."""
    return _PATH.sub("<path>", message)


# ---------------------------------------------------------------------- the check
def _invalid(message: str) -> QueryError:
    return QueryError(QueryErrorKind.INVALID, message)


def _one_statement(con: duckdb.DuckDBPyConnection, sql: str):
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise _invalid(f"cannot parse SQL: {scrub(str(e))}") from None
    if len(statements) != 1:
        raise _invalid(f"expected exactly one statement, got {len(statements)}")
    return statements[0]


def _parse_tree(con: duckdb.DuckDBPyConnection, sql: str) -> dict:
    """DuckDB's parse tree of one SELECT (json_serialize_sql serializes SELECTs only)."""
    try:
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
    except (duckdb.Error, ValueError, TypeError) as e:
        raise _invalid(f"cannot check the statement: {scrub(str(e))}") from None
    if tree.get("error") or len(tree.get("statements", ())) != 1:
        raise _invalid("read-only queries only (SELECT, WITH, VALUES, SHOW TABLES, DESCRIBE, "
                       f"SUMMARIZE, EXPLAIN [ANALYZE] SELECT): "
                       f"{tree.get('error_message') or 'not a single SELECT'}")
    return tree


def _nodes(tree: Any) -> Iterator[dict]:
    """Every object of a parse tree, depth first."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _cte_names(tree: dict) -> set[str]:
    return {entry["key"].lower() for node in _nodes(tree) if isinstance(node.get("cte_map"), dict)
            for entry in node["cte_map"].get("map", ()) if isinstance(entry, dict) and "key" in entry}


def _node_problem(node: dict, readable: set[str]) -> Optional[str]:
    kind = node.get("type")
    if kind == "BASE_TABLE":
        name = str(node.get("table_name", "")).lower()
        if node.get("catalog_name") or node.get("schema_name", "") not in _USER_SCHEMAS \
                or name not in readable:
            return f"table {'.'.join(node.get('qualified_name', {}).get('path', [name]))!r}"
    elif kind == "TABLE_FUNCTION":
        name = str((node.get("function") or {}).get("function_name", "?")).lower()
        if name not in ALLOWED_TABLE_FUNCTIONS:
            return f"table function {name}()"
    elif kind == "SHOW_REF":
        show, name = node.get("show_type"), str(node.get("table_name", ""))
        if (show == "SHOW_SPECIAL" and name not in _SHOW_SPECIAL) or \
                (show == "SHOW" and name.lower() not in readable) or \
                show not in ("SHOW_SPECIAL", "SHOW", "DESCRIBE", "SUMMARY"):
            return f"SHOW {name.strip(chr(34)) or show}"
    elif node.get("class") == "FUNCTION":
        name = str(node.get("function_name", "")).lower()
        if name in DENIED_FUNCTIONS:
            return f"function {name}()"
    return None


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raises QueryError (INVALID) unless `sql` is one statement that only reads allowed data."""
    statement = _one_statement(con, sql)
    if statement.type is duckdb.StatementType.EXPLAIN:
        inner = _EXPLAIN.match(sql)
        if inner is None:
            raise _invalid("EXPLAIN: only EXPLAIN [ANALYZE] <SELECT> is allowed")
        sql = inner["inner"]
        statement = _one_statement(con, sql)
    if statement.type is not duckdb.StatementType.SELECT:
        raise _invalid(f"read-only queries only (SELECT, WITH, SHOW TABLES, DESCRIBE, "
                       f"SUMMARIZE, EXPLAIN [ANALYZE] SELECT): got a {statement.type.name} "
                       "statement")
    tree = _parse_tree(con, sql)
    readable = set(QUERYABLE_TABLES) | _cte_names(tree)
    problems = sorted({p for node in _nodes(tree) if (p := _node_problem(node, readable))})
    if problems:
        raise _invalid(f"not readable through Query: {', '.join(problems)} (tables: "
                       f"{', '.join(sorted(QUERYABLE_TABLES))}; table functions: "
                       f"{', '.join(sorted(ALLOWED_TABLE_FUNCTIONS))})")


# ---------------------------------------------------------------------- the execution
_LOCK = threading.Lock()


def lock_down(con: duckdb.DuckDBPyConnection, settings: QuerySettings) -> None:
    """Once per database: external access off, the memory limit if set, then the configuration
    locked for every connection of the database (no SET succeeds afterwards)."""
    with _LOCK:
        if con.execute("SELECT current_setting('lock_configuration')").fetchone()[0]:
            return
        con.execute("SET enable_external_access = false")
        if settings.memory_limit_mb:
            con.execute(f"SET memory_limit = '{int(settings.memory_limit_mb)}MB'")
        con.execute("SET lock_configuration = true")


def _fetch(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int,
           max_bytes: int) -> QueryResult:
    """Streams the result in batches, counting rows and bytes as they arrive."""
    reader = con.sql(sql).to_arrow_reader(_FETCH_ROWS)
    batches, rows, nbytes = [], 0, 0
    try:
        for batch in reader:
            nbytes += batch.nbytes
            if nbytes > max_bytes:
                raise QueryError(QueryErrorKind.TOO_LARGE,
                                 f"result passed max_result_bytes={max_bytes} after {rows} "
                                 "rows; select fewer rows or columns (LIMIT, max_rows)")
            batches.append(batch)
            rows += batch.num_rows
            if rows > max_rows:
                break
    finally:
        reader.close()   # the open result would block the rollback
    table = pa.Table.from_batches(batches, schema=reader.schema)
    return QueryResult(table=table.slice(0, max_rows), truncated=rows > max_rows)


def run_query(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int, timeout_s: float,
              settings: Optional[QuerySettings] = None) -> QueryResult:
    """Runs one read-only statement on `con` (a cursor of its own), at most `max_rows` rows.
    Each run is recorded (outcome, seconds, rows) on the providers observing a server."""
    start_s = time.monotonic()
    outcome, rows = QueryOutcome.OK, 0
    try:
        result = _run_query(con, sql, max_rows, timeout_s, settings)
        rows = result.table.num_rows
        return result
    except QueryError as e:
        outcome = QueryOutcome(e.kind.value)
        raise
    finally:
        record_query(outcome, time.monotonic() - start_s, rows)


def _run_query(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int, timeout_s: float,
               settings: Optional[QuerySettings]) -> QueryResult:
    settings = settings or QuerySettings.resolve()
    check_read_only(con, sql)
    lock_down(con, settings)
    timer = threading.Timer(timeout_s, con.interrupt)
    timer.start()
    con.begin()
    try:
        return _fetch(con, sql, max_rows, settings.max_result_bytes)
    except duckdb.InterruptException:
        raise QueryError(QueryErrorKind.TIMEOUT, f"query ran past {timeout_s:g} s") from None
    except duckdb.Error as e:
        raise QueryError(QueryErrorKind.FAILED, scrub(str(e))) from None
    finally:
        timer.cancel()
        con.rollback()


def open_read_only(db_path: str) -> duckdb.DuckDBPyConnection:
    """A local read-only connection, for `headroom-controlplane query --db` when no server holds the file."""
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


class QueryClient:
    """Read-only SQL against a running control plane."""

    def __init__(self, address: str, max_message_bytes: int = 64 * 1024 * 1024,
                 credentials=None):
        """credentials: proto.credentials.ClientCredentials; None = from HEADROOM_TLS_* /
        HEADROOM_TOKEN / HEADROOM_LOCAL_TOKEN (plaintext without them)."""
        from headroom_sidecar.proto.credentials import ClientCredentials
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        credentials = credentials or ClientCredentials.resolve()
        self._channel = credentials.channel(address, options=options)
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
                   grpc.StatusCode.DEADLINE_EXCEEDED: QueryErrorKind.TIMEOUT,
                   grpc.StatusCode.RESOURCE_EXHAUSTED: QueryErrorKind.TOO_LARGE}
