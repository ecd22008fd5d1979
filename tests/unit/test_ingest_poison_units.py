"""The pure parts of poison isolation: sorting database errors, bounded statements, the
receive queue's byte bound."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import pytest

from ingest_worker.errors import StorageError
from ingest_worker.metrics import IngestMetrics
from ingest_worker.pipeline import Pipeline
from ingest_worker.writer import Failure, classify, is_transient, statement_chunks
from schemas.limits import Limits


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        # the database or the connection: retried for ever, never split into dead letters
        (asyncpg.ConnectionDoesNotExistError(), Failure.UNREACHABLE),  # 08003
        (asyncpg.ConnectionFailureError(), Failure.UNREACHABLE),  # 08006
        (asyncpg.AdminShutdownError(), Failure.UNREACHABLE),  # 57P01
        (asyncpg.CrashShutdownError(), Failure.UNREACHABLE),  # 57P02
        (asyncpg.CannotConnectNowError(), Failure.UNREACHABLE),  # 57P03
        (asyncpg.TooManyConnectionsError(), Failure.UNREACHABLE),  # 53300
        (ConnectionResetError(), Failure.UNREACHABLE),
        (TimeoutError(), Failure.UNREACHABLE),
        (asyncpg.InterfaceError("connection is closed"), Failure.UNREACHABLE),
        (StorageError("cannot connect"), Failure.UNREACHABLE),
        # this batch, maybe only this time: retried ingest.transient_tries times, then split
        (asyncpg.DeadlockDetectedError(), Failure.TRANSIENT),  # 40P01
        (asyncpg.SerializationError(), Failure.TRANSIENT),  # 40001
        (asyncpg.LockNotAvailableError(), Failure.TRANSIENT),  # 55P03
        (asyncpg.QueryCanceledError(), Failure.TRANSIENT),  # 57014: statement_timeout
        # this batch, for good: split at once
        (asyncpg.OutOfMemoryError(), Failure.PERMANENT),  # 53200: the chunk bomb
        (asyncpg.DiskFullError(), Failure.PERMANENT),  # 53100
        (asyncpg.ProgramLimitExceededError(), Failure.PERMANENT),  # 54000
        (asyncpg.UniqueViolationError(), Failure.PERMANENT),  # 23505
        (asyncpg.CheckViolationError(), Failure.PERMANENT),  # 23514
        (asyncpg.InvalidTextRepresentationError(), Failure.PERMANENT),  # 22P02
        (asyncpg.DataError(), Failure.PERMANENT),  # 22000, also asyncpg's own encoding errors
        (ValueError("a bug one message triggers"), Failure.PERMANENT),
    ],
)
def test_database_errors_are_sorted_by_sqlstate(exc: BaseException, expected: Failure) -> None:
    assert classify(exc) is expected
    assert is_transient(exc) is (expected is not Failure.PERMANENT)


def test_statement_chunks_stay_within_the_budget() -> None:
    sizes = [300, 300, 300, 900, 100, 2000, 50, 50]
    chunks = [list(c) for c in statement_chunks(sizes, lambda n: n, 1000)]
    assert chunks == [[300, 300, 300], [900, 100], [2000], [50, 50]]  # order kept
    assert [n for c in chunks for n in c] == sizes  # nothing lost or repeated
    for chunk in chunks:
        assert sum(chunk) <= 1000 or len(chunk) == 1  # a row over budget goes alone
    assert list(statement_chunks([], len, 10)) == []
    assert [list(c) for c in statement_chunks([5, 5], lambda n: n, 10)] == [[5, 5]]


async def test_reading_pauses_on_payload_bytes() -> None:
    """Payloads of up to megabytes: memory is bounded by bytes, not messages or rows only."""
    acked: list[Any] = []
    paused: list[bool] = []
    metrics = IngestMetrics()
    pipeline = Pipeline(
        limits=Limits(), max_rows=10_000, max_wait_s=0.001, queue_max=1_000,
        queue_max_rows=10_000, queue_max_bytes=1_000, ack=acked.append,
        pause=lambda: paused.append(True), resume=lambda: paused.append(False), metrics=metrics,
    )  # fmt: skip
    t = int(time.time() * 1000)
    sizes = []
    for i in range(3):
        payload = json.dumps({"ts": t + i, "metrics": {"note": "x" * 350}}).encode()
        sizes.append(len(payload))
        pipeline.accept(f"m{i}", "fl/a/d/telemetry", payload, time.time())
        # 3 messages and 3 rows are far below their bounds; ~1,150 bytes are not
        assert paused == ([True] if i == 2 else [])
    assert pipeline.pending_bytes == sum(sizes) >= 1_000
    assert (
        metrics.registry.get_sample_value(
            "fieldline_ingest_receive_pauses_total", {"bound": "bytes"}
        )
        == 1
    )
    batch = await pipeline.next_batch()
    assert batch is not None
    batch[1][0].kill("db_rejected", "refused")  # a dead letter: its bytes still count as sent
    pipeline.committed(batch[1])
    assert acked == ["m0", "m1", "m2"]
    assert (pipeline.pending_bytes, metrics.pending_bytes, paused) == (0, 0, [True, False])
    await asyncio.wait_for(pipeline.drain(1), 2)


async def test_reading_resumes_only_below_half_the_byte_bound() -> None:
    acked: list[Any] = []
    paused: list[bool] = []
    pipeline = Pipeline(
        limits=Limits(), max_rows=1, max_wait_s=0.001, queue_max=1_000, queue_max_bytes=1_000,
        ack=acked.append, pause=lambda: paused.append(True), resume=lambda: paused.append(False),
        metrics=IngestMetrics(),
    )  # fmt: skip
    t = int(time.time() * 1000)
    payloads = [
        json.dumps({"ts": t + i, "metrics": {"note": "x" * 265}}).encode() for i in range(4)
    ]
    assert all(300 <= len(p) < 333 for p in payloads)  # 3 stay below 1,000 bytes, 4 do not
    for i, payload in enumerate(payloads):
        pipeline.accept(f"m{i}", "fl/a/d/telemetry", payload, time.time())
    assert paused == [True]
    batches = []
    for _ in payloads:  # max_rows=1: a batch per message
        batch = await pipeline.next_batch()
        assert batch is not None
        batches.append(batch[1])
    pipeline.committed(batches[0])
    pipeline.committed(batches[1])
    assert paused == [True]  # two messages (> 500 bytes) still held: still paused
    pipeline.committed(batches[2])
    assert paused == [True, False]  # one (< 500 bytes): reading again
    assert acked == ["m0", "m1", "m2"]
