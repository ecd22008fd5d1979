"""The lean client delivers a large read in slices, one per turn of the event loop, so the
writers' statements are not held up behind ~1,000 messages of decoding (docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
from typing import Any

from broker import wire
from ingest_worker.mqtt import MQTT311, PACKETS_PER_TURN, Delivery, Subscriber


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
