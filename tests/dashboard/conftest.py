import pytest
from streamlit.testing.v1 import AppTest

from tests.controlplane.loopkit import start
from tests.dashboard.kit import APP, build_world


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    built = build_world(tmp_path_factory.mktemp("dashboard-world"))
    yield built
    built.agent.close()
    built.server.stop(grace_s=0.5)


@pytest.fixture
def empty_server(tmp_path):
    """A control plane with no agent, no plan, an audit log with nothing in it."""
    server = start(tmp_path)
    yield server
    server.stop(grace_s=0.5)


@pytest.fixture
def open_app(monkeypatch):
    """open_app(address, page, operator=...) -> an AppTest that ran the page once."""
    def make(address: str, page: str, operator: str = "tester", **query) -> AppTest:
        monkeypatch.setenv("HEADROOM_ADDRESS", address)
        if operator:
            monkeypatch.setenv("HEADROOM_OPERATOR", operator)
        else:
            monkeypatch.delenv("HEADROOM_OPERATOR", raising=False)
        at = AppTest.from_file(str(APP), default_timeout=30).run()
        at.switch_page(f"screens/{page}.py")
        at.query_params.update(query)
        return at.run()
    return make
