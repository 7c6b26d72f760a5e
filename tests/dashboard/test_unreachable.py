"""Every page with no control plane behind it: a message that says so and what to run, no
stack trace; and the same session recovers when the control plane comes back."""
import pytest

from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings
from tests.dashboard.helpers import no_exception, texts
from tests.dashboard.kit import free_port

PAGES = ["fleet", "internals", "decisions", "approvals", "audit"]


@pytest.mark.parametrize("page", PAGES)
def test_page_says_the_control_plane_is_unreachable(page, open_app):
    address = f"127.0.0.1:{free_port()}"
    at = open_app(address, page)
    no_exception(at)
    shown = texts(at)
    assert f"The control plane at `{address}` is unreachable" in shown
    assert "controlplane serve" in shown
    assert f"Unreachable: `{address}`" in at.sidebar.error[0].value


def test_recovers_when_the_control_plane_comes_back(tmp_path, open_app):
    port = free_port()
    address = f"127.0.0.1:{port}"
    at = open_app(address, "audit")
    assert "unreachable" in texts(at)
    server = start_server(ServerSettings(db_path=str(tmp_path / "cp.duckdb"), port=port))
    try:
        at.button(key="retry-connection").click().run()
        no_exception(at)
        assert "unreachable" not in texts(at)
        assert "Chain verified" in texts(at)
    finally:
        server.stop(grace_s=0.5)
