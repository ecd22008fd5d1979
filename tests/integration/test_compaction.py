"""Compaction on real PostgreSQL + TimescaleDB: bit-for-bit round trip, late data, kill -9 in
the middle, retention across hot and packed rows, reads equal before and after, the worker's
own schedule."""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from fleet import series
from ingest_worker.compaction import compact_tenant, storage_stats
from ingest_worker.maintenance import apply_retention
from ingest_worker.migrate import RetentionMode, add_tenant
from ingest_worker.receive import BrokerTarget
from ingest_worker.service import IngestWorker, WorkerConfig
from tests.fixtures.ingest import wait_for
from tests.fixtures.postgres import PgServer

pytestmark = pytest.mark.integration

DAY = timedelta(days=1)
# odd values: signed zero, subnormal-adjacent, huge, NaN (the writer refuses NaN, the table
# does not), decimals, products of a quantiser, integers
ODD = [-0.0, 0.0, 1e-300, 5e-324, 1.7976931348623157e308, -1e200, math.nan, 21.43,
       2083 * 0.01, 0.1 + 0.2, 7.0, -3.0, 27.272, 19.3566666666667]  # fmt: skip
WRITE = (
    "INSERT INTO {s}.numeric_values (time, metric_id, value, received) "
    "SELECT * FROM unnest($1::timestamptz[], $2::int[], $3::float8[], $4::bool[]) "
    "ON CONFLICT DO NOTHING"
)  # the writer's rule: a (metric_id, time) already stored is not written again


def _midnight(days_ago: int) -> datetime:
    now = datetime.now(UTC)
    return datetime(now.year, now.month, now.day, tzinfo=UTC) - days_ago * DAY


@pytest.fixture(scope="module")
def dsn(pg_server: PgServer) -> str:
    if not pg_server.timescaledb:
        pytest.skip("TimescaleDB is not installed for this PostgreSQL")
    return pg_server.new_database("compaction")


@pytest.fixture
def tenant(request: pytest.FixtureRequest) -> str:
    name: str = request.node.name
    return name.removeprefix("test_").replace("_", "-")[:40]


@pytest.fixture
async def conn(dsn: str, tenant: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(dsn)
    await add_tenant(c, tenant)
    try:
        yield c
    finally:
        await c.close()


def _s(tenant: str) -> str:
    return f'"tenant_{tenant}"'


async def write(conn: asyncpg.Connection, tenant: str, rows: list[tuple[Any, ...]]) -> None:
    await conn.execute(
        WRITE.format(s=_s(tenant)),
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
    )  # fmt: skip


async def read_all(conn: asyncpg.Connection, tenant: str) -> list[tuple[Any, ...]]:
    """Every sample through the read interface, values as their 8 bytes (bit for bit)."""
    rows = await conn.fetch(
        f"SELECT time, metric_id, float8send(value) AS v, received "  # noqa: S608
        f"FROM {_s(tenant)}.numeric_series(NULL, '-infinity', 'infinity') ORDER BY 2, 1"
    )
    return [tuple(r) for r in rows]


async def counts(conn: asyncpg.Connection, tenant: str) -> tuple[int, int]:
    """(hot rows, packed samples)."""
    st = await storage_stats(conn, tenant)
    return st.hot.samples, st.packed.samples


async def test_round_trip_bit_for_bit(conn: asyncpg.Connection, tenant: str) -> None:
    base = _midnight(3) + timedelta(hours=5)
    rows = []
    for i in range(300):  # metric 1: every odd value, irregular microsecond times
        rows.append((base + timedelta(seconds=61 * i, microseconds=(i * 7919) % 1_000_000),
                     1, ODD[i % len(ODD)], i % 5 == 0))  # fmt: skip
    for i in range(600):  # metric 2: a 2-decimal sensor every 10 s
        rows.append((base + timedelta(seconds=10 * i), 2, round(20 + math.sin(i / 9), 2), False))
    for i in range(300):  # metric 3: the simulator's quantiser (k * 0.01), a 50-minute gap
        gap = timedelta(minutes=50) if i >= 150 else timedelta(0)
        rows.append((base + timedelta(minutes=i) + gap, 3, round(2000 + i % 17) * 0.01, False))
    for i in range(400):  # metric 4: millisecond jitter, integers too far apart for int2
        rows.append((base + timedelta(seconds=30 * i, milliseconds=(i * 37) % 1000), 4,
                     float((i * 7919) % 200_000 - 100_000), False))  # fmt: skip
    await write(conn, tenant, rows)
    before = await read_all(conn, tenant)
    assert len(before) == len(rows)

    result = await compact_tenant(conn, tenant, DAY)
    assert result.rows == len(rows)
    assert result.done
    assert await counts(conn, tenant) == (0, len(rows))
    after = await read_all(conn, tenant)
    assert after == before  # times to the microsecond, values to the bit, received flags
    assert any(math.isnan(asyncpg_float(r[2])) for r in after)
    assert sum(r[2] == b"\x80" + bytes(7) for r in after) == sum(
        1 for r in rows if r[2] == 0 and math.copysign(1, r[2]) < 0
    )  # -0.0 stays negative
    # the encodings chosen: decimals as integers, the quantiser's products too, with the
    # odd values kept as they are (an exception array)
    layout = {
        r["metric_id"]: r
        for r in await conn.fetch(
            f"SELECT metric_id, scale, step, tick, toff IS NOT NULL AS toff, "  # noqa: S608
            f"ts IS NOT NULL AS ts, k2 IS NOT NULL AS k2, k4 IS NOT NULL AS k4 "
            f"FROM {_s(tenant)}.numeric_packed"
        )
    }
    assert layout[2]["scale"] == 100.0
    assert layout[3]["scale"] == -0.01
    # times: a regular row has no per-sample times; offsets in seconds, in milliseconds;
    # microsecond times spread over hours do not fit int4 offsets and are kept as they are
    assert (layout[2]["step"], layout[2]["toff"], layout[2]["ts"]) == (10_000_000, False, False)
    assert (layout[3]["step"], layout[3]["tick"], layout[3]["toff"]) == (None, 1_000_000, True)
    assert (layout[4]["step"], layout[4]["tick"], layout[4]["toff"]) == (None, 1000, True)
    assert (layout[1]["step"], layout[1]["ts"]) == (None, True)
    assert [layout[m]["k2"] for m in (2, 3, 4)] == [True, True, False]
    assert layout[4]["k4"]
    # any window reads exactly its samples (a regular row is cut before it is decoded)
    rng = random.Random(5)
    times = sorted({r[0] for r in rows})
    for _ in range(40):
        a, b = sorted(rng.sample(times, 2))
        a += rng.choice([timedelta(0), timedelta(microseconds=1), -timedelta(microseconds=1)])
        window = await conn.fetch(
            f"SELECT time, metric_id, float8send(value) AS v, received "  # noqa: S608
            f"FROM {_s(tenant)}.numeric_series(NULL, $1, $2) ORDER BY 2, 1",
            a, b,
        )  # fmt: skip
        assert [tuple(r) for r in window] == [r for r in before if a <= r[0] < b]
    # idempotent: nothing left to do, nothing changed
    again = await compact_tenant(conn, tenant, DAY)
    assert again.rows == 0
    assert await read_all(conn, tenant) == before


def asyncpg_float(raw: bytes) -> float:
    import struct

    value: float = struct.unpack("!d", raw)[0]
    return value


async def test_late_data_is_merged_once(conn: asyncpg.Connection, tenant: str) -> None:
    hour = _midnight(4) + timedelta(hours=10)
    # metric 7 is dev-1's "temp" (the others have no metrics row: compaction needs none)
    await conn.execute(f"INSERT INTO {_s(tenant)}.devices (id) VALUES ('dev-1')")  # noqa: S608
    await conn.execute(
        f"INSERT INTO {_s(tenant)}.metrics (id, device_id, name, kind) "  # noqa: S608
        "OVERRIDING SYSTEM VALUE VALUES (7, 'dev-1', 'temp', 'numeric')"
    )
    rows = [(hour + timedelta(minutes=i), 7, 10.0 + i, False) for i in range(0, 60, 2)]
    # a metric with millisecond times (offsets), merged with a late sample of its own
    jitter = [(hour + timedelta(seconds=50 * i, milliseconds=(i * 37) % 1000), 8, i / 4, False)
              for i in range(40)]  # fmt: skip
    await write(conn, tenant, [*rows, *jitter])
    await compact_tenant(conn, tenant, DAY)
    assert await counts(conn, tenant) == (0, 70)
    await write(conn, tenant, [(hour + timedelta(seconds=7, milliseconds=5), 8, 0.5, False)])
    mixed = await read_all(conn, tenant)
    await compact_tenant(conn, tenant, DAY)
    assert await read_all(conn, tenant) == mixed
    assert await counts(conn, tenant) == (0, 71)
    await conn.execute(f"DELETE FROM {_s(tenant)}.numeric_packed WHERE metric_id = 8")  # noqa: S608

    late = (hour + timedelta(minutes=1, microseconds=3), 7, 99.5, True)  # new time
    copy = (hour + timedelta(minutes=4), 7, 555.0, False)  # a packed time, another value
    again = rows[10]  # a redelivery of a packed reading
    await write(conn, tenant, [late, copy, again])
    seen = await read_all(conn, tenant)
    # no double: the packed reading wins over a hot row with its (metric, time)
    assert len(seen) == 31
    assert {(r[0], asyncpg_float(r[2])) for r in seen} == {(r[0], r[2]) for r in [*rows, late]}
    result = await compact_tenant(conn, tenant, DAY)
    assert await counts(conn, tenant) == (0, 31)
    merged = await read_all(conn, tenant)
    assert merged == seen
    # the other value is not silent: one dead letter for the device (the redelivery of the
    # same value is no conflict)
    assert result.conflicts == 1
    told = await conn.fetch(
        "SELECT reason, device_id, topic, error FROM fieldline.dead_letters WHERE tenant_id = $1",
        tenant,
    )
    assert [(r["reason"], r["device_id"], r["topic"]) for r in told] == [
        ("conflicting_value", "dev-1", f"fl/{tenant}/dev-1/telemetry")
    ]
    assert "1 reading(s)" in told[0]["error"]
    assert "temp at " in told[0]["error"]
    assert "stored 14, sent 555" in told[0]["error"]
    # the same late message delivered once more: nothing changes, before or after compaction
    await write(conn, tenant, [late])
    assert await read_all(conn, tenant) == merged
    again_result = await compact_tenant(conn, tenant, DAY)
    assert await read_all(conn, tenant) == merged
    assert await counts(conn, tenant) == (0, 31)
    assert again_result.conflicts == 0
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM fieldline.dead_letters WHERE tenant_id = $1", tenant
        )
        == 1
    )


async def test_kill_9_in_the_middle(conn: asyncpg.Connection, tenant: str, dsn: str) -> None:
    # three days of 4 metrics; a transaction of ours holds a row of the second day, so the
    # compactor commits the first day and waits inside the second one's statement
    start = _midnight(6)
    rows = [
        (start + timedelta(minutes=5 * i), m, float(i % 97) / 4, False)
        for m in (1, 2, 3, 4)
        for i in range(3 * 288)
    ]
    await write(conn, tenant, rows)
    expected = await read_all(conn, tenant)
    blocker = await asyncpg.connect(dsn)
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute(
        f"SELECT 1 FROM {_s(tenant)}.numeric_values WHERE metric_id = 1 "  # noqa: S608
        "AND time = $1 FOR UPDATE",
        start + DAY,
    )
    env = {**os.environ, "FIELDLINE_DATABASE_URL": dsn, "FIELDLINE_LOG_LEVEL": "WARNING"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fieldline", "db", "compact", tenant, "--older-than", "1d",
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        async def waiting() -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%numeric_packed%' AND datname = current_database()"
                )
            )

        await wait_for(waiting, 30, "the compactor to block inside the second day")
        hot, packed = await counts(conn, tenant)
        assert packed == 4 * 288
        assert hot == 8 * 288
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await tx.rollback()
        await blocker.close()

    async def backend_gone() -> bool:
        return not await waiting() and not await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%numeric_packed%' "
            "AND pid <> pg_backend_pid() AND datname = current_database()"
        )

    await wait_for(backend_gone, 30, "the killed compactor's backend to roll back")
    # the half-done day rolled back: readers see every sample once
    assert await read_all(conn, tenant) == expected
    assert await counts(conn, tenant) == (8 * 288, 4 * 288)
    result = await compact_tenant(conn, tenant, DAY)
    assert result.rows == 8 * 288
    assert await read_all(conn, tenant) == expected
    assert await counts(conn, tenant) == (0, 12 * 288)


async def test_retention_drops_hot_and_packed(conn: asyncpg.Connection, tenant: str) -> None:
    await add_tenant(conn, tenant, retention_days=30)
    old = [(_midnight(60) + timedelta(hours=h), 1, float(h), False) for h in range(24)]
    recent = [(_midnight(10) + timedelta(hours=h), 1, float(h), False) for h in range(24)]
    await write(conn, tenant, [*old, *recent])
    await compact_tenant(conn, tenant, DAY)
    late_old = (_midnight(59), 1, 1.5, False)  # hot again, in the old range
    await write(conn, tenant, [late_old])
    assert await counts(conn, tenant) == (1, 48)
    await apply_retention(conn, RetentionMode.DROP_CHUNKS)
    assert await counts(conn, tenant) == (0, 24)
    assert [r[0] for r in await read_all(conn, tenant)] == [r[0] for r in recent]
    # without TimescaleDB's chunks: DELETE, by the packed row's day
    await write(conn, tenant, [late_old, *old])
    await compact_tenant(conn, tenant, DAY)
    await write(conn, tenant, [(_midnight(58), 1, 2.5, False)])
    await apply_retention(conn, RetentionMode.DELETE)
    assert await counts(conn, tenant) == (0, 24)


async def test_reads_equal_before_and_after(
    conn: asyncpg.Connection, tenant: str, dsn: str
) -> None:
    await conn.execute(
        f"INSERT INTO {_s(tenant)}.devices (id, status) VALUES ('press-1', 'online')"  # noqa: S608
    )
    metric = await conn.fetchval(
        f"INSERT INTO {_s(tenant)}.metrics (device_id, name, kind) "  # noqa: S608
        "VALUES ('press-1', 'temp', 'numeric') RETURNING id"
    )
    now = datetime.now(UTC)
    rows = [
        (now - timedelta(minutes=3 * i, microseconds=i), metric, round(math.cos(i / 7), 3), False)
        for i in range(1, 5 * 480)
    ]
    await write(conn, tenant, rows)

    async def everything() -> tuple[Any, ...]:
        q = await series.query(conn, tenant, "press-1", "temp", 6 * DAY, timedelta(hours=1))
        b = await series.buckets(conn, tenant, metric, now - 5 * DAY, now, timedelta(minutes=7))
        latest = await series.latest_values(conn, tenant)
        recent = await series.recent_rows(conn, tenant, 3 * 86400)
        return q, b, latest, recent

    before = await everything()
    assert len(before[0]) > 90
    assert before[2]["press-1"]["temp"].time == rows[0][0]
    result = await compact_tenant(conn, tenant, DAY)
    assert result.rows > 0
    after = await everything()
    # min, max, counts, times and latest values exactly; an average may differ in its last
    # bit, as floating-point sums depend on the order rows arrive in
    assert [_exact(b) for b in after[0]] == [_exact(b) for b in before[0]]
    assert [_exact(b) for b in after[1]] == [_exact(b) for b in before[1]]
    for one, other in ((after[0], before[0]), (after[1], before[1])):
        assert all(
            math.isclose(x.avg, y.avg, rel_tol=1e-12, abs_tol=1e-12)
            for x, y in zip(one, other, strict=False)
        )
    assert after[2:] == before[2:]
    # `fieldline query` as a user runs it
    env = {**os.environ, "FIELDLINE_DATABASE_URL": dsn}
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "fieldline", "query", tenant, "press-1", "temp", "--since", "6d",
         "--bucket", "1h", "--format", "json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count('"count"') == len(before[0])


def _exact(b: series.Bucket) -> tuple[Any, ...]:
    return b.start, b.min, b.max, b.count


async def test_the_worker_compacts_on_its_schedule(
    conn: asyncpg.Connection, tenant: str, dsn: str
) -> None:
    rows = [(_midnight(2) + timedelta(minutes=i), 1, i / 8, False) for i in range(1440)]
    await write(conn, tenant, rows)
    expected = await read_all(conn, tenant)
    # no broker at that port: the receiver retries in the background, the schedules run
    target = BrokerTarget("127.0.0.1", 9, None, "ingest-compaction-test", ("fl/+/+/telemetry",))
    config = WorkerConfig(dsn=dsn, target=target, compact_every_s=0.2, drain_timeout_s=1)
    worker = IngestWorker(config)
    await worker.start()
    try:
        await wait_for(lambda: _packed(conn, tenant, 1440), 30, "the worker to compact")
    finally:
        await worker.stop()
    assert await read_all(conn, tenant) == expected
    rows_metric = worker.metrics.registry.get_sample_value("fieldline_ingest_compacted_rows_total")
    assert rows_metric is not None
    assert rows_metric >= 1440


async def _packed(conn: asyncpg.Connection, tenant: str, n: int) -> bool:
    return (await counts(conn, tenant)) == (0, n)


def test_stats_and_compact_cli(dsn: str) -> None:
    env = {**os.environ, "FIELDLINE_DATABASE_URL": dsn}

    async def seed() -> None:
        c = await asyncpg.connect(dsn)
        try:
            await add_tenant(c, "cli")
            await write(c, "cli", [(_midnight(3) + timedelta(minutes=i), 1, 1.0, False)
                                   for i in range(1440)])  # fmt: skip
        finally:
            await c.close()

    asyncio.run(seed())
    cmd = [sys.executable, "-m", "fieldline", "db"]
    out = subprocess.run([*cmd, "compact", "cli", "--older-than", "1d"], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1,440 rows packed" in out.stdout
    out = subprocess.run([*cmd, "stats", "cli", "--json"], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    import json

    (stats,) = json.loads(out.stdout)
    assert stats["packed"]["samples"] == 1440
    assert stats["hot"]["samples"] == 0
    assert stats["packed"]["bytes"] > 0
    bad = subprocess.run([*cmd, "compact", "cli", "--older-than", "soon"], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode != 0
    assert "Traceback" not in bad.stdout + bad.stderr
