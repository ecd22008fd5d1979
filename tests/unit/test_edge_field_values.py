"""Field modules against hostile values and servers, and the agent's field commands.

One bad value must not dead-letter the whole telemetry message it is merged into, a broken
answer must not end a module's loop, and a deferred command has exactly one result.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.common.node import Node
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent.agent import AgentOptions, EdgeAgent
from edge_agent.field import FieldError
from edge_agent.manifest import parse_manifest
from edge_agent.modbus import ModbusModule
from edge_agent.opcua import (
    OpcUaModule,
    SetupError,
    _LostError,
    _to_ms,
    is_trusted,
    server_certificate,
)
from edge_agent.registers import Layout, RegisterError
from edge_agent.throttle import TELL_EVERY_S
from edge_agent.values import ValueGuard
from schemas import topics
from schemas.messages import decode_telemetry, metric_problem
from tests.fixtures.pki import TestPki

NOW = 1_767_000_000.0  # 2025-12-29, seconds


class Told:
    """What a ValueGuard reported, with a clock the test moves."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, dict[str, Any]]] = []
        self.counts: list[tuple[str, str]] = []
        self.mono = 0.0

    def guard(self) -> ValueGuard:
        return ValueGuard(
            lambda *e: self.events.append(e),
            lambda *c: self.counts.append(c),
            clock=lambda: NOW,
            monotonic=lambda: self.mono,
        )


def _upstream(module: str, reading: dict[str, Any]) -> bytes:
    metrics = {f"{module}.{k}": v for k, v in reading["metrics"].items()}
    return json.dumps({"ts": reading["ts"], "metrics": metrics}).encode()


# -- the platform's rule, public ----------------------------------------------------------


def test_metric_problem_is_the_rule_ingest_applies() -> None:
    assert metric_problem("plc.t", 21.5) is None
    assert metric_problem("plc.t", {"v": 1.0, "u": "degC"}) is None
    assert "256" in (metric_problem("plc.t", "x" * 257) or "")
    assert "NUL" in (metric_problem("plc.t", "ab\x00") or "")
    assert "out of range" in (metric_problem("plc.t", 1e305) or "")
    assert "out of range" in (metric_problem("plc.t", {"v": 1e305, "u": "W"}) or "")
    assert "invalid" in (metric_problem("9t", 1) or "")


# -- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["x" * 300, "in\x00side", 1e305, -1e305, {"v": 1e305, "u": "W"}, [1, 2]],
    ids=["long-text", "nul-inside", "huge", "huge-negative", "huge-quantity", "array"],
)
def test_one_bad_value_is_dropped_and_the_rest_of_the_reading_arrives(bad: Any) -> None:
    told = Told()
    reading = {"ts": int(NOW * 1000), "metrics": {"ok": 1.5, "state": "run", "bad": bad}}
    # unchecked, ingest refuses the whole message for the one value
    with pytest.raises(ValueError, match="bad"):
        decode_telemetry(_upstream("m", reading))
    clean = told.guard().clean("m", reading)
    assert clean == {"ts": int(NOW * 1000), "metrics": {"ok": 1.5, "state": "run"}}
    decode_telemetry(_upstream("m", clean))
    assert [e[1] for e in told.events] == ["field_value_dropped"]
    assert told.events[0][3]["metric"] == "bad"
    assert len(told.counts) == 1


def test_padded_plc_strings_lose_their_trailing_nuls() -> None:
    guard = Told().guard()
    metrics = {"s": "RUN\x00\x00\x00", "q": {"v": "a\x00"}}
    clean = guard.clean("plc", {"ts": int(NOW * 1000), "metrics": metrics})
    assert clean is not None
    assert clean["metrics"] == {"s": "RUN", "q": {"v": "a"}}


def test_a_reading_with_nothing_valid_left_is_no_reading() -> None:
    assert Told().guard().clean("m", {"ts": int(NOW * 1000), "metrics": {"x": 1e305}}) is None


@pytest.mark.parametrize(
    "ts",
    [
        -11_644_473_600_000,  # DateTime 0 (1601) as plain epoch ms
        int(NOW * 1000) + 301_000,  # a PLC clock 301 s ahead
        946_684_799_999,  # 1999
        None,
    ],
    ids=["datetime-0", "clock-ahead", "before-2000", "missing"],
)
def test_an_unusable_source_timestamp_becomes_the_receive_time(ts: int | None) -> None:
    told = Told()
    reading = {"ts": ts, "metrics": {"t": 20.0}}
    clean = told.guard().clean("m", reading)
    assert clean == {"ts": int(NOW * 1000), "metrics": {"t": 20.0}}
    assert [e[1] for e in told.events] == ["field_ts_replaced"]
    assert told.counts == [("m", "ts")]


def test_a_timestamp_within_the_skew_is_kept() -> None:
    ts = int(NOW * 1000) + 299_000
    assert Told().guard().clean("m", {"ts": ts, "metrics": {"t": 1}}) == {
        "ts": ts, "metrics": {"t": 1},
    }  # fmt: skip


def test_opcua_datetime_0_counts_as_no_timestamp() -> None:
    assert _to_ms(datetime.datetime(1601, 1, 1)) is None
    assert _to_ms(datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)) == 1_735_689_600_000


def test_one_event_per_module_metric_and_reason_per_minute() -> None:
    told = Told()
    guard = told.guard()
    for _ in range(50):
        guard.clean("m", {"ts": int(NOW * 1000), "metrics": {"a": "x" * 300, "b": 1e305}})
    guard.clean("n", {"ts": int(NOW * 1000), "metrics": {"a": "x" * 300}})
    assert sorted((e[0], e[3]["metric"]) for e in told.events) == [
        ("m", "a"), ("m", "b"), ("n", "a"),
    ]  # fmt: skip
    assert len(told.counts) == 101  # every drop counted
    told.mono += TELL_EVERY_S
    guard.clean("m", {"ts": int(NOW * 1000), "metrics": {"a": "x" * 300}})
    assert told.events[-1][3] == {"metric": "a", "reason": "text", "suppressed": 49}


# -- Modbus: short answers, a dying loop ------------------------------------------------------

MODBUS: dict[str, Any] = {
    "agent": {"id": "dev-2", "tenant": "acme"},
    "modules": [
        {
            "name": "plc", "kind": "modbus", "host": "127.0.0.1", "interval_s": 0.05,
            "points": [
                {"metric": "temp", "table": "holding", "address": 0, "type": "float32"},
                {"metric": "heater", "table": "coil", "address": 0},
            ],
        }
    ],
    "routes": [{"name": "up", "from": "plc", "to": "upstream"}],
}  # fmt: skip


class _Reply:
    def __init__(self, bits: list[bool] | None = None, registers: list[int] | None = None):
        self.bits = bits or []
        self.registers = registers or []

    def isError(self) -> bool:  # noqa: N802 - pymodbus's name
        return False


class _ShortCoils:
    """A device that answers a coil read with byte_count 0."""

    connected = True

    async def read_holding_registers(self, address: int, **_: Any) -> _Reply:
        return _Reply(registers=[0x41A8, 0x0000])  # 21.0 as float32

    async def read_coils(self, address: int, **_: Any) -> _Reply:
        return _Reply(bits=[])

    read_input_registers = read_holding_registers
    read_discrete_inputs = read_coils

    def close(self) -> None:
        pass


def test_a_point_with_too_few_words_is_a_register_error_not_an_index_error() -> None:
    with pytest.raises(RegisterError, match="0 of 1 bit"):
        Layout("coil", 3).value([])
    with pytest.raises(RegisterError, match="1 of 2 register"):
        Layout("holding", 0, "float32").value([1])


async def test_a_coil_reply_without_bits_is_a_failed_read_and_the_rest_arrives() -> None:
    module = ModbusModule(parse_manifest(MODBUS, "edge.toml").modules[0])
    module.client = _ShortCoils()  # type: ignore[assignment]
    result = await module.poll()
    assert result.values == {"temp": 21.0}
    assert list(result.failures) == ["coil 0"]
    assert "0 bits" in result.failures["coil 0"]


async def test_an_unexpected_error_does_not_end_the_polling_loop() -> None:
    module = ModbusModule(parse_manifest(MODBUS, "edge.toml").modules[0])
    polls = 0
    third = asyncio.Event()
    events: list[tuple[str, str, dict[str, Any]]] = []

    async def connect() -> bool:
        module.client = _ShortCoils()  # type: ignore[assignment]
        return True

    async def poll() -> Any:
        nonlocal polls
        polls += 1
        if polls == 3:
            third.set()
        raise RuntimeError("a bug")

    module._connect = connect  # type: ignore[method-assign]
    module.poll = poll  # type: ignore[method-assign]
    await module.start(lambda r: None, lambda s, k, m, d: events.append((k, m, d)))
    try:
        await asyncio.wait_for(third.wait(), 10)
        assert module.task is not None
        assert not module.task.done()
    finally:
        await module.stop()
    assert [k for k, _, _ in events] == ["modbus_poll_failed"]  # told once, not per retry
    assert "unexpected RuntimeError: a bug" in events[0][1]


# -- OPC UA: a malformed server certificate -------------------------------------------------


def test_a_malformed_server_certificate_is_a_setup_error() -> None:
    with pytest.raises(SetupError, match="not a DER certificate"):
        server_certificate(b"\x30\x82\x00\x10garbage-garbage-")
    with pytest.raises(SetupError, match="not a DER certificate"):
        server_certificate(b"")


OPCUA: dict[str, Any] = {
    "agent": {"id": "dev-2", "tenant": "acme"},
    "modules": [
        {"name": "machine", "kind": "opcua", "url": "opc.tcp://127.0.0.1:4840", "mode": "poll",
         "nodes": [{"node": "ns=2;s=A", "metric": "a"}, {"node": "ns=2;s=B", "metric": "b"}]}
    ],
    "routes": [{"name": "up", "from": "machine", "to": "upstream"}],
}  # fmt: skip


def _opcua(tmp_path: Path) -> OpcUaModule:
    spec = parse_manifest(OPCUA, "edge.toml").modules[0]
    return OpcUaModule(spec, home=tmp_path, state_dir=tmp_path, default_uri="urn:test")


class _FewerResults:
    """A server that answers a Read of two nodes with one result."""

    async def read_attributes(self, nodes: list[Any], *_: Any) -> list[ua.DataValue]:
        return [ua.DataValue(ua.Variant(1.0))]


async def test_a_server_answering_fewer_results_than_asked_is_a_lost_session(
    tmp_path: Path,
) -> None:
    module = _opcua(tmp_path)
    module.nodes = {"a": Node(None, "ns=2;s=A"), "b": Node(None, "ns=2;s=B")}  # type: ignore[arg-type]
    with pytest.raises(_LostError, match=r"Read for 2 node\(s\) with 1 result"):
        await module._poll(_FewerResults())  # type: ignore[arg-type]


async def test_an_unexpected_error_does_not_end_the_opcua_loop(tmp_path: Path) -> None:
    module = _opcua(tmp_path)
    tries = 0
    second = asyncio.Event()
    events: list[tuple[str, str]] = []

    async def connect() -> Any:
        nonlocal tries
        tries += 1
        if tries == 2:
            second.set()
        raise ValueError("malformed answer")

    module._connect = connect  # type: ignore[method-assign]
    await module.start(lambda r: None, lambda s, k, m, d: events.append((k, m)))
    try:
        await asyncio.wait_for(second.wait(), 10)
        assert module.task is not None
        assert not module.task.done()
    finally:
        await module.stop()
    assert events == [
        ("opcua_error", f"cannot connect to {module.url}: unexpected ValueError: malformed "
         "answer; retrying with backoff")
    ]  # fmt: skip


# -- the agent: field commands --------------------------------------------------------------


class FakeField:
    """A field module whose commands wait for the test to release them."""

    kind = "fake"

    def __init__(self) -> None:
        self.name = "plc"
        self.release = asyncio.Event()
        self.started = 0
        self.fail: BaseException | None = None

    @property
    def task(self) -> asyncio.Task[None] | None:
        return None

    async def start(self, emit: Any, event: Any) -> None:
        pass

    async def stop(self) -> None:
        pass

    def check_command(self, name: str, args: dict[str, Any]) -> None:
        if name != "write-coil":
            raise FieldError("no such command", "rejected")

    async def command(self, name: str, args: dict[str, Any]) -> str:
        self.started += 1
        if self.fail is not None:
            raise self.fail
        await self.release.wait()
        return "written"


@pytest.fixture
def agent(test_pki: TestPki, tmp_path: Path) -> Iterator[EdgeAgent]:
    data = json.loads(json.dumps(MODBUS))
    data["agent"]["bundle"] = str(test_pki.device2.directory)
    edge = EdgeAgent(parse_manifest(data, "edge.toml"), AgentOptions(home=tmp_path))
    edge.fields["plc"] = FakeField()
    yield edge
    edge.outbox.close()


def _command(agent: EdgeAgent, cid: str) -> None:
    body = {"id": cid, "name": "write-coil", "ts": int(time.time() * 1000), "ttl_s": 60,
            "args": {"module": "plc", "point": "heater", "value": True}}  # fmt: skip
    topic = topics.device_command_filter(agent.tenant, agent.id).rstrip("#+") + "write-coil"
    agent._on_command(topic, json.dumps(body).encode(), False)


def _sent(agent: EdgeAgent, kind: str) -> list[dict[str, Any]]:
    return [json.loads(e.payload) for e in agent.outbox.pending(1000) if e.kind == kind]


def _refused(agent: EdgeAgent, reason: str) -> float:
    value = agent.metrics.registry.get_sample_value(
        "fieldline_edge_commands_refused_total", {"reason": reason}
    )
    return value or 0.0


async def _settle(agent: EdgeAgent) -> None:
    await asyncio.wait_for(asyncio.gather(*agent._field_tasks), 5)


async def test_a_redelivered_running_command_gets_only_its_real_result(agent: EdgeAgent) -> None:
    field = agent.fields["plc"]
    assert isinstance(field, FakeField)
    cid = str(uuid.uuid4())
    _command(agent, cid)
    await asyncio.sleep(0)
    _command(agent, cid)  # QoS 1 redelivery while the write still runs
    assert _sent(agent, "cmd-res") == []
    assert _refused(agent, "duplicate") == 1
    field.release.set()
    await _settle(agent)
    results = _sent(agent, "cmd-res")
    assert [(r["id"], r["status"], r["detail"]) for r in results] == [(cid, "ok", "written")]
    assert field.started == 1
    _command(agent, cid)  # after it ended, a replay is refused as before
    assert [r["status"] for r in _sent(agent, "cmd-res")] == ["ok", "rejected"]


async def test_commands_beyond_the_limit_are_rejected_busy(agent: EdgeAgent) -> None:
    field = agent.fields["plc"]
    assert isinstance(field, FakeField)
    limit = 8  # the documented default
    for _ in range(limit + 2):
        _command(agent, str(uuid.uuid4()))
    await asyncio.sleep(0)
    assert field.started == limit
    busy = _sent(agent, "cmd-res")
    assert [r["status"] for r in busy] == ["rejected", "rejected"]
    assert f"busy, {limit} commands running" in busy[0]["detail"]
    assert _refused(agent, "busy") == 2
    field.release.set()
    await _settle(agent)
    assert [r["status"] for r in _sent(agent, "cmd-res")].count("ok") == limit
    _command(agent, str(uuid.uuid4()))  # room again
    await asyncio.sleep(0)
    assert field.started == limit + 1
    await _settle(agent)


async def test_a_rule_command_that_crashes_is_one_event(agent: EdgeAgent) -> None:
    field = agent.fields["plc"]
    assert isinstance(field, FakeField)
    field.fail = RuntimeError("module bug")
    await agent._rule_command("plc", "hot", "write-coil", {"point": "heater", "value": False})
    events = _sent(agent, "event")
    assert [(e["kind"], e["message"]) for e in events] == [
        ("command_failed", "rule hot: write-coil: RuntimeError: module bug")
    ]


async def test_field_readings_are_cleaned_before_the_outbox(agent: EdgeAgent) -> None:
    emit = agent._emitter("plc")
    emit({"ts": -11_644_473_600_000, "metrics": {"temp": 1e305, "state": "ok\x00\x00"}})
    (telemetry,) = _sent(agent, "telemetry")
    decode_telemetry(json.dumps(telemetry).encode())
    assert telemetry["metrics"] == {"plc.state": "ok"}
    assert abs(telemetry["ts"] - time.time() * 1000) < 60_000
    kinds = sorted(e["kind"] for e in _sent(agent, "event"))
    assert kinds == ["field_ts_replaced", "field_value_dropped"]


async def test_a_field_task_that_ends_is_an_event(agent: EdgeAgent) -> None:
    async def crash() -> None:
        raise RuntimeError("loop died")

    task = asyncio.create_task(crash())
    task.add_done_callback(agent._field_ended("plc"))
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    (event,) = _sent(agent, "event")
    assert event["kind"] == "field_module_ended"
    assert "RuntimeError: loop died" in event["message"]


# -- OPC UA trust: an issuing anchor must be a CA, in date -------------------------------------


def _cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
    *,
    ca: bool = False,
    cert_sign: bool = True,
    days: tuple[int, int] = (-1, 30),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    builder = builder.add_extension(usage, critical=True)
    return builder.sign(issuer_key, hashes.SHA256())


def test_only_a_ca_in_date_can_vouch_for_a_server() -> None:
    ca_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    server = _cert("server", leaf_key, ("anchor", ca_key))
    assert is_trusted(server, [_cert("anchor", ca_key, ca=True)])
    # the same key and name, but a leaf certificate: it cannot issue
    assert not is_trusted(server, [_cert("anchor", ca_key, ca=False)])
    assert not is_trusted(server, [_cert("anchor", ca_key, ca=True, cert_sign=False)])
    assert not is_trusted(server, [_cert("anchor", ca_key, ca=True, days=(-30, -1))])
