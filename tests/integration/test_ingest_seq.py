"""`seq` gaps on real PostgreSQL: batches of one device committing out of order on two
connections (two writers, or two workers) count nothing; a real skip counts exactly once,
after the reorder window; a redelivery counts nothing; a new boot starts afresh."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from ingest_worker.decode import Decoded, decode_message
from ingest_worker.migrate import migrate_shared
from ingest_worker.registry import Registry
from ingest_worker.sequence import SeqWindow
from ingest_worker.writer import Narrowing, Written, write_narrowed
from schemas.limits import DEFAULT_LIMITS
from tests.fixtures.ingest import wait_for

pytestmark = pytest.mark.integration

BASE_MS = int(time.time() * 1000) - 3_600_000


def messages(device: str, seqs: list[int], boot: int = 1) -> list[Decoded]:
    """One telemetry message per seq, each with a timestamp of its own."""
    now = time.time()
    return [
        decode_message(
            None,
            f"fl/acme/{device}/telemetry",
            json.dumps(
                {"ts": BASE_MS + boot * 100_000 + s, "seq": s, "boot": boot, "metrics": {"v": s}}
            ).encode(),
            now,
            DEFAULT_LIMITS,
        )
        for s in seqs
    ]


class Writers:
    """Two writers of one worker (one registry), each with its own connection."""

    def __init__(self, conns: list[asyncpg.Connection], registry: Registry) -> None:
        self.conns, self.registry, self.gaps = conns, registry, 0

    def _committed(self, _items: list[Decoded], written: Written, _s: float) -> None:
        self.gaps += written.gaps

    async def write(self, writer: int, batch: list[Decoded]) -> None:
        policy = Narrowing(tries=1, committed=self._committed)
        await write_narrowed(self.conns[writer], self.registry, "acme", batch, policy)


@pytest.fixture
async def writers(timescale_dsn: str) -> AsyncIterator[Writers]:
    conns = [await asyncpg.connect(timescale_dsn) for _ in range(3)]
    try:
        await migrate_shared(conns[0])
        window = SeqWindow(wait=timedelta(seconds=0.5), span=4096)
        yield Writers(conns[:2], Registry(sequence=window))
    finally:
        for conn in conns:
            await conn.close()


async def device_row(w: Writers, device: str) -> tuple[object, ...]:
    row = await w.conns[0].fetchrow(
        "SELECT boot, seq, seq_gaps, seq_ahead IS NULL AS closed FROM tenant_acme.devices "
        "WHERE id = $1",
        device,
    )
    assert row is not None
    return tuple(row)


async def hole_older_than_window(w: Writers, device: str) -> bool:
    return bool(
        await w.conns[0].fetchval(
            "SELECT now() - seq_hole_at > interval '0.5 s' FROM tenant_acme.devices WHERE id = $1",
            device,
        )
    )


async def test_batches_committing_out_of_order_count_no_gap(writers: Writers) -> None:
    # 8 batches of 25 messages, committed later ones first, alternating the two writers
    batches = [messages("dev-1", list(range(1 + 25 * b, 26 + 25 * b))) for b in range(8)]
    for n, b in enumerate([1, 0, 3, 2, 7, 5, 6, 4]):
        await writers.write(n % 2, batches[b])
    # and at the same time on both: whichever takes the device's row lock first
    more = [messages("dev-1", list(range(201 + 25 * b, 226 + 25 * b))) for b in range(8)]

    async def stream(writer: int, order: list[int]) -> None:
        for b in order:
            await writers.write(writer, more[b])

    await asyncio.gather(stream(0, [7, 5, 3, 1]), stream(1, [6, 4, 2, 0]))
    assert writers.gaps == 0
    assert await device_row(writers, "dev-1") == (1, 400, 0, True)


async def test_a_real_skip_counts_exactly_once_after_the_window(writers: Writers) -> None:
    # 11, 12, 13 never sent; 31 comes before 21..30 (a reordering)
    await writers.write(0, messages("dev-2", [*range(1, 11), *range(14, 21), 31]))
    await writers.write(1, messages("dev-2", list(range(21, 31))))
    assert (writers.gaps, await device_row(writers, "dev-2")) == (0, (1, 10, 0, False))
    await wait_for(lambda: hole_older_than_window(writers, "dev-2"), 10, "the window")
    await writers.write(1, messages("dev-2", [32]))
    assert (writers.gaps, await device_row(writers, "dev-2")) == (3, (1, 32, 3, True))
    # a redelivery of everything, and the missing one arriving after the window: nothing
    await writers.write(0, messages("dev-2", [*range(1, 11), *range(14, 33)]))
    await writers.write(1, messages("dev-2", [12]))
    assert (writers.gaps, await device_row(writers, "dev-2")) == (3, (1, 32, 3, True))
    # a restart: boot 2 counts from its own first seq; a late boot-1 straggler moves nothing
    await writers.write(0, messages("dev-2", [1, 2], boot=2))
    await writers.write(1, messages("dev-2", [33]))
    assert (writers.gaps, await device_row(writers, "dev-2")) == (3, (2, 2, 3, True))


def answer(command: str, status: str, received_at: float) -> Decoded:
    """A device's answer to a command, received by the worker at `received_at`."""
    payload = json.dumps({"id": command, "status": status}).encode()
    return decode_message(None, "fl/acme/dev-9/cmd-res", payload, received_at, DEFAULT_LIMITS)


async def test_the_first_received_answer_is_the_result_whatever_commits_first(
    writers: Writers,
) -> None:
    # the run's `ok`, then the device refusing a replay: the two answers fall in two batches,
    # and the second batch's writer commits first
    command = "00000000-0000-4000-8000-000000000042"
    now = time.time()
    await writers.write(1, [answer(command, "rejected", now + 0.5)])
    await writers.write(0, [answer(command, "ok", now)])
    row = await writers.conns[0].fetchrow(
        "SELECT status, answered_at FROM tenant_acme.commands WHERE id = $1::uuid", command
    )
    assert row is not None
    assert row["status"] == "ok"
    # and a later answer committed after it changes nothing
    await writers.write(1, [answer(command, "error", now + 1.0)])
    status = await writers.conns[0].fetchval(
        "SELECT status FROM tenant_acme.commands WHERE id = $1::uuid", command
    )
    assert status == "ok"
