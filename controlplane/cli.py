"""`headroom-controlplane serve` and `headroom-controlplane query`. Errors: one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pyarrow as pa

from headroom_sidecar.controlplane.auth import AuthMode
from headroom_sidecar.controlplane.query import QueryClient, QueryError, QueryResult, open_read_only, run_query
from headroom_sidecar.controlplane.app import RunningServer, serve_forever
from headroom_sidecar.controlplane.settings import ServerSettings
from headroom_sidecar.controlplane.store import StoreError
from headroom_sidecar.controlplane.cliout import add_json_flag, write_json

EXIT_ERROR = 2


class CliError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headroom-controlplane", description="headroom control plane")
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    p.add_argument("--version", action="version", version=f"headroom-controlplane {package_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server over one DuckDB file")
    serve.add_argument("--db", help="DuckDB file (env HEADROOM_CP_DB)")
    serve.add_argument("--host", help="listen address (env HEADROOM_CP_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port, 0 = any free one (env HEADROOM_CP_PORT)")
    serve.add_argument("--port-file", help="write the bound port here once listening")
    serve.add_argument("--tls-cert", help="server certificate PEM (env HEADROOM_CP_TLS_CERT)")
    serve.add_argument("--tls-key", help="its private key (env HEADROOM_CP_TLS_KEY)")
    serve.add_argument("--tls-client-ca", help="CA of agent and operator certificates "
                                               "(env HEADROOM_CP_TLS_CLIENT_CA)")
    serve.add_argument("--token-key-file", help="operator token HMAC key "
                                                "(env HEADROOM_CP_TOKEN_KEY_FILE)")
    serve.add_argument("--operator-port", type=int,
                       help="a port for Query/Admin only, served apart from agent streams (with "
                            "TLS: operators with tokens, no client certificate); -1 = none")
    query = sub.add_parser("query", help="run one read-only SQL statement")
    query.add_argument("sql")
    query.add_argument("--address", help="host:port of a running control plane")
    query.add_argument("--db", help="open this DuckDB file read-only instead (no server)")
    query.add_argument("--format", choices=("table", "csv", "json"), default="table")
    query.add_argument("--max-rows", type=int, default=0, help="0 = the server's default")
    add_json_flag(query, "{columns, rows, row_count, truncated}")
    _add_credential_args(query)
    export = sub.add_parser("export", help="telemetry and hourly roll-ups since a time, as "
                                           "Parquet files (one per table)")
    export.add_argument("--db", help="the DuckDB file, opened read-only: stop the server first "
                                     "(env HEADROOM_CP_DB)")
    export.add_argument("--since", required=True, help="ISO 8601 date or time (UTC if no zone)")
    export.add_argument("--to", required=True, dest="to_dir", help="directory for <table>.parquet")
    add_json_flag(export, "{since, to, tables: {table: {path, rows}}}")
    _add_health_command(sub)
    _add_admin_commands(sub)
    from headroom_sidecar.controlplane.policy.cli import add_policy_commands
    add_policy_commands(sub)
    from headroom_sidecar.controlplane.security_cli import add_security_commands
    add_security_commands(sub)
    return p


def package_version(dist: str = "headroom-sidecar") -> str:
    """The installed distribution's version; from pyproject.toml in a checkout never installed."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        import tomllib
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        if not pyproject.is_file():
            return "unknown"
        with open(pyproject, "rb") as f:
            return tomllib.load(f)["project"]["version"]


# ---------------------------------------------------------------------- health (grpc.health.v1)
EXIT_UNHEALTHY = 1   # what Docker's HEALTHCHECK and scripts read as "not healthy"


def _add_health_command(sub) -> None:
    p = sub.add_parser("health", help="grpc.health.v1 Check (plaintext): exit 0 if SERVING, else 1")
    p.add_argument("--address", default="127.0.0.1:50051",
                   help="host:port: the loopback server, or the plaintext health port "
                        "(HEADROOM_CP_HEALTH_PORT) of a TLS one (default 127.0.0.1:50051)")
    p.add_argument("--service", default="", help="service name; \"\" = the whole server")
    p.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the call (default 3)")
    add_json_flag(p, "{address, service, status, error}")


def _health(args: argparse.Namespace) -> int:
    import grpc
    from headroom_sidecar.controlplane.health import check
    doc = {"address": args.address, "service": args.service, "status": None, "error": None}
    try:
        status = check(args.address, args.service, args.timeout_s)
    except grpc.RpcError as e:
        doc["error"] = f"{e.code().name}: {e.details()}"
        print(f"headroom-controlplane health: {args.address}: {doc['error']}", file=sys.stderr)
        if args.json:
            write_json(doc)
        return EXIT_UNHEALTHY
    if args.json:
        write_json({**doc, "status": status})
    else:
        print(status)
    return 0 if status == "SERVING" else EXIT_UNHEALTHY


# ---------------------------------------------------------------------- plan, audit (Admin RPC)
def _admin_parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.add_argument("--address", default=None,
                   help="host:port of the control plane (env HEADROOM_ADDRESS, default 127.0.0.1:50051)")
    p.add_argument("--as", dest="actor", default=None,
                   help="your name on a local (loopback, no TLS) control plane; elsewhere the "
                        "audit log records your credential (env HEADROOM_OPERATOR)")
    _add_credential_args(p)
    return p


def _add_credential_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca", default=None, help="CA of the server certificate: TLS (env HEADROOM_TLS_CA)")
    p.add_argument("--cert", default=None, help="your client certificate (env HEADROOM_TLS_CERT)")
    p.add_argument("--key", default=None, help="its private key (env HEADROOM_TLS_KEY)")
    p.add_argument("--token", default=None, help="signed operator token (env HEADROOM_TOKEN)")


def _credentials(args: argparse.Namespace):
    from headroom_sidecar.proto.credentials import ClientCredentials
    return ClientCredentials.resolve(ca_file=args.ca, cert_file=args.cert, key_file=args.key,
                                     token=args.token)


def _add_admin_commands(sub) -> None:
    plan = sub.add_parser("plan", help="plans: list, show, trigger planning, approve, reject, "
                                       "roll back").add_subparsers(dest="admin_command", required=True)
    p = _admin_parser(plan, "list", "plans, newest first")
    p.add_argument("--status", default=None)
    p.add_argument("--limit", type=int, default=50)
    p = _admin_parser(plan, "show", "a plan: document, diff, trials, decisions, applications")
    p.add_argument("plan_id")
    p = _admin_parser(plan, "trigger", "start a planning run on an agent's traces")
    p.add_argument("--agent", default=None, help="agent id (trials run on it)")
    p.add_argument("--fingerprint", default=None, help="model fingerprint (any of its agents)")
    p.add_argument("--query-class", default=None)
    p.add_argument("--max-trials", type=int, default=None)
    p.add_argument("--wait", action="store_true", help="wait for the job to finish: progress on "
                   "stderr, the finished job as JSON on stdout, exit 1 unless it is done")
    p.add_argument("--poll-s", type=float, default=2.0, help="with --wait: seconds between polls")
    p = _admin_parser(plan, "status", "planning and rollout jobs")
    p.add_argument("job_id", nargs="?", default=None)
    for name, help in (("approve", "approve a needs_human plan (starts its rollout)"),
                       ("reject", "reject a needs_human plan"),
                       ("rollback", "roll an applied plan back on every agent")):
        p = _admin_parser(plan, name, help)
        p.add_argument("plan_id")
        p.add_argument("--reason", required=True)
    audit = sub.add_parser("audit", help="the hash-chained audit log").add_subparsers(
        dest="admin_command", required=True)
    p = _admin_parser(audit, "verify", "walk the hash chain and check every row's MAC")
    p.add_argument("--anchor", default=None, help="a copy of the anchor file (<db>.audit-anchor) "
                   "or a shipped 'audit head {...}' log line: a truncated, wiped or rebuilt log fails")
    p = _admin_parser(audit, "list", "audit rows, newest first")
    p.add_argument("--subject", default=None)
    p.add_argument("--kind", default=None)
    p.add_argument("--limit", type=int, default=50)


def _admin_call(args: argparse.Namespace) -> Callable[[Any], Any]:
    """The typed Admin call of `plan ...` / `audit ...`: client -> reply message."""
    c = args.admin_command
    if args.command == "audit":
        if c == "verify":
            anchor = _anchor(args.anchor) if args.anchor is not None else None
            return lambda client: client.verify_audit(anchor)
        return lambda client: client.list_audit(subject=args.subject or "", kind=args.kind or "",
                                                limit=args.limit)
    if c == "list":
        return lambda client: client.list_plans(status=args.status or "", limit=args.limit)
    if c == "show":
        return lambda client: client.show_plan(args.plan_id)
    if c == "trigger":
        return lambda client: client.trigger_plan(
            agent_id=args.agent or "", fingerprint=args.fingerprint or "",
            query_class=args.query_class or "", max_trials=args.max_trials)
    if c == "status":
        return (lambda client: client.get_job(args.job_id)) if args.job_id else \
            (lambda client: client.list_jobs())
    verdict = {"approve": "approve_plan", "reject": "reject_plan", "rollback": "rollback_plan"}[c]
    return lambda client: getattr(client, verdict)(args.plan_id, args.reason)


def _anchor(path: str) -> dict:
    from headroom_sidecar.controlplane.audit_key import read_anchor
    anchor = read_anchor(path)
    if anchor is None:
        raise CliError(f"no anchor file at {path}")
    return anchor


def _admin(args: argparse.Namespace) -> int:
    import grpc
    from headroom_sidecar.proto import headroom_pb2 as pb
    from headroom_sidecar.proto.client import DEFAULT_ADDRESS, AdminClient, reply_json
    address = args.address or os.environ.get("HEADROOM_ADDRESS") or DEFAULT_ADDRESS
    actor = args.actor or os.environ.get("HEADROOM_OPERATOR", "")
    call = _admin_call(args)
    waits = args.command == "plan" and args.admin_command == "trigger" and args.wait
    try:
        with AdminClient(address, actor=actor, credentials=_credentials(args)) as client:
            reply = call(client)
            if waits:
                reply = _wait_job(client, reply, args.poll_s)
    except grpc.RpcError as e:
        raise CliError(f"{e.code().name}: {e.details()}") from None
    except (ValueError, TypeError) as e:   # an anchor file with fields a head does not have
        raise CliError(str(e)) from None
    write_json(reply_json(reply))
    if isinstance(reply, pb.VerifyAuditReply) and not reply.ok:
        return 1
    return 1 if waits and reply.state != "done" else 0


def _wait_job(client, job, poll_s: float):
    """Polls GetJob until the job leaves `running`; one progress line on stderr per change
    (stage, trials answered, the plan kept so far)."""
    seen = None
    while True:
        plan_id = job.plan_id if job.HasField("plan_id") else None
        progress = (job.stage, job.trials, plan_id)
        if progress != seen:
            print(f"job {job.job_id}: {job.stage}, {job.trials} trial(s) done"
                  + (f", plan {plan_id}" if plan_id else ""), file=sys.stderr)
            seen = progress
        if job.state != "running":
            return job
        time.sleep(poll_s)
        job = client.get_job(job.job_id)


# ---------------------------------------------------------------------- serve
def _write_port_file(path: str, port: int) -> None:
    """Atomically, so a parent polling for the file never reads half of it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, target)


def _serve(args: argparse.Namespace) -> int:
    settings = ServerSettings.resolve(db_path=args.db, host=args.host, port=args.port,
                                      tls_cert_file=args.tls_cert, tls_key_file=args.tls_key,
                                      tls_client_ca_file=args.tls_client_ca,
                                      token_key_file=args.token_key_file,
                                      operator_port=args.operator_port)

    def listening(running: RunningServer) -> None:
        if args.port_file:
            _write_port_file(args.port_file, running.port)
        mode = running.state.auth.mode
        extra = "" if mode is AuthMode.OPEN_LOOPBACK else f" auth={mode.value}"
        extra += f" operator_port={running.operator_port}" if running.operator_port >= 0 else ""
        print(f"headroom control plane listening on {running.host}:{running.port} "
              f"db={settings.db_path}{extra}", flush=True)

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


def _run_remote(address: Optional[str], sql: str, max_rows: int,
                credentials=None) -> QueryResult:
    if address is None:
        settings = ServerSettings.resolve()
        address = f"{settings.host}:{settings.port}"
    with QueryClient(address, credentials=credentials) as client:
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


def _result_doc(result: QueryResult) -> dict:
    table = result.table
    rows = [{n: _json_value(v) for n, v in r.items()} for r in table.to_pylist()]
    return {"columns": [{"name": f.name, "type": str(f.type)} for f in table.schema],
            "rows": rows, "row_count": table.num_rows, "truncated": result.truncated}


def _query(args: argparse.Namespace) -> int:
    if args.max_rows < 0:
        raise CliError(f"--max-rows={args.max_rows} must be >= 0")
    if args.db and not args.address:
        result = _run_local(args.db, args.sql, args.max_rows)
    else:
        result = _run_remote(args.address, args.sql, args.max_rows, _credentials(args))
    if args.json:
        write_json(_result_doc(result))
        return 0
    _print(result.table, args.format, sys.stdout)
    if result.truncated:
        print(f"(truncated at {result.table.num_rows} rows)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- export
def _export(args: argparse.Namespace) -> int:
    from headroom_sidecar.controlplane.export import export_parquet, parse_since
    since = parse_since(args.since)
    db_path = ServerSettings.resolve(db_path=args.db).db_path   # refuses s3:// and other URLs
    if not Path(db_path).exists():
        raise CliError(f"no DuckDB file at {db_path}")
    con = open_read_only(db_path)
    try:
        rows = export_parquet(con, since, args.to_dir)
    finally:
        con.close()
    paths = {table: str(Path(args.to_dir) / (table + ".parquet")) for table in rows}
    if args.json:
        write_json({"since": since.isoformat(), "to": str(Path(args.to_dir)), "tables": {
            table: {"path": paths[table], "rows": n} for table, n in rows.items()}})
        return 0
    for table, n in rows.items():
        print(f"{paths[table]}\t{n} rows")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("policy", "certs", "token"):
            return args.handler(args, sys.stdout)
        if args.command in ("plan", "audit"):
            return _admin(args)
        if args.command == "health":
            return _health(args)
        if args.command == "export":
            return _export(args)
        return _serve(args) if args.command == "serve" else _query(args)
    except (CliError, QueryError, StoreError, ValueError, OSError) as e:
        message = " ".join(str(e).split())   # one line, whatever DuckDB or gRPC said
        print(f"headroom-controlplane {args.command}: error: {message}", file=sys.stderr)
        if getattr(args, "json", False):   # a script reading stdout gets a document too
            write_json({"command": args.command, "error": message})
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
