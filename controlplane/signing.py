"""The control plane's plan signing key: Ed25519, in a key file outside the database.

Every plan sent to an agent (ApplyPlan and TrialRequest) is signed over
proto/plandoc.py signing_payload(purpose, sha256, document_json); agents verify it with the
public keys they are configured to trust (agent/verify.py) before touching a weight.

Key file: HEADROOM_PLAN_SIGNING_KEY (a PEM PKCS8 private key), default `plan_signing.key` in
the control plane's state dir (the DuckDB file's folder). Absent: generated with 0600 perms,
and its public key written beside it as `<key>.pub` (base64 of the raw 32 bytes, one line),
the text an agent's HEADROOM_PLAN_VERIFY_KEYS takes. A key file that group or others may read
is refused. `python -m headroom_sidecar.controlplane.signing [KEY_FILE]` prints the public key and key id.
"""
from __future__ import annotations

import base64
import os
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from headroom_sidecar.controlplane.settings import resolve_settings
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto.plandoc import PlanPurpose, key_id, signing_payload

KEY_FILE_NAME = "plan_signing.key"
_PRIVATE_MODE = 0o600


class SigningKeyError(RuntimeError):
    """The key file cannot be read, written, parsed, or is readable by others."""


@dataclass(frozen=True)
class SigningSettings:
    # PEM private key file; None: KEY_FILE_NAME in the folder of the DuckDB file.
    key_path: Optional[str] = field(default=None, metadata={"env": "HEADROOM_PLAN_SIGNING_KEY"})

    def __post_init__(self):
        if self.key_path is not None and not self.key_path.strip():
            raise ValueError("invalid SigningSettings: key_path is empty")

    @classmethod
    def resolve(cls, **overrides: Any) -> "SigningSettings":
        return resolve_settings(cls, overrides, "signing")


def default_key_path(db_path: str) -> Path:
    """The state dir's key file; an in-memory database gets a per-process temporary one."""
    if db_path == ":memory:" or not db_path:
        return Path(tempfile.mkdtemp(prefix="headroom-plan-key-")) / KEY_FILE_NAME
    return Path(db_path).resolve().parent / KEY_FILE_NAME


def public_text(raw_public: bytes) -> str:
    return base64.b64encode(raw_public).decode("ascii")


class PlanSigner:
    """One Ed25519 private key; signs pb.Plan messages in place."""

    def __init__(self, private_key: Ed25519PrivateKey, path: Optional[Path] = None):
        self._key = private_key
        self.path = path
        self.public_raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)   # 32 bytes
        self.key_id = key_id(self.public_raw)

    @property
    def public_b64(self) -> str:
        return public_text(self.public_raw)

    def sign(self, plan: pb.Plan, purpose: PlanPurpose) -> pb.Plan:
        """Sets plan.signature and plan.key_id over its sha256 and document; returns plan."""
        plan.signature = self._key.sign(signing_payload(purpose, plan.sha256, plan.document_json))
        plan.key_id = self.key_id
        return plan

    @classmethod
    def generate(cls) -> "PlanSigner":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "PlanSigner":
        path = Path(path)
        if not path.exists():
            _create_key_file(path)
        return cls(_read_key_file(path), path)

    @classmethod
    def for_server(cls, db_path: str, settings: Optional[SigningSettings] = None) -> "PlanSigner":
        settings = settings or SigningSettings.resolve()
        return cls.load_or_create(settings.key_path or default_key_path(db_path))


def _create_key_file(path: Path) -> None:
    """Writes a fresh key with 0600 perms (O_EXCL: a concurrent creator's key wins) and its .pub."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_MODE)
    except FileExistsError:
        return
    except OSError as e:
        raise SigningKeyError(f"cannot create plan signing key {path}: {e}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    Path(f"{path}.pub").write_text(public_text(raw) + "\n")


def _read_key_file(path: Path) -> Ed25519PrivateKey:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as e:
        raise SigningKeyError(f"cannot read plan signing key {path}: {e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningKeyError(f"plan signing key {path} has mode {stat.filemode(mode)}: group or "
                              f"others may use it; chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"plan signing key {path} is not an unencrypted PEM private key: "
                              f"{e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"plan signing key {path} is a {type(key).__name__}, not Ed25519")
    return key


def main(argv: list[str]) -> int:
    """Prints the public key (for agents' HEADROOM_PLAN_VERIFY_KEYS) and its key id."""
    path = argv[0] if argv else SigningSettings.resolve().key_path
    if not path:
        print("usage: python -m headroom_sidecar.controlplane.signing KEY_FILE "
              "(or set HEADROOM_PLAN_SIGNING_KEY)", file=sys.stderr)
        return 2
    signer = PlanSigner.load_or_create(path)
    print(f"{signer.public_b64}  key_id={signer.key_id}  file={path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
