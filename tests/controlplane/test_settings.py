import pytest

from headroom_sidecar.controlplane.settings import ServerSettings


def test_argument_beats_env_beats_default(monkeypatch):
    assert ServerSettings.resolve().port == 50051
    monkeypatch.setenv("HEADROOM_CP_PORT", "6000")
    monkeypatch.setenv("HEADROOM_CP_DEDUPE_BATCHES", "off")
    assert ServerSettings.resolve().port == 6000
    assert ServerSettings.resolve().dedupe_batches is False
    assert ServerSettings.resolve(port=7000).port == 7000


@pytest.mark.parametrize("kwargs, fragment", [
    ({"port": -1}, "port=-1"),
    ({"max_message_bytes": 0}, "max_message_bytes=0"),
    ({"query_default_rows": 10, "query_max_rows": 5}, "exceeds query_max_rows=5"),
    ({"db_path": ""}, "db_path is empty"),
    ({"query_timeout_s": 0}, "query_timeout_s=0"),
])
def test_invalid_values_are_named(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ServerSettings(**kwargs)


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("HEADROOM_CP_PORT", "eighty")
    with pytest.raises(ValueError, match="HEADROOM_CP_PORT='eighty'"):
        ServerSettings.resolve()


def test_unknown_setting_is_refused():
    with pytest.raises(TypeError, match="colour"):
        ServerSettings.resolve(colour="red")
