import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.controlplane import helpers as h

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, timeout_s=60):
    return subprocess.run([sys.executable, "-m", "headroom_sidecar.controlplane", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture
def served(tmp_path):
    db, port_file = tmp_path / "cli.duckdb", tmp_path / "run" / "port"
    proc = subprocess.Popen([sys.executable, "-m", "headroom_sidecar.controlplane", "serve", "--db", str(db),
                             "--port", "0", "--port-file", str(port_file)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not port_file.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no port file"
        time.sleep(0.05)
    yield proc, f"127.0.0.1:{int(port_file.read_text())}", db
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serve_then_query_in_every_format_then_sigterm(served):
    proc, address, db = served
    assert proc.stdout.readline().strip() == \
        f"headroom control plane listening on {address} db={db}"
    with h.AgentStream(address) as agent:
        agent.send(h.hello())
        agent.send(h.batch(1, h.tables(h.records(3, traced_every=0))))
        assert agent.recv().ack.rows_stored == 3
    sql = "SELECT request_id, query_class, latency_ms FROM requests ORDER BY request_id"
    table = _cli("query", sql, "--address", address)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["request_id", "query_class", "latency_ms"]
    assert [l.split() for l in lines[2:]] == [["1", "short", "10"], ["2", "long", "20"],
                                              ["3", "short", "30"]]
    csv = _cli("query", sql, "--address", address, "--format", "csv")
    assert csv.stdout.splitlines() == ["request_id,query_class,latency_ms", "1,short,10.0",
                                       "2,long,20.0", "3,short,30.0"]
    js = _cli("query", sql, "--address", address, "--format", "json", "--max-rows", "2")
    assert json.loads(js.stdout) == [{"request_id": 1, "query_class": "short", "latency_ms": 10.0},
                                     {"request_id": 2, "query_class": "long", "latency_ms": 20.0}]
    assert "truncated at 2 rows" in js.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    # The server closed the file: it opens read-only locally now, and the agent shows as gone.
    local = _cli("query", "SELECT agent_id, connected FROM agents", "--db", str(db), "--format", "csv")
    assert local.stdout.splitlines() == ["agent_id,connected", "agent-1,False"]


@pytest.mark.parametrize("sql, fragment", [
    ("DROP TABLE requests", "got a DROP statement"),
    ("SELECT * FROM nosuchtable", "nosuchtable"),
])
def test_query_errors_are_one_line_and_exit_2(served, sql, fragment):
    _, address, _ = served
    out = _cli("query", sql, "--address", address)
    assert out.returncode == 2
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and fragment in out.stderr


def test_sigint_exits_cleanly(served):
    proc, _, _ = served
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0


@pytest.mark.parametrize("args, fragment", [
    (["query", "SELECT 1", "--db", "/nonexistent/x.duckdb"], "no DuckDB file at /nonexistent/x.duckdb"),
    (["query", "SELECT 1", "--address", "127.0.0.1:1"], "127.0.0.1:1"),
    (["serve", "--port", "70000", "--db", "/tmp/headroom-cli-never.duckdb"], "port=70000"),
])
def test_bad_arguments_exit_2_with_one_line(args, fragment):
    out = _cli(*args, timeout_s=60)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and fragment in out.stderr, out.stderr


def test_query_on_a_file_held_by_a_server_says_so(served):
    _, _, db = served
    out = _cli("query", "SELECT 1", "--db", str(db))
    assert out.returncode == 2 and "read-only" in out.stderr
