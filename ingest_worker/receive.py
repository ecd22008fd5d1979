"""The worker's connection to the broker, kept up: the lean asyncio client, or paho-mqtt
driven on the same event loop (`ingest_worker.paho_loop`).

Both keep a persistent session (a fixed client id, clean start off, a session expiry), so
the broker queues for the worker while it is away, and both acknowledge only when told to.
`auto` speaks MQTT 5 and falls back to 3.1.1 when a CONNACK refuses 5 (the embedded broker),
decided again at every connection attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from core.retry import Backoff
from core.settings import BrokerSettings, IngestSettings
from ingest_worker.metrics import IngestMetrics
from ingest_worker.mqtt import (
    MQTT5,
    MQTT311,
    Connack,
    ConnectRefusedError,
    Delivery,
    MqttError,
    Subscriber,
    open_subscriber,
)
from ingest_worker.paho_loop import PahoLoop

log = logging.getLogger("ingest")

OnMessage = Callable[[Any, str, bytes, float], None]
UNACCEPTABLE_PROTOCOL = 0x01
MQTT5_UNSUPPORTED_VERSION = 0x84


@dataclass(frozen=True)
class BrokerTarget:
    """Where and as whom the worker connects."""

    host: str
    port: int
    context: ssl.SSLContext | None  # None: plain TCP, for tests against a scripted broker
    client_id: str
    filters: tuple[str, ...]
    # the settings model is the one source of defaults
    protocol: str = IngestSettings().protocol  # "auto", "5" or "3.1.1"
    keepalive: int = BrokerSettings().keepalive_s
    session_expiry: int = IngestSettings().session_expiry_s
    receive_maximum: int = IngestSettings().receive_maximum
    connect_timeout: float = 10.0  # TLS handshake, then CONNECT to CONNACK, each


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


def refuses_version(exc: BaseException) -> bool:
    """A CONNACK saying the broker does not speak the version we sent (3.1.1 return code 0x01,
    or MQTT 5 reason code 0x84)."""
    return isinstance(exc, ConnectRefusedError) and exc.code in (
        UNACCEPTABLE_PROTOCOL,
        MQTT5_UNSUPPORTED_VERSION,
    )


def fallback_version(protocol: str, version: int, exc: BaseException) -> int | None:
    """The version to try next in the same connection attempt, or None to give the attempt up.

    Only `auto`, only from MQTT 5, and only on a CONNACK refusing the version: a timeout or a
    connection error says nothing about the broker's protocol (a slow broker restart would
    otherwise turn the worker to 3.1.1, and Mosquitto's 1,000-message window, for good).
    """
    if protocol == "auto" and version == MQTT5 and refuses_version(exc):
        return MQTT311
    return None


class LeanReceiver:
    """`ingest_worker.mqtt.Subscriber`, reconnected with backoff until stopped.

    Each connection attempt starts from the configured protocol (`auto`: MQTT 5 first). A
    resumed session (CONNACK session present) that this process has already subscribed is not
    subscribed again, so the broker does not resend every retained `status`; under MQTT 5 the
    SUBSCRIBE also asks for retained messages only for subscriptions that did not exist.
    """

    def __init__(self, target: BrokerTarget, metrics: IngestMetrics) -> None:
        self.target = target
        self.metrics = metrics
        self.current: Subscriber | None = None
        self._stopping = False
        self._paused = False
        # the broker's session holds our subscriptions: set by a SUBACK, cleared by a
        # CONNACK without a session
        self._subscribed = False
        self.version: int | None = None  # the protocol of the last connection made
        self.ready = asyncio.Event()

    async def run(self, on_message: OnMessage) -> None:
        backoff = Backoff(0.2, 10.0)

        def deliver(d: Delivery) -> None:
            on_message(d, d.topic, d.payload, d.received_at)

        while not self._stopping:
            try:
                subscriber = await self._connect(deliver)
            except (OSError, TimeoutError, MqttError, ssl.SSLError) as exc:
                self.current = None
                delay = backoff.next()
                log.warning(
                    "event=broker_unreachable error=%r retry_in=%.1fs",
                    str(exc) or type(exc).__name__, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self.metrics.connected = 1
            self.ready.set()
            reason = await subscriber.closed
            self.metrics.connected = 0
            self.current = None
            if not self._stopping:
                log.warning("event=broker_lost error=%r", str(reason) if reason else "closed")
                await asyncio.sleep(backoff.next())

    async def _connect(self, deliver: Callable[[Delivery], None]) -> Subscriber:
        t = self.target
        version: int | None = _versions(t.protocol)[0]
        while version is not None:
            subscriber = await open_subscriber(
                t.host, t.port, t.context, deliver, version=version, timeout=t.connect_timeout
            )
            try:
                connack = await subscriber.handshake(
                    t.client_id, clean_start=False, keepalive=t.keepalive,
                    session_expiry=t.session_expiry, receive_maximum=t.receive_maximum,
                    timeout=t.connect_timeout,
                )  # fmt: skip
            except (MqttError, OSError, TimeoutError) as exc:
                if subscriber.transport is not None:
                    subscriber.transport.abort()
                version = fallback_version(t.protocol, version, exc)
                if version is None:
                    if isinstance(exc, TimeoutError):
                        raise TimeoutError(
                            f"no CONNACK within {t.connect_timeout:g} s (ingest connect timeout)"
                        ) from exc
                    raise
                log.info("event=protocol_fallback refused=5 trying=3.1.1 detail=%r", str(exc))
                continue
            return await self._subscribe(subscriber, connack, version)
        raise AssertionError("unreachable: every path above returns or raises")

    async def _subscribe(
        self, subscriber: Subscriber, connack: Connack, version: int
    ) -> Subscriber:
        t = self.target
        # a resumed session's backlog flows before the SUBACK: the pipeline's pause must
        # reach this connection already
        self.current = subscriber
        if self._paused:
            subscriber.pause()
        if not connack.session_present:
            self._subscribed = False
        resumed = connack.session_present and self._subscribed
        if not resumed:
            try:
                # 1: retained messages only for a subscription the session did not hold
                codes = await subscriber.subscribe(t.filters, qos=1, retain_handling=1)
            except (MqttError, OSError, TimeoutError):
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
            self._subscribed = True
        self.version = version
        self.metrics.reconnects.inc()
        log.info(
            "event=connected broker=%s:%d mqtt=%s session_present=%s subscribe=%s "
            "keepalive=%ds max_packet=%s filters=%s",
            t.host, t.port, "5" if version == MQTT5 else "3.1.1", connack.session_present,
            "kept" if resumed else "sent", subscriber.keepalive,
            subscriber.maximum_packet_size or "-", ",".join(t.filters),
        )  # fmt: skip
        return subscriber

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


@dataclass(frozen=True, slots=True)
class PahoDelivery:
    """One message paho delivered, and the connection that must acknowledge it."""

    message: mqtt.MQTTMessage
    connection: _PahoConnection

    @property
    def retain(self) -> bool:
        return bool(self.message.retain)


class _PahoConnection:
    """One paho client, one connection attempt: its CONNACK, SUBACK and end as futures."""

    def __init__(self, target: BrokerTarget, version: int, loop: asyncio.AbstractEventLoop) -> None:
        v5 = version == MQTT5
        self.version = version
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=target.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        if target.context is not None:
            self.client.tls_set_context(target.context)
        self.client.connect_timeout = target.connect_timeout  # TCP connect, TLS handshake
        self.driver = PahoLoop(self.client, loop, target.keepalive)
        self.connack: asyncio.Future[bool] = loop.create_future()  # session present
        self.suback: asyncio.Future[list[int]] = loop.create_future()
        self.lost: asyncio.Future[str] = loop.create_future()
        self.connected = False
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if self.connack.done():
            return
        if reason.is_failure:
            self.connack.set_exception(ConnectRefusedError(reason.value, self.version, str(reason)))
            return
        self.connected = True
        self.connack.set_result(bool(flags.session_present))

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        if not self.suback.done():
            self.suback.set_result([code.value for code in codes])

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        self.connected = False
        for waiting in (self.connack, self.suback):
            if not waiting.done():
                lost = ConnectionError(f"the broker closed the connection: {reason}")
                waiting.set_exception(lost)
                waiting.exception()  # retrieved: nobody may be waiting on it any more
        if not self.lost.done():
            self.lost.set_result(str(reason))

    async def open(self, target: BrokerTarget) -> bool:
        """Connect and wait for the CONNACK; True if the broker had our session."""
        props = None
        if self.version == MQTT5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = target.session_expiry
            props.ReceiveMaximum = target.receive_maximum
        self.client.connect_async(
            target.host, target.port, keepalive=target.keepalive, clean_start=False,
            properties=props,
        )  # fmt: skip
        # the TCP connect and the TLS handshake block: in a worker thread, as Home Assistant
        # does; everything after happens on the event loop
        await asyncio.to_thread(self.client.reconnect)
        try:
            return await asyncio.wait_for(asyncio.shield(self.connack), target.connect_timeout)
        except TimeoutError as exc:
            raise TimeoutError(
                f"no CONNACK within {target.connect_timeout:g} s (ingest connect timeout)"
            ) from exc

    async def subscribe(self, target: BrokerTarget) -> None:
        """SUBSCRIBE the worker's filters at QoS 1; a refused filter is a clear error."""
        if self.version == MQTT5:
            # retained messages only for a subscription the session did not hold
            options = SubscribeOptions(qos=1, retainHandling=1)
            self.client.subscribe([(f, options) for f in target.filters])
        else:
            self.client.subscribe([(f, 1) for f in target.filters])
        codes = await asyncio.wait_for(asyncio.shield(self.suback), target.connect_timeout)
        refused = [f for f, c in zip(target.filters, codes, strict=False) if c >= 0x80]
        if refused:
            raise ConnectionError(
                f"the broker refused the subscriptions {refused}: is {target.client_id!r} a "
                "`service` certificate (fieldline certs issue ... --role service)?"
            )

    def abort(self) -> None:
        """Drop the connection without a DISCONNECT (an attempt that failed)."""
        self.connected = False
        self.driver.detach()
        sock = self.client.socket()
        if sock is not None:
            sock.close()


class PahoReceiver:
    """paho-mqtt 2 driven on the event loop (`ingest_worker.paho_loop`): no network thread.

    The same rules as the lean client: a persistent session, acknowledgements only when told
    (on the connection that delivered), MQTT 5 with 3.1.1 only after a CONNACK refusing 5,
    no SUBSCRIBE on a resumed session this process subscribed, reconnect with backoff.
    """

    def __init__(self, target: BrokerTarget, metrics: IngestMetrics) -> None:
        self.target = target
        self.metrics = metrics
        self.ready = asyncio.Event()
        self.current: _PahoConnection | None = None
        self.version: int | None = None  # the protocol of the last connection made
        self._paused = False
        self._subscribed = False
        self._stopping = asyncio.Event()

    async def run(self, on_message: OnMessage) -> None:
        backoff = Backoff(0.2, 10.0)
        while not self._stopping.is_set():
            try:
                connection = await self._connect(on_message)
            except (OSError, TimeoutError, MqttError, ssl.SSLError, ValueError) as exc:
                self.current = None
                if self._stopping.is_set():
                    break
                delay = backoff.next()
                log.warning(
                    "event=broker_unreachable client=paho error=%r retry_in=%.1fs",
                    str(exc) or type(exc).__name__, delay,
                )  # fmt: skip
                await self._sleep(delay)
                continue
            backoff.reset()
            self.metrics.connected = 1
            self.ready.set()
            stopping: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
            ends: set[asyncio.Future[Any]] = {connection.lost, stopping}
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not connection.lost.done():
                connection.client.disconnect()  # written by the loop's writer, then closed
                try:
                    await asyncio.wait_for(asyncio.shield(connection.lost), 2.0)
                except TimeoutError:
                    connection.abort()
            self.metrics.connected = 0
            self.current = None
            if not self._stopping.is_set():
                log.warning("event=broker_lost client=paho error=%r", connection.lost.result())
                await self._sleep(0.2)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _connect(self, on_message: OnMessage) -> _PahoConnection:
        t = self.target
        loop = asyncio.get_running_loop()
        version: int | None = _versions(t.protocol)[0]
        while version is not None:
            connection = _PahoConnection(t, version, loop)
            self._attach(connection, on_message)
            try:
                present = await connection.open(t)
                if self._stopping.is_set():
                    raise ConnectionError("stopping")
                await self._subscribe(connection, present)
            except (MqttError, OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
                connection.abort()
                self.current = None
                version = fallback_version(t.protocol, version, exc)
                if version is None:
                    raise
                log.info("event=protocol_fallback client=paho refused=5 trying=3.1.1 detail=%r",
                         str(exc))  # fmt: skip
                continue
            return connection
        raise AssertionError("unreachable: every path above returns or raises")

    def _attach(self, connection: _PahoConnection, on_message: OnMessage) -> None:
        def on_message_(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
            on_message(PahoDelivery(msg, connection), msg.topic, bytes(msg.payload), time.time())

        connection.client.on_message = on_message_
        # a resumed session's backlog flows before the SUBACK: the pipeline's pause must
        # reach this connection already
        self.current = connection
        if self._paused:
            connection.driver.pause()

    async def _subscribe(self, connection: _PahoConnection, present: bool) -> None:
        t = self.target
        if not present:
            self._subscribed = False
        resumed = present and self._subscribed
        if not resumed:
            await connection.subscribe(t)
            self._subscribed = True
        self.version = connection.version
        self.metrics.reconnects.inc()
        log.info(
            "event=connected client=paho broker=%s:%d mqtt=%s session_present=%s subscribe=%s "
            "filters=%s",
            t.host, t.port, "5" if connection.version == MQTT5 else "3.1.1", present,
            "kept" if resumed else "sent", ",".join(t.filters),
        )  # fmt: skip

    def ack(self, source: Any) -> None:
        # a delivery from an earlier connection: the broker sends it again on this one
        if (
            isinstance(source, PahoDelivery)
            and source.connection is self.current
            and source.connection.connected
        ):
            source.connection.client.ack(source.message.mid, source.message.qos)

    def pause(self) -> None:
        self._paused = True
        if self.current is not None:
            self.current.driver.pause()

    def resume(self) -> None:
        self._paused = False
        if self.current is not None:
            self.current.driver.resume()

    async def stop(self) -> None:
        self._stopping.set()
