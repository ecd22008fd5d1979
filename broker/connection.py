"""One client connection as the embedded broker drives it: its writer, reader and handler.

Nothing of amqtt's connection machinery is used; what goes through a connection is handled
here:

- `Link` is the connection's only writer. Everything written in one turn of the event loop
  (PUBACKs, SUBACKs, PUBLISHes to this client) goes out as one TLS write, instead of one
  TLS record and one system call per packet.
- `FramedReader` reads whole packets, refusing oversized ones from their fixed header, and
  stops reading (TCP backpressure) while the connection's work queue is long in messages or
  bytes (a client that publishes faster than the broker routes), after a PUBLISH while the
  broker's memory budget is spent (publishers wait for subscribers to catch up instead of
  being acknowledged and dropped), and while the client is not reading what it is sent (its
  acknowledgements would pile up in the broker's socket buffer).
- `Connection` reads packets and decodes them in place (amqtt's reader loop wraps every read
  in `asyncio.wait_for` and starts a task per packet): PUBLISH, PUBREL, SUBSCRIBE and
  UNSUBSCRIBE go on one queue in arrival order (ended by a marker when the connection goes),
  acknowledgements of what the broker sent go to the session's outbox, and keepalive is one
  timer per connection. With a durable store the PUBACK (PUBREC) of a PUBLISH is not written
  here but by the broker, once what the message changed is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker import wire
from broker.budget import MESSAGE_OVERHEAD
from broker.errors import ProtocolError

if TYPE_CHECKING:
    import ssl

    from broker.budget import MemoryBudget
    from broker.metrics import BrokerMetrics
    from broker.outbox import Outbox

log = logging.getLogger("broker")

# the reader pauses while more than this much incoming work waits to be routed
WORK_HIGH = 1000
WORK_LOW = 200
WORK_HIGH_BYTES = 1024 * 1024
WORK_LOW_BYTES = 256 * 1024


class Link:
    """The connection's only writer, and the outbox's Transport."""

    HIGH_WATER = 256 * 1024

    def __init__(self, writer: asyncio.StreamWriter, metrics: BrokerMetrics) -> None:
        self._writer = writer
        self._transport = writer.transport
        # drain() then waits exactly while the buffer is over HIGH_WATER (asyncio's TLS
        # default is 512 KiB), so a paused writer or reader sleeps instead of polling
        self._transport.set_write_buffer_limits(high=self.HIGH_WATER)
        self._metrics = metrics
        self._chunks: list[bytes] = []
        self._pending = 0
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        self._resuming: asyncio.Task[None] | None = None
        self.outbox: Outbox | None = None
        self.is_closed = False
        # since when the outbox has been held back by a client that does not read (None: not)
        self.stuck_since: float | None = None
        self.wake: asyncio.Event | None = None  # set when a PUBLISH is written to the client

    # -- writing ----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.is_closed:
            return
        if data[0] & 0xF0 == wire.PUBLISH:
            self._metrics.sent += 1
            if self.wake is not None:
                self.wake.set()  # the reader waits for the budget only while none is in flight
        self._chunks.append(data)
        self._pending += len(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand what this turn wrote to the transport as one piece."""
        self._scheduled = False
        if not self._chunks:
            return
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._pending = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def writable(self) -> bool:
        """For the outbox: False while the socket is backed up; pumping resumes when it drains."""
        if self.is_closed or self._transport.is_closing():
            return False
        if self._transport.get_write_buffer_size() + self._pending <= self.HIGH_WATER:
            return True
        if self.stuck_since is None:
            self.stuck_since = self._loop.time()
        if self._resuming is None or self._resuming.done():
            self._resuming = self._loop.create_task(self._resume())
        return False

    def buffered(self) -> int:
        """Bytes written to the client that it has not read yet (as far as asyncio holds them)."""
        if self.is_closed or self._transport.is_closing():
            return 0
        return self._transport.get_write_buffer_size() + self._pending

    def backed_up(self) -> bool:
        """True while the client leaves more than HIGH_WATER of what it was sent unread."""
        if self.is_closed or self._transport.is_closing():
            return False
        return self._transport.get_write_buffer_size() > self.HIGH_WATER

    async def wait_drained(self) -> None:
        """Until the client has read enough of what was written to it."""
        while self.backed_up():
            self.flush()
            await self._writer.drain()
            if self.backed_up():
                await asyncio.sleep(0.005)

    async def _resume(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not self._transport.is_closing():
                self.flush()
                await self._writer.drain()
                if self._transport.get_write_buffer_size() <= self.HIGH_WATER:
                    self.stuck_since = None
                    if self.outbox is not None:
                        self.outbox.pump()
                    return
                await asyncio.sleep(0.005)

    # -- the connection --------------------------------------------------------------------
    def get_peer_info(self) -> tuple[str, int] | None:
        peer = self._writer.get_extra_info("peername")
        return (peer[0], peer[1]) if peer and len(peer) >= 2 else None

    def get_ssl_info(self) -> ssl.SSLObject | None:
        return self._writer.get_extra_info("ssl_object")  # type: ignore[no-any-return]

    async def close(self) -> None:
        if self.is_closed:
            return
        self.flush()
        self.is_closed = True
        with contextlib.suppress(ConnectionError, OSError):
            self._writer.close()
            await asyncio.wait_for(self._writer.wait_closed(), 2)

    def abort(self) -> None:
        self.is_closed = True
        self._chunks.clear()
        self._transport.abort()


@dataclass(frozen=True, slots=True)
class Ended:
    """The last item of a connection's work queue; `graceful` after a DISCONNECT."""

    graceful: bool


@dataclass(frozen=True, slots=True)
class Incoming:
    """A PUBLISH from the client, decoded; `reply` is its PUBACK or PUBREC still to write
    (empty when already written, or for QoS 0)."""

    topic: str
    data: bytes
    qos: int
    retain: bool
    reply: bytes = b""
    packet_id: int = 0


@dataclass(frozen=True, slots=True)
class Released:
    """A PUBREL: the QoS 2 packet id is free again; PUBCOMP is `reply`."""

    packet_id: int
    reply: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """An acknowledgement to write in order with the others (a resent QoS 2 PUBLISH's PUBREC)."""

    reply: bytes


@dataclass(frozen=True, slots=True)
class SubscribeRequest:
    packet_id: int
    topics: list[tuple[str, int]]


@dataclass(frozen=True, slots=True)
class UnsubscribeRequest:
    packet_id: int
    topics: list[str]


Work = Incoming | Released | Reply | SubscribeRequest | UnsubscribeRequest | Ended


class FramedReader:
    """Whole packets from the stream, refusing oversized ones before reading their body."""

    def __init__(
        self, reader: asyncio.StreamReader, max_bytes: int, connection: Connection
    ) -> None:
        self._reader = reader
        self._max = max_bytes
        self._connection = connection

    async def next_packet(self) -> tuple[int, bytes] | None:
        """(first byte, body) of the next packet, or None at the end of the stream."""
        await self._connection.room_for_work()
        try:
            first = (await self._reader.readexactly(1))[0]
        except asyncio.IncompleteReadError:
            return None
        try:
            length, shift = 0, 0
            while True:
                byte = (await self._reader.readexactly(1))[0]
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise ProtocolError("malformed remaining length")
            if length > self._max:
                self._connection.close_reason = "packet-too-large"
                raise ProtocolError(f"a packet of {length} bytes, over the {self._max}-byte limit")
            return first, await self._reader.readexactly(length) if length else b""
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError("the connection closed in the middle of a packet") from exc


class Connection:
    """One client connection's reader: one ordered work queue, one keepalive timer.

    With `defer_replies` (a durable broker) PUBACK and PUBREC travel with their PUBLISH on
    the work queue and the broker writes them once the message is stored.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        link: Link,
        client_id: str,
        qos2_received: set[int],
        *,
        keepalive_s: float,
        max_packet_bytes: int,
        budget: MemoryBudget | None = None,
        defer_replies: bool = False,
    ) -> None:
        self.link = link
        self.client_id = client_id
        self.budget = budget
        self.keepalive_s = keepalive_s
        self.defer_replies = defer_replies
        self.close_reason: str | None = None
        self.work: asyncio.Queue[Work] = asyncio.Queue()
        self.work_bytes = 0  # of the PUBLISHes in `work`, charged to the budget until routed
        # packet ids of QoS 2 PUBLISHes delivered but not yet released: kept with the session,
        # so a resent PUBLISH (DUP) after a reconnect is not delivered twice
        self.qos2_received = qos2_received
        self._packets = FramedReader(reader, max_packet_bytes, self)
        self._loop = asyncio.get_running_loop()
        self._room = asyncio.Event()
        self._room.set()
        # acknowledgements waiting for the store to commit: past WORK_HIGH the client is not
        # read (a stalled disk must not let one client pile them up without bound)
        self.held_replies = 0
        self._replies_room = asyncio.Event()
        self._replies_room.set()
        self._closed = asyncio.Event()
        self._published = False  # a PUBLISH was read since the reader last checked for room
        self._pausing = False
        self._ended = False
        self._last_rx = 0.0
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start reading."""
        self._task = self._loop.create_task(self._read_loop(), name=f"mqtt-read-{self.client_id}")

    async def stop(self) -> None:
        """Stop reading (the work queue gets its end marker) and wait for the reader."""
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._end(graceful=False)

    # -- the work queue ---------------------------------------------------------------------
    async def room_for_work(self) -> None:
        """Wait while the queue is long, the budget spent or the client not reading its replies.

        The reader calls this before each packet. Only a connection that has just published
        waits for the budget, and only while nothing is in flight to it: subscribers' PUBACKs
        are what frees the budget, so they are always read.
        """
        paused = False
        budget = self.budget
        outbox = self.link.outbox
        while True:
            if self.work.qsize() >= WORK_HIGH or self.work_bytes >= WORK_HIGH_BYTES:
                self._room.clear()
                await self._pause(self._room.wait())
            elif not self._replies_room.is_set():
                await self._pause(self._replies_room.wait())
            elif (
                self._published
                and budget is not None
                and budget.full
                and (outbox is None or not outbox.inflight)
            ):
                budget.paused += 1
                budget.pauses += 1
                self.link.wake = asyncio.Event()
                try:
                    await self._pause(budget.room.wait(), self.link.wake.wait())
                finally:
                    budget.paused -= 1
                    self.link.wake = None
            elif self.link.backed_up():
                await self._pause(self.link.wait_drained())
            else:
                break
            paused = True
        self._published = False
        if paused:
            self._last_rx = self._loop.time()  # the wait was ours, not the client's silence

    async def _pause(self, *waits: Coroutine[Any, Any, Any]) -> None:
        """Not reading until one of `waits` is done, or the connection is closed (then
        ConnectionError)."""
        self._pausing = True
        waiters = [asyncio.ensure_future(w) for w in (*waits, self._closed.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._pausing = False
            for waiter in waiters:
                waiter.cancel()
        if self._closed.is_set():
            raise ConnectionError("closed while not reading")

    async def next_work(self) -> Work:
        item = await self.work.get()
        if isinstance(item, Incoming):
            size = len(item.topic) + len(item.data) + MESSAGE_OVERHEAD
            self.work_bytes -= size
            if self.budget is not None:
                self.budget.release(size)
        if (
            not self._room.is_set()
            and self.work.qsize() <= WORK_LOW
            and self.work_bytes <= WORK_LOW_BYTES
        ):
            self._room.set()
        return item

    def hold_reply(self) -> None:
        """An acknowledgement now waits for the store."""
        self.held_replies += 1
        if self.held_replies >= WORK_HIGH:
            self._replies_room.clear()

    def release_reply(self, reply: bytes) -> None:
        """The store committed what `reply` acknowledges: write it."""
        self.held_replies -= 1
        self.link.write(reply)
        if self.held_replies <= WORK_LOW:
            self._replies_room.set()

    def _queue_publish(self, message: Incoming) -> None:
        size = len(message.topic) + len(message.data) + MESSAGE_OVERHEAD
        self.work_bytes += size
        if self.budget is not None:
            self.budget.charge(size)
        self._published = True
        self.work.put_nowait(message)

    def _end(self, graceful: bool) -> None:
        if not self._ended:
            self._ended = True
            self.work.put_nowait(Ended(graceful))
            self._room.set()

    # -- reading ----------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        self._last_rx = self._loop.time()
        if self.keepalive_s > 0:
            self._keepalive_timer = self._loop.call_later(self.keepalive_s, self._check_keepalive)
        graceful = False
        try:
            while True:
                packet = await self._packets.next_packet()
                if packet is None:
                    break
                self._last_rx = self._loop.time()
                if self._dispatch(*packet):
                    graceful = True
                    break
        except asyncio.CancelledError:
            pass
        except (ProtocolError, UnicodeDecodeError, IndexError, ValueError) as exc:
            self.close_reason = self.close_reason or "protocol-error"
            log.info("event=protocol_error client=%s detail=%r", self.client_id, str(exc))
        except (ConnectionError, OSError):
            pass
        finally:
            if self._keepalive_timer is not None:
                self._keepalive_timer.cancel()
            self._end(graceful)

    def _check_keepalive(self) -> None:
        keepalive = self.keepalive_s
        if self._pausing:
            # the broker is not reading this client: its silence cannot be told; ask again later
            self._keepalive_timer = self._loop.call_later(keepalive, self._check_keepalive)
            return
        idle = self._loop.time() - self._last_rx
        if idle >= keepalive:
            # nothing from the client for 1.5 x its keepalive: MQTT-3.1.2-24
            self.close("keepalive")
        else:
            self._keepalive_timer = self._loop.call_later(keepalive - idle, self._check_keepalive)

    def _dispatch(self, first: int, body: bytes) -> bool:
        """Handle one packet; True for DISCONNECT, a protocol violation raised."""
        kind = first >> 4
        if kind == 3:
            self._publish(first, body)
        elif kind == 4:  # PUBACK
            if self.link.outbox is not None:
                self.link.outbox.acknowledge(_packet_id(body))
        elif kind == 5:  # PUBREC
            packet_id = _packet_id(body)
            if self.link.outbox is not None:
                self.link.outbox.received(packet_id)
            self.link.write(wire.pubrel(packet_id))  # answers every PUBREC, known or not
        elif kind == 6 and first & 0x0F == 2:  # PUBREL: in order with the PUBLISHes
            packet_id = _packet_id(body)
            self.work.put_nowait(Released(packet_id, b"\x70\x02" + body[:2]))
        elif kind == 7:  # PUBCOMP
            if self.link.outbox is not None:
                self.link.outbox.acknowledge(_packet_id(body))
        elif kind == 8 and first & 0x0F == 2:
            self.work.put_nowait(SubscribeRequest(*wire.decode_subscribe(body)))
        elif kind == 10 and first & 0x0F == 2:
            self.work.put_nowait(UnsubscribeRequest(*wire.decode_unsubscribe(body)))
        elif kind == 12:
            self.link.write(b"\xd0\x00")  # PINGRESP
        elif kind == 14:
            if len(body):
                raise ProtocolError("a DISCONNECT with a body")
            return True
        else:
            # CONNECT again (MQTT-3.1.0-2), packets only a server sends, reserved types, bad flags
            raise ProtocolError(f"unexpected packet type {kind} (flags {first & 0x0F})")
        return False

    def _publish(self, first: int, body: bytes) -> None:
        qos = (first >> 1) & 0x03
        if qos == 3:
            raise ProtocolError("PUBLISH with QoS 3")
        size = (body[0] << 8) | body[1]
        if 2 + size + (2 if qos else 0) > len(body):
            raise ProtocolError("a PUBLISH shorter than its topic and packet id")
        topic = body[2 : 2 + size].decode("utf-8")
        if "\x00" in topic:
            raise ProtocolError("a topic name with a NUL character (MQTT-4.7.3-2)")
        retain = bool(first & 1)
        if qos == 0:
            self._queue_publish(Incoming(topic, body[2 + size :], 0, retain))
            return
        packet_id = (body[2 + size] << 8) | body[3 + size]
        if packet_id == 0:
            raise ProtocolError("a QoS 1 or 2 PUBLISH with packet id 0 (MQTT-2.3.1-1)")
        reply = (b"\x40\x02" if qos == 1 else b"\x50\x02") + body[2 + size : 4 + size]
        if qos == 2 and packet_id in self.qos2_received:
            # a DUP of a delivered one is not delivered again, only acknowledged
            if self.defer_replies:
                self.work.put_nowait(Reply(reply))
            else:
                self.link.write(reply)
            return
        if qos == 2:
            self.qos2_received.add(packet_id)
        if self.defer_replies:
            self._queue_publish(Incoming(topic, body[4 + size :], qos, retain, reply, packet_id))
        else:
            self._queue_publish(Incoming(topic, body[4 + size :], qos, retain, b"", packet_id))
            self.link.write(reply)

    # -- the rest ---------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        """Drop the connection; the reader sees it and the broker runs the disconnect path."""
        self.close_reason = self.close_reason or reason
        self._closed.set()
        self.link.abort()


def _packet_id(body: bytes) -> int:
    if len(body) != 2:
        raise ProtocolError(f"an acknowledgement of {len(body)} bytes, not 2")
    return (body[0] << 8) | body[1]
