"""agent/embedded.py: the real control plane as a child process over a real DuckDB file."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

from headroom_sidecar.agent import wire
from headroom_sidecar.agent.embedded import EmbeddedStartError, start_embedded
from headroom_sidecar.agent.exporter import BatchExporter
from headroom_sidecar.agent.records import RequestRecord
from headroom_sidecar.agent.settings import AgentSettings
from headroom_sidecar.controlplane.query import QueryClient
from tests.controlplane.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]


def process_gone(pid: int) -> bool:
    """No such process, or only a zombie left (the parent has not reaped it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_embedded_receives_data_and_stops(tmp_path):
    db = tmp_path / "sub" / "embedded.duckdb"
    settings = AgentSettings(embedded_db_path=str(db), flush_interval_ms=50)
    cp = start_embedded(settings.embedded_db_path)
    try:
        assert cp.alive() and re.fullmatch(r"127\.0\.0\.1:\d+", cp.address)
        ex = BatchExporter(settings, wire.make_hello("agent-emb", None, "unavailable: test",
                                                     settings), cp.address)
        for i in range(20):
            ex.submit(RequestRecord(request_id=i, start_unix_us=i))
        assert ex.flush(15_000) and ex.shutdown(5000)
        with QueryClient(cp.address) as client:
            rows = client.query("SELECT count(*) AS n FROM requests").table.to_pylist()
        assert rows == [{"n": 20}]
    finally:
        code = cp.stop(timeout_s=10)
    assert code == 0, f"control plane exited with {code}; log: {cp.log_path}"   # SIGTERM: clean exit
    assert process_gone(cp.pid) and not cp.alive()
    # The data outlived the process, in the DuckDB file the agent named.
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*), min(request_id), max(request_id) FROM requests"
                           ).fetchone() == (20, 0, 19)
        assert con.execute("SELECT agent_id, connected FROM agents").fetchall() == [
            ("agent-emb", False)]


def test_unusable_db_path_fails_with_the_childs_error(tmp_path):
    not_a_file = tmp_path / "a_directory"
    not_a_file.mkdir()
    with pytest.raises(EmbeddedStartError) as err:
        start_embedded(str(not_a_file), timeout_s=60)
    message = str(err.value)
    assert "exited with code 2 before it listened" in message
    assert "headroom-controlplane serve: error" in message and str(not_a_file) in message
    assert "-m headroom_sidecar.controlplane serve --db" in message   # the command, for reproducing it by hand


def test_start_timeout_kills_the_child(tmp_path):
    with pytest.raises(EmbeddedStartError, match=r"did not write its port to (\S+) within") as err:
        start_embedded(str(tmp_path / "cp.duckdb"), timeout_s=0.001)
    port_file = re.search(r"did not write its port to (\S+) within", str(err.value)).group(1)
    still_running = [p for p in Path("/proc").glob("[0-9]*")
                     if port_file.encode() in _cmdline(p) and not process_gone(int(p.name))]
    assert still_running == []


def _cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return b""


def test_interpreter_exit_stops_the_child(tmp_path):
    """A process that never calls stop(): atexit ends its control plane."""
    script = textwrap.dedent(f"""
        from headroom_sidecar.agent.embedded import start_embedded
        cp = start_embedded({str(tmp_path / 'cp.duckdb')!r})
        print(cp.pid, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    assert wait_until(lambda: process_gone(pid)), f"control plane pid {pid} outlived its parent"
