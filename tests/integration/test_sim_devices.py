"""Simulated devices over a real broker: birth and Will, telemetry, every command, fleets.

Each test runs against the embedded broker and Mosquitto with the rendered config; an
operator (`ops-1`, paho-mqtt) watches `fl/acme/#` and sends the commands, as an engineer
would with `mosquitto_pub`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from schemas.messages import Telemetry
from simulator.fleet import Fleet, FleetConfig, bundle_dirs
from tests.clients import Paho, Received
from tests.fixtures.brokers import BrokerUnderTest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _operator(broker: BrokerUnderTest) -> Paho:
    ops = Paho(broker, broker.pki.operator)
    assert ops.connect(), f"operator could not connect (CONNACK {ops.connack_rc})"
    assert ops.subscribe("fl/acme/#") == [1]
    return ops


@asynccontextmanager
async def _fleet(
    broker: BrokerUnderTest, tmp_path: Path, ids: dict[str, Path], **config: Any
) -> AsyncIterator[Fleet]:
    conf = FleetConfig(tenant="acme", host=broker.host, port=broker.port, seed=7, **config)
    fleet = Fleet(conf, ids, tmp_path / "sim-state")
    await fleet.start(timeout=20)
    runner = asyncio.create_task(fleet.run())
    try:
        yield fleet
    finally:
        fleet.request_stop()
        await runner
        await fleet.stop()


async def _until(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _json(messages: list[Received], topic: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in messages if m.topic == topic]


class Watch:
    """The operator's view of one device: what it published, and commands with their answers."""

    def __init__(self, ops: Paho, device: str) -> None:
        self.ops = ops
        self.base = f"fl/acme/{device}"

    def telemetry(self) -> list[dict[str, Any]]:
        return _json(self.ops.messages, f"{self.base}/telemetry")

    def statuses(self) -> list[dict[str, Any]]:
        return _json(self.ops.messages, f"{self.base}/status")

    async def next_telemetry(self, after: int, timeout: float = 10.0) -> dict[str, Any]:
        got = await _until("telemetry", lambda: self.telemetry()[after:], timeout)
        return dict(got[0])

    async def command(
        self, name: str, args: dict[str, Any] | None = None, *, ttl_s: int | None = None,
        ts: int | None = None, raw: bytes | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        cid = str(uuid.uuid4())
        body: dict[str, Any] = {"id": cid, "name": name, "args": args or {}}
        body["ts"] = ts if ts is not None else int(time.time() * 1000)
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        self.ops.publish(f"{self.base}/cmd/{name}", raw or json.dumps(body).encode())

        def answer() -> dict[str, Any] | None:
            for result in _json(self.ops.messages, f"{self.base}/cmd-res"):
                if result.get("id") == cid:
                    return result
            return None

        result: dict[str, Any] = await _until(f"the answer to {name}", answer)
        return result


async def test_a_device_is_born_publishes_and_answers_every_command(
    broker: BrokerUnderTest, tmp_path: Path
) -> None:
    ops = _operator(broker)
    watch = Watch(ops, "dev-1")
    try:
        ids = {"dev-1": broker.pki.device.directory}
        async with _fleet(broker, tmp_path, ids, interval_s=0.5) as fleet:
            birth = await _until("the birth", watch.statuses)
            assert birth[-1]["state"] == "online"
            boot = birth[-1]["boot"]
            assert boot >= 1
            first = await watch.next_telemetry(0)
            Telemetry.model_validate(first)  # the platform's own model accepts it
            assert set(first["metrics"]) == {"temperature", "humidity"}
            assert first["boot"] == boot
            assert 0 <= first["metrics"]["humidity"]["v"] <= 100

            # set-interval: the period changes
            result = await watch.command("set-interval", {"interval_s": 0.1})
            assert result["status"] == "ok", result
            n = len(watch.telemetry())
            await _until("12 messages at 0.1 s", lambda: watch.telemetry()[n + 12 :])
            fast = watch.telemetry()[n + 1 : n + 12]  # the first may be timed by the old period
            # the device's own timestamps: the test's event loop may lag, the schedule must not
            gaps = sorted(b["ts"] - a["ts"] for a, b in pairwise(fast))
            assert 80 <= gaps[len(gaps) // 2] <= 150, f"gaps {gaps} ms at 0.1 s"
            seqs = [m["seq"] for m in watch.telemetry()]
            assert seqs == list(range(1, len(seqs) + 1)), "seq must count up without gaps"
            for bad in ({"interval_s": 0}, {"interval_s": "fast"}, {}, {"interval_s": 1, "x": 1}):
                result = await watch.command("set-interval", bad)
                assert result["status"] == "error", (bad, result)
                assert "interval_s" in result["detail"] or "x" in result["detail"]

            # sensor-add: a new metric, with its offset, from the next message on
            add = {"id": "probe", "type": "temperature", "offset": 1000.0}
            result = await watch.command("sensor-add", add)
            assert result["status"] == "ok", result
            n = len(watch.telemetry())
            later = await _until(
                "a message with the probe",
                lambda: [m for m in watch.telemetry()[n:] if "probe" in m["metrics"]],
            )
            assert 950 < later[0]["metrics"]["probe"]["v"] < 1050
            bad_bodies = [
                {"id": "probe", "type": "temperature"},  # taken
                {"id": "p2"},  # no type
                {"id": "p2", "type": "pressure"},  # no such model
                {"id": "Bad Id", "type": "humidity"},
                {"id": "p2", "type": "humidity", "interval_s": -1},
                {"id": "p2", "type": "humidity", "disturbances": [{"type": "earthquake"}]},
                {"id": "p2", "type": "humidity", "disturbances": [{"type": "spike"}]},
            ]
            for body in bad_bodies:
                result = await watch.command("sensor-add", body)
                assert result["status"] == "error", (body, result)
                assert result["detail"], body

            # sensor-remove: the metric disappears
            result = await watch.command("sensor-remove", {"id": "probe"})
            assert result["status"] == "ok", result
            n = len(watch.telemetry())
            await _until("two more messages", lambda: len(watch.telemetry()) >= n + 2)
            assert all("probe" not in m["metrics"] for m in watch.telemetry()[n + 1 :])
            result = await watch.command("sensor-remove", {"id": "probe"})
            assert result["status"] == "error"

            # unknown, expired and malformed commands
            assert (await watch.command("self-destruct"))["status"] == "rejected"
            old = int(time.time() * 1000) - 120_000
            assert (await watch.command("reset", ts=old, ttl_s=60))["status"] == "expired"
            assert (await watch.command("reset", {"hard": True}))["status"] == "error"

            # reset: a new boot, seq from 1
            result = await watch.command("reset")
            assert result["status"] == "ok", result
            reborn = await _until(
                "the new birth", lambda: [s for s in watch.statuses() if s.get("boot") == boot + 1]
            )
            assert reborn[0]["state"] == "online"
            after = await _until(
                "telemetry of the new boot",
                lambda: [m for m in watch.telemetry() if m["boot"] == boot + 1],
            )
            assert after[0]["seq"] == 1
            assert fleet.devices[0].stats.commands >= 17
        # stopping publishes the offline status
        # the reset published an offline status for the old boot: wait for the new boot's
        await _until(
            "offline of the new boot",
            lambda: [
                s for s in watch.statuses() if s["state"] == "offline" and s.get("boot") == boot + 1
            ],
        )
    finally:
        ops.close()


async def test_machine_cools_down_after_reset(broker: BrokerUnderTest, tmp_path: Path) -> None:
    ops = _operator(broker)
    watch = Watch(ops, "dev-2")
    try:
        ids = {"dev-2": broker.pki.device2.directory}
        async with _fleet(broker, tmp_path, ids, interval_s=0.05, kind="machine"):
            await _until("the machine to heat up", lambda: len(watch.telemetry()) >= 60)
            hot = watch.telemetry()[-1]["metrics"]
            assert hot["machine_temperature"]["v"] > 35, hot
            assert (await watch.command("reset"))["status"] == "ok"
            n = len(watch.telemetry())
            cold = (await watch.next_telemetry(n))["metrics"]
            assert cold["machine_temperature"]["v"] < hot["machine_temperature"]["v"] - 10
            # pressure follows temperature by the source's formula
            t, p = cold["machine_temperature"]["v"], cold["machine_pressure"]
            assert p == pytest.approx(1 + (t - 21) * 9 / 79, abs=0.01)
    finally:
        ops.close()


async def test_pico_reports_counts_and_the_temperature_they_mean(
    broker: BrokerUnderTest, tmp_path: Path
) -> None:
    from simulator import thermistor

    ops = _operator(broker)
    watch = Watch(ops, "dev-1")
    try:
        ids = {"dev-1": broker.pki.device.directory}
        async with _fleet(broker, tmp_path, ids, interval_s=0.1, kind="pico"):
            await _until("ten readings", lambda: len(watch.telemetry()) >= 10)
        for message in watch.telemetry():
            raw, temp = message["metrics"]["adc_raw"], message["metrics"]["temperature"]
            assert isinstance(raw, int)
            assert 0 < raw < 65535
            assert temp["u"] == "degC"
            assert temp["v"] == pytest.approx(thermistor.Thermistor().to_celsius(raw), abs=0.01)
            assert 5 < temp["v"] < 40, "an indoor thermistor"
    finally:
        ops.close()


async def test_a_lost_device_leaves_its_will(broker: BrokerUnderTest, tmp_path: Path) -> None:
    ops = _operator(broker)
    watch = Watch(ops, "dev-1")
    try:
        ids = {"dev-1": broker.pki.device.directory}
        async with _fleet(broker, tmp_path, ids, interval_s=0.5, keepalive=5) as fleet:
            await _until("the birth", watch.statuses)
            fleet.devices[0].link.abort()
            will = await _until(
                "the Will", lambda: [s for s in watch.statuses() if s["state"] == "offline"]
            )
            assert "ts" not in will[0], "the Will is the registered one, not a clean stop"
            assert will[0]["boot"] == watch.statuses()[0]["boot"]
            # and it comes back by itself, same boot
            await _until(
                "the device to reconnect",
                lambda: [s for s in watch.statuses()[1:] if s["state"] == "online"],
            )
    finally:
        ops.close()


async def test_a_fleet_with_certificates_issued_on_demand(
    broker: BrokerUnderTest, tmp_path: Path
) -> None:
    pki = broker.pki.pki
    config = FleetConfig(
        tenant="acme", devices=20, sensors=3, interval_s=0.5, prefix=f"flt-{broker.kind[:3]}",
        host=broker.host, port=broker.port, seed=1,
    )  # fmt: skip
    ids = [f"{config.prefix}-{n:04d}" for n in range(1, 21)]
    dirs = bundle_dirs(ids, "acme", pki=pki, certs_dir=None)
    broker.apply_registry()  # Mosquitto's ACL file names every device
    ops = _operator(broker)
    try:
        fleet = Fleet(config, dirs, tmp_path / "state")
        await fleet.start(timeout=30)
        stats = await fleet.run(seconds=4)
        await fleet.stop()
        assert stats.online == 20
        assert not stats.behind, stats
        assert stats.requested_rate == pytest.approx(40)
        by_device: dict[str, int] = {}
        for m in ops.messages:
            if m.topic.endswith("/telemetry"):
                body = json.loads(m.payload)
                assert len(body["metrics"]) == 3
                device = m.topic.split("/")[2]
                by_device[device] = by_device.get(device, 0) + 1
        assert sorted(by_device) == ids
        assert all(6 <= n <= 10 for n in by_device.values()), by_device
        # a second run reuses the certificates: nothing new is issued
        before = len(pki.records())
        assert bundle_dirs(ids, "acme", pki=pki, certs_dir=None) == dirs
        assert len(pki.records()) == before
    finally:
        ops.close()


def test_sim_device_command_line(broker: BrokerUnderTest) -> None:
    """`fieldline sim device` as a user runs it, certificates from FIELDLINE_HOME/pki."""
    ops = _operator(broker)
    try:
        env = {
            **os.environ,
            "FIELDLINE_HOME": str(broker.pki.pki.root.parent),
            "PYTHONPATH": str(REPO),
        }
        argv = [
            sys.executable, "-m", "fieldline", "sim", "device", "--id", "dev-2",
            "--tenant", "acme", "--kind", "machine", "--interval", "0.2",
            "--host", broker.host, "--port", str(broker.port), "--seconds", "3",
        ]  # fmt: skip
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        got = [m for m in ops.messages if m.topic == "fl/acme/dev-2/telemetry"]
        assert 8 <= len(got) <= 20, len(got)
        assert "machine_temperature" in json.loads(got[0].payload)["metrics"]
        bad = subprocess.run(
            [*argv[:6], "nobody", *argv[7:]], env=env, capture_output=True, text=True, timeout=60
        )
        assert bad.returncode == 2
        assert "nobody" in bad.stderr
        assert "certs issue" in bad.stderr
    finally:
        ops.close()
