"""The everyday commands' pure parts: durations, the demo agent's manifest, the watch line and
its identity, the line for a command to an offline device."""

from __future__ import annotations

import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certs import Pki, Role
from core.errors import FieldlineError
from core.settings import Settings
from edge_agent.manifest import parse_manifest
from fieldline.ops_cli import offline_line
from fieldline.stack import AGENT_ID, WATCHER_ID, demo_manifest, ensure_certificates, watch_command
from fleet.devices import DeviceState
from fleet.durations import parse_duration


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
    # not the CLI's `operator`: sharing its client id, the two took each other's session
    assert line.startswith(f"mosquitto_sub -h 127.0.0.1 -p 18883 -i {WATCHER_ID} ")
    assert settings.operator != WATCHER_ID
    assert f"--cert {tmp_path}/pki/issued/{WATCHER_ID}/cert.pem" in line
    assert "-t 'fl/demo/#'" in line


def test_the_watcher_is_issued_once_and_follows_the_tenant(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    pki = ensure_certificates(settings, "demo")
    first = pki.bundles([WATCHER_ID])[WATCHER_ID]
    assert (first.identity.tenant, first.identity.role) == ("demo", Role.OPERATOR)
    line = shlex.split(watch_command(settings, "demo"))
    for option in ("--cafile", "--cert", "--key"):
        assert Path(line[line.index(option) + 1]).is_file(), option
    ensure_certificates(settings, "demo")
    assert pki.bundles([WATCHER_ID])[WATCHER_ID].serial == first.serial, "issued once"
    ensure_certificates(settings, "acme")
    moved = pki.bundles([WATCHER_ID])[WATCHER_ID]
    assert moved.identity.tenant == "acme"
    assert pki.is_revoked(first.serial)


def test_a_watcher_id_taken_by_a_device_is_one_clear_error(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    ensure_certificates(settings, "demo")
    pki = Pki(settings.pki_dir)
    pki.issue(WATCHER_ID, tenant="demo", role=Role.DEVICE, force=True)
    with pytest.raises(FieldlineError, match=f"the id '{WATCHER_ID}'.* is a device of tenant demo"):
        ensure_certificates(settings, "demo")


def test_the_offline_line_says_since_when_and_what_happens() -> None:
    now = datetime(2026, 12, 5, 2, 30, tzinfo=UTC)
    gone = DeviceState("pump-1", "offline", now - timedelta(minutes=12))
    assert offline_line(gone, 60, now) == (
        "pump-1 is offline (last heard 2026-12-05 02:18:00 UTC, 12m ago): the broker queues "
        "the command for its session and delivers it when it reconnects; after 60 s (--ttl) "
        "the device answers expired"
    )
    assert "(last heard 2026-12-03 02:30:00 UTC, 2d ago)" in offline_line(
        DeviceState("pump-1", "offline", now - timedelta(days=2)), 60, now
    )
    silent = offline_line(DeviceState("pump-2", "unknown", None), 30, now)
    assert silent.startswith("pump-2 is not known to be online (unknown) (never heard from)")
