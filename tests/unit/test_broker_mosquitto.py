"""The rendered Mosquitto files: ACL blocks from the registry, the config, the file modes."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app as broker_app
from broker.errors import BrokerError
from broker.mosquitto import (
    DEFAULT_AUTOSAVE_INTERVAL,
    DEFAULT_AUTOSAVE_ON_CHANGES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_INFLIGHT_BYTES,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_QUEUE,
    QUEUED_OVERHEAD_BYTES,
    MosquittoOptions,
    QueueSizing,
    parse_duration,
    render_acl,
    write_mosquitto_files,
)
from broker.policy import Principal
from certs import Pki, Role
from core.settings import BrokerSettings, get_settings


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    pki = Pki(tmp_path / "home" / "pki")
    pki.init_ca()
    pki.issue_server("broker")
    pki.issue("pump-1", tenant="acme", role=Role.DEVICE)
    pki.issue("pump-2", tenant="acme", role=Role.DEVICE)
    pki.revoke("pump-2")
    pki.issue("alice", tenant="acme", role=Role.OPERATOR)
    pki.issue("ingest-1", tenant="platform", role=Role.SERVICE)
    return pki


def _blocks(acl: str) -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    user = None
    for line in acl.splitlines():
        if line.startswith("user "):
            user = line.split()[1]
            blocks[user] = []
        elif line.startswith("topic ") and user is not None:
            blocks[user].append(line)
    return blocks


def test_acl_has_one_explicit_block_per_valid_principal(pki: Pki, tmp_path: Path) -> None:
    files = write_mosquitto_files(pki, tmp_path / "mq")
    blocks = _blocks(files.acl.read_text())
    assert set(blocks) == {"pump-1", "alice", "ingest-1"}  # revoked and server certs: none
    assert blocks["pump-1"] == [
        "topic read fl/acme/pump-1/cmd/#",
        "topic write fl/acme/pump-1/cmd-res",
        "topic write fl/acme/pump-1/events",
        "topic write fl/acme/pump-1/status",
        "topic write fl/acme/pump-1/telemetry",
    ]
    assert blocks["alice"] == ["topic read fl/acme/#", "topic write fl/acme/+/cmd/#"]
    assert sorted(blocks["ingest-1"]) == [
        f"topic read fl/+/+/{k}" for k in sorted(("telemetry", "status", "events", "cmd-res"))
    ]
    assert "pattern" not in files.acl.read_text()  # nothing hinges on %c or %u


def test_admin_reads_and_writes_everything() -> None:
    acl = render_acl([Principal("root-1", "platform", Role.ADMIN)])
    assert _blocks(acl) == {"root-1": ["topic readwrite #", "topic read $SYS/#"]}


def test_config_binds_identity_to_the_certificate(pki: Pki, tmp_path: Path) -> None:
    opts = MosquittoOptions(bind="127.0.0.1", port=18883, persistence_dir=tmp_path / "data")
    files = write_mosquitto_files(pki, tmp_path / "mq", options=opts)
    lines = files.config.read_text().splitlines()
    for expected in (
        "allow_anonymous false",
        "listener 18883 127.0.0.1",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"acl_file {files.acl}",
        f"crlfile {files.crl}",
        f"cafile {files.ca}",
        "persistence true",
        f"persistence_location {tmp_path / 'data'}/",
        "max_inflight_messages 1000",
        "max_queued_messages 720000",  # 1 h at 200 msg/s (broker.mosquitto_outage_s, ...)
    ):
        assert expected in lines, expected
    assert "retain_available false" not in lines  # it would disconnect every device's status
    # Mosquitto runs without its persistence directory and silently fails to save at shutdown
    assert (tmp_path / "data").is_dir()


def test_config_has_byte_memory_connection_and_keepalive_limits(pki: Pki, tmp_path: Path) -> None:
    files = write_mosquitto_files(pki, tmp_path / "mq")
    lines = files.config.read_text().splitlines()
    for expected in (
        f"max_queued_bytes {720_000 * 256}",
        f"max_inflight_bytes {16 * 1024 * 1024}",
        "memory_limit 0",  # off: reservable before CONNECT (benchmarks/mosquitto_limits.py)
        "max_connections 20000",
        "max_keepalive 3600",
        f"max_packet_size {2 * 1024 * 1024}",
    ):
        assert expected in lines, expected
    assert files.key.read_bytes() == pki.bundle("broker").key.read_bytes()
    assert files.crl.read_bytes() == pki.crl_path.read_bytes()


def test_files_are_private(pki: Pki, tmp_path: Path) -> None:
    files = write_mosquitto_files(pki, tmp_path / "mq")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.key.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(files.acl.stat().st_mode) == 0o640
    assert not list((tmp_path / "mq").rglob("*.tmp"))


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files to another account needs root")
def test_run_as_hands_the_files_to_that_account(pki: Pki, tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    files = write_mosquitto_files(pki, tmp_path / "mq", options=MosquittoOptions(run_as="nobody"))
    assert files.key.stat().st_uid == nobody.pw_uid
    assert "user nobody" in files.config.read_text().splitlines()


def test_missing_server_certificate_says_what_to_do(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init_ca()
    with pytest.raises(BrokerError, match="fieldline certs server broker"):
        write_mosquitto_files(pki, tmp_path / "mq")


def test_unknown_account(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="no such account"):
        write_mosquitto_files(pki, tmp_path / "mq", options=MosquittoOptions(run_as="no-such-user"))


def test_cli_renders_after_issue_and_revoke(pki: Pki, tmp_path: Path) -> None:
    env = {**os.environ, "FIELDLINE_HOME": str(pki.root.parent)}

    def cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "fieldline", *args],
            capture_output=True, text=True, env=env, check=False, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    printed = cli("broker", "mosquitto-config", "--out", str(tmp_path / "mq"), "--port", "18883")
    assert "(3 principals)" in printed
    acl = tmp_path / "mq" / "fieldline.acl"
    cli("certs", "issue", "pump-3", "--tenant", "acme", "--role", "device")
    cli("certs", "revoke", "pump-1")
    limits = ("--max-queued-bytes", "1000", "--max-inflight-bytes", "2000", "--memory-limit",
              "3000", "--max-connections", "40", "--max-keepalive", "50")  # fmt: skip
    cli("broker", "mosquitto-config", "--out", str(tmp_path / "mq"), "--port", "18883", *limits)
    assert set(_blocks(acl.read_text())) == {"pump-3", "alice", "ingest-1"}
    lines = (tmp_path / "mq" / "mosquitto.conf").read_text().splitlines()
    assert {"max_queued_bytes 1000", "max_inflight_bytes 2000", "memory_limit 3000",
            "max_connections 40", "max_keepalive 50"} <= set(lines)  # fmt: skip


def test_cli_refuses_max_connections_zero(tmp_path: Path) -> None:
    """Mosquitto reads 0 as no limit at all: the CLI says to write -1 for that."""
    result = CliRunner().invoke(
        broker_app, ["mosquitto-config", "--out", str(tmp_path / "mq"), "--max-connections", "0"]
    )
    assert result.exit_code != 0
    assert "use -1" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "mq" / "mosquitto.conf").exists()


def test_systemd_unit_limits_sit_above_the_rendered_ones() -> None:
    """LimitNOFILE is the connection ceiling that holds on 2.0.11; MemoryMax must hold two
    ingest sessions' full queues and windows plus TLS state, ~40 KiB a connection (measured
    by benchmarks/mosquitto_limits.py)."""
    unit = Path(__file__).resolve().parents[2] / "deploy/systemd/fieldline-mosquitto.service"
    settings = dict(
        line.split("=", 1) for line in unit.read_text().splitlines() if line[:1].isalpha()
    )
    nofile = int(settings["LimitNOFILE"])
    assert DEFAULT_MAX_CONNECTIONS < nofile <= DEFAULT_MAX_CONNECTIONS + 1024
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    memory_max = int(settings["MemoryMax"][:-1]) * units[settings["MemoryMax"][-1]]
    assert DEFAULT_QUEUE.bytes == DEFAULT_MAX_QUEUED_BYTES
    sessions = 2 * (DEFAULT_QUEUE.memory + DEFAULT_MAX_INFLIGHT_BYTES)
    assert memory_max >= sessions + DEFAULT_MAX_CONNECTIONS * 40 * 1024


# -- persistence: how often Mosquitto saves (issue 13) ----------------------------------------
def _persistence_lines(config: Path) -> list[str]:
    return [line for line in config.read_text().splitlines() if line.startswith("autosave")]


def test_persistence_is_saved_every_second_by_default(pki: Pki, tmp_path: Path) -> None:
    """A kill -9 loses what Mosquitto acknowledged since its last save: 1-2 s of traffic at
    the default, not 30 s (benchmarks/mosquitto_durability.py measured both)."""
    opts = MosquittoOptions(persistence_dir=tmp_path / "data")
    files = write_mosquitto_files(pki, tmp_path / "mq", options=opts)
    assert _persistence_lines(files.config) == ["autosave_on_changes false", "autosave_interval 1"]
    defaults = BrokerSettings()
    assert DEFAULT_AUTOSAVE_INTERVAL == defaults.mosquitto_autosave_interval == 1
    assert DEFAULT_AUTOSAVE_ON_CHANGES is defaults.mosquitto_autosave_on_changes is False
    # without persistence there is nothing to save
    plain = write_mosquitto_files(pki, tmp_path / "plain")
    assert _persistence_lines(plain.config) == []
    assert "persistence false" in plain.config.read_text().splitlines()


def test_autosave_on_changes_is_rendered(pki: Pki, tmp_path: Path) -> None:
    opts = MosquittoOptions(
        persistence_dir=tmp_path / "data", autosave_interval=500, autosave_on_changes=True
    )
    files = write_mosquitto_files(pki, tmp_path / "mq", options=opts)
    assert _persistence_lines(files.config) == ["autosave_on_changes true", "autosave_interval 500"]


@pytest.fixture
def home_env(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("FIELDLINE_HOME", str(pki.root.parent))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_cli_autosave_comes_from_the_settings_and_its_options(
    home_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """broker.mosquitto_autosave_* (fieldline.toml or FIELDLINE_ env) set the rendered
    default; --autosave-interval and --autosave-on-changes/--autosave-on-time override it."""
    out = tmp_path / "mq"
    base = ["mosquitto-config", "--out", str(out), "--persistence-dir", str(tmp_path / "data")]

    def render(*args: str) -> list[str]:
        result = CliRunner().invoke(broker_app, [*base, *args])
        assert result.exit_code == 0, result.output
        return _persistence_lines(out / "mosquitto.conf")

    assert render() == ["autosave_on_changes false", "autosave_interval 1"]
    monkeypatch.setenv("FIELDLINE_BROKER__MOSQUITTO_AUTOSAVE_INTERVAL", "200")
    monkeypatch.setenv("FIELDLINE_BROKER__MOSQUITTO_AUTOSAVE_ON_CHANGES", "true")
    get_settings.cache_clear()
    assert render() == ["autosave_on_changes true", "autosave_interval 200"]
    assert render("--autosave-interval", "5", "--autosave-on-time") == [
        "autosave_on_changes false",
        "autosave_interval 5",
    ]
    refused = CliRunner().invoke(broker_app, [*base, "--autosave-interval", "0"])
    assert refused.exit_code != 0
    assert "--autosave-interval" in refused.output


# -- the worker's queue, sized for an outage (issue 19) -----------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600), ("1.5 h", 5400)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1w", "h", "-1h", "0s", "one hour"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(BrokerError, match="not a duration"):
        parse_duration(text)


def test_queue_sizing_counts_messages_payload_and_mosquittos_memory() -> None:
    queue = QueueSizing(outage_s=7200, rate=1000, message_bytes=194)
    assert (queue.messages, queue.bytes) == (7_200_000, 7_200_000 * 194)
    assert queue.memory == 7_200_000 * (194 + QUEUED_OVERHEAD_BYTES)
    assert "7,200,000 messages" in queue.describe()
    assert "2 h outage at 1000 msg/s" in queue.describe()
    with pytest.raises(BrokerError, match="rate"):
        QueueSizing(3600, 0, 200)


def test_cli_sizes_the_queue_from_outage_and_rate_and_says_what_it_costs(
    home_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "mq"

    def render(*args: str) -> tuple[str, set[str]]:
        result = CliRunner().invoke(broker_app, ["mosquitto-config", "--out", str(out), *args])
        assert result.exit_code == 0, result.output
        lines = set((out / "mosquitto.conf").read_text().splitlines())
        return " ".join(result.output.split()), lines

    printed, lines = render()
    assert {"max_queued_messages 720000", f"max_queued_bytes {720_000 * 256}"} <= lines
    assert "~450 MiB" in printed
    assert "1800 s behind" in printed
    printed, lines = render("--outage", "2h", "--rate", "1000", "--message-bytes", "194")
    assert {"max_queued_messages 7200000", f"max_queued_bytes {7_200_000 * 194}"} <= lines
    assert "7,200,000 messages / 1,332 MiB of payload" in printed
    assert "Mosquitto memory when full: ~4,079 MiB" in printed
    # the settings set the defaults; an explicit limit wins over the sizing
    monkeypatch.setenv("FIELDLINE_BROKER__MOSQUITTO_OUTAGE_S", "60")
    get_settings.cache_clear()
    printed, lines = render("--max-queued-bytes", "5000")
    assert {"max_queued_messages 12000", "max_queued_bytes 5000"} <= lines
    assert "as given" in printed
    refused = CliRunner().invoke(
        broker_app, ["mosquitto-config", "--out", str(out), "--outage", "soon"]
    )
    assert refused.exit_code != 0
    assert "not a duration" in refused.output
