"""grpc.health.v1 and reflection on a real control plane over a real DuckDB file."""
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from headroom_sidecar.controlplane.cli import main
from headroom_sidecar.controlplane.health import HealthSettings
from headroom_sidecar.controlplane.server import SERVICE_NAME
from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings

FAST = HealthSettings(probe_interval_s=0.05)


@pytest.fixture
def running(tmp_path):
    server = start_server(ServerSettings(db_path=str(tmp_path / "cp.duckdb"), port=0), health=FAST)
    yield server
    server.stop(grace_s=0.5)


def _status(address: str, service: str = "") -> str:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _wait_for(address: str, want: str, timeout_s: float = 5.0) -> str:
    deadline = time.monotonic() + timeout_s
    status = _status(address)
    while status != want and time.monotonic() < deadline:
        time.sleep(0.02)
        status = _status(address)
    return status


def test_serving_without_credentials_on_loopback(running):
    assert _status(running.address) == "SERVING"
    assert _status(running.address, SERVICE_NAME) == "SERVING"


def test_not_serving_once_the_store_fails(running, capsys):
    running.retention.stop()   # its pass at start must not be inside the store as it goes
    running.store.close()   # what a lost or broken DuckDB file looks like to the probe
    assert _wait_for(running.address, "NOT_SERVING") == "NOT_SERVING"
    assert _status(running.address, SERVICE_NAME) == "NOT_SERVING"
    assert main(["health", "--address", running.address]) == 1
    assert capsys.readouterr().out.strip() == "NOT_SERVING"


def test_cli_health_exit_codes(running, capsys):
    assert main(["health", "--address", running.address]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert main(["health", "--address", running.address, "--service", "no.such.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_cli_health_unreachable_is_unhealthy(capsys):
    assert main(["health", "--address", "127.0.0.1:1", "--timeout-s", "0.5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_reflection_lists_the_headroom_service(running):
    with grpc.insecure_channel(running.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_plaintext_health_port_serves_only_health(tmp_path):
    server = start_server(ServerSettings(db_path=str(tmp_path / "cp.duckdb"), port=0),
                          health=HealthSettings(probe_interval_s=0.05, port=0))
    try:
        address = f"127.0.0.1:{server.health.port}"
        assert server.health.port > 0 and server.health.port != server.port
        assert _status(address) == "SERVING"
        with grpc.insecure_channel(address) as channel:   # no Headroom service on this port
            query = channel.unary_unary(f"/{SERVICE_NAME}/Query")
            with pytest.raises(grpc.RpcError) as e:
                query(b"", timeout=5)
        assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(grace_s=0.5)
    assert not server.health._thread.is_alive()   # the probe thread ends with the server


@pytest.mark.parametrize("kwargs, problem", [
    ({"probe_interval_s": 0.0}, "probe_interval_s=0.0 must be > 0"),
    ({"port": -2}, "port=-2 is not -1"),
    ({"port": 65536}, "port=65536 is not -1"),
])
def test_health_settings_refuse_bad_values(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        HealthSettings(**kwargs)


def test_health_settings_boundaries_accepted(monkeypatch):
    assert HealthSettings(port=-1).port == -1 and HealthSettings(port=65535).port == 65535
    monkeypatch.setenv("HEADROOM_CP_HEALTH_PORT", "8081")
    assert HealthSettings.resolve().port == 8081
    assert HealthSettings.resolve(port=9000).port == 9000


def test_version_prints_the_package_version(capsys):
    from headroom_sidecar.controlplane.cli import package_version
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"headroom-controlplane {package_version()}"
    assert package_version() == _pyproject_version()


def test_version_falls_back_to_pyproject_when_not_installed():
    from headroom_sidecar.controlplane.cli import package_version
    assert package_version("headroom-not-installed-anywhere") == _pyproject_version()


def _pyproject_version() -> str:
    import tomllib
    from pathlib import Path
    with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]
