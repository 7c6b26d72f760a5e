"""DashboardSettings: command line > HEADROOM_* env > default, and clear errors."""
import pytest

from headroom_sidecar.dashboard.settings import DEFAULT_ADDRESS, DashboardSettings


def test_defaults_env_and_flags_in_that_order(monkeypatch):
    for name in ("HEADROOM_ADDRESS", "HEADROOM_OPERATOR", "HEADROOM_DASHBOARD_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    assert DashboardSettings.resolve([]) == DashboardSettings(address=DEFAULT_ADDRESS, operator="")
    monkeypatch.setenv("HEADROOM_ADDRESS", "cp.internal:7000")
    monkeypatch.setenv("HEADROOM_OPERATOR", "alice")
    monkeypatch.setenv("HEADROOM_DASHBOARD_TIMEOUT_S", "2.5")
    from_env = DashboardSettings.resolve(["app.py"])
    assert (from_env.address, from_env.operator, from_env.timeout_s) == ("cp.internal:7000", "alice", 2.5)
    # Other programs' arguments (pytest's, streamlit's) are ignored; no abbreviations.
    flags = DashboardSettings.resolve(["-q", "--addr", "x:1", "--address", "127.0.0.1:9",
                                       "--operator", "bob"])
    assert (flags.address, flags.operator) == ("127.0.0.1:9", "bob")
    assert DashboardSettings.resolve(["--operator", "bob"], operator="carol").operator == "carol"


@pytest.mark.parametrize("kwargs,problem", [
    ({"address": "nohost"}, "address='nohost' is not host:port"),
    ({"address": "h:99999"}, "is not host:port"),
    ({"operator": " alice"}, "surrounding spaces"),
    ({"timeout_s": 0}, "timeout_s=0 must be > 0"),
    ({"max_rows": -1}, "max_rows=-1 must be > 0")])
def test_bad_values_say_which_field(kwargs, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        DashboardSettings(**kwargs)


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("HEADROOM_DASHBOARD_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="HEADROOM_DASHBOARD_TIMEOUT_S='soon'"):
        DashboardSettings.resolve([])
    with pytest.raises(TypeError, match="unknown dashboard setting"):
        DashboardSettings.resolve([], colour="red")
