"""The per-session outbox: order, the in-flight window, redelivery with DUP, bounds."""

from __future__ import annotations

import asyncio

from amqtt.adapters import BufferReader
from amqtt.mqtt.publish import PublishPacket

from broker import wire
from broker.outbox import Message, Outbox


class FakeLink:
    """Records what the outbox writes; `full` plays a socket whose buffer is full."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.full = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writable(self) -> bool:
        return not self.full

    def publishes(self) -> list[tuple[bytes, int, bool, int]]:
        """(payload, qos, dup, packet id) of each PUBLISH written."""
        out = []
        for data in self.written:
            if data[0] & 0xF0 != wire.PUBLISH:
                continue
            packet = asyncio.run(PublishPacket.from_stream(BufferReader(data)))
            out.append((packet.data, packet.qos, packet.dup_flag, packet.packet_id or 0))
        return out


def msg(payload: bytes, qos: int = 1) -> Message:
    return Message(b"fl/acme/dev-1/cmd/reset", payload, qos, False)


def test_messages_go_out_in_order_within_the_window() -> None:
    box, link = Outbox(max_inflight=2), FakeLink()
    box.attach(link)
    for i in range(4):
        box.put(msg(b"%d" % i))
    assert [p[0] for p in link.publishes()] == [b"0", b"1"]  # the window is 2
    assert len(box.queue) == 2
    first_id = link.publishes()[0][3]
    assert box.acknowledge(first_id)
    assert [p[0] for p in link.publishes()] == [b"0", b"1", b"2"]
    assert not box.acknowledge(first_id)  # a second PUBACK for it means nothing


def test_qos0_does_not_wait_for_the_window() -> None:
    box, link = Outbox(max_inflight=1), FakeLink()
    box.attach(link)
    box.put(msg(b"a", qos=1))
    box.put(msg(b"b", qos=1))  # the window is full: waits
    box.put(msg(b"c", qos=0))  # behind b in the queue: waits too, order is kept
    assert [p[0] for p in link.publishes()] == [b"a"]
    box.acknowledge(link.publishes()[0][3])
    assert [p[0] for p in link.publishes()] == [b"a", b"b", b"c"]  # b fills the window again
    box.put(msg(b"d", qos=0))  # the window is full, yet QoS 0 takes no slot: out at once
    assert [(p[0], p[1], p[3]) for p in link.publishes()[2:]] == [(b"c", 0, 0), (b"d", 0, 0)]


def test_unacknowledged_messages_are_resent_with_dup_on_reattach() -> None:
    box, link = Outbox(), FakeLink()
    box.attach(link)
    box.put(msg(b"a"))
    box.put(msg(b"b"))
    box.detach(persistent=True)
    box.put(msg(b"c"))  # arrives while the client is away: queued
    again = FakeLink()
    assert box.attach(again) == 3
    assert [(p[0], p[2]) for p in again.publishes()] == [(b"a", True), (b"b", True), (b"c", False)]
    # same packet ids as the first time (MQTT-4.4.0-1)
    assert [p[3] for p in again.publishes()[:2]] == [p[3] for p in link.publishes()]


def test_qos2_flow_and_resending_pubrel() -> None:
    box, link = Outbox(), FakeLink()
    box.attach(link)
    box.put(msg(b"x", qos=2))
    packet_id = link.publishes()[0][3]
    assert not box.acknowledge(packet_id)  # PUBCOMP before PUBREC is not a delivery
    assert box.received(packet_id)
    box.detach(persistent=True)
    again = FakeLink()
    box.attach(again)
    assert again.written == [wire.pubrel(packet_id)]  # released: only PUBREL is resent
    assert box.acknowledge(packet_id)
    assert len(box) == 0


def test_clean_session_detach_forgets_everything_and_qos0_is_never_kept() -> None:
    box = Outbox()
    box.attach(FakeLink())
    box.put(msg(b"a"))
    box.detach(persistent=False)
    assert len(box) == 0
    link = FakeLink()
    link.full = True
    box.attach(link)
    box.put(msg(b"q0", qos=0))
    box.put(msg(b"q1", qos=1))
    box.detach(persistent=True)
    assert [m.payload for m in box.queue] == [b"q1"]


def test_full_socket_holds_messages_back_and_bounded_queue_drops() -> None:
    box, link = Outbox(max_queued=2), FakeLink()
    link.full = True
    box.attach(link)
    assert box.put(msg(b"a"))
    assert box.put(msg(b"b"))
    assert not box.put(msg(b"c"))
    assert box.dropped == 1
    assert link.written == []
    link.full = False
    assert box.pump() == 2


def test_keep_drops_what_is_no_longer_wanted() -> None:
    box, link = Outbox(max_inflight=1), FakeLink()
    box.attach(link)
    box.put(Message(b"fl/acme/x", b"1", 1, False))
    box.put(Message(b"fl/globex/y", b"2", 1, False))
    assert box.keep(lambda m: m.topic.startswith(b"fl/globex/")) == 1
    assert [m.payload for m in box.queue] == [b"2"]
    assert not box.inflight


def test_packet_ids_skip_those_in_flight_and_wrap() -> None:
    box, link = Outbox(max_inflight=3), FakeLink()
    box.attach(link)
    box._last_id = 65534
    for payload in (b"a", b"b", b"c"):
        box.put(msg(payload))
    assert [p[3] for p in link.publishes()] == [65535, 1, 2]
