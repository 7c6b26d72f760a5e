"""proto/settings.py: the one resolver of agent, control plane and dashboard settings."""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Optional

import pytest

from headroom_sidecar.proto.settings import SettingsError, resolve_settings


class Colour(str, enum.Enum):
    RED = "red"
    DARK_BLUE = "dark-blue"


def _env(name: str) -> dict:
    return {"env": f"HEADROOM_TEST_{name.upper()}"}


@dataclass(frozen=True)
class Example:
    text: str = field(default="d", metadata=_env("text"))
    count: int = field(default=1, metadata=_env("count"))
    ratio: float = field(default=0.5, metadata=_env("ratio"))
    flag: bool = field(default=False, metadata=_env("flag"))
    colour: Colour = field(default=Colour.RED, metadata=_env("colour"))
    maybe_text: Optional[str] = field(default="x", metadata=_env("maybe_text"))
    maybe_count: Optional[int] = field(default=7, metadata=_env("maybe_count"))
    # int in its name must not make it an int (the agent's old resolver matched by substring)
    interval_name: str = field(default="n", metadata=_env("interval_name"))
    argument_only: int = 3      # no env metadata: set by argument only

    def __post_init__(self):
        if self.count < 0:
            raise ValueError(f"count={self.count} must be >= 0")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for f in dataclasses.fields(Example):
        if "env" in f.metadata:
            monkeypatch.delenv(f.metadata["env"], raising=False)


@pytest.mark.parametrize("name, raw, value", [
    ("text", " spaced ", " spaced "),
    ("count", "0", 0), ("count", " 42 ", 42), ("count", "-0", 0),
    ("ratio", "1e-3", 0.001), ("ratio", "0", 0.0),
    ("flag", "1", True), ("flag", "TRUE", True), ("flag", "yes", True), ("flag", " On ", True),
    ("flag", "0", False), ("flag", "false", False), ("flag", "No", False), ("flag", "off", False),
    ("colour", "dark-blue", Colour.DARK_BLUE), ("colour", "DARK_BLUE", Colour.DARK_BLUE),
    ("colour", "red", Colour.RED),
    ("maybe_text", "", None), ("maybe_text", "none", "none"), ("maybe_text", "v", "v"),
    ("maybe_count", "", None), ("maybe_count", "None", None), ("maybe_count", "3", 3),
    ("interval_name", "12", "12"),
])
def test_env_text_is_parsed_by_the_exact_type(monkeypatch, name, raw, value):
    monkeypatch.setenv(f"HEADROOM_TEST_{name.upper()}", raw)
    got = getattr(resolve_settings(Example, {}, "test"), name)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("name, raw, kind", [
    ("count", "1.5", "int"), ("count", "", "int"), ("count", "ten", "int"),
    ("ratio", "fast", "float"),
    ("flag", "2", "bool"), ("flag", "", "bool"), ("flag", "y", "bool"),
    ("colour", "green", "Colour"),
    ("maybe_count", "x", "Optional[int]"),
])
def test_bad_env_text_names_the_variable_the_type_and_the_field(monkeypatch, name, raw, kind):
    env = f"HEADROOM_TEST_{name.upper()}"
    monkeypatch.setenv(env, raw)
    with pytest.raises(SettingsError) as e:
        resolve_settings(Example, {}, "test")
    assert f"environment variable {env}={raw!r}: not a valid {kind} for test setting {name}" \
        in str(e.value)


def test_bad_enum_and_bool_say_what_is_accepted(monkeypatch):
    monkeypatch.setenv("HEADROOM_TEST_COLOUR", "green")
    with pytest.raises(SettingsError, match=r"known: red, dark-blue"):
        resolve_settings(Example, {}, "test")
    monkeypatch.setenv("HEADROOM_TEST_COLOUR", "red")
    monkeypatch.setenv("HEADROOM_TEST_FLAG", "maybe")
    with pytest.raises(SettingsError, match=r"use one of 1, true, yes, on, 0, false, no, off"):
        resolve_settings(Example, {}, "test")


def test_argument_beats_env_beats_default(monkeypatch):
    assert resolve_settings(Example, {}, "test") == Example()
    monkeypatch.setenv("HEADROOM_TEST_COUNT", "5")
    assert resolve_settings(Example, {}, "test").count == 5
    assert resolve_settings(Example, {"count": 9}, "test").count == 9
    assert resolve_settings(Example, {"count": None}, "test").count == 5   # None = not given
    assert resolve_settings(Example, {"argument_only": 4}, "test").argument_only == 4


def test_unknown_override_and_invalid_value(monkeypatch):
    with pytest.raises(TypeError, match="unknown test setting.s.: colr; known: "):
        resolve_settings(Example, {"colr": "red"}, "test")
    monkeypatch.setenv("HEADROOM_TEST_COUNT", "-1")    # parses, then __post_init__ refuses
    with pytest.raises(ValueError, match="count=-1 must be >= 0"):
        resolve_settings(Example, {}, "test")


def test_every_part_uses_this_resolver():
    from headroom_sidecar.agent import settings as agent_settings
    from headroom_sidecar.controlplane import settings as cp_settings
    from headroom_sidecar.dashboard import settings as dash_settings
    assert agent_settings.resolve_settings is resolve_settings
    assert cp_settings.resolve_settings is resolve_settings
    assert dash_settings.resolve_settings is resolve_settings


@pytest.mark.parametrize("env, raw, resolve, field_name, value", [
    ("HEADROOM_EXPORT", "off", "agent", "export_enabled", False),
    ("HEADROOM_CP_DEDUPE_BATCHES", "Yes", "server", "dedupe_batches", True),
    ("HEADROOM_DASHBOARD_MAX_ROWS", "1", "dashboard", "max_rows", 1),
])
def test_the_parts_settings_parse_through_it(monkeypatch, env, raw, resolve, field_name, value):
    from headroom_sidecar.agent.settings import AgentSettings
    from headroom_sidecar.controlplane.settings import ServerSettings
    from headroom_sidecar.dashboard.settings import DashboardSettings
    monkeypatch.setenv(env, raw)
    cls = {"agent": AgentSettings.resolve, "server": ServerSettings.resolve,
           "dashboard": lambda: DashboardSettings.resolve([])}[resolve]
    assert getattr(cls(), field_name) == value
