"""Pure pieces of the ingest worker: batching and in-order acknowledgements."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

from broker import wire
from ingest_worker.decode import BAD_TOPIC, UNEXPECTED_TOPIC, decode_message
from ingest_worker.metrics import IngestMetrics
from ingest_worker.mqtt import MQTT311, Delivery, Subscriber
from ingest_worker.pipeline import Pipeline
from ingest_worker.writer import is_transient
from schemas.limits import Limits

NOW = datetime(2026, 11, 24, tzinfo=UTC)


def test_transient_errors() -> None:
    import asyncpg

    assert is_transient(asyncpg.DeadlockDetectedError())
    assert is_transient(asyncpg.AdminShutdownError())
    assert is_transient(ConnectionResetError())
    assert not is_transient(asyncpg.UniqueViolationError())
    assert not is_transient(asyncpg.DataError())


def test_decode_refuses_without_raising() -> None:
    limits = Limits()
    bad_topic = decode_message(None, "fl/A/b/telemetry", b"{}", time.time(), limits)
    assert bad_topic.dead_reason == BAD_TOPIC
    command = decode_message(None, "fl/a/b/cmd/reset", b"{}", time.time(), limits)
    assert command.dead_reason == UNEXPECTED_TOPIC
    nul = decode_message(None, "fl/a/b/telemetry", b'{"metrics": {"t": "a\\u0000"}}', 0, limits)
    assert nul.dead_reason is not None
    assert "\x00" not in (nul.dead_error or "")  # PostgreSQL text cannot hold it
    cleared = decode_message(None, "fl/a/b/status", b"", time.time(), limits)
    assert cleared.ignored


async def test_acks_leave_in_receive_order_and_only_after_commit() -> None:
    acked: list[Any] = []
    paused: list[bool] = []
    pipeline = Pipeline(
        limits=Limits(), max_rows=3, max_wait_s=0.001, queue_max=4,
        ack=acked.append, pause=lambda: paused.append(True), resume=lambda: paused.append(False),
        metrics=IngestMetrics(),
    )  # fmt: skip
    t = int(time.time() * 1000)
    for i, tenant in enumerate(["a", "b", "a", "b"]):
        payload = json.dumps({"ts": t + i, "metrics": {"v": i}}).encode()
        pipeline.accept(f"m{i}", f"fl/{tenant}/d/telemetry", payload, time.time())
    assert paused == [True]  # queue_max reached: the receiver stops reading
    first = await pipeline.next_batch()
    second = await pipeline.next_batch()
    assert first is not None
    assert second is not None
    assert {first[0], second[0]} == {"a", "b"}
    batch_b = first if first[0] == "b" else second
    batch_a = second if batch_b is first else first
    pipeline.committed(batch_b[1])
    assert acked == []  # m0 (tenant a) is not committed: nothing may be acknowledged
    pipeline.committed(batch_a[1])
    assert acked == ["m0", "m1", "m2", "m3"]
    assert paused == [True, False]
    await asyncio.wait_for(pipeline.drain(1), 2)


async def test_reading_pauses_on_rows_as_well_as_messages() -> None:
    """Backlog messages carry many rows each: memory is bounded by rows, not only messages."""
    acked: list[Any] = []
    paused: list[bool] = []
    pipeline = Pipeline(
        limits=Limits(), max_rows=10_000, max_wait_s=0.001, queue_max=1_000, queue_max_rows=250,
        ack=acked.append, pause=lambda: paused.append(True), resume=lambda: paused.append(False),
        metrics=IngestMetrics(),
    )  # fmt: skip
    t = int(time.time() * 1000)
    for i in range(3):
        samples = [{"ts": t + 100 * i + s, "metrics": {"v": s}} for s in range(100)]
        payload = json.dumps({"samples": samples}).encode()
        pipeline.accept(f"m{i}", "fl/a/d/telemetry", payload, time.time())
        assert paused == ([True] if i == 2 else [])  # 300 rows >= 250, after 3 messages
    batch = await pipeline.next_batch()
    assert batch is not None
    batch[1][0].kill("db_rejected", "a row refused")  # its weight in the bound stays 100
    pipeline.committed(batch[1])
    assert acked == ["m0", "m1", "m2"]
    assert (pipeline.pending_rows, paused) == (0, [True, False])


async def test_a_suback_behind_a_long_backlog_is_waited_for() -> None:
    """A resumed session's queued PUBLISHes come before the SUBACK: as long as they keep
    arriving, subscribe() must not time out (the worker would reconnect forever)."""
    backlog_s, timeout_s = 2.0, 0.5

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # CONNECT
        writer.write(wire.connack(True, 0))
        await reader.read(1024)  # SUBSCRIBE (packet id 1)
        ends = time.monotonic() + backlog_s
        packet_id = 0
        while time.monotonic() < ends:
            packet_id = packet_id % 65_535 + 1
            writer.write(wire.publish(b"fl/a/d/telemetry", b"{}", 1, False, packet_id=packet_id))
            await asyncio.sleep(0.05)
        writer.write(b"\x90\x03\x00\x01\x01")  # SUBACK: granted QoS 1
        await writer.drain()
        await reader.read(1024)
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    got: list[Delivery] = []
    loop = asyncio.get_running_loop()
    _t, subscriber = await loop.create_connection(
        lambda: Subscriber(got.append, MQTT311), "127.0.0.1", port
    )
    try:
        await subscriber.handshake("ingest-1", keepalive=0, timeout=timeout_s)
        started = time.monotonic()
        assert await subscriber.subscribe(["fl/+/+/telemetry"], timeout=timeout_s) == [1]
        assert time.monotonic() - started >= backlog_s - 0.1
        assert len(got) > 10
    finally:
        await subscriber.close()
        server.close()
        await server.wait_closed()
