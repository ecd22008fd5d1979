"""The lean MQTT client's liveness, protocol fallback, CONNACK properties and resume rules.

Pure decisions are tested as functions; the client's behaviour against a scripted broker on a
loopback socket (plain TCP: the scripted broker speaks MQTT, not TLS).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import pytest

from broker import wire
from ingest_worker.decode import Decoded
from ingest_worker.metrics import IngestMetrics
from ingest_worker.mqtt import (
    DEAD,
    MQTT5,
    MQTT311,
    PING,
    ConnectRefusedError,
    LivenessError,
    MqttError,
    PacketTooLargeError,
    Subscriber,
    decode_connack,
    keepalive_step,
    parse_properties,
    subscribe_packet,
)
from ingest_worker.receive import BrokerTarget, LeanReceiver, fallback_version
from ingest_worker.writer import _device_states
from schemas.messages import Status
from tests.mqtt_raw import read_packet

NOW = datetime(2026, 12, 5, tzinfo=UTC)


# -- the fallback decision --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("protocol", "version", "exc", "expected"),
    [
        ("auto", MQTT5, ConnectRefusedError(0x01, MQTT5), MQTT311),  # a 3.1.1 CONNACK
        ("auto", MQTT5, ConnectRefusedError(0x84, MQTT5), MQTT311),  # MQTT 5 reason code
        ("auto", MQTT5, ConnectRefusedError(0x87, MQTT5), None),  # not authorized
        ("auto", MQTT5, ConnectRefusedError(0x05, MQTT5), None),
        ("auto", MQTT5, TimeoutError(), None),  # a slow broker says nothing about versions
        ("auto", MQTT5, ConnectionResetError(), None),
        ("auto", MQTT5, ConnectionError("the broker closed the connection"), None),
        ("auto", MQTT5, OSError("unreachable"), None),
        ("auto", MQTT311, ConnectRefusedError(0x01, MQTT311), None),  # nothing below 3.1.1
        ("5", MQTT5, ConnectRefusedError(0x84, MQTT5), None),  # pinned: no fallback
        ("3.1.1", MQTT311, ConnectRefusedError(0x01, MQTT311), None),
    ],
)
def test_only_a_connack_refusing_mqtt5_falls_back(
    protocol: str, version: int, exc: BaseException, expected: int | None
) -> None:
    assert fallback_version(protocol, version, exc) == expected


# -- CONNACK and its properties ---------------------------------------------------------------
def _props(*parts: bytes) -> bytes:
    data = b"".join(parts)
    return wire.varint(len(data)) + data


def _u16(ident: int, value: int) -> bytes:
    return bytes((ident,)) + struct.pack("!H", value)


def _u32(ident: int, value: int) -> bytes:
    return bytes((ident,)) + struct.pack("!I", value)


def _text(ident: int, value: str) -> bytes:
    raw = value.encode()
    return bytes((ident,)) + struct.pack("!H", len(raw)) + raw


def test_connack_properties_are_read_whatever_comes_around_them() -> None:
    user = b"\x26" + struct.pack("!H", 1) + b"k" + struct.pack("!H", 2) + b"vv"
    body = b"\x01\x00" + _props(
        _text(0x12, "assigned-id"),  # Assigned Client Identifier
        user,
        _u16(0x22, 10),  # Topic Alias Maximum
        _u16(0x13, 7),  # Server Keep Alive
        b"\x24\x01",  # Maximum QoS
        _u32(0x27, 512),  # Maximum Packet Size
        _u16(0x21, 5000),  # Receive Maximum
        _u32(0x11, 60),  # Session Expiry Interval
    )
    connack = decode_connack(body, MQTT5)
    assert connack.session_present
    assert connack.code == 0
    assert (connack.server_keepalive, connack.maximum_packet_size) == (7, 512)
    assert connack.receive_maximum == 5000


def test_connack_without_properties_and_a_311_answer_to_mqtt5() -> None:
    bare = decode_connack(b"\x00\x00", MQTT311)
    assert (bare.session_present, bare.code, bare.server_keepalive) == (False, 0, None)
    # a 3.1.1-only broker answers an MQTT 5 CONNECT with a two-byte 3.1.1 CONNACK
    assert decode_connack(b"\x00\x01", MQTT5).code == 0x01
    refused = decode_connack(b"\x00\x84" + _props(_text(0x1F, "v5 off")), MQTT5)
    assert (refused.code, refused.reason) == (0x84, "v5 off")


@pytest.mark.parametrize(
    "props",
    [
        b"\x13\x00",  # a two-byte property cut short
        b"\x7f\x00\x01",  # no such property
        b"\x1f\x00\x09abc",  # a string longer than the list
    ],
)
def test_malformed_properties_are_a_protocol_error(props: bytes) -> None:
    with pytest.raises((MqttError, struct.error, IndexError)):
        parse_properties(props)
    with pytest.raises((MqttError, struct.error, IndexError)):
        decode_connack(b"\x00\x00" + wire.varint(len(props)) + props, MQTT5)


def test_subscribe_asks_for_retained_messages_only_for_new_subscriptions() -> None:
    v5 = subscribe_packet(1, ["fl/+/+/status"], 1, MQTT5, retain_handling=1)
    assert v5[-1] == 0x11  # QoS 1, Retain Handling 1 (bits 4-5)
    v311 = subscribe_packet(1, ["fl/+/+/status"], 1, MQTT311, retain_handling=1)
    assert v311[-1] == 0x01  # 3.1.1 has no options byte beyond the QoS


# -- the keepalive timer ----------------------------------------------------------------------
def _step(now: float, rx: float, tx: float, ping: float | None = None, paused: bool = False) -> Any:
    return keepalive_step(
        now, keepalive=10, last_rx=rx, last_sent=tx, ping_sent=ping, paused=paused
    )


def test_keepalive_pings_on_silence_either_way_and_gives_up_after_a_keepalive() -> None:
    assert _step(4.0, rx=0, tx=0) is None
    assert _step(5.0, rx=4, tx=0) == PING  # nothing sent for half a keepalive
    assert _step(5.0, rx=0, tx=4.9) == PING  # nothing heard for half a keepalive
    assert _step(6.0, rx=0, tx=5.0, ping=5.0) is None  # the PINGREQ is out: wait for it
    assert _step(9.9, rx=0, tx=5.0, ping=5.0) is None
    assert _step(10.0, rx=0, tx=5.0, ping=5.0) == DEAD  # a keepalive without a packet
    assert _step(10.0, rx=5.1, tx=9.0, ping=5.0) is None  # anything from the broker counts
    assert _step(11.0, rx=0, tx=9, ping=5.0, paused=True) is None  # paused: our silence
    assert _step(15.0, rx=0, tx=9, ping=5.0, paused=True) == PING  # the broker's deadline
    assert (
        keepalive_step(1e9, keepalive=0, last_rx=0, last_sent=0, ping_sent=None, paused=False)
        is None
    )


# -- the writer: a retained status ------------------------------------------------------------
@dataclass
class _Source:
    retain: bool


def _status(state: str, *, retain: bool, at: datetime, fw: str | None = None) -> Decoded:
    item = Decoded(_Source(retain), "fl/acme/dev-1/status", b"{}", at, "acme", "dev-1")
    item.status = Status.model_validate({"state": state, **({"fw": fw} if fw else {})})
    return item


def test_a_retained_status_never_moves_last_seen() -> None:
    states = _device_states([_status("online", retain=True, at=NOW, fw="2.0")])
    state = states["dev-1"]
    assert state.seen is None  # last_seen stays as stored
    assert state.status is None  # a retained `online` is not presence
    assert state.fw == "2.0"  # what it says about the device is still recorded

    offline = _device_states([_status("offline", retain=True, at=NOW)])["dev-1"]
    assert (offline.seen, offline.status, offline.by_status) == (None, "offline", True)

    live = _device_states([_status("online", retain=False, at=NOW)])["dev-1"]
    assert (live.seen, live.status) == (NOW, "online")


# -- the client against a scripted broker -----------------------------------------------------
@dataclass
class Script:
    """What the scripted broker answers, connection by connection, and what it saw."""

    answer: Callable[[int, int], bytes | None]  # (connection index, protocol level) -> CONNACK
    pingresp: bool = True
    levels: list[int] = field(default_factory=list)
    packets: list[list[int]] = field(default_factory=list)  # packet types per connection


async def _serve(script: Script) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(script.packets)
        seen: list[int] = []
        script.packets.append(seen)
        try:
            while True:
                first, body = await read_packet(reader)
                kind = first >> 4
                seen.append(kind)
                if kind == 1:
                    level = body[6]
                    script.levels.append(level)
                    connack = script.answer(index, level)
                    if connack is not None:
                        writer.write(connack)
                elif kind == 8:
                    packet_id = body[:2]
                    props = b"\x00" if script.levels[-1] == MQTT5 else b""
                    writer.write(b"\x90" + bytes((3 + len(props),)) + packet_id + props + b"\x01")
                elif kind == 12 and script.pingresp:
                    writer.write(b"\xd0\x00")
                elif kind == 14:
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _v5_connack(present: bool, *props: bytes) -> bytes:
    body = bytes((int(present), 0)) + _props(*props)
    return b"\x20" + wire.varint(len(body)) + body


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def _drop(receiver: LeanReceiver) -> None:
    """The connection breaks under the worker (as a network failure would)."""
    assert receiver.current is not None
    assert receiver.current.transport is not None
    receiver.current.transport.abort()


async def _with_receiver(
    script: Script, body: Callable[[LeanReceiver], Awaitable[None]], **target: Any
) -> None:
    server, port = await _serve(script)
    receiver = LeanReceiver(
        BrokerTarget("127.0.0.1", port, None, "ingest-1", ("fl/+/+/status",), **target),
        IngestMetrics(),
    )
    running = asyncio.create_task(receiver.run(lambda *_a: None))
    try:
        await body(receiver)
    finally:
        await receiver.stop()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        server.close()
        await server.wait_closed()


async def test_auto_falls_back_per_attempt_and_only_on_a_refusal() -> None:
    """Connection 0: a 3.1.1 broker refuses MQTT 5 -> 3.1.1 in the same attempt. The next
    attempt starts from MQTT 5 again. A CONNACK that never comes is not a refusal."""

    def answer(index: int, level: int) -> bytes | None:
        if index == 0:
            return wire.connack(False, 0x01)  # "unacceptable protocol version"
        if index == 1:
            return wire.connack(False, 0)  # 3.1.1, accepted
        if index == 2:
            return None  # a broker too slow to answer
        return _v5_connack(False)

    script = Script(answer)

    async def body(receiver: LeanReceiver) -> None:
        await _until(lambda: receiver.version == MQTT311, 5, "the 3.1.1 session")
        _drop(receiver)
        await _until(lambda: receiver.version == MQTT5, 10, "an MQTT 5 session")

    await _with_receiver(script, body, connect_timeout=0.3)
    # 5 (refused), 3.1.1, then 5 (no CONNACK: timed out, no fallback), then 5 again
    assert script.levels == [MQTT5, MQTT311, MQTT5, MQTT5]


async def test_a_resumed_session_is_not_subscribed_again() -> None:
    presents = {0: False, 1: True, 2: False}

    def answer(index: int, _level: int) -> bytes:
        return _v5_connack(presents.get(index, True))

    script = Script(answer)

    def connects(receiver: LeanReceiver) -> float:
        value = receiver.metrics.registry.get_sample_value("fieldline_ingest_broker_connects_total")
        return value or 0.0

    async def body(receiver: LeanReceiver) -> None:
        for n in (1, 2, 3):
            # counted once the session is ready: after the SUBACK, if it subscribed
            await _until(partial(lambda n: connects(receiver) == n, n), 5, f"session {n}")
            if n < 3:
                _drop(receiver)

    await _with_receiver(script, body)
    subscribes = [packets.count(8) for packets in script.packets[:3]]
    # new session: SUBSCRIBE; resumed: none; a session the broker lost: SUBSCRIBE again
    assert subscribes == [1, 0, 1]


async def _subscriber(script: Script, keepalive: int) -> tuple[asyncio.Server, Subscriber, Any]:
    server, port = await _serve(script)
    loop = asyncio.get_running_loop()
    _t, subscriber = await loop.create_connection(
        lambda: Subscriber(lambda _d: None), "127.0.0.1", port
    )
    connack = await subscriber.handshake("ingest-1", keepalive=keepalive, timeout=2)
    return server, subscriber, connack


async def test_server_keep_alive_and_maximum_packet_size_are_honoured() -> None:
    script = Script(lambda _i, _l: _v5_connack(False, _u16(0x13, 1), _u32(0x27, 20)))
    server, subscriber, connack = await _subscriber(script, keepalive=60)
    try:
        assert (connack.server_keepalive, subscriber.keepalive) == (1, 1)
        assert subscriber.maximum_packet_size == 20
        with pytest.raises(PacketTooLargeError, match="Maximum Packet Size"):
            await subscriber.subscribe(["fl/+/+/telemetry", "fl/+/+/status"])
        assert 8 not in script.packets[0]  # refused before it was sent
        # the broker's 1 s keepalive, not our 60: pings within a second of silence
        await _until(lambda: 12 in script.packets[0], 2, "a PINGREQ")
    finally:
        await subscriber.close()
        server.close()
        await server.wait_closed()


async def test_a_maximum_packet_size_below_a_puback_is_refused() -> None:
    script = Script(lambda _i, _l: _v5_connack(False, _u32(0x27, 3)))
    server, port = await _serve(script)
    loop = asyncio.get_running_loop()
    _t, subscriber = await loop.create_connection(
        lambda: Subscriber(lambda _d: None), "127.0.0.1", port
    )
    try:
        with pytest.raises(MqttError, match="smaller than a PUBACK"):
            await subscriber.handshake("ingest-1", timeout=2)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_broker_that_stops_answering_is_given_up_within_a_keepalive() -> None:
    script = Script(lambda _i, _l: _v5_connack(False), pingresp=False)
    server, subscriber, _connack = await _subscriber(script, keepalive=1)
    try:
        started = time.monotonic()
        reason = await asyncio.wait_for(subscriber.closed, 3)
        assert isinstance(reason, LivenessError)
        assert 12 in script.packets[0]  # it asked before giving up
        assert time.monotonic() - started < 1.5
    finally:
        server.close()
        await server.wait_closed()


async def test_a_broker_that_answers_pings_keeps_the_connection() -> None:
    script = Script(lambda _i, _l: _v5_connack(False))
    server, subscriber, _connack = await _subscriber(script, keepalive=1)
    try:
        await _until(lambda: script.packets[0].count(12) >= 4, 5, "four PINGREQs")
        assert not subscriber.closed.done()
    finally:
        await subscriber.close()
        server.close()
        await server.wait_closed()
