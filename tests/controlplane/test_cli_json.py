"""`--json` on `headroom-controlplane query|health|export|certs|token`: one JSON document on stdout
(errors too), text unchanged without it. In process against a real server on localhost."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from headroom_sidecar.controlplane.auth import Role, load_token_key, verify_token
from headroom_sidecar.controlplane.cli import EXIT_ERROR, EXIT_UNHEALTHY, main


def run_json(capsys, *argv) -> tuple[int, object]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)   # exactly one document


def test_query_json_has_columns_rows_and_truncation(server, capsys):
    sql = "SELECT range AS n, 'x' || range AS s, NULL AS nothing FROM range(3)"
    code, doc = run_json(capsys, "query", sql, "--address", server.address, "--max-rows", "2")
    assert code == 0
    assert doc == {"columns": [{"name": "n", "type": "int64"}, {"name": "s", "type": "string"},
                               {"name": "nothing", "type": doc["columns"][2]["type"]}],
                   "rows": [{"n": 0, "s": "x0", "nothing": None},
                            {"n": 1, "s": "x1", "nothing": None}],
                   "row_count": 2, "truncated": True}
    code, doc = run_json(capsys, "query", sql, "--address", server.address, "--max-rows", "3")
    assert doc["row_count"] == 3 and doc["truncated"] is False   # exactly at the limit


def test_query_text_stays_the_default(server, capsys):
    assert main(["query", "SELECT 1 AS one", "--address", server.address]) == 0
    assert capsys.readouterr().out.split() == ["one", "---", "1"]


def test_an_error_is_a_json_document_too(server, capsys):
    code, doc = run_json(capsys, "query", "DELETE FROM requests", "--address", server.address)
    assert code == EXIT_ERROR and doc["command"] == "query"
    assert "read-only" in doc["error"]


def test_health_json(server, capsys, unused_address):
    code, doc = run_json(capsys, "health", "--address", server.address)
    assert code == 0 and doc == {"address": server.address, "service": "", "status": "SERVING",
                                 "error": None}
    code, doc = run_json(capsys, "health", "--address", unused_address, "--timeout-s", "0.5")
    assert code == EXIT_UNHEALTHY and doc["status"] is None and doc["error"].startswith(
        ("UNAVAILABLE", "DEADLINE_EXCEEDED"))


@pytest.fixture
def unused_address() -> str:
    import socket
    with socket.socket() as s:   # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_export_json_names_every_file_with_its_rows(settings, capsys, tmp_path):
    from headroom_sidecar.controlplane.app import start_server
    start_server(settings).stop(grace_s=0.5)   # a real, empty store, then released
    out_dir = tmp_path / "out"
    code, doc = run_json(capsys, "export", "--db", settings.db_path, "--since", "2026-01-01",
                         "--to", str(out_dir))
    assert code == 0 and doc["since"] == "2026-01-01T00:00:00" and doc["to"] == str(out_dir)
    assert "requests" in doc["tables"]
    for table, entry in doc["tables"].items():
        assert entry == {"path": str(out_dir / f"{table}.parquet"), "rows": 0}
        assert pq.read_metadata(entry["path"]).num_rows == 0


def test_certs_and_token_json(capsys, tmp_path):
    code, doc = run_json(capsys, "certs", "init", str(tmp_path / "c"), "--agent", "gpu-0",
                         "--operator", "alice:approver")
    root = (tmp_path / "c").resolve()
    assert code == 0 and doc["dir"] == str(root) and set(doc["agents"]) == {"gpu-0"}
    assert set(doc["operators"]) == {"alice"}
    for path in [doc["ca_file"], doc["token_key_file"], *doc["server"].values(),
                 *doc["agents"]["gpu-0"].values()]:
        assert Path(path).is_file(), path
    assert doc["serve_env"]["HEADROOM_CP_TLS_CERT"] == str(root / "server.pem")
    code, doc = run_json(capsys, "certs", "issue", str(root), "--agent", "gpu-1")
    assert code == 0 and doc["cn"] == "gpu-1" and Path(doc["cert_file"]).is_file()
    code, doc = run_json(capsys, "token", "issue", "--subject", "bob", "--role", "viewer",
                         "--ttl", "15m", "--key-file", str(root / "token.key"))
    assert code == 0 and doc["subject"] == "bob" and doc["role"] == "viewer" and doc["ttl_s"] == 900
    claims = verify_token(load_token_key(str(root / "token.key")), doc["token"])
    assert claims.subject == "bob" and claims.role is Role.VIEWER
