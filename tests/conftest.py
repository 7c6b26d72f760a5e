"""Fixtures every test folder shares. Each test session keeps machine state to itself: kernel
probe verdicts go to a folder of this session, never the user's ~/.cache (agent/kernels/probe.py)."""
import os

import pytest

from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings


@pytest.fixture(scope="session", autouse=True)
def _kernel_cache_dir(tmp_path_factory):
    old = os.environ.get("HEADROOM_KERNEL_CACHE_DIR")
    os.environ["HEADROOM_KERNEL_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernel-cache"))
    yield
    if old is None:
        os.environ.pop("HEADROOM_KERNEL_CACHE_DIR", None)
    else:
        os.environ["HEADROOM_KERNEL_CACHE_DIR"] = old


@pytest.fixture
def settings(tmp_path):
    """A real control plane on a free localhost port with its own DuckDB file."""
    return ServerSettings(db_path=str(tmp_path / "cp.duckdb"), port=0)


@pytest.fixture
def server(settings):
    running = start_server(settings)
    yield running
    running.stop(grace_s=0.5)
