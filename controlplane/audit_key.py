"""What keeps the audit log honest from outside DuckDB: the MAC key file and the anchor file.

- The key (32 random bytes, hex) lives in a file only the control plane reads (0600, created
  on first start). Whoever can write the DuckDB file but cannot read the key cannot produce a
  valid MAC: an edited row, a recomputed chain or a forged appended row fails verify.
- The anchor file holds the chain head (last seq, row_hash, MAC, first keyed seq) and is
  rewritten after every append; the same head goes to the `controlplane.audit.anchor` log at
  INFO, for an operator to ship elsewhere. A truncated or wiped log no longer reaches it.

Defaults sit next to the DuckDB file (`<db>.audit-key`, `<db>.audit-anchor`); point them
elsewhere (another volume, another owner) with HEADROOM_AUDIT_KEY_FILE / _ANCHOR_FILE.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from headroom_sidecar.controlplane.settings import resolve_settings

log = logging.getLogger("headroom_sidecar.controlplane.audit")
anchor_log = logging.getLogger("headroom_sidecar.controlplane.audit.anchor")

KEY_BYTES = 32
KEY_SUFFIX = ".audit-key"
ANCHOR_SUFFIX = ".audit-anchor"
# Key of logs in an in-memory database: they die with the process, and so does this.
_PROCESS_KEY = secrets.token_bytes(KEY_BYTES)


class AuditKeyError(OSError):
    """The key file cannot be read, created or parsed; the message names the file."""


@dataclass(frozen=True)
class AuditSettings:
    # "" : next to the DuckDB file (<db>.audit-key / <db>.audit-anchor); none for in-memory.
    key_file: str = field(default="", metadata={"env": "HEADROOM_AUDIT_KEY_FILE"})
    anchor_file: str = field(default="", metadata={"env": "HEADROOM_AUDIT_ANCHOR_FILE"})

    @classmethod
    def resolve(cls, db_path: Optional[str] = None, **overrides: Any) -> "AuditSettings":
        """Arguments > environment > next to db_path (None or ":memory:": no files)."""
        s = resolve_settings(cls, overrides, "audit")
        if db_path and db_path != ":memory:":
            s = cls(key_file=s.key_file or db_path + KEY_SUFFIX,
                    anchor_file=s.anchor_file or db_path + ANCHOR_SUFFIX)
        return s


def load_or_create_key(path: str) -> bytes:
    """The key in `path`; a new random one (file mode 0600) if the file does not exist."""
    if not path:
        return _PROCESS_KEY
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path)
    except OSError as e:
        raise AuditKeyError(f"cannot create audit key file {path}: {e}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")
    log.info("created audit key file %s (0600)", path)
    return _read_key(path)


def _read_key(path: str) -> bytes:
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text().strip()
    except OSError as e:
        raise AuditKeyError(f"cannot read audit key file {path}: {e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("audit key file %s is accessible to group/others (mode %o): "
                    "chmod 600 it", path, stat.S_IMODE(mode))
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise AuditKeyError(f"audit key file {path}: expected at least 32 hex digits, "
                            f"got {len(text)} characters")
    return key


def write_anchor(path: str, head: dict) -> None:
    """Atomically replaces the anchor file with `head`, and logs it for shipping."""
    line = json.dumps(head, sort_keys=True)
    anchor_log.info("audit head %s", line)
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:   # the row is committed; a stale anchor shows up at verify
        log.error("cannot write audit anchor file %s: %s", path, e)


def read_anchor(path: str) -> Optional[dict]:
    """The anchor file's head, None if there is no file yet; ValueError if it is not one."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"cannot read audit anchor file {path}: {e}") from None
    # The file itself, or a shipped log line ("... audit head {...}"): the last line's object.
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    try:
        head = json.loads(last[last.find("{"):] if "{" in last else last)
    except json.JSONDecodeError as e:
        raise ValueError(f"audit anchor file {path} is not JSON: {e.msg}") from None
    if not isinstance(head, dict):
        raise ValueError(f"audit anchor file {path}: expected a JSON object")
    return head
