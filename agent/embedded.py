"""An embedded control plane for `attach(model)` without an address: a child process.

A child, not a thread: DuckDB writes and the gRPC server then never compete with the model for
the GIL. The agent only knows the command line (`headroom-controlplane serve ...`), never the
package, so agent/ still does not import controlplane/.

Zero configuration and still not open to every local user: the child listens on 127.0.0.1 only
and takes only calls that carry this process's secret (`local_token()`: HEADROOM_LOCAL_TOKEN,
made once per process and inherited by its children, e.g. a dashboard it starts; the exporter,
AdminClient and QueryClient of this process read it from there).
"""
from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from headroom_sidecar.agent.verify import SIGNING_KEY_ENV, write_signing_key

# The repository root, so the child finds `controlplane` even without an installed package.
_ROOT = Path(__file__).resolve().parent.parent
_STDERR_TAIL_BYTES = 4000
LOCAL_TOKEN_ENV = "HEADROOM_LOCAL_TOKEN"        # what clients of this process present
SERVER_TOKEN_ENV = "HEADROOM_CP_LOCAL_TOKEN"    # what the child control plane requires


def local_token() -> str:
    """This process's secret for its embedded control planes: inherited from a parent (same
    user, same secret) or made now; kept in the environment for in-process clients and children."""
    token = os.environ.get(LOCAL_TOKEN_ENV)
    if not token:
        token = secrets.token_urlsafe(32)
        os.environ[LOCAL_TOKEN_ENV] = token
    return token


class EmbeddedStartError(RuntimeError):
    """The embedded control plane did not come up; the message holds its command and stderr."""


class EmbeddedControlPlane:
    """A running child control plane: .address ("127.0.0.1:<port>"), .pid, .stop(timeout_s)."""

    def __init__(self, process: subprocess.Popen, port: int, log_path: Path, tmp_dir: Path,
                 plan_public_key: bytes = b""):
        self._process, self.port, self.log_path, self._tmp_dir = process, port, log_path, tmp_dir
        # The raw Ed25519 public key of the plan signing key this process made for the child
        # (agent/verify.py): the agent trusts it in process, nothing travels on the stream.
        self.plan_public_key = plan_public_key
        self.address = f"127.0.0.1:{port}"
        atexit.register(self.stop)

    @property
    def pid(self) -> int:
        return self._process.pid

    def alive(self) -> bool:
        return self._process.poll() is None

    def stop(self, timeout_s: float = 5.0) -> Optional[int]:
        """SIGTERM (the server closes DuckDB cleanly), SIGKILL after timeout_s; the exit code."""
        atexit.unregister(self.stop)
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5.0)
        if self._process.returncode in (0, -signal.SIGTERM):
            shutil.rmtree(self._tmp_dir, ignore_errors=True)   # keep the log only after a failure
        return self._process.returncode

    def __enter__(self) -> "EmbeddedControlPlane":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _command(db_path: str, port_file: Path) -> list[str]:
    return [sys.executable, "-m", "headroom_sidecar.controlplane", "serve", "--db", db_path,
            "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)]


def _child_env(signing_key: Optional[Path] = None) -> dict:
    env = dict(os.environ)
    env[SERVER_TOKEN_ENV] = local_token()
    for name in ("HEADROOM_CP_HOST", "HEADROOM_CP_TLS_CERT", "HEADROOM_CP_TLS_KEY"):
        env.pop(name, None)   # the embedded plane is plaintext loopback, whatever the shell says
    if signing_key is not None:
        env[SIGNING_KEY_ENV] = str(signing_key)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    return env


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "<no output>"
    return data[-_STDERR_TAIL_BYTES:].decode("utf-8", "replace").strip() or "<no output>"


def _read_port(port_file: Path) -> Optional[int]:
    """The port once the child has written it completely (a partial write reads as None)."""
    try:
        text = port_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _wait_for_port(process: subprocess.Popen, port_file: Path, log_path: Path,
                   timeout_s: float, command: list[str]) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        port = _read_port(port_file)
        if port is not None:
            return port
        if process.poll() is not None:
            raise EmbeddedStartError(
                f"embedded control plane exited with code {process.returncode} before it "
                f"listened.\ncommand: {' '.join(command)}\nstderr:\n{_tail(log_path)}")
        time.sleep(0.02)
    process.kill()
    process.wait(5.0)
    raise EmbeddedStartError(
        f"embedded control plane did not write its port to {port_file} within {timeout_s:.0f} s."
        f"\ncommand: {' '.join(command)}\nstderr:\n{_tail(log_path)}")


def start_embedded(db_path: str, timeout_s: float = 30.0) -> EmbeddedControlPlane:
    """Starts `headroom-controlplane serve` on a free localhost port and waits until it listens."""
    Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix="headroom-embedded-"))
    port_file, log_path = tmp_dir / "port", tmp_dir / "controlplane.log"
    signing_key, plan_public_key = write_signing_key(tmp_dir)   # one per embedded child
    command = _command(os.path.abspath(db_path), port_file)
    with open(log_path, "wb") as log_file:
        # Own session: a Ctrl-C meant for the serving process does not kill the control plane
        # before the agent's exporter has flushed into it; the agent stops it at exit.
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, env=_child_env(signing_key),
                                   start_new_session=True)
    try:
        port = _wait_for_port(process, port_file, log_path, timeout_s, command)
    except EmbeddedStartError:
        shutil.rmtree(tmp_dir, ignore_errors=True)   # the error message carries the log's tail
        raise
    return EmbeddedControlPlane(process, port, log_path, tmp_dir, plan_public_key)
