"""One session's outgoing messages: queued in order, then in flight until the client acknowledges.

amqtt 0.12.1 forgets an in-flight QoS 1/2 message when the connection drops (or after 5 s
without a PUBACK), so a command sent to a device that reconnects is lost. Here a message
leaves the outbox only on PUBACK (QoS 1) or PUBCOMP (QoS 2); on reconnect of a persistent
session the in-flight ones are sent again with DUP set (MQTT-4.4.0-1), in their order,
before anything queued, paced by the socket like everything else.

Each outbox is bounded by count and by bytes, queued and in flight, and charges what it holds
to the broker's `MemoryBudget` (a message's bytes are its topic, payload and a fixed overhead).
A persistent session's outbox on a durable broker also has a `Journal`: every QoS 1/2 message
it takes is recorded in the store, and recorded as gone when it leaves (acknowledged, dropped
or the session deleted).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from broker import wire
from broker.budget import MESSAGE_OVERHEAD, MemoryBudget

QUEUE_FULL = "queue-full"  # the queue holds max_queued messages
QUEUE_BYTES = "queue-bytes"  # the queue holds max_queued_bytes


class Transport(Protocol):
    """Where an attached outbox writes: the client's connection."""

    def write(self, data: bytes) -> None: ...

    def writable(self) -> bool:
        """False while the socket's buffer is full; the transport pumps again once drained."""
        ...


class Journal(Protocol):
    """Where a durable outbox records the messages it holds (broker.store.Journal)."""

    def added(self, message: Message) -> None: ...

    def removed(self, message: Message) -> None: ...


class Message:
    """A message on its way to one client (QoS and retain already as that client gets them)."""

    __slots__ = ("packet_id", "payload", "qos", "released", "retain", "seq", "size", "topic")

    def __init__(self, topic: bytes, payload: bytes, qos: int, retain: bool) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.packet_id = 0
        self.released = False  # QoS 2: PUBREC received and PUBREL sent, PUBCOMP awaited
        self.seq = 0  # its key in the durable store (0: not stored)
        self.size = len(topic) + len(payload) + MESSAGE_OVERHEAD

    def packet(self, dup: bool = False) -> bytes:
        return wire.publish(self.topic, self.payload, self.qos, self.retain, dup, self.packet_id)


class Outbox:
    """Bounded: past `max_queued` waiting messages or `max_queued_bytes` new ones are refused.

    In flight: at most `max_inflight` messages and `max_inflight_bytes` (one message always
    fits, however large). Every byte held is charged to `budget`, in its offline pool while
    no client is attached.
    """

    def __init__(
        self,
        max_inflight: int = 100,
        max_queued: int = 10_000,
        *,
        max_inflight_bytes: int = 4 * 1024 * 1024,
        max_queued_bytes: int = 16 * 1024 * 1024,
        budget: MemoryBudget | None = None,
    ) -> None:
        if max_inflight < 1 or max_inflight > 65_535:
            raise ValueError("max_inflight must be 1..65535")
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.max_inflight_bytes = max_inflight_bytes
        self.max_queued_bytes = max_queued_bytes
        self.budget = budget
        self.journal: Journal | None = None
        self.queue: deque[Message] = deque()
        self.inflight: dict[int, Message] = {}  # insertion order is send order
        self.queued_bytes = 0
        self.inflight_bytes = 0
        self.dropped = 0
        self._transport: Transport | None = None
        self._resend: deque[int] = deque()  # in-flight packet ids still to resend after attach
        self._last_id = 0

    def __len__(self) -> int:
        return len(self.queue) + len(self.inflight)

    @property
    def attached(self) -> bool:
        return self._transport is not None

    @property
    def held_bytes(self) -> int:
        """Bytes of the messages queued and in flight."""
        return self.queued_bytes + self.inflight_bytes

    def put(self, message: Message) -> str | None:
        """Queue a message and send what the window allows; None, or why it was refused."""
        if len(self.queue) >= self.max_queued:
            self.dropped += 1
            return QUEUE_FULL
        size = message.size
        if self.queue and self.queued_bytes + size > self.max_queued_bytes:
            self.dropped += 1
            return QUEUE_BYTES
        self.queue.append(message)
        self.queued_bytes += size
        if self.journal is not None and message.qos and not message.seq:
            self.journal.added(message)
        if self.budget is not None:
            self.budget.charge(size, self._transport is None)
        if self._transport is not None:
            self.pump()
        return None

    def pump(self) -> int:
        """Send resends, then queued messages, while the window and socket allow; how many."""
        transport = self._transport
        if transport is None:
            return 0
        sent = 0
        if self._resend:
            sent = self._send_resends(transport)
            if self._resend:
                return sent
        queue, inflight = self.queue, self.inflight
        while queue and transport.writable():
            message = queue[0]
            size = message.size
            if message.qos:
                if len(inflight) >= self.max_inflight or (
                    inflight and self.inflight_bytes + size > self.max_inflight_bytes
                ):
                    break
                message.packet_id = self._next_id()
                inflight[message.packet_id] = message
                self.inflight_bytes += size
            elif self.budget is not None:
                self.budget.release(size)  # QoS 0 is done with once written
            queue.popleft()
            self.queued_bytes -= size
            transport.write(message.packet())
            sent += 1
        return sent

    def _send_resends(self, transport: Transport) -> int:
        sent = 0
        while self._resend and transport.writable():
            packet_id = self._resend.popleft()
            message = self.inflight.get(packet_id)
            if message is None:
                continue  # acknowledged meanwhile
            transport.write(wire.pubrel(packet_id) if message.released else message.packet(True))
            sent += 1
        return sent

    def attach(self, transport: Transport) -> int:
        """A (re)connected client: resend what is in flight, in order, then pump the queue."""
        if self._transport is None and self.budget is not None:
            self.budget.move(self.held_bytes, offline=False)
        self._transport = transport
        self._resend = deque(self.inflight)
        return self.pump()

    def detach(self, persistent: bool) -> None:
        """The client went away: keep QoS 1/2 for a persistent session, drop everything else."""
        was_attached = self._transport is not None
        self._transport = None
        self._resend.clear()
        if not persistent:
            self._forget(offline=not was_attached)
            return
        if any(m.qos == 0 for m in self.queue):
            self._keep_queued(lambda m: m.qos != 0, offline=not was_attached)
        if was_attached and self.budget is not None:
            self.budget.move(self.held_bytes, offline=True)

    def clear(self) -> None:
        """The session is deleted: everything it held is released."""
        self._forget(offline=self._transport is None)

    def trim(self, n: int) -> int:
        """Drop the newest queued messages until `n` bytes are freed (or none is left); how many."""
        freed, count = 0, 0
        while self.queue and freed < n:
            message = self.queue.pop()
            freed += message.size
            count += 1
            self._gone(message)
        self.queued_bytes -= freed
        if self.budget is not None:
            self.budget.release(freed, self._transport is None)
        self.dropped += count
        return count

    def keep(self, wanted: Callable[[Message], bool]) -> int:
        """Drop queued and in-flight messages that are no longer wanted; how many went."""
        before = len(self)
        offline = self._transport is None
        self._keep_queued(wanted, offline)
        kept = {pid: m for pid, m in self.inflight.items() if wanted(m)}
        for message in self.inflight.values():
            if message.packet_id not in kept:
                self._gone(message)
        gone = self.inflight_bytes - sum(m.size for m in kept.values())
        self.inflight = kept
        self.inflight_bytes -= gone
        if self.budget is not None:
            self.budget.release(gone, offline)
        return before - len(self)

    def acknowledge(self, packet_id: int) -> bool:
        """PUBACK (QoS 1) or PUBCOMP (QoS 2): the message is delivered; pump the next ones."""
        message = self.inflight.get(packet_id)
        if message is None or (message.qos == 2 and not message.released):
            return False
        del self.inflight[packet_id]
        self.inflight_bytes -= message.size
        self._gone(message)
        if self.budget is not None:
            self.budget.release(message.size, self._transport is None)
        if self._transport is not None:
            self.pump()
        return True

    def received(self, packet_id: int) -> bool:
        """PUBREC of a QoS 2 message: True if the caller must answer PUBREL."""
        message = self.inflight.get(packet_id)
        if message is None or message.qos != 2:
            return False
        message.released = True
        return True

    def _keep_queued(self, wanted: Callable[[Message], bool], offline: bool) -> None:
        kept: deque[Message] = deque()
        for message in self.queue:
            if wanted(message):
                kept.append(message)
            else:
                self._gone(message)
        gone = self.queued_bytes - sum(m.size for m in kept)
        self.queue = kept
        self.queued_bytes -= gone
        if self.budget is not None:
            self.budget.release(gone, offline)

    def _gone(self, message: Message) -> None:
        if message.seq and self.journal is not None:
            self.journal.removed(message)

    def _forget(self, offline: bool) -> None:
        if self.budget is not None:
            self.budget.release(self.held_bytes, offline)
        if self.journal is not None:
            for message in (*self.queue, *self.inflight.values()):
                self._gone(message)
        self.queue.clear()
        self.inflight.clear()
        self.queued_bytes = self.inflight_bytes = 0

    def _next_id(self) -> int:
        packet_id = self._last_id
        while True:
            packet_id = packet_id % 65_535 + 1
            if packet_id not in self.inflight:
                self._last_id = packet_id
                return packet_id
