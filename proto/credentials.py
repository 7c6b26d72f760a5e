"""What an operator's CLI, AdminClient, QueryClient and the dashboard present to the control
plane (whose controlplane/auth.py checks it), and the gRPC channel that carries it.

    argument > environment > nothing
    HEADROOM_TLS_CA       CA of the server's certificate (TLS on; without it: plaintext loopback)
    HEADROOM_TLS_CERT     client certificate (PEM) } operators with a certificate
    HEADROOM_TLS_KEY      its private key (PEM)    }
    HEADROOM_TOKEN        a signed operator token (`headroom-controlplane token issue`)
    HEADROOM_LOCAL_TOKEN  the embedded control plane's per-process secret (set for you)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import grpc

ENV = {"ca_file": "HEADROOM_TLS_CA", "cert_file": "HEADROOM_TLS_CERT",
       "key_file": "HEADROOM_TLS_KEY", "token": "HEADROOM_TOKEN",
       "local_token": "HEADROOM_LOCAL_TOKEN", "server_name": "HEADROOM_TLS_SERVER_NAME"}


@dataclass(frozen=True)
class ClientCredentials:
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    token: Optional[str] = None
    local_token: Optional[str] = None
    server_name: Optional[str] = None     # the name to check the server certificate against

    def __post_init__(self):
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("client certificate needs both cert_file and key_file "
                             "(HEADROOM_TLS_CERT, HEADROOM_TLS_KEY)")
        if self.cert_file and not self.ca_file:
            raise ValueError("a client certificate needs TLS: set ca_file (HEADROOM_TLS_CA)")

    @classmethod
    def resolve(cls, **overrides) -> "ClientCredentials":
        values = {k: overrides.get(k) or os.environ.get(env) or None for k, env in ENV.items()}
        return cls(**values)

    @property
    def bearer(self) -> Optional[str]:
        return self.token or self.local_token

    def channel(self, address: str, options: Sequence[tuple] = ()) -> grpc.Channel:
        """A channel to address: TLS when ca_file is set, the bearer token on every call."""
        options = [*options, LOCAL_SUBCHANNELS]
        if self.ca_file:
            if self.server_name:
                options.append(("grpc.ssl_target_name_override", self.server_name))
            creds = grpc.ssl_channel_credentials(
                _read(self.ca_file), _read(self.key_file) if self.key_file else None,
                _read(self.cert_file) if self.cert_file else None)
            channel = grpc.secure_channel(address, creds, options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        return grpc.intercept_channel(channel, BearerInterceptor(self.bearer)) if self.bearer \
            else channel


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"credential file {path}: {e.strerror}") from None


# gRPC shares connections between channels with equal arguments, process-wide; a new channel
# would then inherit another's reconnect backoff (up to 120 s) and fail at once with its last
# error although the server is back. Each of our channels connects on its own.
LOCAL_SUBCHANNELS = ("grpc.use_local_subchannel_pool", 1)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
        self.wait_for_ready, self.compression = d.wait_for_ready, d.compression
        self.metadata = metadata


class BearerInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel (plaintext or TLS)."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, d):
        return _Details(d, list(d.metadata or ()) + [self._header])

    def intercept_unary_unary(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_unary_stream(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_stream_unary(self, continuation, d, requests):
        return continuation(self._details(d), requests)

    def intercept_stream_stream(self, continuation, d, requests):
        return continuation(self._details(d), requests)
