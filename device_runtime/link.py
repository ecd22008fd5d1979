"""A device's MQTT connection: paho-mqtt 2 driven by the asyncio loop.

A persistent MQTT 3.1.1 session (commands sent while the device is away wait for it) over
TLS with the device's client certificate, a retained Will, QoS 1 with a bounded in-flight
window, and `stay_connected`: reconnects with jittered backoff until cancelled.

A simulated fleet runs a thousand devices with one connection each; a paho network thread per device
would be a thousand threads. paho's external-loop hooks (`on_socket_open`, `loop_read`,
`loop_write`, `loop_misc`) let one event loop drive them all. Only the blocking TCP + TLS
connect runs in a worker thread, so a slow handshake never stalls the other devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from core.retry import Backoff
from device_runtime.errors import LinkError

MessageHandler = Callable[[str, bytes, bool], None]
"""(topic, payload, retained): the retain flag a message was delivered with."""

INFLIGHT_WINDOW = 100
"""QoS 1 messages in flight at once: the broker's per-device window (`broker.max_inflight`)."""

# A link being closed reads what the broker had sent before the EOF; bounded, so a peer
# that keeps sending cannot hold a close open.
_CLOSE_READS = 1000


class DeviceLink:
    """A persistent MQTT 3.1.1 session with a client certificate and a Will; QoS 1 publishing."""

    def __init__(
        self,
        client_id: str,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        *,
        will: tuple[str, bytes] | None = None,
        keepalive: int = 30,
        inflight: int = INFLIGHT_WINDOW,
        on_message: MessageHandler | None = None,
        on_disconnect: Callable[[], None] | None = None,
        on_ack: Callable[[int], None] | None = None,
    ) -> None:
        self.client_id = client_id
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.inflight = inflight
        self._on_message = on_message
        self._closing = False
        self._on_disconnect = on_disconnect
        self._on_ack = on_ack
        # clean_session=False: commands sent while the device is away wait for it (QoS 1)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.client.tls_set_context(tls)
        self.client.max_inflight_messages_set(inflight)
        self.client.max_queued_messages_set(10_000)
        if will is not None:
            self.set_will(*will)
        self.client.on_connect = self._connected
        self.client.on_disconnect = self._disconnected
        self.client.on_message = self._message
        self.client.on_publish = self._acknowledged
        self.client.on_socket_open = self._socket_open
        self.client.on_socket_close = self._socket_close
        self.client.on_socket_register_write = self._register_write
        self.client.on_socket_unregister_write = self._unregister_write
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._connack: asyncio.Future[int] | None = None
        self._misc: asyncio.Task[None] | None = None
        self.connected = False
        self.attempts = 0  # connects tried, successful or not
        self._started = False
        self._unacked: set[int] = set()

    # -- paho's socket hooks. They run on the loop, or in the connect thread; the selector
    # is keyed by file descriptor numbers taken now, because paho closes the socket right
    # after telling us.
    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _socket_open(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        self._call(self._add_reader, sock.fileno())

    def _add_reader(self, fd: int) -> None:
        assert self._loop is not None
        self._loop.add_reader(fd, self.client.loop_read)

    def _socket_close(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        self._call(self._forget, sock.fileno())

    def _forget(self, fd: int) -> None:
        assert self._loop is not None
        self._loop.remove_reader(fd)
        self._loop.remove_writer(fd)

    def _register_write(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        self._call(self._add_writer, sock.fileno())

    def _add_writer(self, fd: int) -> None:
        assert self._loop is not None
        self._loop.add_writer(fd, self.client.loop_write)

    def _unregister_write(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        self._call(self._remove_writer, sock.fileno())

    def _remove_writer(self, fd: int) -> None:
        assert self._loop is not None
        self._loop.remove_writer(fd)

    # -- MQTT callbacks (run on the loop, from loop_read/loop_write/loop_misc)
    def _connected(
        self, _c: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode, _p: Any
    ) -> None:
        code = reason.value if isinstance(reason, ReasonCode) else int(reason)
        self.connected = code == 0
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(code)

    def _disconnected(self, _c: mqtt.Client, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        was = self.connected
        self.connected = False
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(LinkError(f"{self.client_id}: the broker closed the link"))
        if was and self._on_disconnect is not None:
            self._on_disconnect()

    def _message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        if self._on_message is not None:
            # retain set on delivery: a retained message sent because of a (re)subscription
            self._on_message(message.topic, bytes(message.payload), bool(message.retain))

    def _acknowledged(self, _c: mqtt.Client, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        self._unacked.discard(mid)
        if self._on_ack is not None:
            self._on_ack(mid)

    async def _misc_loop(self) -> None:
        # keepalive pings and QoS 1 retries; paho returns an error once the socket is gone
        while True:
            if self.client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            await asyncio.sleep(1.0)

    async def connect(self, timeout: float = 15.0) -> None:
        """Open TCP + TLS and wait for CONNACK; LinkError says why not."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._connack = self._loop.create_future()
        self.attempts += 1
        if self._closing:
            raise LinkError(f"{self.client_id}: the link is closed")
        opening = self._loop.run_in_executor(None, self._open)
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            # the blocking TCP + TLS connect cannot be interrupted: whatever it opens once it
            # returns is closed then, or it would stay open without keepalive until the broker
            # timed it out (and fired the Will)
            opening.add_done_callback(self._opened_too_late)
            raise
        except (OSError, ssl.SSLError) as exc:
            raise LinkError(
                f"{self.client_id}: cannot reach {self.host}:{self.port}: {exc}"
            ) from exc
        if self._closing:  # closed while the connect ran in its thread
            self._drop()
            raise LinkError(f"{self.client_id}: the link was closed while connecting")
        if self._misc is None or self._misc.done():
            self._misc = asyncio.create_task(self._misc_loop(), name=f"mqtt-misc-{self.client_id}")
        try:
            code = await asyncio.wait_for(self._connack, timeout)
        except TimeoutError as exc:
            self._drop()
            raise LinkError(f"{self.client_id}: no CONNACK within {timeout:.0f} s") from exc
        if code != 0:
            self._drop()
            raise LinkError(f"{self.client_id}: the broker refused the connection ({code:#04x})")

    def _open(self) -> None:
        if not self._started:
            self._started = True
            self.client.connect(self.host, self.port, self.keepalive)
        else:
            self.client.reconnect()

    def _opened_too_late(self, opening: asyncio.Future[None]) -> None:
        if not opening.cancelled() and opening.exception() is None:
            self._drop()

    def set_will(self, topic: str, payload: bytes) -> None:
        """The retained QoS 1 message the broker publishes if this link dies; next CONNECT."""
        self.client.will_set(topic, payload, qos=1, retain=True)

    def subscribe(self, topic_filter: str) -> None:
        """Queue a QoS 1 SUBSCRIBE (the broker answers asynchronously)."""
        self.client.subscribe(topic_filter, qos=1)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Queue a QoS 1 PUBLISH; paho keeps it and resends it until the broker acknowledges."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self._unacked.add(info.mid)
        return info

    def unacknowledged(self) -> int:
        """QoS 1 messages the broker has not acknowledged yet (paho keeps and resends them)."""
        return len(self._unacked)

    async def drain(self, timeout: float) -> bool:
        """Wait until the broker has acknowledged everything published; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._unacked:
            if time.monotonic() > deadline or not self.connected:
                return False
            await asyncio.sleep(0.02)
        return True

    def _drop(self) -> None:
        # paho has no public "close now": shut the socket down, and paho's own read sees the
        # EOF and closes it (on_socket_close takes it off the loop, on_disconnect fires)
        self.abort()
        for _ in range(_CLOSE_READS):
            if self.client.socket() is None:
                return
            self.client.loop_read()

    def abort(self) -> None:
        """Lose the connection without DISCONNECT, as a power cut would: the Will fires."""
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    async def close(self) -> None:
        """Send DISCONNECT (no Will), close the socket and stop the timers.

        Returns at once when the broker is gone or half-open: the DISCONNECT is best effort."""
        self._closing = True  # a connect still running in its thread closes what it opens
        self._on_message = None  # what still arrives while closing is not acted on
        was, self.connected = self.connected, False  # a close is no loss: on_disconnect stays quiet
        if was:
            self.client.disconnect()
            if self.client.want_write():
                # hand the DISCONNECT to the socket now (non-blocking: a full buffer waits
                # for nobody); once it is written paho closes the socket itself
                self.client.loop_write()
        self._drop()
        if self._misc is not None:
            self._misc.cancel()
            await asyncio.gather(self._misc, return_exceptions=True)

    async def stay_connected(
        self,
        on_connect: Callable[[], None],
        *,
        will: Callable[[], tuple[str, bytes]] | None = None,
        on_error: Callable[[LinkError, float], None] | None = None,
        backoff: Backoff | None = None,
        check_s: float = 0.5,
        stable_s: float = 10.0,
    ) -> None:
        """Connect, and reconnect whenever the link drops, until cancelled.

        Before each try `will()` gives the Will; after each CONNACK `on_connect()` runs
        (subscribe, birth); a failed try is `on_error(error, delay)` and a jittered wait. A
        link that drops within `stable_s` of its CONNACK waits as a failed try does."""
        backoff = backoff or Backoff(1.0, 30.0)
        up_since: float | None = None
        while True:
            if not self.connected:
                if up_since is not None:
                    # a broker that accepts, then drops (another client taking this client id
                    # over, say) must not get a reconnect every check_s from every device
                    if time.monotonic() - up_since >= stable_s:
                        backoff.reset()
                    else:
                        await asyncio.sleep(backoff.next())
                    up_since = None
                if will is not None:
                    self.set_will(*will())
                try:
                    await self.connect()
                except LinkError as exc:
                    delay = backoff.next()
                    if on_error is not None:
                        on_error(exc, delay)
                    await asyncio.sleep(delay)
                    continue
                up_since = time.monotonic()
                on_connect()
            await asyncio.sleep(check_s)
