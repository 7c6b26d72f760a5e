"""Plan signatures, the agent's side: which control plane keys it trusts, and the check every
plan from the network passes before any weight is touched.

Trusted keys come from AgentSettings.plan_verify_keys (HEADROOM_PLAN_VERIFY_KEYS): entries
separated by commas, each a file path or the base64 of a raw 32-byte Ed25519 public key. A
file holds one key per line (base64) or one PEM public key; several keys = rotation: trust
old and new while the control plane switches keys. The embedded control plane's key is
trusted in process (attach). A key sent on the stream is never trusted: the agent has no way
to learn a key from the control plane it connects to.

The signature covers proto/plandoc.py signing_payload(purpose, sha256, document_json), so a
plan altered in transit, a hash that does not match the bytes, or a trial's plan replayed as
an ApplyPlan all fail. This module does not import agent.settings or agent.wire (settings
validates its field through parse_trusted_keys).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from headroom_sidecar.proto.plandoc import ED25519_PUBLIC_KEY_BYTES, PlanPurpose, key_id, signing_payload

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
SIGNING_KEY_ENV = "HEADROOM_PLAN_SIGNING_KEY"   # the control plane's key file (embedded child)


class SignedPlan(Protocol):
    """wire.PlanMessage's fields this module reads."""
    plan_id: str
    document_json: str
    sha256: str
    signature: bytes
    key_id: str


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    public: Ed25519PublicKey
    source: str          # where it came from, for error messages


def trusted_key(raw_public: bytes, source: str) -> TrustedKey:
    """raw_public: the 32 raw bytes of an Ed25519 public key."""
    return TrustedKey(key_id(raw_public), Ed25519PublicKey.from_public_bytes(raw_public), source)


def _key_from_b64(text: str, source: str) -> TrustedKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{source}: not base64 (expected the base64 of a 32-byte Ed25519 "
                         "public key, or a file path)") from None
    if len(raw) != ED25519_PUBLIC_KEY_BYTES:
        raise ValueError(f"{source}: decodes to {len(raw)} bytes; an Ed25519 public key is "
                         f"{ED25519_PUBLIC_KEY_BYTES}")
    return trusted_key(raw, source)


def _keys_from_file(path: Path) -> list[TrustedKey]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"plan verify key file {path}: {e}") from None
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as e:
            raise ValueError(f"plan verify key file {path}: not a PEM public key: {e}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"plan verify key file {path}: a {type(key).__name__}, not Ed25519")
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return [trusted_key(raw, str(path))]
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines()]
    keys = [_key_from_b64(ln, f"{path} line {i + 1}") for i, ln in enumerate(lines)
            if ln and not ln.startswith("#")]
    if not keys:
        raise ValueError(f"plan verify key file {path}: no key in it")
    return keys


def parse_trusted_keys(spec: str) -> tuple[TrustedKey, ...]:
    """HEADROOM_PLAN_VERIFY_KEYS text -> keys; ValueError naming the entry that is wrong."""
    keys: list[TrustedKey] = []
    for i, entry in enumerate(e.strip() for e in spec.split(",")):
        if not entry:
            continue
        path = Path(os.path.expanduser(entry))
        if path.is_file():
            keys += _keys_from_file(path)
        elif "/" in entry and not entry.endswith("="):
            raise ValueError(f"plan_verify_keys entry {i + 1} ({entry!r}): no such file")
        else:
            keys.append(_key_from_b64(entry, f"plan_verify_keys entry {i + 1}"))
    return tuple(keys)


class PlanVerifier:
    """The keys this agent trusts; check() lists every reason a plan is refused."""

    def __init__(self, keys: tuple[TrustedKey, ...] = ()):
        self._lock = threading.Lock()
        self._keys = {k.key_id: k for k in keys}

    @classmethod
    def from_spec(cls, spec: str | None) -> "PlanVerifier":
        return cls(parse_trusted_keys(spec) if spec else ())

    def trust(self, raw_public: bytes, source: str) -> str:
        """Adds a key (the embedded control plane's, in process); returns its key id."""
        key = trusted_key(raw_public, source)
        with self._lock:
            self._keys[key.key_id] = key
        return key.key_id

    @property
    def key_ids(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted(self._keys))

    def check(self, msg: SignedPlan, purpose: PlanPurpose) -> list[str]:
        """Empty when `msg` is signed for `purpose` by a trusted key and its sha256 is the hash
        of its document bytes; else every problem found."""
        problems = _hash_problems(msg)
        with self._lock:
            key = self._keys.get(msg.key_id)
            trusted = sorted(self._keys)
        if not trusted:
            return problems + ["no plan verification key is configured "
                               "(HEADROOM_PLAN_VERIFY_KEYS): plans from the network are refused"]
        if not msg.signature:
            return problems + ["unsigned: the plan carries no signature"]
        if key is None:
            return problems + [f"signed by key {msg.key_id!r}, which this agent does not trust "
                               f"(trusted: {', '.join(trusted)})"]
        try:
            key.public.verify(msg.signature, signing_payload(purpose, msg.sha256,
                                                             msg.document_json))
        except InvalidSignature:
            problems.append(f"signature does not verify with key {key.key_id} for a "
                            f"{purpose.value} plan (altered, or signed for another purpose)")
        return problems


def _hash_problems(msg: SignedPlan) -> list[str]:
    if not _HEX64.match(msg.sha256 or ""):
        return [f"sha256: {msg.sha256[:80]!r} is not 64 lowercase hex digits"]
    actual = hashlib.sha256(msg.document_json.encode("utf-8")).hexdigest()
    if actual != msg.sha256:
        return [f"sha256: the message says {msg.sha256[:12]}…, the document bytes hash to "
                f"{actual[:12]}… (altered in transit)"]
    return []


def write_signing_key(folder: Path) -> tuple[Path, bytes]:
    """A fresh Ed25519 private key file (0600) in `folder` for an embedded control plane this
    process starts; returns its path and the raw public key this process then trusts."""
    key = Ed25519PrivateKey.generate()
    path = Path(folder) / "plan_signing.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return path, raw
