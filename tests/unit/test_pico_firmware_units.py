"""The Pico W firmware's pure parts: the thermistor conversion at known points and through the
ADC, fault thresholds, timestamps, ids, certificate subjects, config, commands, boot counter.

The forward model (temperature -> read_u16 counts) is the shims' board physics, written from
the divider and the RP2040's 12-bit ADC independently of the firmware's inverse.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from certs import KeyType, Pki, Role
from schemas.errors import InvalidIdError
from schemas.messages import CommandStatus, decode_command_result, decode_event, decode_telemetry
from schemas.topics import validate_id
from tests.firmware_shims import FIRMWARE, SHIM_LIB, load_firmware, unload_shims
from tests.firmware_shims.board import adc_step_celsius, thermistor_counts

RATED = range(-40, 126)  # a 10k NTC's usual rating, degrees C


@pytest.fixture
def fw(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """main.py, loaded fresh (it needs the shims' `utime` under CPython)."""
    monkeypatch.syspath_prepend(str(SHIM_LIB))
    try:
        yield load_firmware()
    finally:
        unload_shims()


def beta_counts(celsius: float) -> float:
    """The ideal (unquantised) read_u16 value of the divider: 65535 * R / (R + 10k)."""
    r = 10_000.0 * math.exp(3950.0 * (1.0 / (celsius + 273.15) - 1.0 / 298.15))
    return 65535.0 * r / (r + 10_000.0)


# -- conversion --------------------------------------------------------------------------------
def test_25_celsius_is_mid_scale(fw: ModuleType) -> None:
    assert fw.counts_to_celsius(32768) == pytest.approx(25.0, abs=0.001)
    # the RP2040 reads 2048 of 4096 there, which read_u16 scales to 2048 << 4 | 2048 >> 8
    assert thermistor_counts(25.0) == 32776
    assert fw.counts_to_celsius(32776) == pytest.approx(25.0, abs=adc_step_celsius(25.0))


@pytest.mark.parametrize("celsius", [-40.0, -20.0, 0.0, 25.0, 37.5, 50.0, 85.0, 100.0, 125.0])
def test_known_points_of_the_beta_equation(fw: ModuleType, celsius: float) -> None:
    assert fw.counts_to_celsius(beta_counts(celsius)) == pytest.approx(celsius, abs=1e-6)


def test_round_trip_through_the_adc_within_its_resolution(fw: ModuleType) -> None:
    worst = 0.0
    for celsius in RATED:
        u = thermistor_counts(celsius)
        error = abs(fw.counts_to_celsius(u) - celsius)
        assert error <= adc_step_celsius(celsius), (celsius, u, error)
        worst = max(worst, error)
    assert worst < 0.6  # a 12-bit reading of this divider is coarse only at the ends


def test_fault_thresholds(fw: ModuleType) -> None:
    assert [fw.thermistor_fault(u) for u in (65535, 65000, 64999)] == ["open", "open", None]
    assert [fw.thermistor_fault(u) for u in (0, 512, 513)] == ["short", "short", None]
    # the limits lie far outside what the sensor can read, so no real temperature is a fault
    assert fw.counts_to_celsius(64999) < -50
    assert fw.counts_to_celsius(513) > 190
    assert all(fw.thermistor_fault(thermistor_counts(c)) is None for c in RATED)


class FakeAdc:
    def __init__(self, *counts: int) -> None:
        self.counts = list(counts)

    def read_u16(self) -> int:
        return self.counts.pop(0)


def test_a_reading_averages_and_reports_faults_instead_of_temperatures(fw: ModuleType) -> None:
    assert fw.Thermistor(FakeAdc(32760, 32776, 32776, 32792), 4).read() == (32776, 24.99, None)
    assert fw.Thermistor(FakeAdc(65535, 65535), 2).read() == (65535, None, "open")
    assert fw.Thermistor(FakeAdc(0, 16, 0, 0), 4).read() == (4, None, "short")


# -- timestamps, ids, certificates -----------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "2024-11-22T10:00:00.123Z",
        "2024-11-22T11:00:00.123+01:00",
        "2024-11-22t09:30:00-00:30",
        "2024-02-29 23:59:59.9999Z",
        "1999-12-31T23:59:59Z",
        "2100-03-01T00:00:00.5+14:00",
    ],
)
def test_rfc3339_timestamps(fw: ModuleType, text: str) -> None:
    parsed = datetime.fromisoformat(text.upper().replace("Z", "+00:00").replace(" ", "T"))
    truncated = parsed.replace(microsecond=parsed.microsecond // 1000 * 1000)
    assert fw.rfc3339_ms(text) == int(truncated.timestamp() * 1000)


@pytest.mark.parametrize(
    "text",
    ["", "2024-11-22", "2024-11-22T10:00:00", "2024-11-22T10:00:00.Z", "2024-13-01T00:00:00Z",
     "2024-11-22T10:00:00+0100", "20x4-11-22T10:00:00Z", "2024-11-22T10:00:60Z"],
)  # fmt: skip
def test_rfc3339_refusals(fw: ModuleType, text: str) -> None:
    assert fw.rfc3339_ms(text) is None


def test_timestamps_of_commands(fw: ModuleType) -> None:
    assert fw.timestamp_ms(1732269600123) == 1732269600123
    assert fw.timestamp_ms(1732269600123.9) == 1732269600123
    refused: list[object] = [True, None, [], float("nan"), float("inf"), "yesterday"]
    for bad in refused:
        assert fw.timestamp_ms(bad) is None


def test_days_from_civil_matches_the_calendar(fw: ModuleType) -> None:
    epoch = date(1970, 1, 1).toordinal()
    day = date(1900, 1, 1)
    while day < date(2200, 1, 1):
        assert fw.days_from_civil(day.year, day.month, day.day) == day.toordinal() - epoch, day
        day += timedelta(days=13)
    for leap in (date(2000, 2, 29), date(2024, 2, 29), date(2100, 3, 1)):
        assert fw.days_from_civil(leap.year, leap.month, leap.day) == leap.toordinal() - epoch


@pytest.mark.parametrize(
    "value",
    ["dev-1", "a", "0", "pump_7", "x" * 64, "x" * 65, "", "-a", "_a", "Dev-1", "a/b", "a+",
     "a#", "$sys", "a b", "dev\u00e9", "a\n"],
)  # fmt: skip
def test_ids_agree_with_the_platform(fw: ModuleType, value: str) -> None:
    try:
        validate_id(value)
    except InvalidIdError:
        platform = False
    else:
        platform = True
    assert fw.valid_id(value) is platform


def test_uuid_check(fw: ModuleType) -> None:
    assert fw.is_uuid(str(uuid.uuid4()))
    assert fw.is_uuid(str(uuid.uuid4()).upper())
    for bad in ("", "c1", str(uuid.uuid4())[:-1] + "g", str(uuid.uuid4()).replace("-", "_"), 7):
        assert not fw.is_uuid(bad)


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.RSA_2048])
def test_certificate_subject_from_the_der_bundle(
    fw: ModuleType, tmp_path: Path, key_type: KeyType
) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init_ca()
    bundle = pki.issue("pump-7", tenant="acme", role=Role.DEVICE, key_type=key_type)
    subject = fw.cert_subject(bundle.cert_der.read_bytes())
    assert subject == {"CN": "pump-7", "O": "acme", "OU": "device"}


# -- config and flash ----------------------------------------------------------------------------
def _config(tmp_path: Path, **changes: Any) -> Path:
    config: dict[str, Any] = {
        "wifi_ssid": "plant",
        "wifi_password": "secret",
        "broker_host": "broker.plant.example",
        "tenant": "acme",
        "device": "pump-7",
    }
    config.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return path


def test_config_defaults(fw: ModuleType, tmp_path: Path) -> None:
    cfg = fw.load_config(str(_config(tmp_path)))
    assert (cfg["broker_port"], cfg["cert"], cfg["key"], cfg["ca"]) == (
        8883, "cert.der", "key.der", "ca.der",
    )  # fmt: skip
    example = json.loads((FIRMWARE.parent / "config.example.json").read_text())
    assert fw.load_config(str(_config(tmp_path, **example)))["device"] == example["device"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"wifi_pasword": "x"}, "unknown setting"),
        ({"device": None}, "device must be set"),
        ({"tenant": "Acme"}, "tenant 'Acme' is not an id"),
        ({"interval_s": 0.1}, "interval_s"),
        ({"interval_s": True}, "interval_s"),
        ({"keepalive_s": 0}, "keepalive_s"),
        ({"backoff_min_s": 5, "backoff_max_s": 1}, "backoff"),
        ({"watchdog_ms": 10000}, "watchdog_ms"),
        ({"broker_port": "8883"}, "broker_port"),
        ({"io_timeout_s": 0}, "io_timeout_s"),
    ],
)
def test_config_errors(
    fw: ModuleType, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        fw.load_config(str(_config(tmp_path, **changes)))


def test_a_bundle_of_another_device_is_refused_before_any_hardware(
    fw: ModuleType, tmp_path: Path
) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init_ca()
    bundle = pki.issue("pump-8", tenant="acme", role=Role.DEVICE)
    files = {k: str(bundle.directory / f"{k}.der") for k in ("cert", "key", "ca")}
    config = _config(tmp_path, boot_file=str(tmp_path / "boot"), **files)
    with pytest.raises(ValueError, match="certificate CN is 'pump-8', not 'pump-7'"):
        fw.main(str(config), log=lambda _line: None)
    assert not (tmp_path / "boot").exists()  # not even counted as a boot
    operator = pki.issue("pump-7", tenant="acme", role=Role.OPERATOR)
    with pytest.raises(ValueError, match="certificate OU is 'operator', not 'device'"):
        fw.check_identity(operator.cert_der.read_bytes(), fw.load_config(str(_config(tmp_path))))


def test_boot_counter(fw: ModuleType, tmp_path: Path) -> None:
    lines: list[str] = []
    path = str(tmp_path / "boot_count.txt")
    assert [fw.next_boot(path, lines.append) for _ in range(3)] == [1, 2, 3]
    assert Path(path).read_text() == "3"
    assert not Path(path + ".tmp").exists()
    Path(path).write_text("garbage")
    assert fw.next_boot(path, lines.append) == 1
    assert len(lines) == 2  # missing at first, then unreadable: both said


def test_epoch_milliseconds_since_1970(fw: ModuleType) -> None:
    assert fw.EPOCH_OFFSET_S == 0  # CPython, like rp2, counts from 1970
    assert datetime.fromtimestamp(fw.SECONDS_1970_TO_2000, UTC) == datetime(2000, 1, 1, tzinfo=UTC)
    assert abs(fw.Clock().epoch_ms() - time.time() * 1000) < 1000


# -- commands (no broker: the device's decisions) ------------------------------------------
class FixedClock:
    def __init__(self) -> None:
        self.now_ms = 1_732_269_600_123

    def epoch_ms(self) -> int:
        return self.now_ms

    def ticks(self) -> int:
        return 0


class Recorder:
    """What `Device.publish` needs of an MQTT client."""

    def __init__(self) -> None:
        self.pid = 0
        self.sent: list[tuple[bytes, bytes, bool, int]] = []

    def publish(self, topic: bytes, msg: bytes, retain: bool = False, qos: int = 0) -> None:
        self.sent.append((topic, msg, retain, qos))


@pytest.fixture
def device(fw: ModuleType, tmp_path: Path) -> Any:
    cfg = fw.load_config(str(_config(tmp_path, interval_s=10)))
    return fw.Device(cfg, FixedClock(), fw.Thermistor(FakeAdc(), 1), 4, log=lambda _line: None)


def _command(
    device: Any, name: str, body: dict[str, Any], *, retained: bool = False
) -> tuple[str, str]:
    """(status, detail) of one command; issued now (ts) unless `body` says otherwise."""
    topic = f"fl/acme/pump-7/cmd/{name}".encode()
    body = {"id": str(uuid.uuid4()), "ts": device.clock.now_ms, **body}
    result, event = device.command(topic, json.dumps(body).encode(), retained)
    assert event is None
    decoded = decode_command_result(json.dumps(result).encode())
    assert str(decoded.id) == body["id"]
    assert decoded.detail
    return decoded.status.value, decoded.detail


def test_command_decisions(device: Any) -> None:
    now = device.clock.now_ms
    assert _command(device, "set-interval", {"args": {"interval_s": 2.5}})[0] == "ok"
    assert device.interval_ms == 2500
    assert _command(device, "set-interval", {"args": {"interval_s": 1}, "ttl_s": 60})[0] == "ok"
    fresh = {"ts": now - 59_000, "ttl_s": 60, "args": {"interval_s": 3}}
    assert _command(device, "set-interval", fresh)[0] == "ok"
    stale = {"ts": now - 61_000, "ttl_s": 60, "args": {"interval_s": 4}}
    expired = ("expired", "ttl_s 60 ran out 1 s before it arrived")
    assert _command(device, "set-interval", stale) == expired
    assert device.interval_ms == 3000
    bad: list[dict[str, Any]] = [
        {"args": {"interval_s": float("nan")}},
        {"args": []},
        {"ts": "last tuesday", "args": {"interval_s": 1}},
        {"ttl_s": 0, "args": {"interval_s": 1}},
        {"ttl_s": "60", "args": {"interval_s": 1}},
        {"ts": None, "ttl_s": 0, "args": {"interval_s": 1}},
        {"name": "reset"},
    ]
    for body in bad:
        assert _command(device, "set-interval", body)[0] == "error", body
    assert device.interval_ms == 3000
    assert _command(device, "reset", {"args": {"hard": True}})[0] == "error"
    assert not device.reset_requested
    assert _command(device, "sensor-add", {"args": {}})[0] == "rejected"
    assert _command(device, "reset", {}) == ("ok", "resetting")
    assert device.reset_requested


def test_unanswerable_commands_become_events(device: Any) -> None:
    for payload in (b"not json", b"[1]", b'{"name": "reset"}', b'{"id": "c1"}', b"\xff"):
        result, event = device.command(b"fl/acme/pump-7/cmd/reset", payload)
        assert result is None
        assert decode_event(json.dumps(event).encode()).kind == "bad-command"
    assert not device.reset_requested


def test_commands_past_the_inbox_are_answered_rejected(fw: ModuleType, device: Any) -> None:
    ids = [str(uuid.uuid4()) for _ in range(fw.MAX_INBOX + 3)]
    for command_id in ids:
        device.on_message(b"fl/acme/pump-7/cmd/reset", json.dumps({"id": command_id}).encode())
    device.on_message(b"fl/acme/pump-7/cmd/reset", b"no id, nothing to answer")
    assert len(device.inbox) == fw.MAX_INBOX
    assert device.overflow == ids[fw.MAX_INBOX :]
    client = Recorder()
    device.refuse_pending(client, "busy")
    answered = [decode_command_result(msg) for _topic, msg, _retain, _qos in client.sent]
    assert [str(a.id) for a in answered] == ids
    assert {(a.status, a.detail) for a in answered} == {(CommandStatus.REJECTED, "busy")}
    assert {(topic, qos) for topic, _msg, _retain, qos in client.sent} == {
        (b"fl/acme/pump-7/cmd-res", 1)
    }
    assert (device.inbox, device.overflow) == ([], [])


def test_telemetry_and_fault_events_validate(fw: ModuleType, device: Any) -> None:
    device.sensor = fw.Thermistor(FakeAdc(30000, 65535, 65535, 0, 31000), 1)
    client = Recorder()
    for _ in range(5):
        device.publish_sample(client)
    kinds = []
    for topic, msg, retain, qos in client.sent:
        assert (retain, qos) == (False, 1)
        if topic == b"fl/acme/pump-7/telemetry":
            decode_telemetry(msg)
        else:
            assert topic == b"fl/acme/pump-7/events"
            kinds.append(decode_event(msg).kind)
    assert kinds == ["sensor-fault", "sensor-fault", "sensor-ok"]  # open, short, fine again
    assert device.seq == 5


def test_packet_ids_start_over_before_umqtt_would_send_zero(device: Any) -> None:
    client = Recorder()
    client.pid = 65000
    device.publish(client, b"fl/acme/pump-7/telemetry", {"metrics": {"a": 1}})
    assert client.pid == 0  # the client increments it to 1 for this publish
    client.pid = 64999
    device.publish(client, b"fl/acme/pump-7/telemetry", {"metrics": {"a": 1}})
    assert client.pid == 64999


def _run(device: Any, command_id: str, interval_s: float, retained: bool = False) -> str:
    body = {"id": command_id, "ts": device.clock.now_ms, "args": {"interval_s": interval_s}}
    topic = b"fl/acme/pump-7/cmd/set-interval"
    result, _event = device.command(topic, json.dumps(body).encode(), retained)
    decoded = decode_command_result(json.dumps(result).encode())
    assert decoded.detail
    return f"{decoded.status.value}: {decoded.detail}"


def test_retained_and_repeated_commands_are_refused_and_not_run(
    fw: ModuleType, device: Any
) -> None:
    first = str(uuid.uuid4())
    answer = _run(device, first, 2, retained=True)
    assert answer.startswith("rejected: refused: delivered retained"), answer
    assert "fl/acme/pump-7/cmd/set-interval" in answer  # where to clear it
    assert device.interval_ms == 10_000
    assert _run(device, first, 2).startswith("ok")  # the retained copy was not counted as run
    assert device.interval_ms == 2000
    assert _run(device, str(uuid.uuid4()), 3).startswith("ok")
    again = _run(device, first, 2)
    assert again.startswith(f"rejected: refused: command {first} was received before"), again
    assert "(answered ok)" in again
    assert device.interval_ms == 3000, "the repeat must not run"
    # the ring holds RECENT_IDS ids: older ones are forgotten (the ttl still bounds them)
    for _ in range(fw.RECENT_IDS - 2):  # with `first` and the one above: a full ring
        _run(device, str(uuid.uuid4()), 3)
    assert _run(device, first, 2).startswith("rejected")
    _run(device, str(uuid.uuid4()), 3)
    assert _run(device, first, 2).startswith("ok")
    assert len(device.recent_ids) == fw.RECENT_IDS


def test_commands_out_of_their_time_are_refused(fw: ModuleType, device: Any) -> None:
    now = device.clock.now_ms
    args = {"args": {"interval_s": 2}}
    no_ts = _command(device, "set-interval", {"ts": None, **args})
    assert no_ts[0] == "rejected"
    assert "no ts" in no_ts[1]
    assert _command(device, "set-interval", {"ttl_s": 30, **args})[0] == "ok"
    # without ttl_s a command lives DEFAULT_TTL_S seconds
    default = fw.DEFAULT_TTL_S * 1000
    assert _command(device, "set-interval", {"ts": now - default + 1000, **args})[0] == "ok"
    old = _command(device, "set-interval", {"ts": now - default - 1000, **args})
    assert old == ("expired", f"ttl_s {fw.DEFAULT_TTL_S} ran out 1 s before it arrived")
    skew = fw.MAX_CLOCK_SKEW_S * 1000
    assert _command(device, "set-interval", {"ts": now + skew, **args})[0] == "ok"
    ahead = _command(device, "set-interval", {"ts": now + skew + 5000, **args})
    assert ahead[0] == "rejected"
    assert f"{fw.MAX_CLOCK_SKEW_S + 5} s ahead" in ahead[1]


def test_without_a_set_clock_only_time_checks_are_skipped(fw: ModuleType, device: Any) -> None:
    device.clock.now_ms = 5_000  # 1970: this clock was never set
    assert _command(device, "set-interval", {"ts": None, "args": {"interval_s": 2}})[0] == "ok"
    stale = {"ts": 1_000, "ttl_s": 1, "args": {"interval_s": 3}}
    assert _command(device, "set-interval", stale)[0] == "ok"
    assert _run(device, str(uuid.uuid4()), 4, retained=True).startswith("rejected")
    once = str(uuid.uuid4())
    assert _run(device, once, 5).startswith("ok")
    assert _run(device, once, 5).startswith("rejected")
    assert device.interval_ms == 5000


def test_the_retain_bit_comes_from_the_packet_type(fw: ModuleType, device: Any) -> None:
    """umqtt.simple's callback gets (topic, msg); wait_msg() then returns the PUBLISH's first
    byte: 0x30 | QoS << 1 | retain."""
    topic = b"fl/acme/pump-7/cmd/reset"
    for op, retained in ((0x33, True), (0x32, False), (0x31, True), (0x3A, False)):
        device.on_message(topic, b"{}")
        device.delivered(op)
        assert device.inbox.pop()[2] is retained, hex(op)
    device.on_message(topic, b"{}")
    device.delivered(0x90)  # a SUBACK after it: not a PUBLISH, nothing is marked
    device.delivered(None)
    assert device.inbox.pop()[2] is False
    device.delivered(0x33)  # no PUBLISH went to the callback in this call
    assert device.inbox == []
