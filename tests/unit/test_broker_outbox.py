"""The per-session outbox: order, the in-flight window, redelivery with DUP, bounds in
messages and bytes, and the memory budget its bytes are charged to."""

from __future__ import annotations

import asyncio

from amqtt.adapters import BufferReader
from amqtt.mqtt.publish import PublishPacket

from broker import wire
from broker.budget import MESSAGE_OVERHEAD, MemoryBudget
from broker.outbox import QUEUE_BYTES, QUEUE_FULL, Message, Outbox


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
    assert box.put(msg(b"a")) is None
    assert box.put(msg(b"b")) is None
    assert box.put(msg(b"c")) == QUEUE_FULL
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


def sized(n: int, qos: int = 1) -> Message:
    """A message whose accounted size is exactly n bytes."""
    topic = b"fl/acme/dev-1/cmd/x"
    return Message(topic, b"x" * (n - len(topic) - MESSAGE_OVERHEAD), qos, False)


def test_queue_refuses_past_its_byte_limit_but_takes_one_message_whatever_its_size() -> None:
    box, link = Outbox(max_queued_bytes=3000), FakeLink()
    link.full = True  # a client that does not read: everything stays queued
    box.attach(link)
    assert box.put(sized(5000)) is None  # an empty queue takes any message
    assert box.put(sized(500)) == QUEUE_BYTES
    box = Outbox(max_queued_bytes=3000)
    box.attach(link)
    assert [box.put(sized(1000)) for _ in range(4)] == [None, None, None, QUEUE_BYTES]
    assert (box.queued_bytes, box.dropped) == (3000, 1)


def test_inflight_window_is_bounded_in_bytes_and_one_message_always_fits() -> None:
    box, link = Outbox(max_inflight=100, max_inflight_bytes=2500), FakeLink()
    box.attach(link)
    for _ in range(3):
        box.put(sized(1000))
    assert len(link.publishes()) == 2  # a third would make 3000 bytes in flight
    assert (box.inflight_bytes, box.queued_bytes) == (2000, 1000)
    box.acknowledge(link.publishes()[0][3])
    assert len(link.publishes()) == 3
    big, link2 = Outbox(max_inflight_bytes=100), FakeLink()
    big.attach(link2)
    big.put(sized(5000))
    assert len(link2.publishes()) == 1


def test_bytes_are_charged_to_the_budget_and_change_pool_with_the_client() -> None:
    budget = MemoryBudget(10_000)
    box, link = Outbox(max_inflight=1, budget=budget), FakeLink()
    box.attach(link)
    box.put(sized(1000))  # in flight
    box.put(sized(1000))  # queued
    box.put(sized(500, qos=0))  # queued behind; QoS 0 is not kept offline
    assert (budget.connected, budget.offline) == (2500, 0)
    box.detach(persistent=True)
    assert (budget.connected, budget.offline) == (0, 2000)
    box.put(sized(1000))  # arrives while away
    assert budget.offline == 3000
    again = FakeLink()
    box.attach(again)
    assert (budget.connected, budget.offline) == (3000, 0)
    box.acknowledge(again.publishes()[0][3])  # the resent one
    assert budget.connected == 2000
    box.clear()  # the session is deleted
    assert (budget.connected, budget.offline, len(box)) == (0, 0, 0)


def test_qos0_leaves_the_budget_when_written_and_clean_detach_releases_all() -> None:
    budget = MemoryBudget(10_000)
    box, link = Outbox(budget=budget), FakeLink()
    box.attach(link)
    box.put(sized(700, qos=0))
    assert budget.used == 0
    box.put(sized(700))
    box.detach(persistent=False)
    assert budget.used == 0


def test_trim_drops_the_newest_queued_messages_and_keep_releases_bytes() -> None:
    budget = MemoryBudget(100_000)
    box = Outbox(budget=budget)
    for i in range(5):
        box.put(Message(b"t", b"%d" % i + b"x" * 999, 1, False))
    size = box.queue[0].size
    assert budget.offline == 5 * size
    assert box.trim(size + 1) == 2
    assert [m.payload[:1] for m in box.queue] == [b"0", b"1", b"2"]
    assert budget.offline == box.queued_bytes == 3 * size
    assert box.keep(lambda m: m.payload[:1] != b"1") == 1
    assert budget.offline == 2 * size


def test_budget_closes_at_its_limit_and_opens_at_low_water() -> None:
    budget = MemoryBudget(1000)
    budget.charge(600)
    budget.charge(300, offline=True)
    assert not budget.full
    budget.charge(100)
    assert budget.full
    budget.release(50)  # 950: still above low water (900)
    assert budget.full
    budget.release(50, offline=True)
    assert not budget.full
    assert budget.offline_room(250)  # offline sessions keep half of 1000 at most
    assert not budget.offline_room(251)
    budget.sampled_sockets(200)  # unread socket bytes count too
    assert budget.full


def test_resends_after_reconnect_are_paced_by_the_socket() -> None:
    box, link = Outbox(), FakeLink()
    box.attach(link)
    for payload in (b"a", b"b", b"c"):
        box.put(msg(payload))
    box.detach(persistent=True)
    box.put(msg(b"d"))
    slow = FakeLink()
    writes = iter([True, False])
    slow.writable = lambda: next(writes, False)  # type: ignore[method-assign]
    assert box.attach(slow) == 1  # one resend, then the socket is full
    acked = link.publishes()[1][3]
    assert box.acknowledge(acked)  # b acknowledged meanwhile: not resent
    slow.full = False
    slow.writable = lambda: not slow.full  # type: ignore[method-assign]
    box.pump()
    assert [(p[0], p[2]) for p in slow.publishes()] == [(b"a", True), (b"c", True), (b"d", False)]
