"""The everyday commands' pure parts: durations, the demo agent's manifest, the watch line."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from core.errors import FieldlineError
from core.settings import Settings
from edge_agent.manifest import parse_manifest
from fieldline.ops import parse_duration
from fieldline.stack import AGENT_ID, demo_manifest, watch_command


def test_durations() -> None:
    assert parse_duration("30s") == timedelta(seconds=30)
    assert parse_duration("15m") == timedelta(minutes=15)
    assert parse_duration("1.5h") == timedelta(minutes=90)
    assert parse_duration("7d") == timedelta(days=7)
    for bad in ("", "1", "h", "-1h", "0m", "1w", "1 h"):
        with pytest.raises(FieldlineError, match="duration"):
            parse_duration(bad)


def test_the_demo_agent_is_the_shipped_example_on_this_stack(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, broker={"host": "127.0.0.1", "port": 18883})
    manifest = parse_manifest(demo_manifest(settings, "demo"), "demo")
    assert (manifest.agent.id, manifest.agent.tenant) == (AGENT_ID, "demo")
    assert (manifest.broker.host, manifest.broker.port) == ("127.0.0.1", 18883)
    assert [r.name for r in manifest.routes] == [
        "telemetryToCloud", "telemetryToRules", "alertsToCloud", "alertsToReset",
    ]  # fmt: skip
    line = watch_command(settings, "demo")
    assert line.startswith("mosquitto_sub -h 127.0.0.1 -p 18883 -i operator ")
    assert f"--cert {tmp_path}/pki/issued/operator/cert.pem" in line
    assert "-t 'fl/demo/#'" in line
