"""Shared fixtures for the security tests (and other helpers' tests that need TLS + auth):
real certificates made here with `cryptography` (controlplane/certs.py), a real server on
127.0.0.1 with TLS, client certificates and operator tokens, and clients that carry them.

    def test_x(secure):                       # a running TLS server, see SecureWorld
        with secure.admin("alice") as client:  # operator certificate, role approver
            client.list_plans()
        with secure.agent("agent-1") as a:     # mutual-TLS Connect stream, CN=agent-1
            a.send(helpers.hello("agent-1"))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest

from headroom_sidecar.controlplane import certs
from headroom_sidecar.controlplane.auth import Role, issue_token, load_token_key
from headroom_sidecar.proto.client import AdminClient
from headroom_sidecar.proto.credentials import ClientCredentials
from headroom_sidecar.controlplane.query import QueryClient
from headroom_sidecar.controlplane.app import RunningServer, start_server
from headroom_sidecar.controlplane.settings import ServerSettings
from tests.controlplane.helpers import AgentStream

AGENTS = ("agent-1", "agent-2")
# name -> role: one operator certificate per role
OPERATORS = {"vera": "viewer", "otto": "operator", "alice": "approver", "adam": "admin"}


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> certs.CertDir:
    """CA, server certificate (localhost, 127.0.0.1), agent and operator certificates, token key."""
    return certs.init_dir(str(tmp_path_factory.mktemp("pki")), agents=AGENTS,
                          operators=tuple(OPERATORS.items()))


def tls_settings(pki: certs.CertDir, db_path: str, **overrides) -> ServerSettings:
    """ServerSettings for TLS + client certificates + tokens on an operator port (free ports)."""
    values = dict(db_path=db_path, host="127.0.0.1", port=0, tls_cert_file=pki.server.cert_file,
                  tls_key_file=pki.server.key_file, tls_client_ca_file=pki.ca_file,
                  token_key_file=pki.token_key_file, operator_port=0)
    values.update(overrides)
    return ServerSettings(**values)


@dataclass
class SecureWorld:
    server: RunningServer
    pki: certs.CertDir

    @property
    def address(self) -> str:
        return f"localhost:{self.server.port}"     # the server certificate names localhost

    @property
    def operator_address(self) -> str:
        return f"localhost:{self.server.operator_port}"

    def agent_credentials(self, agent_id: str) -> ClientCredentials:
        pair = self.pki.agents[agent_id]
        return ClientCredentials(ca_file=self.pki.ca_file, cert_file=pair.cert_file,
                                 key_file=pair.key_file)

    def operator_credentials(self, name: str) -> ClientCredentials:
        pair = self.pki.operators[name]
        return ClientCredentials(ca_file=self.pki.ca_file, cert_file=pair.cert_file,
                                 key_file=pair.key_file)

    def token(self, subject: str, role: str, ttl_s: float = 600.0) -> str:
        return issue_token(load_token_key(self.pki.token_key_file), subject, Role.parse(role),
                           ttl_s)

    def token_credentials(self, subject: str, role: str) -> ClientCredentials:
        return ClientCredentials(ca_file=self.pki.ca_file, token=self.token(subject, role))

    def admin(self, name: str, actor: str = "") -> AdminClient:
        """AdminClient with operator `name`'s certificate (roles: OPERATORS)."""
        return AdminClient(self.address, actor=actor, timeout_s=20.0,
                           credentials=self.operator_credentials(name))

    def admin_with_token(self, subject: str, role: str, actor: str = "") -> AdminClient:
        """AdminClient on the operator port with a freshly signed token."""
        return AdminClient(self.operator_address, actor=actor, timeout_s=20.0,
                           credentials=self.token_credentials(subject, role))

    def query_client(self, name: str = "vera") -> QueryClient:
        return QueryClient(self.address, credentials=self.operator_credentials(name))

    def agent(self, agent_id: str, credentials: Optional[ClientCredentials] = None,
              address: Optional[str] = None) -> AgentStream:
        """A Connect stream presenting agent_id's certificate (or `credentials`)."""
        creds = credentials or self.agent_credentials(agent_id)
        return AgentStream(creds.channel(address or self.address))


@pytest.fixture
def secure_settings(pki, tmp_path) -> ServerSettings:
    return tls_settings(pki, str(tmp_path / "secure.duckdb"))


@pytest.fixture
def secure(pki, secure_settings):
    """A real TLS + auth control plane on 127.0.0.1 and its PKI; stopped afterwards."""
    running = start_server(secure_settings)
    yield SecureWorld(running, pki)
    running.stop(grace_s=0.5)
