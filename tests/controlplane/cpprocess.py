"""A real control plane in a child process (`headroom-controlplane serve`), for tests that kill
it with SIGKILL (no cleanup of any kind runs) and start it again on the same port and file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import duckdb

ROOT = Path(__file__).resolve().parents[2]


class ControlPlaneProcess:
    def __init__(self, db: Path, env: Optional[dict] = None, start_timeout_s: float = 60.0):
        self.db, self.port = Path(db), 0
        self.env = {**os.environ, **(env or {})}
        self.start_timeout_s = start_timeout_s
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Serves on self.port (0 the first time: any free port, kept for every restart)."""
        port_file = self.db.parent / f"{self.db.stem}.port"
        port_file.unlink(missing_ok=True)
        self._log = open(self.db.parent / f"{self.db.stem}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "headroom_sidecar.controlplane", "serve", "--db", str(self.db),
             "--port", str(self.port), "--port-file", str(port_file)],
            cwd=ROOT, env=self.env, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + self.start_timeout_s
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None:
                raise AssertionError(f"control plane exited with {self.proc.returncode}: "
                                     + self.log_tail())
            if time.monotonic() > deadline:
                raise AssertionError("control plane did not start: " + self.log_tail())
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    def pause(self) -> None:
        """SIGSTOP: the process holds its sockets but answers nothing (acks stay unsent)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self) -> None:
        """SIGTERM: a clean stop, the DuckDB file closed (readable by the test afterwards)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)   # a paused one must run to stop
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()

    def log_tail(self, n_bytes: int = 4000) -> str:
        path = self.db.parent / f"{self.db.stem}.log"
        return path.read_bytes()[-n_bytes:].decode("utf-8", "replace") if path.exists() else ""

    def rows(self, sql: str, params=()) -> list[tuple]:
        """Reads the file once the process is stopped (DuckDB: one writer process)."""
        con = duckdb.connect(str(self.db), read_only=True)
        try:
            return con.execute(sql, list(params)).fetchall()
        finally:
            con.close()
