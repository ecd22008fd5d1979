"""The paho receive path driven on the event loop, against a scripted broker on loopback.

What is checked: messages arrive on the loop's thread; acknowledgements go out only when the
pipeline says so and only on the connection that delivered; a pause stops reading and a
resume reads on; everything TLS has already decrypted is read; the protocol fallback, the
resumed session and paho's keepalive lead to the same behaviour as the lean client.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from broker import wire
from certs import client_context
from ingest_worker.metrics import IngestMetrics
from ingest_worker.mqtt import MQTT5, MQTT311
from ingest_worker.receive import BrokerTarget, PahoDelivery, PahoReceiver
from tests.fixtures.pki import TestPki
from tests.mqtt_raw import read_packet

TOPIC = "fl/acme/dev-1/telemetry"


@dataclass
class Conn:
    """One connection the scripted broker accepted: what came in, and a way to send."""

    writer: asyncio.StreamWriter
    level: int = 0
    kinds: list[int] = field(default_factory=list)
    pubacks: list[int] = field(default_factory=list)


@dataclass
class Script:
    answer: Callable[[int, int], bytes | None]  # (connection index, protocol level) -> CONNACK
    pingresp: bool = True
    conns: list[Conn] = field(default_factory=list)

    def levels(self) -> list[int]:
        return [c.level for c in self.conns]


async def _serve(script: Script, context: ssl.SSLContext | None) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(script.conns)
        conn = Conn(writer)
        script.conns.append(conn)
        try:
            while True:
                first, body = await read_packet(reader)
                kind = first >> 4
                conn.kinds.append(kind)
                if kind == 1:
                    conn.level = body[6]
                    connack = script.answer(index, conn.level)
                    if connack is not None:
                        writer.write(connack)
                elif kind == 4:
                    conn.pubacks.append(struct.unpack("!H", body[:2])[0])
                elif kind == 8:
                    props = b"\x00" if conn.level == MQTT5 else b""
                    writer.write(b"\x90" + bytes((3 + len(props),)) + body[:2] + props + b"\x01")
                elif kind == 12 and script.pingresp:
                    writer.write(b"\xd0\x00")
                elif kind == 14:
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    return server, server.sockets[0].getsockname()[1]


def _v5_connack(present: bool) -> bytes:
    return b"\x20\x03" + bytes((int(present), 0, 0))


def _publish(level: int, packet_id: int, payload: bytes) -> bytes:
    topic = TOPIC.encode()
    body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", packet_id)
    body += (b"\x00" if level == MQTT5 else b"") + payload
    return b"\x32" + wire.varint(len(body)) + body


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Got:
    sources: list[PahoDelivery] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    threads: set[int] = field(default_factory=set)

    def __call__(self, source: Any, _topic: str, payload: bytes, _at: float) -> None:
        self.sources.append(source)
        self.payloads.append(payload)
        self.threads.add(threading.get_ident())


async def _with_receiver(
    script: Script,
    body: Callable[[PahoReceiver, Got], Awaitable[None]],
    server_context: ssl.SSLContext | None = None,
    client_ctx: ssl.SSLContext | None = None,
    **target: Any,
) -> None:
    server, port = await _serve(script, server_context)
    receiver = PahoReceiver(
        BrokerTarget("127.0.0.1", port, client_ctx, "ingest-1", (TOPIC,), **target),
        IngestMetrics(),
    )
    got = Got()
    running = asyncio.create_task(receiver.run(got))
    try:
        await body(receiver, got)
    finally:
        await receiver.stop()
        await asyncio.wait_for(running, 5)
        server.close()
        await server.wait_closed()


async def test_acks_only_when_told_on_the_delivering_connection_and_pause_stops_reading() -> None:
    presents = {0: False}
    script = Script(lambda i, _l: _v5_connack(presents.get(i, True)))

    async def body(receiver: PahoReceiver, got: Got) -> None:
        await asyncio.wait_for(receiver.ready.wait(), 5)
        first = script.conns[0]
        first.writer.write(b"".join(_publish(MQTT5, n, b"m%d" % n) for n in (1, 2, 3)))
        await _until(lambda: len(got.payloads) == 3, 3, "three messages")
        assert got.threads == {threading.get_ident()}  # on the loop's thread: no paho thread
        receiver.ack(got.sources[1])
        await _until(lambda: first.pubacks == [2], 3, "the PUBACK of message 2")

        receiver.pause()
        first.writer.write(_publish(MQTT5, 4, b"m4"))
        receiver.ack(got.sources[2])  # writes go on while reading is paused
        await _until(lambda: first.pubacks == [2, 3], 3, "the PUBACK of message 3")
        await asyncio.sleep(0.2)  # message 4 has long reached the socket
        assert len(got.payloads) == 3
        receiver.resume()
        await _until(lambda: got.payloads[-1:] == [b"m4"], 3, "message 4 after the resume")

        first.writer.close()  # the connection breaks: a new one, the session resumed
        await _until(lambda: len(script.conns) == 2 and receiver.current is not None, 5, "conn 2")
        await _until(lambda: receiver.version == MQTT5 and len(got.payloads) == 4, 3, "ready")
        second = script.conns[1]
        receiver.ack(got.sources[0])  # delivered on the old connection: not acked on this one
        second.writer.write(_publish(MQTT5, 7, b"m7"))
        await _until(lambda: len(got.payloads) == 5, 3, "message 7")
        receiver.ack(got.sources[4])
        # in order: an ack of message 1 would have come first
        await _until(lambda: 7 in second.pubacks, 3, "the PUBACK of message 7")
        assert second.pubacks == [7]
        assert isinstance(got.sources[4], PahoDelivery)
        assert not got.sources[4].retain

    await _with_receiver(script, body, protocol="5")
    subscribes = [c.kinds.count(8) for c in script.conns[:2]]
    assert subscribes == [1, 0]  # the resumed session already holds the subscription
    assert script.conns[1].kinds[-1] == 14  # stop() said DISCONNECT


async def test_auto_falls_back_per_attempt_and_only_on_a_refusal() -> None:
    def answer(index: int, _level: int) -> bytes | None:
        if index == 0:
            return wire.connack(False, 0x01)  # a 3.1.1 broker: "unacceptable protocol version"
        if index == 1:
            return wire.connack(False, 0)
        if index == 2:
            return None  # too slow: not a refusal
        return _v5_connack(False)

    script = Script(answer)

    async def body(receiver: PahoReceiver, _got: Got) -> None:
        await _until(lambda: receiver.version == MQTT311, 5, "the 3.1.1 session")
        script.conns[1].writer.close()
        await _until(lambda: receiver.version == MQTT5, 10, "an MQTT 5 session")

    await _with_receiver(script, body, connect_timeout=0.3)
    # 5 refused, 3.1.1; then 5 (no CONNACK: timed out, no fallback), then 5 again
    assert script.levels() == [MQTT5, MQTT311, MQTT5, MQTT5]


async def test_a_broker_that_stops_answering_is_left_and_reconnected() -> None:
    script = Script(lambda _i, _l: _v5_connack(False), pingresp=False)

    async def body(receiver: PahoReceiver, _got: Got) -> None:
        await asyncio.wait_for(receiver.ready.wait(), 5)
        # paho's keepalive, driven by loop_misc on the loop: a PINGREQ after 1 s of silence,
        # the connection given up a keepalive later
        await _until(lambda: len(script.conns) >= 2, 5, "a new connection")
        assert 12 in script.conns[0].kinds

    await _with_receiver(script, body, keepalive=1, protocol="5")


async def test_everything_tls_has_decrypted_is_read(test_pki: TestPki) -> None:
    """Many PUBLISH in one TLS record: after the first, the rest sit decrypted in the SSL
    object and the kernel has nothing, so the selector alone would never deliver them."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(test_pki.server.cert, test_pki.server.key)
    client_ctx = client_context(test_pki.service.directory)
    script = Script(lambda _i, _l: _v5_connack(False))

    async def body(receiver: PahoReceiver, got: Got) -> None:
        await asyncio.wait_for(receiver.ready.wait(), 5)
        script.conns[0].writer.write(b"".join(_publish(MQTT5, n, b"x") for n in range(1, 41)))
        await _until(lambda: len(got.payloads) == 40, 3, "all 40 messages")

    await _with_receiver(script, body, server_ctx, client_ctx, keepalive=60, protocol="5")
