"""Commands cannot be replayed: a simulated device and the edge agent over a real broker.

Both answer through `device_runtime.intake.CommandIntake`. A command runs at most once: a
repeat of its id is answered `rejected` and does not run, one past `ts + ttl_s` is answered
`expired`, one without `ts` is `rejected`. A command delivered retained is refused: an
operator can retain on a cmd topic with Mosquitto (its ACL has no notion of retain), and
the broker then sends it again, retained, on every resubscribe. The embedded broker drops
retain on cmd topics, so the retained cases run on Mosquitto only. The Pico W firmware has
the same tests in test_pico_firmware.py, next to its board.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import AgentOptions, EdgeAgent
from edge_agent.manifest import load_manifest
from simulator.device import SimDevice
from simulator.fleet import tls_context
from simulator.sources import ArmaSource, SensorBank
from tests.clients import Paho
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.edge import MACHINE_RESET, manifest_text, write_manifest

pytestmark = pytest.mark.integration


def command(
    name: str,
    args: dict[str, Any],
    *,
    age_s: float = 0.0,
    ttl_s: int | None = 60,
    ts: bool = True,
) -> dict[str, Any]:
    """A command body with a fresh id, issued `age_s` ago."""
    body: dict[str, Any] = {"id": str(uuid.uuid4()), "name": name, "args": args}
    if ts:
        body["ts"] = int((time.time() - age_s) * 1000)
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    return body


async def until(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Operator:
    """ops-1 of tenant acme, sending commands to one device and reading its answers."""

    def __init__(self, broker: BrokerUnderTest, device: str) -> None:
        self.base = f"fl/acme/{device}"
        self.client = Paho(broker, broker.pki.operator)
        assert self.client.connect(), f"operator could not connect ({self.client.connack_rc})"
        assert self.client.subscribe(f"{self.base}/#") == [1]

    def send(self, body: dict[str, Any], *, retain: bool = False) -> str:
        topic = f"{self.base}/cmd/{body['name']}"
        self.client.publish(topic, json.dumps(body).encode(), retain=retain)
        return str(body["id"])

    def answers(self, command_id: str) -> list[dict[str, Any]]:
        found = []
        for message in list(self.client.messages):
            if message.topic == f"{self.base}/cmd-res":
                body = json.loads(message.payload)
                if body.get("id") == command_id:
                    found.append(body)
        return found

    async def answer(self, command_id: str, nth: int = 1) -> dict[str, Any]:
        """The nth answer to the command of this id."""
        got = await until(
            f"answer {nth} to {command_id}", lambda: self.answers(command_id)[nth - 1 :]
        )
        return dict(got[0])

    async def run(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.answer(self.send(body))

    async def born(self) -> None:
        """Until the device's birth: it publishes it after its SUBSCRIBE, on one connection."""

        await until("the birth", self.births, 20)

    def births(self) -> int:
        """Online statuses seen so far (none is retained: the operator came first)."""
        statuses = [m for m in self.client.messages if m.topic == f"{self.base}/status"]
        return sum(1 for m in statuses if json.loads(m.payload).get("state") == "online")

    def close(self) -> None:
        self.client.close()


@asynccontextmanager
async def sim_device(broker: BrokerUnderTest, tmp_path: Path) -> AsyncIterator[SimDevice]:
    device = SimDevice(
        "acme", "dev-1", ArmaSource(SensorBank(seed=1)),
        tls_context(broker.pki.device.directory), broker.host, broker.port,
        interval_s=0.5, state_dir=tmp_path / "sim",
    )  # fmt: skip
    await device.start()
    try:
        await device.wait_online(20)
        yield device
    finally:
        await device.stop()


@asynccontextmanager
async def edge_agent(broker: BrokerUnderTest, tmp_path: Path) -> AsyncIterator[EdgeAgent]:
    path = write_manifest(tmp_path, manifest_text(broker, *MACHINE_RESET))
    agent = EdgeAgent(load_manifest(path), AgentOptions(home=tmp_path / "home"))
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop(flush_s=3)


def _refused(agent: EdgeAgent, reason: str) -> float:
    value = agent.metrics.registry.get_sample_value(
        "fieldline_edge_commands_refused_total", {"reason": reason}
    )
    return value or 0.0


# -- a simulated device ----------------------------------------------------------------------
async def test_a_sim_device_runs_a_command_once_and_never_late(
    broker: BrokerUnderTest, tmp_path: Path
) -> None:
    ops = Operator(broker, "dev-1")
    try:
        async with sim_device(broker, tmp_path) as device:
            await ops.born()
            first = command("set-interval", {"interval_s": 0.4})
            assert (await ops.run(first))["status"] == "ok"
            assert (await ops.run(command("set-interval", {"interval_s": 0.3})))["status"] == "ok"

            ops.send(first)  # the same id again
            replay = await ops.answer(first["id"], nth=2)
            assert replay["status"] == "rejected", replay
            assert "received before (answered ok)" in replay["detail"]
            assert device.interval_s == 0.3, "the repeat must not run"

            stale = command("set-interval", {"interval_s": 5}, age_s=120, ttl_s=60)
            expired = await ops.run(stale)
            assert expired["status"] == "expired", expired
            assert "ts + ttl_s 60 s" in expired["detail"]
            no_ttl = command("set-interval", {"interval_s": 5}, age_s=90, ttl_s=None)
            assert (await ops.run(no_ttl))["status"] == "expired"  # the default ttl, 60 s
            untimed = await ops.run(command("set-interval", {"interval_s": 5}, ts=False))
            assert untimed["status"] == "rejected"
            assert "no ts" in untimed["detail"]
            assert device.interval_s == 0.3
            assert device.stats.refused == {"duplicate": 1, "expired": 2, "no_ts": 1}
            assert device.stats.results["ok"] == 2
    finally:
        ops.close()


async def test_a_sim_device_refuses_a_retained_command(
    broker_factory: Callable[..., BrokerUnderTest], tmp_path: Path
) -> None:
    broker = broker_factory("mosquitto")  # the embedded broker drops retain on cmd topics
    ops = Operator(broker, "dev-1")
    try:
        # retained while the device is away: it arrives with the retain flag when it subscribes
        waiting = ops.send(command("set-interval", {"interval_s": 3}), retain=True)
        async with sim_device(broker, tmp_path) as device:
            await ops.born()
            refused = await ops.answer(waiting)
            assert refused["status"] == "rejected", refused
            assert refused["detail"].startswith("refused: delivered retained")
            assert device.interval_s == 0.5

            # retained while it is connected: delivered live (retain flag 0) it runs once ...
            live = ops.send(command("set-interval", {"interval_s": 0.3}), retain=True)
            assert (await ops.answer(live))["status"] == "ok"
            assert device.interval_s == 0.3
            assert (await ops.run(command("set-interval", {"interval_s": 0.4})))["status"] == "ok"
            # ... and when the link drops, the resubscription brings it back, retained
            births = ops.births()
            device.link.abort()
            await until("the reconnect", lambda: ops.births() > births)
            again = await ops.answer(live, nth=2)
            assert again["status"] == "rejected", again
            assert "retained" in again["detail"]
            assert device.interval_s == 0.4
            assert device.stats.refused == {"retained": 2}
    finally:
        ops.close()


# -- the edge agent --------------------------------------------------------------------------
async def test_the_edge_agent_runs_a_command_once_and_never_late(
    broker: BrokerUnderTest, tmp_path: Path
) -> None:
    ops = Operator(broker, "dev-2")
    try:
        async with edge_agent(broker, tmp_path) as agent:
            await ops.born()
            machine = agent.modules["machine"]
            first = command("set-interval", {"interval_s": 0.5})
            assert (await ops.run(first))["status"] == "ok"
            assert (await ops.run(command("set-interval", {"interval_s": 0.2})))["status"] == "ok"

            ops.send(first)
            replay = await ops.answer(first["id"], nth=2)
            assert replay["status"] == "rejected", replay
            assert "received before (answered ok)" in replay["detail"]
            assert machine.interval_s == 0.2, "the repeat must not run"

            stale = command("set-interval", {"interval_s": 5}, age_s=30, ttl_s=10)
            assert (await ops.run(stale))["status"] == "expired"
            untimed = await ops.run(command("set-interval", {"interval_s": 5}, ts=False))
            assert untimed["status"] == "rejected"
            assert machine.interval_s == 0.2
            counts = {r: _refused(agent, r) for r in ("duplicate", "expired", "no_ts", "retained")}
            assert counts == {"duplicate": 1, "expired": 1, "no_ts": 1, "retained": 0}
    finally:
        ops.close()


async def test_the_edge_agent_refuses_a_retained_command(
    broker_factory: Callable[..., BrokerUnderTest], tmp_path: Path
) -> None:
    broker = broker_factory("mosquitto")
    ops = Operator(broker, "dev-2")
    try:
        waiting = ops.send(command("set-interval", {"interval_s": 3}), retain=True)
        async with edge_agent(broker, tmp_path) as agent:
            await ops.born()
            machine = agent.modules["machine"]
            before = machine.interval_s
            refused = await ops.answer(waiting)
            assert refused["status"] == "rejected", refused
            assert refused["detail"].startswith("refused: delivered retained")
            assert machine.interval_s == before
            assert _refused(agent, "retained") == 1
    finally:
        ops.close()
