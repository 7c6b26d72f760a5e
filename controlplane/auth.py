"""Who is calling: transport modes, principals, roles, operator tokens, agent certificate bindings.

Modes (AuthMode, chosen from ServerSettings by `auth_mode`):
- OPEN_LOOPBACK: no TLS, no token, loopback only (tests, a developer's own machine).
- LOCAL_TOKEN: no TLS, loopback only, every call carries the per-process secret
  (`authorization: Bearer <local token>`): the embedded control plane of `attach(model)`.
- TLS: TLS on every port. The main port requires a client certificate signed by
  tls_client_ca_file (agents: OU=agent, CN=agent id; operators: OU=<role>, CN=name); the
  optional operator port takes TLS without client certificates and a signed operator token.
Anything but loopback without TLS and a way to authenticate refuses to start (`check_bind`).

Roles, checked per Admin RPC method by the server (METHOD_ROLES; the client's
`headroom-actor` metadata is ignored for authenticated callers):

    role      may call
    viewer    ListAgents ListPlans ShowPlan GetJob ListJobs ListAudit VerifyAudit ShowPolicy
              AnalysisSummary, and the Query RPC
    operator  + TriggerPlan
    approver  + ApprovePlan RejectPlan RollbackPlan
    admin     + ReloadPolicy UnbindAgent (release an agent id's certificate binding)
"""
from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import ipaddress
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from headroom_sidecar.controlplane.schema import AGENT_BINDINGS_DDL

TOKEN_PREFIX = "hrt1"
BEARER = "bearer "
AGENT_OU = "agent"
LOCAL_SUBJECT = "local"


class Role(enum.IntEnum):
    """Ordered: a role may do everything the roles below it may."""
    VIEWER = 1
    OPERATOR = 2
    APPROVER = 3
    ADMIN = 4

    @classmethod
    def parse(cls, text: str) -> "Role":
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown role {text!r}; known: "
                             f"{', '.join(r.name.lower() for r in cls)}") from None


# The one table of who may call which Admin RPC (method names of service Headroom in
# proto/headroom.proto); tests/security checks it covers exactly the service's Admin methods.
METHOD_ROLES: dict[str, Role] = {
    "ListAgents": Role.VIEWER, "ListPlans": Role.VIEWER, "ShowPlan": Role.VIEWER,
    "GetJob": Role.VIEWER, "ListJobs": Role.VIEWER, "ListAudit": Role.VIEWER,
    "VerifyAudit": Role.VIEWER, "ShowPolicy": Role.VIEWER, "AnalysisSummary": Role.VIEWER,
    "TriggerPlan": Role.OPERATOR,
    "ApprovePlan": Role.APPROVER, "RejectPlan": Role.APPROVER, "RollbackPlan": Role.APPROVER,
    "ReloadPolicy": Role.ADMIN, "UnbindAgent": Role.ADMIN,
}
QUERY_ROLE = Role.VIEWER
# A method nobody mapped needs the highest role: a new method is never open by accident.
UNMAPPED_ROLE = Role.ADMIN


class AuthMode(enum.Enum):
    OPEN_LOOPBACK = "open-loopback"
    LOCAL_TOKEN = "local-token"
    TLS = "tls"


class PrincipalKind(enum.Enum):
    AGENT = "agent"          # client certificate, OU=agent
    OPERATOR = "operator"    # client certificate OU=<role>, or a signed token
    LOCAL = "local"          # loopback without TLS (the machine's own user)


@dataclass(frozen=True)
class Principal:
    kind: PrincipalKind
    subject: str                      # agent id, operator name, or "local"
    role: Optional[Role] = None       # operators and local callers
    cert_sha256: str = ""             # certificate principals: SHA-256 of the DER certificate

    def audit_actor(self, typed: str) -> str:
        """What the audit log records. Authenticated operators: their credential's name, never
        what the client typed. Local callers are the machine's user, who names themselves
        (`--as`); empty stays empty so the command asks for it."""
        if self.kind is PrincipalKind.OPERATOR:
            return f"operator:{self.subject}"
        typed = (typed or "").strip()
        return typed if not typed or ":" in typed else f"operator:{typed}"

    @property
    def client_key(self) -> str:
        """What the per-client stream limit counts by."""
        return self.cert_sha256 or f"{self.kind.value}:{self.subject}"


class AuthError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


# ---------------------------------------------------------------------- operator tokens
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_token_key(path: str) -> bytes:
    """The HMAC key of a token key file (hex, as `headroom-controlplane certs init` writes it)."""
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"token key file {path}: {e.strerror}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"token key file {path}: not hex") from None
    if len(key) < 16:
        raise ValueError(f"token key file {path}: {len(key)} bytes; at least 16 are needed")
    return key


_TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_TTL_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl_s(text: str) -> float:
    """'90s', '15m', '8h', '7d' or plain seconds -> seconds (> 0)."""
    m = _TTL.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"ttl {text!r}: expected a positive number with s, m, h or d (e.g. 8h)")
    return float(m.group(1)) * _TTL_UNIT_S[m.group(2)]


def issue_token(key: bytes, subject: str, role: Role, ttl_s: float,
                now_s: Optional[float] = None) -> str:
    """hrt1.<payload>.<HMAC-SHA256>; payload {sub, role, iat, exp} in Unix seconds."""
    if not subject or subject != subject.strip() or ":" in subject:
        raise ValueError(f"token subject {subject!r}: must be a non-empty name without ':' "
                         "or surrounding spaces")
    now_s = time.time() if now_s is None else now_s
    payload = _b64(json.dumps({"sub": subject, "role": role.name.lower(), "iat": int(now_s),
                               "exp": now_s + ttl_s}, sort_keys=True).encode())
    body = f"{TOKEN_PREFIX}.{payload}"
    return f"{body}.{_b64(hmac.new(key, body.encode(), hashlib.sha256).digest())}"


def verify_token(key: bytes, token: str, now_s: Optional[float] = None) -> Principal:
    """The operator a token names; AuthError(UNAUTHENTICATED) if forged, malformed or expired.
    Valid while now < exp (a token is dead at its expiry second)."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "bearer token is not a headroom token")
    want = hmac.new(key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    try:
        ok = hmac.compare_digest(want, _unb64(parts[2]))
        claims = json.loads(_unb64(parts[1])) if ok else None
    except (ValueError, TypeError):
        ok = False
    if not ok or not isinstance(claims, dict):
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "bearer token signature does not verify")
    now_s = time.time() if now_s is None else now_s
    if not now_s < float(claims.get("exp", 0)):
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED,
                        f"token of {claims.get('sub')!r} expired; issue a new one "
                        "(headroom-controlplane token issue)")
    try:
        role = Role.parse(str(claims.get("role", "")))
    except ValueError as e:
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"token: {e}") from None
    return Principal(PrincipalKind.OPERATOR, str(claims["sub"]), role)


# ---------------------------------------------------------------------- certificates
def principal_from_cert(pem: bytes) -> Principal:
    """A verified client certificate (gRPC checked it against the client CA) -> principal."""
    cert = x509.load_pem_x509_certificate(pem)
    cn = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    ou = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    sha = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    if len(cn) != 1 or not cn[0] or len(ou) != 1:
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "client certificate needs exactly one "
                        "CN (agent id or operator name) and one OU (agent or a role)")
    if ou[0] == AGENT_OU:
        return Principal(PrincipalKind.AGENT, cn[0], cert_sha256=sha)
    try:
        role = Role.parse(ou[0])
    except ValueError as e:
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED,
                        f"client certificate OU={ou[0]!r}: neither 'agent' nor a role ({e})") from None
    return Principal(PrincipalKind.OPERATOR, cn[0], role, cert_sha256=sha)


# ---------------------------------------------------------------------- the server side
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def auth_mode(settings) -> AuthMode:
    """The mode ServerSettings ask for; ValueError saying what to configure if it is unsafe."""
    tls = bool(settings.tls_cert_file or settings.tls_key_file)
    if tls:
        missing = [n for n in ("tls_cert_file", "tls_key_file", "tls_client_ca_file")
                   if not getattr(settings, n)]
        if missing:
            raise ValueError(f"TLS needs {', '.join(missing)} too (HEADROOM_CP_TLS_CERT, "
                             "HEADROOM_CP_TLS_KEY, HEADROOM_CP_TLS_CLIENT_CA)")
        if settings.operator_port >= 0 and not settings.token_key_file:
            raise ValueError("operator_port takes signed tokens: set token_key_file "
                             "(HEADROOM_CP_TOKEN_KEY_FILE)")
        return AuthMode.TLS
    if not is_loopback(settings.host):
        raise ValueError(
            f"refusing to listen on {settings.host} without TLS and authentication: anyone who "
            "reaches it could push plans to agents. Either bind 127.0.0.1 (HEADROOM_CP_HOST), "
            "or set HEADROOM_CP_TLS_CERT, HEADROOM_CP_TLS_KEY and HEADROOM_CP_TLS_CLIENT_CA "
            "(and HEADROOM_CP_TOKEN_KEY_FILE for operator tokens); `headroom-controlplane certs init DIR` "
            "makes them all")
    return AuthMode.LOCAL_TOKEN if settings.local_token else AuthMode.OPEN_LOOPBACK


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what} {path}: {e.strerror}") from None


class ServerAuth:
    """Authenticates each call from its transport (client certificate) or bearer metadata."""

    def __init__(self, settings):
        self.mode = auth_mode(settings)
        self.settings = settings
        self._local_token = settings.local_token or ""
        self._token_key = load_token_key(settings.token_key_file) if settings.token_key_file \
            else None

    def credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        s = self.settings
        pair = (_read(s.tls_key_file, "tls_key_file"), _read(s.tls_cert_file, "tls_cert_file"))
        ca = _read(s.tls_client_ca_file, "tls_client_ca_file") if require_client_cert else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                           require_client_auth=require_client_cert)

    def authenticate(self, context: grpc.ServicerContext) -> Principal:
        if self.mode is AuthMode.OPEN_LOOPBACK:
            return Principal(PrincipalKind.LOCAL, LOCAL_SUBJECT, Role.ADMIN)
        bearer = _bearer(context)
        if self.mode is AuthMode.LOCAL_TOKEN:
            if bearer and hmac.compare_digest(bearer.encode(), self._local_token.encode()):
                return Principal(PrincipalKind.LOCAL, LOCAL_SUBJECT, Role.ADMIN)
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "this control plane takes only "
                            "calls that carry its local token (HEADROOM_LOCAL_TOKEN)")
        pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        if pem:
            return principal_from_cert(pem)
        if bearer and self._token_key is not None:
            return verify_token(self._token_key, bearer)
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "no credential: present a client "
                        "certificate, or a token (HEADROOM_TOKEN) on the operator port")



def require_role(principal: Principal, needed: Role, what: str) -> None:
    """PERMISSION_DENIED unless principal is an operator (or local caller) with role >= needed."""
    if principal.kind is PrincipalKind.AGENT:
        raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                        f"{what}: agent {principal.subject!r} may only stream telemetry")
    if principal.role is None or principal.role < needed:
        have = principal.role.name.lower() if principal.role else "none"
        raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                        f"{what} needs role {needed.name.lower()}; {principal.subject!r} "
                        f"has {have}")


def authorize_method(principal: Principal, method: str) -> None:
    """PERMISSION_DENIED unless principal's role covers Admin RPC `method` (METHOD_ROLES)."""
    require_role(principal, METHOD_ROLES.get(method, UNMAPPED_ROLE), method)


def _bearer(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith(BEARER):
            return value[len(BEARER):].strip()
    return ""


# ---------------------------------------------------------------------- agent bindings
class AgentBindings:
    """agent id -> SHA-256 of the certificate it first connected with, and the fingerprint of
    the model it first registered, in the store's DuckDB file, so a restart opens no window for
    another certificate to claim the id, nor for a verified agent to pose as another model's
    (canaries are chosen by fingerprint). Serving another model takes a new agent id, or an
    admin's agents.unbind."""

    def __init__(self, con, lock: threading.RLock):
        self._con, self._lock = con, lock
        with self._lock:
            self._con.execute(AGENT_BINDINGS_DDL)   # schema.py's table; here for a bare connection

    def bind(self, agent_id: str, cert_sha256: str, fingerprint: str) -> Optional[str]:
        """None once bound to this certificate and model (now or before); else why not."""
        with self._lock:
            row = self._con.execute("SELECT cert_sha256, fingerprint FROM agent_bindings WHERE "
                                    "agent_id = ?", [agent_id]).fetchone()
            if row is None:
                self._con.execute("INSERT INTO agent_bindings (agent_id, cert_sha256, fingerprint)"
                                  " VALUES (?, ?, ?)", [agent_id, cert_sha256, fingerprint])
                return None
        if row[0] != cert_sha256:
            return (f"agent {agent_id!r} is bound to another certificate (sha256 {row[0][:16]}...)")
        if row[1] != fingerprint:
            return (f"agent {agent_id!r} registered model {row[1][:12]}..., this hello says "
                    f"{fingerprint[:12]}...: another model needs another agent id")
        return None

    def unbind(self, agent_id: str) -> bool:
        with self._lock:
            found = self._con.execute("SELECT count(*) FROM agent_bindings WHERE agent_id = ?",
                                      [agent_id]).fetchone()[0]
            self._con.execute("DELETE FROM agent_bindings WHERE agent_id = ?", [agent_id])
        return bool(found)

    def close(self) -> None:
        self._con.close()
