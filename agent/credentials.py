"""The agent's side of the control plane's transport security (controlplane/auth.py).

- TLS (tls_ca_file set): the agent presents its client certificate (CN = its agent id, OU =
  agent); the control plane binds the agent id to that certificate on first contact.
- Plaintext loopback: every call carries the local token, if any (settings.local_token, else
  HEADROOM_LOCAL_TOKEN, which agent/embedded.py sets for the control plane it starts).
Files are read once, at construction: a wrong path fails at attach(), never in a model call.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import grpc

from headroom_sidecar.proto.credentials import LOCAL_SUBCHANNELS, BearerInterceptor

LOCAL_TOKEN_ENV = "HEADROOM_LOCAL_TOKEN"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"agent {what} {path}: {e.strerror}") from None


class AgentChannels:
    """Opens channels to the control plane with the agent's credentials."""

    def __init__(self, settings):
        self._tls: Optional[grpc.ChannelCredentials] = None
        self._options: list = [LOCAL_SUBCHANNELS]
        if settings.tls_ca_file:
            cert = _read(settings.tls_cert_file, "tls_cert_file") if settings.tls_cert_file else None
            key = _read(settings.tls_key_file, "tls_key_file") if settings.tls_key_file else None
            self._tls = grpc.ssl_channel_credentials(_read(settings.tls_ca_file, "tls_ca_file"),
                                                     key, cert)
            if settings.tls_server_name:
                self._options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
        self._token = settings.local_token

    def open(self, target: str) -> grpc.Channel:
        if self._tls is not None:
            return grpc.secure_channel(target, self._tls, options=self._options)
        channel = grpc.insecure_channel(target, options=self._options)
        token = self._token or os.environ.get(LOCAL_TOKEN_ENV, "")
        return grpc.intercept_channel(channel, BearerInterceptor(token)) if token else channel

