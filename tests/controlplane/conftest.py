import pytest

from controlplane.server import start_server
from controlplane.settings import ServerSettings


@pytest.fixture
def settings(tmp_path):
    return ServerSettings(db_path=str(tmp_path / "cp.duckdb"), port=0)


@pytest.fixture
def server(settings):
    running = start_server(settings)
    yield running
    running.stop(grace_s=0.5)
