"""A lean asyncio MQTT 3.1.1 client for load: many TLS connections, counting, few allocations.

paho runs a thread per client and cannot hold thousands of connections in one process; this
speaks only what the benchmarks need (CONNECT, SUBSCRIBE, PUBLISH QoS 0/1, PUBACK, PINGREQ).
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from pathlib import Path

from schemas import packets

_U16 = struct.Struct("!H")


def client_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def connect_packet(client_id: str, keepalive: int, clean: bool = True) -> bytes:
    return packets.connect_v311(client_id, keepalive, clean)


def subscribe_packet(packet_id: int, topic_filter: str, qos: int) -> bytes:
    return packets.subscribe_v311(packet_id, topic_filter, qos)


class MqttLoadProtocol(asyncio.Protocol):
    """Counts PUBLISHes received (acknowledging QoS 1 in one write per read) and PUBACKs."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.suback: asyncio.Future[bytes] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.received = 0
        self.acked = 0
        self._buffer = bytearray()
        self._paused = False
        self._resumed: asyncio.Event = asyncio.Event()
        self._resumed.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed before CONNACK"))
        if self.suback is not None and not self.suback.done():
            self.suback.set_exception(ConnectionError("closed before SUBACK"))
        self._resumed.set()

    def pause_writing(self) -> None:
        self._resumed.clear()

    def resume_writing(self) -> None:
        self._resumed.set()

    async def drain(self) -> None:
        await self._resumed.wait()

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        pos, n = 0, len(buf)
        acks = bytearray()
        while n - pos >= 2:
            first = buf[pos]
            length, shift, i = 0, 0, pos + 1
            while True:
                if i >= n:
                    length = -1
                    break
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                i += 1
                if not byte & 0x80:
                    break
                shift += 7
            if length < 0 or i + length > n:
                break
            kind = first >> 4
            if kind == 3:
                self.received += 1
                if first & 0x06:  # QoS 1: acknowledge
                    tlen = (buf[i] << 8) | buf[i + 1]
                    pid = buf[i + 2 + tlen : i + 4 + tlen]
                    acks += b"\x40\x02" + pid
            elif kind == 4:
                self.acked += 1
            elif kind == 2 and not self.connack.done():
                self.connack.set_result(buf[i + 1])
            elif kind == 9 and self.suback is not None and not self.suback.done():
                self.suback.set_result(bytes(buf[i + 2 : i + length]))
            pos = i + length
        del buf[:pos]
        if acks and self.transport is not None:
            self.transport.write(bytes(acks))


async def open_client(
    host: str,
    port: int,
    context: ssl.SSLContext,
    client_id: str,
    *,
    keepalive: int = 60,
    subscribe: tuple[str, int] | None = None,
    timeout: float = 30.0,
    clean: bool = True,
) -> MqttLoadProtocol:
    """TLS, CONNECT (and SUBSCRIBE); raises ConnectionError when refused."""
    loop = asyncio.get_running_loop()
    _transport, protocol = await asyncio.wait_for(
        loop.create_connection(
            MqttLoadProtocol, host, port, ssl=context, server_hostname="localhost"
        ),
        timeout,
    )
    assert protocol.transport is not None
    protocol.transport.write(connect_packet(client_id, keepalive, clean))
    rc = await asyncio.wait_for(protocol.connack, timeout)
    if rc != 0:
        protocol.transport.close()
        raise ConnectionError(f"{client_id}: CONNACK {rc}")
    if subscribe is not None:
        protocol.suback = loop.create_future()
        protocol.transport.write(subscribe_packet(1, *subscribe))
        codes = await asyncio.wait_for(protocol.suback, timeout)
        if any(c == 0x80 for c in codes):
            raise ConnectionError(f"{client_id}: SUBSCRIBE {subscribe[0]} refused")
    return protocol
