"""One session's outgoing messages: queued in order, then in flight until the client acknowledges.

amqtt 0.12.1 forgets an in-flight QoS 1/2 message when the connection drops (or after 5 s
without a PUBACK), so a command sent to a device that reconnects is lost. Here a message
leaves the outbox only on PUBACK (QoS 1) or PUBCOMP (QoS 2); on reconnect of a persistent
session the in-flight ones are sent again with DUP set (MQTT-4.4.0-1), in their order,
before anything queued.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from broker import wire


class Transport(Protocol):
    """Where an attached outbox writes: the client's connection."""

    def write(self, data: bytes) -> None: ...

    def writable(self) -> bool:
        """False while the socket's buffer is full; the transport pumps again once drained."""
        ...


class Message:
    """A message on its way to one client (QoS and retain already as that client gets them)."""

    __slots__ = ("packet_id", "payload", "qos", "released", "retain", "topic")

    def __init__(self, topic: bytes, payload: bytes, qos: int, retain: bool) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.packet_id = 0
        self.released = False  # QoS 2: PUBREC received and PUBREL sent, PUBCOMP awaited

    def packet(self, dup: bool = False) -> bytes:
        return wire.publish(self.topic, self.payload, self.qos, self.retain, dup, self.packet_id)


class Outbox:
    """Bounded: past `max_queued` waiting messages new ones are refused (and counted)."""

    def __init__(self, max_inflight: int = 100, max_queued: int = 10_000) -> None:
        if max_inflight < 1 or max_inflight > 65_535:
            raise ValueError("max_inflight must be 1..65535")
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.queue: deque[Message] = deque()
        self.inflight: dict[int, Message] = {}  # insertion order is send order
        self.dropped = 0
        self._transport: Transport | None = None
        self._last_id = 0

    def __len__(self) -> int:
        return len(self.queue) + len(self.inflight)

    @property
    def attached(self) -> bool:
        return self._transport is not None

    def put(self, message: Message) -> bool:
        """Queue a message and send what the window allows; False if the queue is full."""
        if len(self.queue) >= self.max_queued:
            self.dropped += 1
            return False
        self.queue.append(message)
        if self._transport is not None:
            self.pump()
        return True

    def pump(self) -> int:
        """Send queued messages while the in-flight window and the socket allow; how many."""
        transport = self._transport
        sent = 0
        queue, inflight = self.queue, self.inflight
        while queue and transport is not None and transport.writable():
            message = queue[0]
            if message.qos:
                if len(inflight) >= self.max_inflight:
                    break
                message.packet_id = self._next_id()
                inflight[message.packet_id] = message
            queue.popleft()
            transport.write(message.packet())
            sent += 1
        return sent

    def attach(self, transport: Transport) -> int:
        """A (re)connected client: resend what is in flight, in order, then pump the queue."""
        self._transport = transport
        for packet_id, message in self.inflight.items():
            transport.write(wire.pubrel(packet_id) if message.released else message.packet(True))
        return len(self.inflight) + self.pump()

    def detach(self, persistent: bool) -> None:
        """The client went away: keep QoS 1/2 for a persistent session, drop everything else."""
        self._transport = None
        if not persistent:
            self.queue.clear()
            self.inflight.clear()
        elif any(m.qos == 0 for m in self.queue):
            self.queue = deque(m for m in self.queue if m.qos)

    def keep(self, wanted: Callable[[Message], bool]) -> int:
        """Drop queued and in-flight messages that are no longer wanted; how many went."""
        before = len(self)
        self.queue = deque(m for m in self.queue if wanted(m))
        self.inflight = {pid: m for pid, m in self.inflight.items() if wanted(m)}
        return before - len(self)

    def acknowledge(self, packet_id: int) -> bool:
        """PUBACK (QoS 1) or PUBCOMP (QoS 2): the message is delivered; pump the next ones."""
        message = self.inflight.get(packet_id)
        if message is None or (message.qos == 2 and not message.released):
            return False
        del self.inflight[packet_id]
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

    def _next_id(self) -> int:
        packet_id = self._last_id
        while True:
            packet_id = packet_id % 65_535 + 1
            if packet_id not in self.inflight:
                self._last_id = packet_id
                return packet_id
