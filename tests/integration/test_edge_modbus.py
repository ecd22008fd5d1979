"""The edge agent's `modbus` module against a real pymodbus server, broker, worker and TimescaleDB.

The server (tests/fixtures/modbus.py) holds every register type in every byte and word
order; the agent polls it, and what it decoded must be in the tenant's tables exactly.
Cloud commands write a coil and a float register; stopping the server gives failure
events and no values (never zeros), and the agent resumes when the server comes back.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pymodbus.constants import ExcCodes

from edge_agent.agent import AgentOptions, EdgeAgent
from edge_agent.manifest import load_manifest
from edge_agent.modbus import ModbusModule
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.edge import manifest_text, write_manifest
from tests.fixtures.ingest import fetch, fetchval, start_worker, wait_for
from tests.fixtures.modbus import (
    HEATER,
    POINTS,
    SETPOINT,
    WRITABLE,
    MapPoint,
    ModbusServerUnderTest,
    modbus_server,
    registers,
)

pytestmark = pytest.mark.integration

VALUES = "tenant_acme.numeric_values"
METRICS = "tenant_acme.metrics"


def _module(server: ModbusServerUnderTest, points: list[MapPoint], interval_s: float) -> str:
    lines = ",\n  ".join(p.toml() for p in points)
    return f"""
[[modules]]
name = "plc"
kind = "modbus"
host = "{server.host}"
port = {server.port}
unit_id = 1
interval_s = {interval_s}
timeout_s = 0.5
points = [
  {lines},
]
"""


ROUTES = """
[[routes]]
name = "plcToCloud"
from = "plc"
to = "upstream"
"""


# a rule on the PLC's own alarm coil (it is on) opens a valve: coil 20, by address
ALARM_RULE = """
[[rules]]
name = "alarm-valve"
metric = "alarm"
window = { kind = "tumbling", size_s = 0.5 }
aggregate = "max"
condition = { op = ">", value = 0.5 }
command = { name = "write-coil", args = { address = 20, value = true } }
"""
ALARM_ROUTES = """
[[routes]]
name = "plcToRule"
from = "plc"
to = "rules/alarm-valve"

[[routes]]
name = "openValve"
from = "rules/alarm-valve"
to = "plc"
"""


@asynccontextmanager
async def running_agent(path: Path, home: Path) -> AsyncIterator[EdgeAgent]:
    agent = EdgeAgent(load_manifest(path), AgentOptions(home=home, manifest_path=path))
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


async def _scalar(dsn: str, sql: str, *args: Any) -> Any:
    """A value, None while the tenant's schema does not exist yet (made on first sight)."""
    try:
        return await fetchval(dsn, sql, *args)
    except asyncpg.UndefinedTableError:
        return None


async def _latest(dsn: str, metric: str) -> float | None:
    sql = (
        f"SELECT v.value FROM {VALUES} v JOIN {METRICS} m ON m.id = v.metric_id "  # noqa: S608
        "WHERE m.name = $1 ORDER BY v.time DESC LIMIT 1"
    )
    value = await _scalar(dsn, sql, f"plc.{metric}")
    return None if value is None else float(value)


async def test_every_type_and_order_arrives_decoded_and_cloud_commands_write_the_plc(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str, tmp_path: Path
) -> None:
    from tests.clients import Paho

    broker = broker_factory("fieldline")
    worker = start_worker(broker, timescale_dsn, tmp_path / "worker")
    ops = Paho(broker, broker.pki.operator)
    assert ops.connect()
    assert ops.subscribe("fl/acme/dev-2/cmd-res") == [1]
    try:
        async with modbus_server() as server:
            module = _module(server, [*POINTS, *WRITABLE], 0.2)
            text = manifest_text(broker, module, ALARM_RULE, ROUTES + ALARM_ROUTES)
            path = write_manifest(tmp_path, text)
            async with running_agent(path, tmp_path / "home") as agent:

                async def all_there() -> bool:
                    n = await _scalar(timescale_dsn, f"SELECT count(*) FROM {METRICS}")  # noqa: S608
                    return (n or 0) == len(POINTS) + len(WRITABLE)

                await wait_for(all_there, 30, "a value of every point in TimescaleDB")
                for point in POINTS:
                    got = await _latest(timescale_dsn, point.metric)
                    assert got == point.expected, (point, got)
                plc = agent.fields["plc"]
                assert isinstance(plc, ModbusModule)
                assert len(plc.plan) < len(POINTS), "adjacent registers share reads"

                async def command(name: str, args: dict[str, object]) -> dict[str, Any]:
                    cid = str(uuid.uuid4())
                    body = {"id": cid, "name": name, "args": args, "ts": int(time.time() * 1000)}
                    ops.publish(f"fl/acme/dev-2/cmd/{name}", json.dumps(body).encode())

                    def results() -> list[dict[str, Any]]:
                        return [json.loads(m.payload) for m in ops.messages]

                    async def answered() -> bool:
                        return any(r.get("id") == cid for r in results())

                    await wait_for(answered, 15, f"the answer to {name}")
                    return next(r for r in results() if r["id"] == cid)

                coil = await command("write-coil", {"point": "heater", "value": True})
                assert coil["status"] == "ok", coil
                setpoint = await command("write-register", {"point": "setpoint", "value": 72.25})
                assert setpoint["status"] == "ok", setpoint
                speed = await command("write-register", {"module": "plc", "point": "speed",
                                                         "value": -12.3})  # fmt: skip
                assert speed["status"] == "ok", speed
                bad = await command("write-register", {"point": "u16_ba", "value": 1})
                assert bad["status"] == "rejected", bad
                assert "read-only" in bad["detail"]
                past = await command("write-register", {"address": 99, "value": 1,
                                                        "type": "float32"})  # fmt: skip
                assert past["status"] == "error", past  # 99..100: past the map's end
                assert "Modbus exception 2" in past["detail"]

                async with server.client() as client:
                    held = await client.read_coils(HEATER.address, count=1, device_id=1)
                    assert held.bits[0] is True
                    regs = await client.read_holding_registers(SETPOINT.address, count=3,
                                                               device_id=1)  # fmt: skip
                    want = _with_raw(SETPOINT, 72.25)
                    assert list(regs.registers[:2]) == registers(want)
                    assert regs.registers[2] == 0xFFFF & -123  # speed: -12.3 at 0.1 per count

                async def valve_open() -> bool:
                    async with server.client() as client:
                        coil = await client.read_coils(20, count=1, device_id=1)
                        return bool(coil.bits[0])

                await wait_for(valve_open, 15, "the rule's write-coil on coil 20")

                # and the agent reads back what it wrote
                async def read_back() -> bool:
                    return (
                        await _latest(timescale_dsn, "setpoint") == 72.25
                        and await _latest(timescale_dsn, "heater") == 1.0
                    )

                await wait_for(read_back, 15, "the written values polled back")
        kinds = await fetch(timescale_dsn, f"SELECT name, kind, unit FROM {METRICS}")  # noqa: S608
        by_name = {r["name"]: (r["kind"], r["unit"]) for r in kinds}
        assert by_name["plc.alarm"] == ("bool", None)
        assert by_name["plc.door"] == ("bool", None)
        assert by_name["plc.tenths"] == ("numeric", "degC")
        assert by_name["plc.f32_abcd"] == ("numeric", "bar")
        stored = await fetch(
            timescale_dsn, "SELECT status, result FROM tenant_acme.commands ORDER BY updated_at"
        )
        assert [r["status"] for r in stored].count("ok") == 3
    finally:
        ops.close()
        worker.stop()


def _with_raw(point: MapPoint, raw: float) -> MapPoint:
    return MapPoint(**{**point.__dict__, "raw": raw, "expected": raw})


async def test_a_failing_plc_is_an_event_and_a_gap_never_a_zero(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str, tmp_path: Path
) -> None:
    """Exception responses, no answer, then the server switched off: each is told as an
    event, no value (least of all a zero) is stored while it lasts, and polling resumes."""
    broker = broker_factory("fieldline")
    worker = start_worker(broker, timescale_dsn, tmp_path / "worker")
    points = [POINTS[0], POINTS[4], POINTS[-4]]  # a float, an int16 and a coil: never 0
    gaps: list[tuple[str, float, float]] = []  # (what, from, to): no values in between
    try:
        async with modbus_server(points) as server:
            text = manifest_text(broker, _module(server, points, 0.1), "", ROUTES)
            path = write_manifest(tmp_path, text)
            async with running_agent(path, tmp_path / "home") as agent:
                plc = agent.fields["plc"]
                assert isinstance(plc, ModbusModule)

                def good_polls(n: int) -> Callable[[], Awaitable[bool]]:
                    start = plc.polls_ok

                    async def more() -> bool:
                        return plc.polls_ok >= start + n

                    return more

                def failed_polls(n: int) -> Callable[[], Awaitable[bool]]:
                    start = plc.polls_failed

                    async def more() -> bool:
                        return plc.polls_failed >= start + n

                    return more

                def told(words: str) -> Callable[[], Awaitable[bool]]:
                    async def found() -> bool:
                        events = await _events(timescale_dsn, "modbus_poll_failed")
                        return any(words in e for b in events for e in b["errors"].values())

                    return found

                await wait_for(good_polls(5), 20, "five good polls")
                # 1. the PLC answers every read with a Modbus exception (server busy)
                # a gap begins once a poll has failed: the poll under way when the fault
                # began may still bring values read before it (stamped when the poll ends)
                first = failed_polls(1)
                server.fault = ExcCodes.DEVICE_BUSY
                await wait_for(first, 20, "a failed poll while busy")
                begin = time.time()
                await wait_for(told("Modbus exception 6 (server device busy)"), 20, "busy event")
                await wait_for(failed_polls(3), 10, "three failed polls while busy")
                server.fault = None
                gaps.append(("busy", begin, time.time()))
                await wait_for(good_polls(3), 20, "good polls after busy")
                # 2. the PLC hangs: a read gets no answer within timeout_s
                first = failed_polls(1)
                server.answering.clear()
                await wait_for(first, 20, "a failed poll while hung")
                begin = time.time()
                await wait_for(told("no answer within 0.5 s"), 20, "a timeout event")
                await wait_for(failed_polls(2), 10, "two failed polls while hung")
                server.answering.set()
                gaps.append(("hung", begin, time.time()))
                await wait_for(good_polls(3), 30, "good polls after the hang")
                # 3. the PLC is switched off: connection refused until it is back
                first = failed_polls(1)
                await server.stop()
                await wait_for(first, 20, "a failed poll while off")
                begin = time.time()
                await wait_for(told("cannot connect"), 20, "a connection-refused event")
                await wait_for(failed_polls(2), 10, "two failed connects")
                await server.start()
                gaps.append(("off", begin, time.time()))
                await wait_for(good_polls(5), 40, "five good polls after the restart")
                polls_failed, outages_left = plc.polls_failed, plc.outages
                sample = agent.metrics.registry.get_sample_value
                for reason in ("exception", "timeout"):
                    labels = {"module": "plc", "reason": reason}
                    assert (sample("fieldline_edge_modbus_read_errors_total", labels) or 0) > 0
                labels = {"module": "plc", "outcome": "failed"}
                assert sample("fieldline_edge_modbus_polls_total", labels) == polls_failed
                assert (sample("fieldline_edge_modbus_connects_total", {"module": "plc"}) or 0) >= 2
            last_ms = plc.last_ts  # the agent has stopped: nothing after it

        async def written() -> bool:
            sql = f"SELECT max(time) FROM {VALUES}"  # noqa: S608
            newest = await _scalar(timescale_dsn, sql)
            return newest is not None and newest.timestamp() * 1000 >= last_ms

        await wait_for(written, 30, "the agent's last reading in TimescaleDB")
        rows = await fetch(
            timescale_dsn,
            f"SELECT m.name, v.time, v.value FROM {VALUES} v JOIN {METRICS} m "  # noqa: S608
            "ON m.id = v.metric_id ORDER BY v.time",
        )
        expected = {f"plc.{p.metric}": p.expected for p in points}
        wrong = [(r["name"], r["value"]) for r in rows if r["value"] != expected[r["name"]]]
        assert wrong == [], "a failed poll must not be stored as a value (least of all 0)"
        for what, begin, end in gaps:
            inside = [r for r in rows if begin < r["time"].timestamp() < end - 0.05]
            assert inside == [], f"values stored while the PLC was {what}"
            after = [r for r in rows if r["time"].timestamp() > end]
            assert {r["name"] for r in after} == set(expected), f"polling resumed after {what}"
        failed = await _events(timescale_dsn, "modbus_poll_failed")
        resumed = await _events(timescale_dsn, "modbus_poll_resumed")
        assert {b["module"] for b in failed + resumed} == {"plc"}
        # told when an outage begins (again only every REPORT_EVERY_S), not at every poll
        assert len(failed) < polls_failed / 2, (len(failed), polls_failed)
        # and every read that failed was told answering again, with the gap it left
        assert outages_left == {}
        told_failed = {key for b in failed for key in b["errors"]}
        assert told_failed == {key for b in resumed for key in b["reads"]}
        assert {"connection", "coil 0", "holding 0..1", "holding 8"} <= told_failed
        off = resumed[-1]
        assert off["reads"] == ["connection"]
        _what, begin, end = gaps[-1]
        assert off["failed_polls"] >= 2
        assert end - begin - 1.0 < off["gap_s"] < end - begin + 35, off
    finally:
        worker.stop()


async def _events(dsn: str, kind: str) -> list[dict[str, Any]]:
    """The bodies of the tenant's events of `kind`, oldest first (data flattened into them)."""
    try:
        rows = await fetch(
            dsn, "SELECT body FROM tenant_acme.events WHERE kind = $1 ORDER BY time", kind
        )
    except asyncpg.UndefinedTableError:
        return []
    return [_body(r["body"]) for r in rows]


def _body(value: Any) -> dict[str, Any]:
    body = json.loads(value) if isinstance(value, str) else value
    assert isinstance(body, dict)
    return body
