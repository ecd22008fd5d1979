"""Numeric values leave the writer as binary COPY rows built by hand (`ingest_worker.writer`):
on real PostgreSQL they must store exactly what asyncpg's own encoding of the same datetimes
and floats stores, and a written batch exactly the decoded samples' times and values."""

from __future__ import annotations

import json
import struct
import time
from datetime import UTC, datetime

import asyncpg
import pytest

from ingest_worker.decode import decode_message
from ingest_worker.migrate import migrate_shared
from ingest_worker.registry import Registry
from ingest_worker.writer import (
    _NUMERIC_ROW,
    apply,
    epoch_micros,
    numeric_copy,
    pg_time,
    write_batch,
)
from schemas.limits import DEFAULT_LIMITS, MAX_INT
from schemas.messages import Quantity

pytestmark = pytest.mark.integration

TIMES = [
    datetime(2026, 6, 1, 12, 0, 0, 123456, tzinfo=UTC),
    datetime(2000, 1, 1, tzinfo=UTC),
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(1969, 7, 20, 20, 17, 40, 1, tzinfo=UTC),
    datetime(2242, 3, 16, 12, 56, 32, 999000, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
    datetime.max.replace(tzinfo=UTC),  # asyncpg writes it as infinity
    datetime.min.replace(tzinfo=UTC),  # and this as -infinity
    datetime(2026, 6, 1, 14, 0, tzinfo=UTC).astimezone(),  # another zone: the same instant
]
VALUES = [0.0, -0.0, 5e-324, 1e300, -1e300, 1 / 3, float(MAX_INT), float(-MAX_INT), 1.0, 0.0]


async def test_binary_copy_rows_store_what_asyncpg_stores(timescale_dsn: str) -> None:
    conn = await asyncpg.connect(timescale_dsn)
    try:
        for name in ("by_asyncpg", "by_hand"):
            await conn.execute(
                f"CREATE TEMP TABLE {name} (n serial, time timestamptz, metric_id integer, "
                "value double precision, received boolean)"
            )
        columns = ["time", "metric_id", "value", "received"]
        rows = [
            (when, 7 + i, value, i % 2 == 0)
            for i, (when, value) in enumerate(zip(TIMES, VALUES, strict=True))
        ]
        await conn.copy_records_to_table("by_asyncpg", records=rows, columns=columns)
        packed = [
            _NUMERIC_ROW.pack(4, 8, pg_time(epoch_micros(t)), 4, m, 8, v, 1, r)
            for t, m, v, r in rows
        ]
        await conn.copy_to_table(
            "by_hand", source=memoryview(numeric_copy(packed)), columns=columns, format="binary"
        )
        query = "SELECT time::text, metric_id, float8send(value), received FROM {} ORDER BY n"
        want = [tuple(r) for r in await conn.fetch(query.format("by_asyncpg"))]
        got = [tuple(r) for r in await conn.fetch(query.format("by_hand"))]
        assert got == want
        assert want[7][0] == "infinity"
        assert want[8][0] == "-infinity"
    finally:
        await conn.close()


async def test_a_written_batch_stores_the_decoded_samples_exactly(timescale_dsn: str) -> None:
    conn = await asyncpg.connect(timescale_dsn)
    try:
        await migrate_shared(conn)
        registry = Registry()
        now = time.time()
        base = int(now * 1000) - 3_600_000
        payloads = [
            # first sight of the metrics: their rows wait for the ids (the other path)
            {
                "ts": base - 1000,
                "metrics": {"level": 1, "n": 2, "on": True, "t": {"v": 1, "u": "C"}},
            },
            # a backlog: samples 1 ms apart, then 1 s and more apart, int and float values
            {"samples": [{"ts": base + s, "metrics": {"level": s + 0.25}} for s in range(50)]},
            {"samples": [{"ts": base + 5000 + 999 * s, "metrics": {"n": s}} for s in range(20)]},
            {"ts": base + 0.5004, "metrics": {"level": -0.0, "on": True, "t": {"v": 21, "u": "C"}}},
            {"metrics": {"level": 9.99e299, "n": MAX_INT, "note": "text"}},  # stamped on receipt
            {"ts": base + 7, "seq": 3, "metrics": {"n": -MAX_INT, "on": False}},
        ]
        items = [
            decode_message(
                None, "fl/acme/dev-1/telemetry", json.dumps(p).encode(), now, DEFAULT_LIMITS
            )
            for p in payloads
        ]
        assert [i.dead_reason for i in items] == [None] * len(items)
        assert items[1].micros is not None  # the fast path's microseconds are what is written
        first = await write_batch(conn, registry, "acme", items[:1])
        apply(registry, first)
        written = await write_batch(conn, registry, "acme", items[1:])
        apply(registry, written)
        want = []
        for item in items:
            for when, stamped, metrics in item.samples:
                for name, value in metrics.items():
                    v = value.v if isinstance(value, Quantity) else value
                    if isinstance(v, str):
                        continue
                    want.append((name, when, struct.pack(">d", float(v)), stamped))
        rows = await conn.fetch(
            "SELECT m.name, v.time, float8send(v.value) AS value, v.received "
            "FROM tenant_acme.numeric_values v JOIN tenant_acme.metrics m ON m.id = v.metric_id"
        )
        got = sorted((r["name"], r["time"], r["value"], r["received"]) for r in rows)
        assert got == sorted(want)
        assert first.numeric + written.numeric == len(want)
        assert written.text == 1
        text = await conn.fetch("SELECT time, value, received FROM tenant_acme.text_values")
        assert [tuple(r) for r in text] == [(items[4].received_at, "text", True)]
        # the same batch again (a redelivery): nothing new, no conflict
        again = await write_batch(conn, registry, "acme", items)
        assert again.conflict_readings == 0
        assert await conn.fetchval("SELECT count(*) FROM tenant_acme.numeric_values") == len(want)
    finally:
        await conn.close()
