"""The lean client delivers a large read in slices, one per turn of the event loop, so the
writers' statements are not held up behind ~1,000 messages of decoding (docs/benchmarks.md);
a slice is bounded in packets and in bytes."""

from __future__ import annotations

import asyncio
from typing import Any

from broker import wire
from ingest_worker.mqtt import BYTES_PER_TURN, MQTT311, PACKETS_PER_TURN, Delivery, Subscriber


class FakeTransport(asyncio.Transport):
    """Records pause/resume of reading (the pure logic under test needs no socket)."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = True
        self.pauses = 0
        self.written: list[bytes] = []

    def pause_reading(self) -> None:
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))


async def test_a_large_read_is_delivered_in_order_over_several_turns() -> None:
    got: list[int] = []
    sub = Subscriber(lambda d: got.append(d.packet_id), MQTT311)
    transport = FakeTransport()
    sub.connection_made(transport)
    total = PACKETS_PER_TURN * 3 + 7
    data = b"".join(
        wire.publish(b"fl/t/d/telemetry", b'{"metrics":{"a":1}}', 1, False, packet_id=n)
        for n in range(1, total + 1)
    )
    sub.data_received(data[:-5])  # the last packet is cut: it waits for its tail
    assert got == list(range(1, PACKETS_PER_TURN + 1))  # one slice in this turn
    assert not transport.reading  # no more reads until the buffer is through
    other_turns = 0
    while len(got) < total - 1:
        await asyncio.sleep(0)  # the writers' turn, then the next slice
        other_turns += 1
        assert other_turns < 10
    assert got == list(range(1, total))
    assert other_turns >= 3
    assert transport.reading  # resumed once the buffer was parsed
    sub.data_received(data[-5:])
    assert got == list(range(1, total + 1))


async def test_a_pause_by_the_pipeline_is_not_undone_by_the_slicing() -> None:
    got: list[Delivery] = []
    sub = Subscriber(got.append, MQTT311)
    transport = FakeTransport()
    sub.connection_made(transport)
    data = b"".join(
        wire.publish(b"fl/t/d/telemetry", b"{}", 1, False, packet_id=n)
        for n in range(1, PACKETS_PER_TURN * 2 + 1)
    )
    sub.data_received(data)
    sub.pause()  # the pipeline is full
    sub.resume()  # ... and drained, while a slice is still waiting: reading stays paused
    assert not transport.reading
    sub.pause()
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(got) == PACKETS_PER_TURN * 2  # what was read is delivered
    assert not transport.reading  # the pipeline's pause holds
    sub.resume()
    assert transport.reading


async def test_a_slice_of_large_messages_is_bounded_in_bytes() -> None:
    """Decoding costs by the byte: 128 backlog messages of 20 KiB would be one 2.5 MiB slice."""
    got: list[int] = []
    sub = Subscriber(lambda d: got.append(d.packet_id), MQTT311)
    transport = FakeTransport()
    sub.connection_made(transport)
    payload = b"x" * (20 * 1024)
    packets = [
        wire.publish(b"fl/t/d/telemetry", payload, 1, False, packet_id=n) for n in range(1, 41)
    ]
    sub.data_received(b"".join(packets))
    per_slice = -(-BYTES_PER_TURN // len(packets[0]))  # the packet that crosses the bound ends it
    assert len(got) == per_slice < PACKETS_PER_TURN
    assert not transport.reading
    turns = 0
    while len(got) < len(packets):
        await asyncio.sleep(0)
        turns += 1
        assert turns < 20
    assert got == list(range(1, len(packets) + 1))
    assert turns >= len(packets) // per_slice - 1
    assert transport.reading


async def test_one_packet_larger_than_the_byte_bound_is_still_delivered() -> None:
    got: list[int] = []
    sub = Subscriber(lambda d: got.append(d.packet_id), MQTT311)
    sub.connection_made(FakeTransport())
    big = wire.publish(b"fl/t/d/telemetry", b"y" * (BYTES_PER_TURN * 2), 1, False, packet_id=7)
    sub.data_received(big)
    assert got == [7]
