"""A small certificate authority for `headroom-controlplane certs init DIR` and the tests.

Identity lives in the certificate subject: CN is the agent id or the operator's name, OU says
what the holder is (controlplane.auth.CertKind): "agent", or an operator role ("viewer",
"operator", "approver", "admin"), or "server". Keys are ECDSA P-256 (fast to make, small).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_OU = "server"
AGENT_OU = "agent"
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")
TOKEN_KEY_BYTES = 32


@dataclass(frozen=True)
class Issued:
    """One certificate and its key, as PEM files."""
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class CertDir:
    """What `init_dir` wrote: the CA, the server's pair, one pair per agent and operator."""
    ca_file: str
    ca_key_file: str
    server: Issued
    agents: dict
    operators: dict
    token_key_file: str


def _name(cn: str, ou: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "headroom")])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    start = _now() - datetime.timedelta(minutes=5)   # clocks of other machines may lag a little
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days)))


def make_ca(cn: str = "headroom CA", days: int = 3650):
    """(private key, self-signed CA certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(cn, "ca")
    cert = (_builder(name, name, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def issue(ca_key, ca_cert, cn: str, ou: str, server_names: Sequence[str] = (), days: int = 365):
    """(private key, certificate) signed by the CA. server_names: DNS names / IPs for a server
    certificate; none makes a client certificate."""
    if not cn or not cn.strip():
        raise ValueError("certificate subject CN is empty")
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (_builder(_name(cn, ou), ca_cert.subject, key.public_key(), days)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if server_names:
        b = b.add_extension(_san(server_names), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, private: bool) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return str(path)


def write_pair(folder: Path, stem: str, key, cert) -> Issued:
    return Issued(cert_file=_write(folder / f"{stem}.pem", cert_pem(cert), private=False),
                  key_file=_write(folder / f"{stem}.key", key_pem(key), private=True))


def load_ca(folder: Path):
    """(key, cert) of a CA that init_dir wrote."""
    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    return key, x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())


def write_token_key(path: Path) -> str:
    """A fresh random HMAC key for operator tokens, hex, readable by its owner only."""
    return _write(path, secrets.token_hex(TOKEN_KEY_BYTES).encode() + b"\n", private=True)


def issue_into(folder: Path, cn: str, ou: str) -> Issued:
    """A client certificate signed by the CA in `folder`, written as <ou>-<cn>.pem/.key."""
    ca_key, ca_cert = load_ca(folder)
    key, cert = issue(ca_key, ca_cert, cn, ou)
    stem = f"agent-{cn}" if ou == AGENT_OU else f"operator-{cn}"
    return write_pair(folder, stem, key, cert)


def init_dir(folder: str, agents: Sequence[str] = ("agent-1",),
             operators: Sequence[tuple[str, str]] = (("admin", "admin"),),
             server_names: Sequence[str] = DEFAULT_SERVER_NAMES) -> CertDir:
    """A CA, a server certificate for server_names, client certificates for each agent id and
    each (operator name, role), and a token signing key; refuses a folder that already has a CA."""
    root = Path(folder)
    if (root / "ca.key").exists():
        raise FileExistsError(f"{root / 'ca.key'} exists; use `headroom-controlplane certs issue` to add "
                              "certificates, or choose an empty folder")
    ca_key, ca_cert = make_ca()
    ca = write_pair(root, "ca", ca_key, ca_cert)
    server = write_pair(root, "server", *issue(ca_key, ca_cert, server_names[0], SERVER_OU,
                                               server_names=server_names))
    agent_pairs = {a: write_pair(root, f"agent-{a}", *issue(ca_key, ca_cert, a, AGENT_OU))
                   for a in agents}
    operator_pairs = {n: write_pair(root, f"operator-{n}", *issue(ca_key, ca_cert, n, role))
                      for n, role in operators}
    return CertDir(ca_file=ca.cert_file, ca_key_file=ca.key_file, server=server,
                   agents=agent_pairs, operators=operator_pairs,
                   token_key_file=write_token_key(root / "token.key"))
