"""A small blocking MQTT 3.1.1 client over TLS that sends exactly what a test tells it to.

paho acknowledges, pings and reconnects by itself; the attack suite also needs a client that
does none of that: one that holds PUBACKs, goes silent, drops the socket mid-flight, or sends
an MQTT 5 CONNECT. Packets read back keep their flags (QoS, retain, DUP) for the assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from broker import wire
from certs import Bundle
from schemas.packets import string


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int


def tls_context(ca: Path, bundle: Bundle | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if bundle is not None:
        context.load_cert_chain(str(bundle.cert), str(bundle.key))
    return context


def connect_packet(
    client_id: str,
    *,
    clean: bool = True,
    keepalive: int = 60,
    will: tuple[str, bytes, int, bool] | None = None,
    level: int = 4,
) -> bytes:
    """A CONNECT; level 5 gives MQTT 5's layout (an empty property block after the keepalive)."""
    flags = 0x02 if clean else 0
    payload = string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        if level == 5:
            payload += b"\x00"  # will properties
        payload += string(topic) + string(message)
    body = string("MQTT") + bytes((level, flags)) + struct.pack("!H", keepalive)
    if level == 5:
        body += b"\x00"  # connect properties
    body += payload
    return bytes((wire.CONNECT,)) + wire.varint(len(body)) + body


class RawClient:
    """One TLS connection; every method is one packet, nothing happens behind the test's back."""

    def __init__(
        self, host: str, port: int, ca: Path, bundle: Bundle | None, timeout: float = 5.0
    ) -> None:
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock = tls_context(ca, bundle).wrap_socket(raw, server_hostname="localhost")
        self.sock.settimeout(timeout)
        self._buffer = b""
        self._next_id = 0
        self.pending: list[Publish] = []  # PUBLISHes read while waiting for something else

    # -- bytes ------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read_exact(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def read_packet(self, timeout: float | None = None) -> tuple[int, bytes]:
        """(first byte, body) of the next packet; socket.timeout if none comes in time."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        first = self._read_exact(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._read_exact(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first, self._read_exact(length)

    def closed_by_broker(self, timeout: float) -> bool:
        """True if the broker closes the connection within timeout (packets read meanwhile)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.read_packet(max(0.05, deadline - time.monotonic()))
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            return not isinstance(exc, TimeoutError)
        return False

    # -- packets ----------------------------------------------------------------------------
    def connect(self, client_id: str, **kwargs: object) -> tuple[bool, int]:
        """Send CONNECT, return (session present, return code) from the CONNACK."""
        self.send(connect_packet(client_id, **kwargs))  # type: ignore[arg-type]
        first, body = self.read_packet()
        assert first == wire.CONNACK, f"expected CONNACK, got packet type {first >> 4}"
        return bool(body[0] & 1), body[1]

    def subscribe(self, *filters: tuple[str, int]) -> list[int]:
        """SUBSCRIBE, return the SUBACK codes (0x80 = refused)."""
        packet_id = self._id()
        body = struct.pack("!H", packet_id) + b"".join(string(f) + bytes((q,)) for f, q in filters)
        self.send(bytes((0x82,)) + wire.varint(len(body)) + body)
        while True:
            first, reply = self.read_packet()
            if first >> 4 == 9:
                assert struct.unpack("!H", reply[:2])[0] == packet_id
                return list(reply[2:])
            self.pending.append(self._decode_publish(first, reply))

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """PUBLISH; for QoS 1 wait for the PUBACK (a broker that drops it still acknowledges)."""
        packet_id = self._id() if qos else 0
        self.send(wire.publish(topic.encode(), payload, qos, retain, packet_id=packet_id))
        while qos == 1:
            first, reply = self.read_packet()
            if first >> 4 == 4 and struct.unpack("!H", reply)[0] == packet_id:
                return
            self.pending.append(self._decode_publish(first, reply))

    def next_publish(self, timeout: float) -> Publish | None:
        """The next PUBLISH from the broker, or None if none arrives in time (not acknowledged)."""
        if self.pending:
            return self.pending.pop(0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                first, body = self.read_packet(max(0.05, deadline - time.monotonic()))
            except (TimeoutError, ConnectionError, ssl.SSLError):
                return None  # nothing (more) arrived: the broker was silent or hung up
            if first >> 4 == 3:
                return self._decode_publish(first, body)
        return None

    def publishes(self, timeout: float) -> list[Publish]:
        """Every PUBLISH that arrives within timeout."""
        got: list[Publish] = []
        while (message := self.next_publish(timeout)) is not None:
            got.append(message)
        return got

    def puback(self, packet_id: int) -> None:
        self.send(b"\x40\x02" + struct.pack("!H", packet_id))

    def disconnect(self) -> None:
        self.send(b"\xe0\x00")
        self.close()

    def close(self) -> None:
        """Drop the connection without DISCONNECT (what a crashing device does)."""
        with contextlib.suppress(OSError):
            self.sock.close()

    def _id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    @staticmethod
    def _decode_publish(first: int, body: bytes) -> Publish:
        if first >> 4 != 3:
            raise AssertionError(f"expected PUBLISH, got packet type {first >> 4}")
        qos = (first >> 1) & 3
        n = struct.unpack("!H", body[:2])[0]
        topic = body[2 : 2 + n].decode()
        rest = body[2 + n :]
        packet_id = 0
        if qos:
            packet_id = struct.unpack("!H", rest[:2])[0]
            rest = rest[2:]
        return Publish(topic, rest, qos, bool(first & 1), bool(first & 8), packet_id)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(first byte, body) of the next MQTT packet, for scripted brokers in tests."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)
