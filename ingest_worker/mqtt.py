"""A lean asyncio MQTT subscriber for the ingest worker: MQTT 5 or 3.1.1, manual acknowledgements.

The worker's receive path (paho stays for devices and tools): packets are parsed in an
`asyncio.Protocol`, PUBACKs are written only when the worker says so and leave in one write
per event-loop turn. Measured against paho in `benchmarks/ingest.py`.

One `Subscriber` is one connection; the worker makes a new one to reconnect. Packet ids
belong to a connection, so a `Delivery` remembers its connection and is acknowledged only
on it: a message that arrived before a reconnect is redelivered by the broker instead.

Liveness: the broker must be heard at least once per keepalive. After half a keepalive without
a packet either way a PINGREQ goes out; a connection silent for a whole keepalive is dead and
is aborted (`closed` resolves with `LivenessError`), so a half-open connection is noticed in
one keepalive instead of when the kernel gives up on it (15+ minutes).
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from schemas.packets import string, varint

MQTT5: Literal[5] = 5
MQTT311: Literal[4] = 4
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")

# MQTT 5 property identifiers we write or read
SESSION_EXPIRY = 0x11
SERVER_KEEP_ALIVE = 0x13
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
MAXIMUM_PACKET_SIZE = 0x27
USER_PROPERTY = 0x26

# the value type of every MQTT 5 property (section 2.2.2.2), so a list can be walked
_BYTE, _TWO, _FOUR, _VARINT, _TEXT, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    0x01: _BYTE, 0x02: _FOUR, 0x03: _TEXT, 0x08: _TEXT, 0x09: _BINARY, 0x0B: _VARINT,
    0x11: _FOUR, 0x12: _TEXT, 0x13: _TWO, 0x15: _TEXT, 0x16: _BINARY, 0x17: _BYTE,
    0x18: _FOUR, 0x19: _BYTE, 0x1A: _TEXT, 0x1C: _TEXT, 0x1F: _TEXT, 0x21: _TWO, 0x22: _TWO,
    0x23: _TWO, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _FOUR, 0x28: _BYTE, 0x29: _BYTE,
    0x2A: _BYTE,
}  # fmt: skip

# what the keepalive timer decides (`keepalive_step`)
PING: Literal["ping"] = "ping"
DEAD: Literal["dead"] = "dead"

# the largest packet the worker must be able to send once connected: a PUBACK
_PUBACK_BYTES = 4
# packets delivered per turn of the event loop before the writers get theirs (~10 ms of
# decoding single messages on this project's 2-core benchmark machine) ...
PACKETS_PER_TURN = 128
# ... and bytes: decoding costs by the byte, and 128 backlog messages of 100 samples are
# ~30 ms (~4 ms in 64 KiB); a slice always delivers at least one packet
BYTES_PER_TURN = 64 * 1024


class MqttError(Exception):
    """The broker refused us or broke the protocol; the message says how."""


class ConnectRefusedError(MqttError):
    """A CONNACK with a non-zero return code (3.1.1) or reason code (5)."""

    def __init__(self, code: int, version: int, reason: str | None = None) -> None:
        self.code = code
        self.version = version
        detail = f": {reason}" if reason else ""
        super().__init__(f"CONNACK {code:#04x} (MQTT {'5' if version == 5 else '3.1.1'}){detail}")


class LivenessError(MqttError):
    """Nothing heard from the broker for a whole keepalive: the connection is treated as dead."""


class PacketTooLargeError(MqttError):
    """A packet the worker would send exceeds the broker's Maximum Packet Size."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One PUBLISH received; `ack()` it on its subscriber once it is safe."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int
    received_at: float
    subscriber: Subscriber


@dataclass(frozen=True, slots=True)
class Connack:
    """A CONNACK as the client needs it; the MQTT 5 properties are None when absent (or 3.1.1)."""

    session_present: bool
    code: int = 0
    receive_maximum: int | None = None  # what the broker accepts from us
    server_keepalive: int | None = None  # replaces the keepalive we asked for
    maximum_packet_size: int | None = None  # the largest packet the broker accepts from us
    reason: str | None = None


def connect_packet(
    client_id: str,
    *,
    version: int,
    clean_start: bool,
    keepalive: int,
    session_expiry: int,
    receive_maximum: int,
) -> bytes:
    body = string("MQTT") + bytes((version, 0x02 if clean_start else 0)) + _U16.pack(keepalive)
    if version == MQTT5:
        props = bytes((SESSION_EXPIRY,)) + _U32.pack(session_expiry)
        props += bytes((RECEIVE_MAXIMUM,)) + _U16.pack(receive_maximum)
        body += varint(len(props)) + props
    body += string(client_id)
    return b"\x10" + varint(len(body)) + body


def subscribe_packet(
    packet_id: int, filters: Sequence[str], qos: int, version: int, retain_handling: int = 0
) -> bytes:
    """SUBSCRIBE; under MQTT 5 `retain_handling` goes in each filter's options (3.8.3.1):
    1 sends retained messages only for a subscription that did not exist yet."""
    body = _U16.pack(packet_id) + (b"\x00" if version == MQTT5 else b"")
    options = qos | (retain_handling << 4 if version == MQTT5 else 0)
    for topic_filter in filters:
        body += string(topic_filter) + bytes((options,))
    return b"\x82" + varint(len(body)) + body


def parse_properties(props: bytes) -> dict[int, int | str | bytes]:
    """An MQTT 5 property list: identifier -> value (User Properties are skipped)."""
    out: dict[int, int | str | bytes] = {}
    pos = 0
    while pos < len(props):
        key = props[pos]
        pos += 1
        kind = _PROPERTY_TYPES.get(key)
        value: int | str | bytes
        if kind is None:
            raise MqttError(f"unknown MQTT 5 property {key:#04x}")
        if kind == _BYTE:
            value, pos = props[pos], pos + 1
        elif kind == _TWO:
            value, pos = _U16.unpack_from(props, pos)[0], pos + 2
        elif kind == _FOUR:
            value, pos = _U32.unpack_from(props, pos)[0], pos + 4
        elif kind == _VARINT:
            value, used = _readvarint(props, pos)
            pos += used
        else:
            pairs = 2 if kind == _PAIR else 1
            start = pos
            for _ in range(pairs):
                pos += 2 + _U16.unpack_from(props, pos)[0]
            if pos > len(props):
                raise MqttError(f"MQTT 5 property {key:#04x} runs past the property list")
            if kind == _PAIR:
                continue
            raw = props[start + 2 : pos]
            value = raw.decode("utf-8") if kind == _TEXT else raw
        if pos > len(props):
            raise MqttError(f"MQTT 5 property {key:#04x} runs past the property list")
        out[key] = value
    return out


def decode_connack(body: bytes, version: int) -> Connack:
    """A CONNACK's variable header. A 3.1.1-only broker answers an MQTT 5 CONNECT with a
    3.1.1 CONNACK (two bytes, code 0x01), which this reads as it is."""
    if len(body) < 2:
        raise MqttError(f"a CONNACK of {len(body)} bytes")
    present, code = bool(body[0] & 1), body[1]
    if version != MQTT5 or len(body) == 2:
        return Connack(present, code)
    plen, used = _readvarint(body, 2)
    start = 2 + used
    if start + plen > len(body):
        raise MqttError("the CONNACK's properties run past the packet")
    props = parse_properties(body[start : start + plen])

    def number(key: int) -> int | None:
        value = props.get(key)
        return value if isinstance(value, int) else None

    reason = props.get(REASON_STRING)
    return Connack(
        present,
        code,
        receive_maximum=number(RECEIVE_MAXIMUM),
        server_keepalive=number(SERVER_KEEP_ALIVE),
        maximum_packet_size=number(MAXIMUM_PACKET_SIZE),
        reason=reason if isinstance(reason, str) else None,
    )


def keepalive_step(
    now: float,
    *,
    keepalive: float,
    last_rx: float,
    last_sent: float,
    ping_sent: float | None,
    paused: bool,
) -> Literal["ping", "dead"] | None:
    """What the keepalive timer does now: send a PINGREQ, give the connection up, or nothing.

    Any packet from the broker counts as liveness. While paused we do not read, so silence is
    ours and only the broker's deadline (something sent within 1.5 keepalives) is kept.
    """
    if keepalive <= 0:
        return None
    if not paused and now - last_rx >= keepalive:
        return DEAD
    half = keepalive / 2
    if now - last_sent >= half:
        return PING
    unanswered = ping_sent is not None and ping_sent >= last_rx
    if not paused and not unanswered and now - last_rx >= half:
        return PING
    return None


class Subscriber(asyncio.Protocol):
    """One connection: CONNECT, SUBSCRIBE, then PUBLISHes to `on_message` until it closes."""

    def __init__(self, on_message: Callable[[Delivery], None], version: int = MQTT5) -> None:
        self.on_message = on_message
        self.version = version
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._parse_scheduled = False
        self._yielding = False  # reading paused by _parse, not by the pipeline
        self._disconnected = False  # DISCONNECT written: nothing more is sent or delivered
        self._connack: asyncio.Future[Connack] = self._loop.create_future()
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._acks: list[bytes] = []
        self._flush_scheduled = False
        self._last_sent = time.monotonic()
        self._ping_sent: float | None = None
        self._pinger: asyncio.Task[None] | None = None
        self.received = 0
        self.last_rx = time.monotonic()
        self.paused = False
        # what the CONNACK settled: the keepalive in force and the broker's packet size limit
        self.keepalive = 0
        self.maximum_packet_size: int | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        self._fail_waiters(exc or ConnectionError("the broker closed the connection"))
        if not self.closed.done():
            self.closed.set_result(exc)

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        self._buffer += data
        if not self._parse_scheduled:
            self._parse()

    def _parse(self) -> None:
        """Deliver the buffer's complete packets, at most PACKETS_PER_TURN of them or
        BYTES_PER_TURN per turn of the event loop: a 256 KiB read of a backlog holds ~1,000
        messages, 70-100 ms of decoding, during which no writer's statement could be sent or
        its result taken (docs/benchmarks.md). Reading pauses until the buffer is through."""
        self._parse_scheduled = False
        if self.closed.done() or self._disconnected:
            self._buffer.clear()  # not acknowledged: the broker sends them again
            return
        buf = self._buffer
        pos, n = 0, len(buf)
        budget = PACKETS_PER_TURN
        stop_at = pos + BYTES_PER_TURN  # the slice ends at the first packet past this
        try:
            while n - pos >= 2:
                if not budget or pos >= stop_at:
                    self._parse_scheduled = True
                    self._loop.call_soon(self._parse)
                    if self.transport is not None and not self._yielding:
                        self._yielding = True
                        self.transport.pause_reading()
                    break
                budget -= 1
                length, shift, i = 0, 0, pos + 1
                while True:
                    if i >= n:
                        length = -1
                        break
                    byte = buf[i]
                    i += 1
                    length |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise MqttError("malformed remaining length")
                if length < 0 or i + length > n:
                    break
                self._packet(buf[pos], bytes(buf[i : i + length]))
                pos = i + length
        except (MqttError, IndexError, UnicodeDecodeError, struct.error) as exc:
            self._fail(exc)
        del buf[:pos]
        if self._yielding and not self._parse_scheduled:
            self._yielding = False
            if self.transport is not None and not self.paused and not self.transport.is_closing():
                self.transport.resume_reading()

    def _fail_waiters(self, error: BaseException) -> None:
        if not self._connack.done():
            self._connack.set_exception(error)
        for waiter in self._subacks.values():
            if not waiter.done():
                waiter.set_exception(error)

    def _fail(self, exc: BaseException) -> None:
        """Give the connection up: its waiters and `closed` get `exc`, the socket is aborted."""
        self._fail_waiters(exc)
        if not self.closed.done():
            self.closed.set_result(exc)
        if self.transport is not None:
            self.transport.abort()

    def _packet(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 3:
            self._publish(first, body)
        elif kind == 2:
            self._on_connack(body)
        elif kind == 9:
            packet_id = _U16.unpack_from(body)[0]
            codes = body[2:]
            if self.version == MQTT5:
                plen, used = _readvarint(body, 2)
                codes = body[2 + used + plen :]
            waiter = self._subacks.pop(packet_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(list(codes))
        elif kind == 13:  # PINGRESP: data_received already counted it as liveness
            pass
        elif kind == 14:  # DISCONNECT from the broker (MQTT 5)
            code = body[0] if body else 0
            self._fail(MqttError(f"the broker disconnected us, reason {code:#04x}"))
        else:
            raise MqttError(f"unexpected packet type {kind}")

    def _on_connack(self, body: bytes) -> None:
        if self._connack.done():
            raise MqttError("a second CONNACK")
        connack = decode_connack(body, self.version)
        if connack.code != 0:
            self._connack.set_exception(
                ConnectRefusedError(connack.code, self.version, connack.reason)
            )
        elif connack.maximum_packet_size is not None and (
            connack.maximum_packet_size < _PUBACK_BYTES
        ):
            raise MqttError(
                f"the broker's Maximum Packet Size ({connack.maximum_packet_size} bytes) is "
                f"smaller than a PUBACK ({_PUBACK_BYTES} bytes): the worker cannot acknowledge"
            )
        else:
            self.maximum_packet_size = connack.maximum_packet_size
            self._connack.set_result(connack)

    def _publish(self, first: int, body: bytes) -> None:
        qos = (first >> 1) & 0x03
        size = (body[0] << 8) | body[1]
        pos = 2 + size
        topic = body[2:pos].decode("utf-8")
        packet_id = 0
        if qos:
            packet_id = (body[pos] << 8) | body[pos + 1]
            pos += 2
        if self.version == MQTT5:
            plen, used = _readvarint(body, pos)
            pos += used + plen
        self.received += 1
        self.on_message(
            Delivery(
                topic, body[pos:], qos, bool(first & 1), bool(first & 8), packet_id,
                time.time(), self,
            )
        )  # fmt: skip

    # -- the worker's side ------------------------------------------------------------------
    async def handshake(
        self,
        client_id: str,
        *,
        clean_start: bool = False,
        keepalive: int = 30,
        session_expiry: int = 7 * 24 * 3600,
        receive_maximum: int = 1000,
        timeout: float = 10.0,
    ) -> Connack:
        """Send CONNECT and wait for the CONNACK; ConnectRefusedError if the broker says no.

        The broker's Server Keep Alive replaces `keepalive` (a 0 from it: we still probe on
        ours, PINGREQ being allowed at any time); its Maximum Packet Size bounds what we send.
        """
        self._write(
            connect_packet(
                client_id, version=self.version, clean_start=clean_start, keepalive=keepalive,
                session_expiry=session_expiry, receive_maximum=receive_maximum,
            )
        )  # fmt: skip
        connack = await asyncio.wait_for(asyncio.shield(self._connack), timeout)
        self.keepalive = connack.server_keepalive or keepalive
        if self.keepalive:
            self.last_rx = time.monotonic()
            self._pinger = self._loop.create_task(self._ping())
        return connack

    async def subscribe(
        self,
        filters: Sequence[str],
        qos: int = 1,
        timeout: float = 10.0,
        *,
        retain_handling: int = 0,
    ) -> list[int]:
        """SUBSCRIBE to all filters in one packet; the granted QoS (>= 0x80: refused) of each.

        A resumed session's queued PUBLISHes may come first, and reading pauses while the
        pipeline is full, so only `timeout` seconds of silence on a reading connection fail.
        PacketTooLargeError if the packet exceeds the broker's Maximum Packet Size.
        """
        packet_id = len(self._subacks) + 1
        packet = subscribe_packet(packet_id, filters, qos, self.version, retain_handling)
        if self.maximum_packet_size is not None and len(packet) > self.maximum_packet_size:
            raise PacketTooLargeError(
                f"the SUBSCRIBE for {len(filters)} filters is {len(packet)} bytes, over the "
                f"broker's Maximum Packet Size ({self.maximum_packet_size} bytes)"
            )
        waiter: asyncio.Future[list[int]] = self._loop.create_future()
        self._subacks[packet_id] = waiter
        self._write(packet)
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except TimeoutError:
                if self.paused or time.monotonic() - self.last_rx < timeout:
                    continue
                raise

    def ack(self, delivery: Delivery) -> bool:
        """PUBACK a QoS 1 delivery (written with this turn's other acks); False if the
        delivery came on an earlier connection (the broker sends it again)."""
        if delivery.subscriber is not self or delivery.qos != 1:
            return False
        self._acks.append(b"\x40\x02" + _U16.pack(delivery.packet_id))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_acks)
        return True

    def _flush_acks(self) -> None:
        self._flush_scheduled = False
        if self._acks:
            data = b"".join(self._acks)
            self._acks.clear()
            self._write(data)

    def pause(self) -> None:
        """Stop reading: the broker's window fills and it stops sending (backpressure)."""
        self.paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        self.paused = False
        self.last_rx = time.monotonic()  # silence while paused was ours, not the broker's
        if self.transport is not None and not self.transport.is_closing() and not self._yielding:
            self.transport.resume_reading()

    async def close(self, timeout: float = 5.0) -> None:
        """Flush pending acks, send DISCONNECT (the session stays: clean_start was False), and
        let the broker close first, so the acks are read before the connection ends.

        Closing our end first loses them whenever the broker is still sending: a socket closed
        with unread bytes (reading was paused, the rest of a backlog is arriving) is reset by
        the kernel, and the reset discards what the broker had not yet read, acks included, so
        the broker sent everything again (test_ingest_close.py). The broker closes once it has
        read the DISCONNECT, after every ack before it; what it sends meanwhile is read and
        dropped (not acknowledged: it comes again). Past `timeout` we close anyway.
        """
        if self.transport is None or self.transport.is_closing():
            return
        self._flush_acks()
        self._write(b"\xe0\x00")
        self._disconnected = True
        self._buffer.clear()
        self._yielding = False
        self.transport.resume_reading()  # to see the broker's close behind its last sends
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
            return
        except TimeoutError:
            self.transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            self.transport.abort()

    def _write(self, data: bytes) -> None:
        if self._disconnected:
            return  # nothing may follow a DISCONNECT (MQTT 3.14.4)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self._last_sent = time.monotonic()

    async def _ping(self) -> None:
        keepalive = self.keepalive
        tick = max(0.05, min(1.0, keepalive / 8))
        while not self.closed.done():
            await asyncio.sleep(tick)
            now = time.monotonic()
            step = keepalive_step(
                now, keepalive=keepalive, last_rx=self.last_rx, last_sent=self._last_sent,
                ping_sent=self._ping_sent, paused=self.paused,
            )  # fmt: skip
            if step == DEAD:
                self._fail(
                    LivenessError(
                        f"nothing from the broker for {now - self.last_rx:.1f} s "
                        f"(keepalive {keepalive} s, PINGREQ unanswered)"
                    )
                )
                return
            if step == PING:
                self._write(b"\xc0\x00")
                self._ping_sent = now


def _readvarint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift, used = 0, 0, 0
    while True:
        byte = data[pos + used]
        used += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, used
        shift += 7
        if shift > 21:
            raise MqttError("malformed variable byte integer")


async def open_subscriber(
    host: str,
    port: int,
    context: ssl.SSLContext | None,
    on_message: Callable[[Delivery], None],
    *,
    version: int = MQTT5,
    server_hostname: str | None = None,
    timeout: float = 10.0,
) -> Subscriber:
    """A TLS connection (plain TCP without a context) with a Subscriber on it (CONNECT not
    sent yet)."""
    loop = asyncio.get_running_loop()
    _transport, protocol = await asyncio.wait_for(
        loop.create_connection(
            lambda: Subscriber(on_message, version), host, port, ssl=context,
            server_hostname=(server_hostname or host) if context is not None else None,
        ),
        timeout,
    )  # fmt: skip
    return protocol
