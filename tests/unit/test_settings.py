"""Settings: environment over fieldline.toml, validated with messages that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import SettingsError
from core.settings import load_settings
from device_runtime.intake import ReplayPolicy


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("FIELDLINE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    s = load_settings()
    assert s.home == Path(".fieldline")
    assert s.pki_dir == Path(".fieldline/pki")
    assert s.pg_dir == Path(".fieldline/pg")
    assert s.broker.port == 8883
    assert s.broker.bind == "127.0.0.1"
    assert s.database_url is None


def test_environment_with_prefix_and_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIELDLINE_HOME", "/srv/fl")
    monkeypatch.setenv("FIELDLINE_BROKER__PORT", "18883")
    monkeypatch.setenv("FIELDLINE_DATABASE_URL", "postgresql://u@db/x")
    s = load_settings()
    assert s.home == Path("/srv/fl")
    assert s.broker.port == 18883
    assert s.database_url == "postgresql://u@db/x"


def test_toml_file_is_read_and_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "fieldline.toml").write_text(
        'home = "/from/toml"\nlog_level = "debug"\n[broker]\nport = 1884\nhost = "broker.local"\n'
    )
    monkeypatch.setenv("FIELDLINE_BROKER__PORT", "2884")
    s = load_settings()
    assert s.home == Path("/from/toml")
    assert s.log_level == "DEBUG"
    assert s.broker.host == "broker.local"
    assert s.broker.port == 2884


def test_named_config_file_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIELDLINE_CONFIG", "/nowhere/fieldline.toml")
    with pytest.raises(
        SettingsError, match=r"FIELDLINE_CONFIG=/nowhere/fieldline\.toml: no such file"
    ):
        load_settings()


@pytest.mark.parametrize(
    ("env", "value", "fragment"),
    [
        ("FIELDLINE_BROKER__PORT", "abc", "broker.port (FIELDLINE_BROKER__PORT)"),
        ("FIELDLINE_BROKER__PORT", "70000", "less than or equal to 65535"),
        ("FIELDLINE_DATABASE_URL", "mysql://x", "database_url (FIELDLINE_DATABASE_URL): "),
        ("FIELDLINE_LOG_LEVEL", "loud", "must be one of DEBUG"),
    ],
)
def test_bad_values_name_the_key(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert fragment in str(info.value)


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    (tmp_path / "fieldline.toml").write_text("[broker]\nprot = 1\n")
    with pytest.raises(SettingsError, match=r"broker\.prot .*unknown setting"):
        load_settings()


def test_unparsable_toml_is_a_settings_error(tmp_path: Path) -> None:
    (tmp_path / "fieldline.toml").write_text("home = \n")
    with pytest.raises(SettingsError, match="cannot read the configuration file"):
        load_settings()


def test_command_settings_build_the_devices_replay_policy() -> None:
    """The CLIs and `fieldline up` build ReplayPolicy from `commands.*`: same names, same
    defaults (a renamed field would fail at start-up, a drifted default silently)."""
    assert ReplayPolicy(**load_settings().commands.model_dump()) == ReplayPolicy()
