"""A lean asyncio MQTT subscriber for the ingest worker: MQTT 5 or 3.1.1, manual acknowledgements.

The worker's receive path (paho stays for devices and tools): packets are parsed in an
`asyncio.Protocol`, PUBACKs are written only when the worker says so and leave in one write
per event-loop turn. Measured against paho in `benchmarks/ingest.py`.

One `Subscriber` is one connection; the worker makes a new one to reconnect. Packet ids
belong to a connection, so a `Delivery` remembers its connection and is acknowledged only
on it: a message that arrived before a reconnect is redelivered by the broker instead.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

MQTT5: Literal[5] = 5
MQTT311: Literal[4] = 4
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")

# MQTT 5 property identifiers we write or read
_SESSION_EXPIRY = 0x11
_RECEIVE_MAXIMUM = 0x21
_REASON_STRING = 0x1F


class MqttError(Exception):
    """The broker refused us or broke the protocol; `reason` says how."""


class ConnectRefusedError(MqttError):
    def __init__(self, code: int, version: int) -> None:
        self.code = code
        self.version = version
        super().__init__(f"CONNACK {code:#04x} (MQTT {'5' if version == 5 else '3.1.1'})")


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
    session_present: bool
    receive_maximum: int | None  # what the broker accepts from us (MQTT 5 only)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _U16.pack(len(raw)) + raw


def connect_packet(
    client_id: str,
    *,
    version: int,
    clean_start: bool,
    keepalive: int,
    session_expiry: int,
    receive_maximum: int,
) -> bytes:
    body = _string("MQTT") + bytes((version, 0x02 if clean_start else 0)) + _U16.pack(keepalive)
    if version == MQTT5:
        props = bytes((_SESSION_EXPIRY,)) + _U32.pack(session_expiry)
        props += bytes((_RECEIVE_MAXIMUM,)) + _U16.pack(receive_maximum)
        body += _varint(len(props)) + props
    body += _string(client_id)
    return b"\x10" + _varint(len(body)) + body


def subscribe_packet(packet_id: int, filters: Sequence[str], qos: int, version: int) -> bytes:
    body = _U16.pack(packet_id) + (b"\x00" if version == MQTT5 else b"")
    for topic_filter in filters:
        body += _string(topic_filter) + bytes((qos,))
    return b"\x82" + _varint(len(body)) + body


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
        self._connack: asyncio.Future[Connack] = self._loop.create_future()
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._acks: list[bytes] = []
        self._flush_scheduled = False
        self._last_sent = time.monotonic()
        self._pinger: asyncio.Task[None] | None = None
        self.received = 0
        self.last_rx = time.monotonic()
        self.paused = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        error = exc or ConnectionError("the broker closed the connection")
        if not self._connack.done():
            self._connack.set_exception(error)
        for waiter in self._subacks.values():
            if not waiter.done():
                waiter.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(exc)

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        buf = self._buffer
        buf += data
        pos, n = 0, len(buf)
        try:
            while n - pos >= 2:
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

    def _fail(self, exc: BaseException) -> None:
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
                plen, used = _read_varint(body, 2)
                codes = body[2 + used + plen :]
            waiter = self._subacks.pop(packet_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(list(codes))
        elif kind == 13:  # PINGRESP
            pass
        elif kind == 14:  # DISCONNECT from the broker (MQTT 5)
            code = body[0] if body else 0
            self._fail(MqttError(f"the broker disconnected us, reason {code:#04x}"))
        else:
            raise MqttError(f"unexpected packet type {kind}")

    def _on_connack(self, body: bytes) -> None:
        if self._connack.done():
            raise MqttError("a second CONNACK")
        present, code = bool(body[0] & 1), body[1]
        receive_maximum = None
        if self.version == MQTT5 and len(body) > 2:
            plen, used = _read_varint(body, 2)
            props = body[2 + used : 2 + used + plen]
            receive_maximum = _find_u16(props, _RECEIVE_MAXIMUM)
        if code != 0:
            self._connack.set_exception(ConnectRefusedError(code, self.version))
        else:
            self._connack.set_result(Connack(present, receive_maximum))

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
            plen, used = _read_varint(body, pos)
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
        """Send CONNECT and wait for the CONNACK; ConnectRefusedError if the broker says no."""
        self._write(
            connect_packet(
                client_id, version=self.version, clean_start=clean_start, keepalive=keepalive,
                session_expiry=session_expiry, receive_maximum=receive_maximum,
            )
        )  # fmt: skip
        connack = await asyncio.wait_for(asyncio.shield(self._connack), timeout)
        if keepalive:
            self._pinger = self._loop.create_task(self._ping(keepalive))
        return connack

    async def subscribe(
        self, filters: Sequence[str], qos: int = 1, timeout: float = 10.0
    ) -> list[int]:
        """SUBSCRIBE to all filters in one packet; the granted QoS (>= 0x80: refused) of each.

        A resumed session's queued PUBLISHes may come first, and reading pauses while the
        pipeline is full, so only `timeout` seconds of silence on a reading connection fail.
        """
        packet_id = len(self._subacks) + 1
        waiter: asyncio.Future[list[int]] = self._loop.create_future()
        self._subacks[packet_id] = waiter
        self._write(subscribe_packet(packet_id, filters, qos, self.version))
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
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    async def close(self) -> None:
        """Flush pending acks, send DISCONNECT (the session stays: clean_start was False)."""
        if self.transport is None or self.transport.is_closing():
            return
        self._flush_acks()
        self._write(b"\xe0\x00")
        self.transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), 5)
        except TimeoutError:
            self.transport.abort()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self._last_sent = time.monotonic()

    async def _ping(self, keepalive: int) -> None:
        while True:
            await asyncio.sleep(max(1.0, keepalive / 2))
            if time.monotonic() - self._last_sent >= keepalive / 2:
                self._write(b"\xc0\x00")


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
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


def _find_u16(props: bytes, ident: int) -> int | None:
    """A two-byte property's value, walking the property list (MQTT 5, 2.2.2.2)."""
    pos = 0
    sizes = {0x01: 1, 0x02: 4, 0x11: 4, 0x13: 2, 0x17: 1, 0x19: 1, 0x21: 2, 0x22: 2, 0x24: 1,
             0x25: 1, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1}  # fmt: skip
    while pos < len(props):
        key = props[pos]
        pos += 1
        if key == ident:
            return int(_U16.unpack_from(props, pos)[0])
        if key in sizes:
            pos += sizes[key]
        elif key == 0x26:  # user property: two strings
            for _ in range(2):
                pos += 2 + _U16.unpack_from(props, pos)[0]
        elif key == 0x0B:  # subscription identifier: a variable byte integer
            pos += _read_varint(props, pos)[1]
        else:  # the rest are strings or binary data with a two-byte length
            pos += 2 + _U16.unpack_from(props, pos)[0]
    return None


async def open_subscriber(
    host: str,
    port: int,
    context: ssl.SSLContext,
    on_message: Callable[[Delivery], None],
    *,
    version: int = MQTT5,
    server_hostname: str | None = None,
    timeout: float = 10.0,
) -> Subscriber:
    """A TLS connection with a Subscriber on it (CONNECT not sent yet)."""
    loop = asyncio.get_running_loop()
    _transport, protocol = await asyncio.wait_for(
        loop.create_connection(
            lambda: Subscriber(on_message, version), host, port, ssl=context,
            server_hostname=server_hostname or host,
        ),
        timeout,
    )  # fmt: skip
    return protocol
