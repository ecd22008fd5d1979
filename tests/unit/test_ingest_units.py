"""Pure pieces of the ingest worker: gap counting, batching and in-order acknowledgements."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from ingest_worker.decode import BAD_TOPIC, UNEXPECTED_TOPIC, decode_message
from ingest_worker.metrics import IngestMetrics
from ingest_worker.pipeline import Pipeline
from ingest_worker.writer import _DeviceState, count_gaps, is_transient
from schemas.limits import Limits

NOW = datetime(2026, 11, 24, tzinfo=UTC)


def state(*sequences: tuple[int | None, int, int], boots: tuple[int, ...] = ()) -> _DeviceState:
    return _DeviceState(NOW, NOW, boots=list(boots), sequences=list(sequences))


@pytest.mark.parametrize(
    ("stored", "batch", "expected"),
    [
        ((None, None), state((1, 1, 1), (1, 2, 2), (1, 5, 5)), (1, 5, 2)),  # 3, 4 missing
        ((1, 5), state((1, 9, 9)), (1, 9, 3)),  # 6, 7, 8 missing
        ((1, 9), state((1, 3, 3), (1, 9, 9)), (1, 9, 0)),  # redelivered: nothing
        ((1, 9), state((2, 1, 1), (2, 2, 2)), (2, 2, 0)),  # a restart: counting starts afresh
        ((2, 2), state((1, 5, 5)), (2, 2, 0)),  # a straggler from an older boot
        ((1, 9), state((None, 12, 20)), (1, 20, 2)),  # no boot sent: same boot; a backlog
        ((1, 9), state(boots=(3,)), (3, None, 0)),  # a status birth with a new boot
        ((1, 9), state((1, 10, 10), boots=(1,)), (1, 10, 0)),  # same boot announced again
    ],
)
def test_gap_counting(
    stored: tuple[int | None, int | None], batch: _DeviceState, expected: tuple[Any, ...]
) -> None:
    assert count_gaps(*stored, batch) == expected


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
