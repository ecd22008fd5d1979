"""The edge agent's `opcua` module against a real asyncua server, broker, worker and TimescaleDB.

The server (tests/fixtures/opcua.py) is the simulator's machine: it heats until its `Reset`
method is called. The agent reads it over OPC UA, its rule calls `Reset` over OPC UA, and
everything it sends (rows, events, command results) is checked in the database.
"""

from __future__ import annotations

import asyncio
import json
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from cryptography import x509

from edge_agent.manifest import ModuleSpec
from edge_agent.opcua import OpcUaModule
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.edge import MACHINE_RESET, manifest_text, write_manifest
from tests.fixtures.ingest import fetch, start_worker, wait_for
from tests.fixtures.opcua import SECURE, TEMPERATURE, MachineServer, server_certificate
from tests.integration.test_edge_agent import _scalar, running_agent

pytestmark = pytest.mark.integration

VALUES = "tenant_acme.numeric_values"


def _opcua_manifest(broker: BrokerUnderTest, url: str) -> str:
    module = f"""
[[modules]]
name = "machine"
kind = "opcua"
url = "{url}"
publishing_interval_s = 0.1
sampling_interval_s = 0.05
nodes = [
  {{ node = "{TEMPERATURE}", metric = "temperature", unit = "degC" }},
  {{ path = "2:Machine/2:State", metric = "state", kind = "text" }},
  {{ node = "ns=2;s=Machine.NoSuchSensor", metric = "ghost" }},
  {{ node = "ns=2;s=Machine.V0000", metric = "huge" }},
]
"""
    rule = """
[[rules]]
name = "overheat"
metric = "temperature"
window = { kind = "tumbling", size_s = 1 }
aggregate = "avg"
condition = { op = ">", value = 35 }
event = { kind = "overheat", severity = "warning", message = "machine too hot" }
command = { name = "call", args = { object = "ns=2;s=Machine", method = "2:Reset" } }
"""
    routes = MACHINE_RESET[2]  # the same four routes as the simulated machine's
    return manifest_text(broker, module, rule, routes)


async def _count(dsn: str, sql: str) -> int:
    return await _scalar(dsn, sql)


async def test_the_machine_reset_over_opcua_end_to_end_with_a_server_restart(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str, tmp_path: Path
) -> None:
    from tests.clients import Paho

    broker = broker_factory("fieldline")  # the agent's MQTT side is test_edge_agent's subject
    dsn = timescale_dsn
    started = time.time()
    worker = start_worker(broker, dsn, tmp_path / "worker")
    ops = Paho(broker, broker.pki.operator)
    assert ops.connect()
    assert ops.subscribe("fl/acme/dev-2/cmd-res") == [1]
    try:
        async with MachineServer(extra_variables=1) as server:
            path = write_manifest(tmp_path, _opcua_manifest(broker, server.url))
            async with running_agent(path, tmp_path / "home"):
                # a value beyond the platform's bounds is dropped at the edge: the telemetry
                # it would share a message with is not dead-lettered with it
                await server.extra[0].write_value(1e305)
                dropped = (
                    "SELECT count(*) FROM tenant_acme.events WHERE kind = 'field_value_dropped'"
                )
                await wait_for(lambda: _at_least(dsn, dropped, 1), 30, "the dropped-value event")
                # the rule fires on the OPC UA temperature and calls Reset over OPC UA
                overheat = "SELECT count(*) FROM tenant_acme.events WHERE kind = 'overheat'"
                await wait_for(lambda: _at_least(dsn, overheat, 1), 60, "the overheat event")

                async def reset_called() -> bool:
                    return server.machine.resets >= 1

                await wait_for(reset_called, 15, "Reset called on the OPC UA server")
                cooled = (
                    f"SELECT count(*) FROM {VALUES} v JOIN tenant_acme.metrics m "  # noqa: S608
                    "ON m.id = v.metric_id WHERE m.name = 'machine.temperature' AND v.value < 25 "
                    "AND v.time > "
                    "(SELECT min(time) FROM tenant_acme.events WHERE kind = 'overheat')"
                )
                await wait_for(lambda: _at_least(dsn, cooled, 3), 30, "cold readings after Reset")
                hot = (
                    f"SELECT count(*) FROM {VALUES} v JOIN tenant_acme.metrics m "  # noqa: S608
                    "ON m.id = v.metric_id WHERE m.name = 'machine.temperature' AND v.value > 35"
                )
                assert await _count(dsn, hot) >= 1, "it was hot before"
                texts = "SELECT count(*) FROM tenant_acme.text_values"
                assert await _count(dsn, texts) >= 1, "the State node arrives as text"

                # a cloud command runs over OPC UA; its one result lands in `commands`
                cid = str(uuid.uuid4())
                args = {"node": "ns=2;s=Machine.Setpoint", "value": 55}
                body = {"id": cid, "name": "write", "args": args, "ts": int(time.time() * 1000)}
                ops.publish("fl/acme/dev-2/cmd/write", json.dumps(body).encode())
                done = f"SELECT count(*) FROM tenant_acme.commands WHERE id = '{cid}'"  # noqa: S608
                await wait_for(lambda: _at_least(dsn, done, 1), 30, "the write's result")
                sql = "SELECT status, result FROM tenant_acme.commands WHERE id = $1::uuid"
                row = (await fetch(dsn, sql, cid))[0]
                assert row["status"] == "ok", row
                assert await server.setpoint.read_value() == 55
                # a replay is refused by the intake, so the write ran (and answered) once
                await server.setpoint.write_value(ua.Variant(54, ua.VariantType.Int32))
                ops.publish("fl/acme/dev-2/cmd/write", json.dumps(body).encode())

                def answers() -> list[str]:
                    bodies = [json.loads(m.payload) for m in ops.messages]
                    return [b["status"] for b in bodies if b.get("id") == cid]

                async def refused() -> bool:
                    return len(answers()) >= 2

                await wait_for(refused, 15, "the replay's refusal")
                assert answers() == ["ok", "rejected"]
                assert await server.setpoint.read_value() == 54

                # the server restarts: the agent reconnects, re-subscribes and says how long
                # the gap was
                await server.stop()
                await asyncio.sleep(1.0)
                await server.start()
                gap = "SELECT count(*) FROM tenant_acme.events WHERE kind = 'opcua_reconnected'"
                await wait_for(lambda: _at_least(dsn, gap, 1), 40, "the reconnect (gap) event")
                before = await _count(dsn, f"SELECT count(*) FROM {VALUES}")  # noqa: S608
                resumed = f"SELECT count(*) FROM {VALUES}"  # noqa: S608
                await wait_for(lambda: _at_least(dsn, resumed, before + 10), 30, "values again")
        events = await fetch(
            dsn, "SELECT kind, severity, body FROM tenant_acme.events ORDER BY time"
        )
        kinds = [e["kind"] for e in events]
        dead = (
            "SELECT count(*) FROM fieldline.dead_letters "  # noqa: S608
            f"WHERE device_id = 'dev-2' AND time >= to_timestamp({started})"
        )
        assert await _count(dsn, dead) == 0, "nothing the agent sent was refused"
        # the unknown node: one clear error, not one per reconnect
        assert kinds.count("opcua_unknown_nodes") == 1, kinds
        unknown = next(e for e in events if e["kind"] == "opcua_unknown_nodes")
        assert "NoSuchSensor" in json.dumps(_body(unknown["body"]))
        assert unknown["severity"] == "error"
        gap_body = _body(next(e for e in events if e["kind"] == "opcua_reconnected")["body"])
        assert gap_body["gap_s"] >= 1.0
        assert "opcua_disconnected" in kinds
    finally:
        ops.close()
        worker.stop()


def _body(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) else dict(value)


async def _at_least(dsn: str, sql: str, n: int) -> bool:
    return await _count(dsn, sql) >= n


# -- security: certificates and trust, against a real server -------------------------------


def _module(tmp_path: Path, url: str, **keys: Any) -> OpcUaModule:
    fields: dict[str, Any] = {
        "name": "machine", "kind": "opcua", "url": url, "publishing_interval_s": 0.1,
        "nodes": [{"node": TEMPERATURE, "metric": "temperature"}],
    }  # fmt: skip
    fields.update(keys)
    spec = ModuleSpec.model_validate({k: v for k, v in fields.items() if v is not None})
    home = tmp_path / "home"
    return OpcUaModule(spec, home=home, state_dir=home / "edge" / "gw", default_uri="urn:t:gw")


class _Sink:
    def __init__(self) -> None:
        self.readings: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str, dict[str, Any]]] = []

    def emit(self, reading: dict[str, Any]) -> None:
        self.readings.append(reading)

    def event(self, severity: str, kind: str, message: str, data: dict[str, Any]) -> None:
        self.events.append((severity, kind, message, data))

    async def some_values(self) -> bool:
        return len(self.readings) >= 3

    async def some_event(self) -> bool:
        return bool(self.events)


async def test_sign_and_encrypt_with_trusted_certificates_and_refusals(tmp_path: Path) -> None:
    uri = "urn:fieldline:test:machine-server"
    cert = server_certificate(tmp_path / "server", "machine-server", uri)
    other, _ = server_certificate(tmp_path / "other", "impostor", uri)
    async with MachineServer(security=SECURE, cert=cert, uri=uri) as server:
        # trusted: the server's certificate itself is server_trust
        module = _module(
            tmp_path, server.url, security_mode="SignAndEncrypt", server_trust=str(cert[0])
        )
        sink = _Sink()
        await module.start(sink.emit, sink.event)
        try:
            await wait_for(sink.some_values, 20, "values over SignAndEncrypt")
        finally:
            await module.stop()
        key = tmp_path / "home" / "edge" / "gw" / "opcua" / "machine.key.pem"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        mine = x509.load_der_x509_certificate(key.with_name("machine.der").read_bytes())
        san = mine.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "urn:t:gw" in san.get_values_for_type(x509.UniformResourceIdentifier)

        # untrusted: server_trust holds another certificate -> refused, one clear event
        module = _module(
            tmp_path, server.url, security_mode="SignAndEncrypt", server_trust=str(other)
        )
        sink = _Sink()
        await module.start(sink.emit, sink.event)
        try:
            await wait_for(sink.some_event, 20, "the refusal")
            await asyncio.sleep(2.0)  # two more retries: still one event
        finally:
            await module.stop()
        assert not sink.readings
        assert len(sink.events) == 1, sink.events
        severity, kind, message, _ = sink.events[0]
        assert (severity, kind) == ("error", "opcua_setup_error")
        assert "not trusted" in message
        assert "CN=machine-server" in message

    # wrong security settings: the agent wants Sign, the server offers only None
    async with MachineServer() as plain:
        module = _module(tmp_path, plain.url, security_mode="Sign", server_trust=str(cert[0]))
        sink = _Sink()
        await module.start(sink.emit, sink.event)
        try:
            await wait_for(sink.some_event, 20, "the security mismatch")
            await asyncio.sleep(1.5)
        finally:
            await module.stop()
        assert len(sink.events) == 1, sink.events
        assert "offers no Basic256Sha256 endpoint with security_mode 'Sign'" in sink.events[0][2]
        assert "None" in sink.events[0][2]

        # quality: a Bad status is an event, not a value (polled, this time)
        module = _module(
            tmp_path, plain.url, mode="poll", interval_s=0.05, publishing_interval_s=None,
            nodes=[{"node": "ns=2;s=Machine.Pressure", "metric": "pressure"}],
        )  # fmt: skip
        sink = _Sink()
        await module.start(sink.emit, sink.event)
        try:
            await wait_for(sink.some_values, 20, "pressure values")
            await plain.set_pressure_bad(True)
            await wait_for(sink.some_event, 20, "the Bad status event")
            seen = len(sink.readings)
            await asyncio.sleep(0.5)
            assert len(sink.readings) == seen, "no values while the status is Bad"
        finally:
            await module.stop()
        assert [e[1] for e in sink.events] == ["opcua_bad_status"]
        assert "BadSensorFailure" in sink.events[0][2]
