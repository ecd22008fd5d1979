"""`fieldline ingest nats-ensure`: bad input and an unusable setup are one line, no traceback
(what it does against a real cluster: tests/integration/test_ingest_jetstream.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.settings import get_settings
from ingest_worker.cli import app


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("FIELDLINE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--stream", "OTHER"], 2, "--stream OTHER: use $MQTT_msgs or FIELDLINE"),
        (["--nats-url", "127.0.0.1:4222"], 2, "--nats-url 127.0.0.1:4222: give tls://HOST:PORT"),
        # no service certificate in this home: said once, with the command that issues one
        (["--nats-url", "tls://127.0.0.1:1"], 1, "fieldline certs issue ingest-1"),
    ],
)
def test_bad_input_is_one_line(empty_home: None, args: list[str], code: int, message: str) -> None:
    result = CliRunner().invoke(app, ["nats-ensure", *args], terminal_width=200)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
