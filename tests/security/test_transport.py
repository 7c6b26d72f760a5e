"""Transport: TLS everywhere, no call without a credential, unsafe binds refuse to start, and
the embedded (loopback) default keeps working with its per-process token."""
import subprocess
import sys

import grpc
import pytest

from headroom_sidecar.controlplane import certs
from headroom_sidecar.controlplane.auth import AuthError, Role, issue_token, verify_token
from headroom_sidecar.proto.client import AdminClient
from headroom_sidecar.proto.credentials import ClientCredentials
from headroom_sidecar.controlplane.query import QueryClient, QueryError
from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings
from tests.controlplane import helpers
from tests.security.conftest import tls_settings


def _code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details() or ""


def test_operator_certificate_and_token_both_work(secure):
    with secure.admin("vera") as client:
        assert len(client.list_agents().agents) == 0
    with secure.admin_with_token("tom", "viewer") as client:
        assert len(client.list_plans().plans) == 0
    with secure.query_client("vera") as q:
        assert q.query("SELECT 41 + 1 AS x").table.to_pylist() == [{"x": 42}]


def test_plaintext_and_certless_callers_are_refused(secure):
    plain = AdminClient(secure.address, credentials=ClientCredentials(), timeout_s=5)
    code, _ = _code(lambda: plain.list_agents())      # no TLS: no handshake at all
    assert code == grpc.StatusCode.UNAVAILABLE
    certless = AdminClient(secure.address, timeout_s=5,
                           credentials=ClientCredentials(ca_file=secure.pki.ca_file))
    code, _ = _code(lambda: certless.list_agents())   # main port requires a client cert
    assert code == grpc.StatusCode.UNAVAILABLE
    anonymous = AdminClient(secure.operator_address, timeout_s=5,
                            credentials=ClientCredentials(ca_file=secure.pki.ca_file))
    code, details = _code(lambda: anonymous.list_agents())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "no credential" in details
    for c in (plain, certless, anonymous):
        c.close()


def test_foreign_ca_client_certificate_is_refused(secure, tmp_path):
    other = certs.init_dir(str(tmp_path / "other"), agents=("agent-1",),
                           operators=(("adam", "admin"),))
    creds = ClientCredentials(ca_file=secure.pki.ca_file, cert_file=other.operators["adam"].cert_file,
                              key_file=other.operators["adam"].key_file)
    with AdminClient(secure.address, credentials=creds, timeout_s=5) as client:
        code, _ = _code(lambda: client.reload_policy())
    assert code == grpc.StatusCode.UNAVAILABLE


def test_forged_tokens_are_refused(secure):
    forged_key = b"not the server's key, 32 bytes.."
    for token in ("nonsense", issue_token(forged_key, "eve", Role.ADMIN, 600),
                  issue_token(forged_key, "eve", Role.ADMIN, 600)[:-2] + "AA"):
        creds = ClientCredentials(ca_file=secure.pki.ca_file, token=token)
        with AdminClient(secure.operator_address, credentials=creds, timeout_s=5) as client:
            code, _ = _code(lambda: client.list_agents())
        assert code == grpc.StatusCode.UNAUTHENTICATED


def test_token_expiry_boundary(pki):
    from headroom_sidecar.controlplane.auth import load_token_key
    key = load_token_key(pki.token_key_file)
    token = issue_token(key, "tom", Role.VIEWER, ttl_s=60, now_s=1000.0)
    assert verify_token(key, token, now_s=1059.999).subject == "tom"
    with pytest.raises(AuthError, match="expired"):
        verify_token(key, token, now_s=1060.0)          # dead at its expiry second


def test_connect_needs_an_agent_certificate(secure):
    # The operator port (no client certificate) serves no agent stream at all.
    with secure.agent("x", credentials=ClientCredentials(ca_file=secure.pki.ca_file),
                      address=secure.operator_address) as s:
        assert s.wait_end() == grpc.StatusCode.UNIMPLEMENTED
    with secure.agent("x", credentials=secure.token_credentials("tom", "admin"),
                      address=secure.operator_address) as s:
        assert s.wait_end() == grpc.StatusCode.UNIMPLEMENTED
    with secure.agent("x", credentials=secure.operator_credentials("adam")) as s:
        s.send(helpers.hello("adam"))
        assert s.wait_end() == grpc.StatusCode.PERMISSION_DENIED
    assert secure.server.state.agent_streams() == 0


def test_agent_certificate_streams_telemetry(secure):
    with secure.agent("agent-1") as s:
        s.send(helpers.hello("agent-1"))
        s.send(helpers.batch(1, helpers.tables(helpers.records(2))))
        assert s.recv().ack.seq == 1
        assert secure.server.state.verified_agents() == ["agent-1"]


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_non_loopback_bind_without_tls_refuses_to_start(tmp_path, host):
    settings = ServerSettings(db_path=str(tmp_path / "cp.duckdb"), host=host, port=0)
    with pytest.raises(ValueError, match="HEADROOM_CP_TLS_CERT.*HEADROOM_CP_TLS_CLIENT_CA"):
        start_server(settings)
    assert not (tmp_path / "cp.duckdb").exists()        # refused before opening anything


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_without_tls_starts(tmp_path, host):
    running = start_server(ServerSettings(db_path=str(tmp_path / "cp.duckdb"), host=host, port=0))
    running.stop(grace_s=0.1)


def test_tls_without_client_ca_refuses_to_start(pki, tmp_path):
    with pytest.raises(ValueError, match="tls_client_ca_file"):
        start_server(tls_settings(pki, str(tmp_path / "cp.duckdb"), host="0.0.0.0",
                                  tls_client_ca_file=""))


def test_tls_on_all_interfaces_starts(pki, tmp_path):
    running = start_server(tls_settings(pki, str(tmp_path / "cp.duckdb"), host="0.0.0.0"))
    try:
        assert running.port > 0 and running.operator_port > 0
    finally:
        running.stop(grace_s=0.1)


def test_serve_cli_refuses_public_bind_with_what_to_set(tmp_path):
    out = subprocess.run([sys.executable, "-m", "headroom_sidecar.controlplane", "serve", "--db",
                          str(tmp_path / "cp.duckdb"), "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0" in out.stderr and "certs init" in out.stderr


def test_local_token_mode_refuses_calls_without_the_token(tmp_path):
    running = start_server(ServerSettings(db_path=str(tmp_path / "cp.duckdb"), port=0,
                                          local_token="s3cret-s3cret"))
    try:
        with QueryClient(running.address, credentials=ClientCredentials()) as q:
            with pytest.raises(QueryError, match="local token"):
                q.query("SELECT 1")
        with QueryClient(running.address,
                         credentials=ClientCredentials(local_token="wrong")) as q:
            with pytest.raises(QueryError, match="local token"):
                q.query("SELECT 1")
        with QueryClient(running.address,
                         credentials=ClientCredentials(local_token="s3cret-s3cret")) as q:
            assert q.query("SELECT 1 AS ok").table.to_pylist() == [{"ok": 1}]
    finally:
        running.stop(grace_s=0.1)


def test_embedded_control_plane_takes_only_this_process_token(tmp_path):
    from headroom_sidecar.agent.embedded import LOCAL_TOKEN_ENV, start_embedded
    import os
    with start_embedded(str(tmp_path / "emb.duckdb")) as cp:
        assert os.environ.get(LOCAL_TOKEN_ENV)                  # handed to in-process clients
        with QueryClient(cp.address) as q:                       # zero configuration
            assert q.query("SELECT 1 AS ok").table.to_pylist() == [{"ok": 1}]
        with QueryClient(cp.address, credentials=ClientCredentials()) as q:
            with pytest.raises(QueryError, match="local token"):
                q.query("SELECT 1")                              # another local user's client


def test_readme_commands_certs_token_and_cli_over_tls(tmp_path, capsys):
    """certs init -> serve with TLS -> CLI with a token on the operator port and with a cert."""
    from headroom_sidecar.controlplane import cli
    d = tmp_path / "pki"
    assert cli.main(["certs", "init", str(d), "--agent", "gpu-0", "--operator",
                     "alice:approver"]) == 0
    assert "HEADROOM_CP_TLS_CLIENT_CA=" in capsys.readouterr().out
    assert cli.main(["token", "issue", "--subject", "bob", "--role", "viewer", "--ttl", "1h",
                     "--key-file", str(d / "token.key")]) == 0
    token = capsys.readouterr().out.strip()
    assert cli.main(["certs", "init", str(d)]) == 2                   # never overwrites a CA
    assert "exists" in capsys.readouterr().err
    running = start_server(ServerSettings(
        db_path=str(tmp_path / "cp.duckdb"), port=0, operator_port=0,
        tls_cert_file=str(d / "server.pem"), tls_key_file=str(d / "server.key"),
        tls_client_ca_file=str(d / "ca.pem"), token_key_file=str(d / "token.key")))
    try:
        ca = ["--ca", str(d / "ca.pem")]
        assert cli.main(["plan", "list", "--address", f"localhost:{running.operator_port}",
                         "--token", token, *ca]) == 0
        assert capsys.readouterr().out.strip() == "[]"
        assert cli.main(["plan", "approve", "p-x", "--reason", "r", "--token", token, *ca,
                         "--address", f"localhost:{running.operator_port}"]) == 2
        assert "PERMISSION_DENIED" in capsys.readouterr().err
        assert cli.main(["query", "SELECT 5 AS five", "--format", "csv", *ca,
                         "--address", f"localhost:{running.port}",
                         "--cert", str(d / "operator-alice.pem"),
                         "--key", str(d / "operator-alice.key")]) == 0
        assert capsys.readouterr().out == "five\n5\n"
    finally:
        running.stop(grace_s=0.1)


def test_dashboard_client_carries_the_operator_credential(secure):
    from headroom_sidecar.dashboard.client import CommandFailed, ControlPlaneClient
    from headroom_sidecar.dashboard.settings import DashboardSettings
    settings = DashboardSettings(address=secure.address, timeout_s=5.0)
    with_cert = ControlPlaneClient(settings, credentials=secure.operator_credentials("vera"))
    assert with_cert.ping() is None and with_cert.admin(lambda a: a.list_agents()) == []
    with pytest.raises(CommandFailed, match="needs role admin"):
        with_cert.admin(lambda a: a.reload_policy())
    with_cert.close()
    without = ControlPlaneClient(settings, credentials=ClientCredentials())
    assert without.ping() is not None          # refused at the TLS handshake
    without.close()
