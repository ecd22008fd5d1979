"""The worker's connection to the broker, kept up: the lean asyncio client, or paho-mqtt.

Both keep a persistent session (a fixed client id, clean start off, a session expiry), so
the broker queues for the worker while it is away, and both acknowledge only when told to.
`auto` speaks MQTT 5 and falls back to 3.1.1 when the broker refuses 5 (the embedded broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest_worker.metrics import IngestMetrics
from ingest_worker.mqtt import (
    MQTT5,
    MQTT311,
    ConnectRefusedError,
    Delivery,
    Subscriber,
    open_subscriber,
)

log = logging.getLogger("ingest")

OnMessage = Callable[[Any, str, bytes, float], None]
UNACCEPTABLE_PROTOCOL = 0x01
MQTT5_UNSUPPORTED_VERSION = 0x84


@dataclass(frozen=True)
class BrokerTarget:
    """Where and as whom the worker connects."""

    host: str
    port: int
    context: ssl.SSLContext
    client_id: str
    filters: tuple[str, ...]
    protocol: str = "auto"  # "auto", "5" or "3.1.1"
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600
    receive_maximum: int = 1000


class Receiver(Protocol):
    async def run(self, on_message: OnMessage) -> None: ...
    def ack(self, source: Any) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    async def stop(self) -> None: ...


def _versions(protocol: str) -> list[int]:
    if protocol == "5":
        return [MQTT5]
    if protocol == "3.1.1":
        return [MQTT311]
    return [MQTT5, MQTT311]


class LeanReceiver:
    """`ingest_worker.mqtt.Subscriber`, reconnected with backoff until stopped."""

    def __init__(self, target: BrokerTarget, metrics: IngestMetrics) -> None:
        self.target = target
        self.metrics = metrics
        self.current: Subscriber | None = None
        self._stopping = False
        self._paused = False
        self._version: int | None = (
            None if target.protocol == "auto" else _versions(target.protocol)[0]
        )
        self.ready = asyncio.Event()

    async def run(self, on_message: OnMessage) -> None:
        backoff = 0.2

        def deliver(d: Delivery) -> None:
            on_message(d, d.topic, d.payload, d.received_at)

        while not self._stopping:
            try:
                subscriber = await self._connect(deliver)
            except (
                OSError,
                TimeoutError,
                ConnectionError,
                ConnectRefusedError,
                ssl.SSLError,
            ) as exc:
                self.current = None
                log.warning(
                    "event=broker_unreachable error=%r retry_in=%.1fs",
                    str(exc) or type(exc).__name__, backoff,
                )  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.2
            self.metrics.connected = 1
            self.ready.set()
            reason = await subscriber.closed
            self.metrics.connected = 0
            self.current = None
            if not self._stopping:
                log.warning("event=broker_lost error=%r", str(reason) if reason else "closed")
                await asyncio.sleep(backoff)

    async def _connect(self, deliver: Callable[[Delivery], None]) -> Subscriber:
        t = self.target
        versions = [self._version] if self._version is not None else _versions("auto")
        last: Exception | None = None
        for version in versions:
            subscriber = await open_subscriber(t.host, t.port, t.context, deliver, version=version)
            try:
                connack = await subscriber.handshake(
                    t.client_id, clean_start=False, keepalive=t.keepalive,
                    session_expiry=t.session_expiry, receive_maximum=t.receive_maximum,
                )  # fmt: skip
            except ConnectRefusedError as exc:
                subscriber.transport.abort() if subscriber.transport else None
                last = exc
                if exc.code in (UNACCEPTABLE_PROTOCOL, MQTT5_UNSUPPORTED_VERSION):
                    continue  # the broker does not speak this version: try the next
                raise
            except (ConnectionError, OSError, TimeoutError) as exc:
                # a 3.1.1-only broker may simply hang up on an MQTT 5 CONNECT
                if subscriber.transport is not None:
                    subscriber.transport.abort()
                last = exc
                continue
            self._version = version
            # a resumed session's backlog flows before the SUBACK: the pipeline's pause must
            # reach this connection already
            self.current = subscriber
            if self._paused:
                subscriber.pause()
            try:
                codes = await subscriber.subscribe(t.filters, qos=1)
            except (ConnectionError, OSError, TimeoutError):
                if subscriber.transport is not None:
                    subscriber.transport.abort()
                raise
            refused = [f for f, c in zip(t.filters, codes, strict=False) if c >= 0x80]
            if refused:
                await subscriber.close()
                raise ConnectionError(
                    f"the broker refused the subscriptions {refused}: is {t.client_id!r} a "
                    "`service` certificate (fieldline certs issue ... --role service)?"
                )
            self.metrics.reconnects.inc()
            log.info(
                "event=connected broker=%s:%d mqtt=%s session_present=%s filters=%s",
                t.host, t.port, "5" if version == MQTT5 else "3.1.1",
                connack.session_present, ",".join(t.filters),
            )  # fmt: skip
            return subscriber
        assert last is not None
        raise last

    def ack(self, source: Any) -> None:
        if isinstance(source, Delivery):
            source.subscriber.ack(source)

    def pause(self) -> None:
        self._paused = True
        if self.current is not None:
            self.current.pause()

    def resume(self) -> None:
        self._paused = False
        if self.current is not None:
            self.current.resume()

    async def stop(self) -> None:
        self._stopping = True
        if self.current is not None:
            await self.current.close()


class PahoReceiver:
    """paho-mqtt 2 in its own thread; messages cross to the event loop, acks come back."""

    def __init__(self, target: BrokerTarget, metrics: IngestMetrics) -> None:
        self.target = target
        self.metrics = metrics
        self.ready = asyncio.Event()
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._room = threading.BoundedSemaphore(1)
        self._stopped = asyncio.Event()

    async def run(self, on_message: OnMessage) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        for version in _versions(self.target.protocol):
            refused = asyncio.Event()
            client = self._client = self._make(version, on_message, loop, refused)
            client.loop_start()
            stopped = loop.create_task(self._stopped.wait())
            wrong_version = loop.create_task(refused.wait())
            await asyncio.wait([stopped, wrong_version], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            wrong_version.cancel()
            if refused.is_set() and not self._stopped.is_set():
                # the broker does not speak this version (the embedded one is 3.1.1 only)
                await asyncio.to_thread(client.loop_stop)
                continue
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)
            return

    def _make(
        self,
        version: int,
        on_message: OnMessage,
        loop: asyncio.AbstractEventLoop,
        refused: asyncio.Event,
    ) -> Any:
        t = self.target
        v5 = version == MQTT5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=t.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        client.tls_set_context(t.context)
        client.max_inflight_messages_set(t.receive_maximum)

        def on_connect(c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
            if getattr(reason, "is_failure", False):
                log.warning("event=broker_refused reason=%s", reason)
                if v5 and t.protocol == "auto" and reason.value in (0x01, 0x84):
                    loop.call_soon_threadsafe(refused.set)
                return
            c.subscribe([(f, 1) for f in t.filters])
            self.metrics.connected = 1
            self.metrics.reconnects.inc()
            log.info("event=connected client=paho mqtt=%s", "5" if v5 else "3.1.1")
            loop.call_soon_threadsafe(self.ready.set)

        def on_disconnect(*_a: Any) -> None:
            self.metrics.connected = 0

        def on_message_(_c: Any, _u: Any, msg: Any) -> None:
            self._room.acquire()  # blocks paho's thread while the pipeline has paused us
            self._room.release()
            if self._stopped.is_set():
                return  # unacknowledged: the broker sends it again to the next session
            with contextlib.suppress(RuntimeError):  # the loop may be closing
                loop.call_soon_threadsafe(on_message, msg, msg.topic, msg.payload, time.time())

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = on_message_
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = t.session_expiry
            props.ReceiveMaximum = t.receive_maximum
        client.connect_async(
            t.host, t.port, keepalive=t.keepalive, clean_start=False, properties=props
        )
        return client

    def ack(self, source: Any) -> None:
        if self._client is not None:
            self._client.ack(source.mid, source.qos)

    def pause(self) -> None:
        self._room.acquire(blocking=False)

    def resume(self) -> None:
        with contextlib.suppress(ValueError):  # not paused
            self._room.release()

    async def stop(self) -> None:
        self._stopped.set()
        self.resume()  # a callback blocked on the pause would keep paho's thread from ending
