"""`controlplane serve` and `controlplane query`. Errors: one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa

from controlplane.query import QueryClient, QueryError, QueryResult, open_read_only, run_query
from controlplane.server import RunningServer, serve_forever
from controlplane.settings import ServerSettings
from controlplane.store import StoreError

EXIT_ERROR = 2


class CliError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="controlplane", description="headroom control plane")
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server over one DuckDB file")
    serve.add_argument("--db", help="DuckDB file (env HEADROOM_CP_DB)")
    serve.add_argument("--host", help="listen address (env HEADROOM_CP_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port, 0 = any free one (env HEADROOM_CP_PORT)")
    serve.add_argument("--port-file", help="write the bound port here once listening")
    query = sub.add_parser("query", help="run one read-only SQL statement")
    query.add_argument("sql")
    query.add_argument("--address", help="host:port of a running control plane")
    query.add_argument("--db", help="open this DuckDB file read-only instead (no server)")
    query.add_argument("--format", choices=("table", "csv", "json"), default="table")
    query.add_argument("--max-rows", type=int, default=0, help="0 = the server's default")
    return p


# ---------------------------------------------------------------------- serve
def _write_port_file(path: str, port: int) -> None:
    """Atomically, so a parent polling for the file never reads half of it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, target)


def _serve(args: argparse.Namespace) -> int:
    settings = ServerSettings.resolve(db_path=args.db, host=args.host, port=args.port)

    def listening(running: RunningServer) -> None:
        if args.port_file:
            _write_port_file(args.port_file, running.port)
        print(f"headroom control plane listening on {running.host}:{running.port} "
              f"db={settings.db_path}", flush=True)

    serve_forever(settings, on_listening=listening)
    return 0


# ---------------------------------------------------------------------- query
def _run_local(db_path: str, sql: str, max_rows: int) -> QueryResult:
    if not Path(db_path).exists():
        raise CliError(f"no DuckDB file at {db_path}")
    settings = ServerSettings.resolve(db_path=db_path)
    con = open_read_only(db_path)
    try:
        rows = min(max_rows or settings.query_default_rows, settings.query_max_rows)
        return run_query(con, sql, rows, settings.query_timeout_s)
    finally:
        con.close()


def _run_remote(address: Optional[str], sql: str, max_rows: int) -> QueryResult:
    if address is None:
        settings = ServerSettings.resolve()
        address = f"{settings.host}:{settings.port}"
    with QueryClient(address) as client:
        return client.query(sql, max_rows=max_rows)


def _cell(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _json_value(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _print(table: pa.Table, fmt: str, out) -> None:
    names, rows = table.column_names, [list(r.values()) for r in table.to_pylist()]
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        writer.writerows(rows)
    elif fmt == "json":
        out.write(json.dumps([{n: _json_value(v) for n, v in zip(names, r)} for r in rows],
                             default=str) + "\n")
    else:
        cells = [names] + [[_cell(v) for v in r] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(names))]
        for i, row in enumerate(cells):
            out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
            if i == 0:
                out.write("  ".join("-" * w for w in widths) + "\n")


def _query(args: argparse.Namespace) -> int:
    if args.max_rows < 0:
        raise CliError(f"--max-rows={args.max_rows} must be >= 0")
    if args.db and not args.address:
        result = _run_local(args.db, args.sql, args.max_rows)
    else:
        result = _run_remote(args.address, args.sql, args.max_rows)
    _print(result.table, args.format, sys.stdout)
    if result.truncated:
        print(f"(truncated at {result.table.num_rows} rows)", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _serve(args) if args.command == "serve" else _query(args)
    except (CliError, QueryError, StoreError, ValueError, OSError) as e:
        message = " ".join(str(e).split())   # one line, whatever DuckDB or gRPC said
        print(f"controlplane {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
