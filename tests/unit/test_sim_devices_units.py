"""Simulated devices without a network: command arguments, sources, sensor schedules, boots."""

from __future__ import annotations

import json
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from device_runtime.args import SetInterval
from device_runtime.errors import CommandError
from schemas.messages import Telemetry
from simulator.commands import SensorAdd, parse_args
from simulator.device import SimDevice
from simulator.fleet import FleetConfig, device_ids, falling_behind
from simulator.sources import ArmaSource, MachineSource, PicoSource, SensorBank, make_source
from simulator.thermistor import Thermistor


def test_arguments_are_validated_before_anything_runs() -> None:
    assert parse_args("set-interval", {"interval_s": 2}) == SetInterval(interval_s=2.0)
    with pytest.raises(CommandError, match="unknown command 'launch'") as unknown:
        parse_args("launch", {})
    assert unknown.value.status == "rejected"
    for name, args, field in [
        ("set-interval", {"interval_s": 0.01}, "interval_s"),
        ("set-interval", {"interval_s": float("inf")}, "interval_s"),
        ("set-interval", {}, "interval_s"),
        ("reset", {"now": True}, "now"),
        ("sensor-add", {"id": "x"}, "type"),
        ("sensor-add", {"id": "9lives", "type": "humidity"}, "id"),
        ("sensor-add", {"id": "x", "type": "humidity", "offset": "high"}, "offset"),
        ("sensor-remove", {}, "id"),
    ]:
        with pytest.raises(CommandError) as bad:
            parse_args(name, args)
        assert bad.value.status == "error"
        assert field in bad.value.detail, (name, args, bad.value.detail)


def test_sensors_are_due_on_their_own_interval() -> None:
    bank = SensorBank(seed=3)
    source = ArmaSource(bank, 2, interval_s=1.0)
    source.add_sensor(SensorAdd(id="slow", type="temperature", interval_s=3.0))
    bank.step()
    seen = [sorted(source.metrics(now)) for now in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)]
    assert seen[0] == ["humidity", "slow", "temperature"]
    assert [("slow" in s) for s in seen] == [True, False, False, True, False, False, True]


def test_add_remove_and_reset_keep_the_bank_consistent() -> None:
    bank = SensorBank(seed=5)
    source = ArmaSource(bank, 4)
    assert sorted(source.sensors) == ["humidity", "humidity_2", "temperature", "temperature_2"]
    source.add_sensor(SensorAdd(id="hot", type="temperature", offset=100.0))
    with pytest.raises(CommandError, match="exists already"):
        source.add_sensor(SensorAdd(id="hot", type="humidity"))
    bank.step()
    values = source.metrics(0.0)
    assert 110 < values["hot"]["v"] < 130
    assert values["humidity"]["u"] == "%RH"
    assert 0 <= values["humidity"]["v"] <= 100
    source.remove_sensor("hot")
    with pytest.raises(CommandError, match="sensors: humidity, humidity_2"):
        source.remove_sensor("hot")
    # the freed slot is reused, and never shows the removed sensor's value
    source.add_sensor(SensorAdd(id="cool", type="temperature", offset=-100.0))
    assert "cool" not in source.metrics(0.0)
    bank.step()
    assert source.metrics(0.0)["cool"]["v"] < -70
    assert bank.engine.size == 5
    source.reset()
    assert bank.engine.size == 5
    assert sorted(source.sensors)[-1] == "temperature_2"


def test_a_bad_disturbance_list_is_refused_with_its_reason() -> None:
    source = ArmaSource(SensorBank(seed=1), 0)
    with pytest.raises(Exception, match=r"disturbances\[0\]"):
        source.add_sensor(SensorAdd(id="x", type="humidity", disturbances=[{"type": "spike"}]))
    assert source.sensors == {}
    source.add_sensor(
        SensorAdd(id="x", type="humidity", disturbances=[{"type": "dropout", "start": 0}])
    )
    source.bank.step()
    assert "x" not in source.metrics(0.0), "a sensor that drops out sends nothing"


def test_pico_reports_what_its_count_means() -> None:
    bank = SensorBank(seed=9)
    pico = PicoSource(bank)
    thermistor = Thermistor()
    for _ in range(50):
        bank.step()
        m = pico.metrics(0.0)
        assert m["temperature"]["v"] == pytest.approx(thermistor.to_celsius(m["adc_raw"]), abs=0.01)
        assert 15 < m["temperature"]["v"] < 27
    with pytest.raises(CommandError, match="exists already"):
        pico.add_sensor(SensorAdd(id="adc_raw", type="humidity"))


def test_machine_heats_per_message_and_cools_on_reset() -> None:
    source = make_source("machine", SensorBank(seed=2), 2)
    assert isinstance(source, MachineSource)
    temps = [source.metrics(0.0)["machine_temperature"]["v"] for _ in range(100)]
    assert temps[-1] > temps[0] + 30  # +0.5 per message on average
    source.reset()
    assert source.metrics(0.0)["machine_temperature"]["v"] < 23


def _device(tmp_path: Path, source: Any = None) -> SimDevice:
    return SimDevice(
        "acme", "dev-1", source or ArmaSource(SensorBank(seed=1)), ssl.create_default_context(),
        "127.0.0.1", 1, interval_s=1.0, state_dir=tmp_path,
    )  # fmt: skip


def _command(name: str, args: dict[str, Any] | None = None, **extra: Any) -> bytes:
    """A command body, issued now (ts) unless `extra` says otherwise (None: left out)."""
    body = {"id": str(uuid.uuid4()), "name": name, "args": args or {}}
    body["ts"] = int(time.time() * 1000)
    body.update(extra)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def test_commands_get_the_answer_their_content_deserves(tmp_path: Path) -> None:
    device = _device(tmp_path)
    topic = "fl/acme/dev-1/cmd/"
    answer = device.handle_command(
        topic + "set-interval", _command("set-interval", {"interval_s": 3})
    )
    assert answer[1] == "ok"
    assert device.interval_s == 3.0
    cid, status, detail = device.handle_command(topic + "reset", _command("set-interval"))
    assert (status, cid is not None) == ("error", True)
    assert "differs from topic" in detail
    old = int(time.time() * 1000) - 10_000
    assert (
        device.handle_command(topic + "reset", _command("reset", ts=old, ttl_s=5))[1] == "expired"
    )
    assert device.handle_command(topic + "reset", b"\xff not json")[0] is None
    no_uuid = json.dumps({"id": "7", "name": "reset"}).encode()
    cid, status, detail = device.handle_command(topic + "reset", no_uuid)
    assert (cid, status) == (None, "error")  # nothing to answer to: logged instead
    assert "id" in detail
    bad_uuid_but_answerable = json.dumps({"id": str(uuid.uuid4()), "name": 5}).encode()
    cid, status, _ = device.handle_command(topic + "reset", bad_uuid_but_answerable)
    assert (cid is not None, status) == (True, "error")


def test_a_sim_device_refuses_a_retained_or_repeated_command(tmp_path: Path) -> None:
    device = _device(tmp_path)
    topic = "fl/acme/dev-1/cmd/set-interval"
    body = _command("set-interval", {"interval_s": 3})
    assert device.handle_command(topic, body, retained=True)[1] == "rejected"
    assert device.interval_s == 1.0
    assert device.handle_command(topic, body)[1] == "ok"
    assert device.interval_s == 3.0
    assert device.handle_command(topic, _command("set-interval", {"interval_s": 4}))[1] == "ok"
    assert device.handle_command(topic, body)[1] == "rejected"
    assert device.interval_s == 4.0
    assert device.stats.refused == {"retained": 1, "duplicate": 1}


def test_telemetry_is_what_the_platform_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bank = SensorBank(seed=4)
    device = _device(tmp_path, ArmaSource(bank, 3))
    sent: list[bytes] = []
    monkeypatch.setattr(
        device.link, "publish", lambda _t, payload, retain=False: sent.append(payload)
    )
    device.boot = 7
    assert not device.publish_telemetry(time.time()), "no values before the first model tick"
    bank.step()
    assert device.publish_telemetry(time.time())
    body = Telemetry.model_validate_json(sent[0])
    assert (body.seq, body.boot) == (1, 7)
    assert len(body.metrics) == 3


def test_fleet_ids_are_numbered_and_validated() -> None:
    assert device_ids(FleetConfig(tenant="acme", devices=3, prefix="pump")) == [
        "pump-0001", "pump-0002", "pump-0003",
    ]  # fmt: skip
    assert device_ids(FleetConfig(tenant="acme", devices=12_345))[-1] == "sim-12345"
    with pytest.raises(Exception, match="device id"):
        device_ids(FleetConfig(tenant="acme", ids=("Bad/Id",)))


def test_the_fleet_says_when_it_cannot_keep_up() -> None:
    assert not falling_behind(1000, 990, 50, window=1.0)
    assert falling_behind(1000, 900, 50, window=1.0)  # too slow
    assert falling_behind(1000, 1000, 2500, window=1.0)  # the broker is not acknowledging
    assert not falling_behind(1000, 0, 0, window=0.5)  # too early to tell
