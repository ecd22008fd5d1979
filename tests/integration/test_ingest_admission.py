"""One device with a valid certificate cannot hurt the others: the worker's admission limits.

Real broker, real PostgreSQL + TimescaleDB, a real worker: what a hostile device sends is
refused into (bounded, rate-limited) dead letters with its reason, while a canary device of
the same tenant keeps committing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import replace
from typing import Any

import asyncpg
import pytest

from ingest_worker.admission import AdmissionLimits
from ingest_worker.migrate import add_tenant, migrate_shared
from ingest_worker.service import IngestWorker
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.ingest import burst, count, fetch, fetchval, wait_for, worker_config

pytestmark = pytest.mark.integration

DAY_MS = 24 * 3600 * 1000


def now_ms() -> int:
    return int(time.time() * 1000)


def j(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


async def _chunks(dsn: str, table: str = "numeric_values") -> int:
    return int(
        await fetchval(
            dsn,
            "SELECT count(*) FROM timescaledb_information.chunks "
            "WHERE hypertable_schema = 'tenant_acme' AND hypertable_name = $1",
            table,
        )
    )


async def _reasons(dsn: str) -> dict[str, int]:
    rows = await fetch(
        dsn, "SELECT reason, count(*) AS n FROM fieldline.dead_letters GROUP BY reason"
    )
    return {r["reason"]: r["n"] for r in rows}


async def test_a_chunk_bomb_is_refused_and_a_canary_of_the_same_tenant_commits(
    broker: BrokerUnderTest, timescale_dsn: str
) -> None:
    """6 backlog messages of 1,000 samples a day apart since 2000 once made thousands of chunks
    in one transaction (`out of shared memory`, retried for ever): now dead letters."""
    pki = broker.pki
    start = 946_684_800_000  # 2000-01-01
    bomb = [
        (
            "fl/acme/dev-1/telemetry",
            j({"samples": [
                {"ts": start + (m * 1000 + i) * DAY_MS, "metrics": {"x": i}}
                for i in range(1000) if start + (m * 1000 + i) * DAY_MS < now_ms()
            ]}),
        )
        for m in range(6)
    ]  # fmt: skip
    async with IngestWorker(worker_config(broker, timescale_dsn)) as worker:
        await worker.wait_connected(15)
        warm = [("fl/acme/dev-2/telemetry", j({"ts": now_ms(), "metrics": {"canary": 0}}))]
        await asyncio.to_thread(burst, broker, pki.device2, warm)
        await wait_for(
            lambda: _at_least(timescale_dsn, "tenant_acme.numeric_values", 1), 15, "warm"
        )
        chunks_before = await _chunks(timescale_dsn)
        await asyncio.to_thread(burst, broker, pki.device, bomb)
        sent = time.monotonic()
        canary = [("fl/acme/dev-2/telemetry", j({"ts": now_ms(), "metrics": {"canary": 1}}))]
        await asyncio.to_thread(burst, broker, pki.device2, canary)
        await wait_for(
            lambda: _at_least(timescale_dsn, "tenant_acme.numeric_values", 2), 10, "the canary"
        )
        assert time.monotonic() - sent < 10
        await wait_for(
            lambda: _at_least(timescale_dsn, "fieldline.dead_letters", len(bomb)), 10, "refusals"
        )
    assert await _chunks(timescale_dsn) - chunks_before <= 2
    assert (await _reasons(timescale_dsn)) == {"too_old": len(bomb)}
    error = await fetchval(timescale_dsn, "SELECT error FROM fieldline.dead_letters LIMIT 1")
    assert "older than the accepted window" in error
    assert _metric(worker, "fieldline_ingest_dead_letters_total", reason="too_old") == len(bomb)


async def test_old_events_and_statuses_are_refused_like_old_telemetry(
    broker: BrokerUnderTest, timescale_dsn: str
) -> None:
    """`events` is a hypertable too: events a week apart since 2000 made a chunk each."""
    start = 946_684_800_000
    old = [
        ("fl/acme/dev-1/events", j({"ts": start + w * 7 * DAY_MS, "kind": "door"}))
        for w in range(200)
    ] + [("fl/acme/dev-1/status", j({"state": "online", "ts": start}))]
    fresh = [("fl/acme/dev-1/events", j({"ts": now_ms(), "kind": "door"}))]
    async with IngestWorker(worker_config(broker, timescale_dsn)) as worker:
        await worker.wait_connected(15)
        await asyncio.to_thread(burst, broker, broker.pki.device, fresh)
        await wait_for(lambda: _settled(worker, 1), 15, "the fresh event")
        before = await _chunks(timescale_dsn, "events")
        await asyncio.to_thread(burst, broker, broker.pki.device, old)
        await wait_for(lambda: _settled(worker, 202), 15, "the old ones")
    assert await _chunks(timescale_dsn, "events") == before
    dead = await fetch(timescale_dsn, "SELECT topic, reason FROM fieldline.dead_letters")
    assert {r["reason"] for r in dead} == {"too_old"}
    assert len(dead) == 60  # the device's dead-letter budget; the other 141 counted only
    suppressed = _metric(worker, "fieldline_ingest_dead_letters_suppressed_total", reason="too_old")
    assert suppressed == 141
    events = await fetchval(
        timescale_dsn, "SELECT count(*) FROM tenant_acme.events WHERE kind = 'door'"
    )
    assert events == 1


async def test_a_command_result_id_repeated_in_one_batch_is_one_row_without_a_split(
    broker: BrokerUnderTest, timescale_dsn: str
) -> None:
    """Twice the same id in one statement once failed every batch (SQLSTATE 21000), which
    split them down to single messages: 52 s of ingest for a 1 s burst."""
    results = []
    for n in range(200):
        command = f"00000000-0000-4000-8000-{n:012d}"
        for status in ("ok", "error"):
            results.append(("fl/acme/dev-1/cmd-res", j({"id": command, "status": status})))
    async with IngestWorker(worker_config(broker, timescale_dsn)) as worker:
        await worker.wait_connected(15)
        await asyncio.to_thread(burst, broker, broker.pki.device, results)
        await wait_for(lambda: _settled(worker, 400), 20, "the results")
        splits = _metric(worker, "fieldline_ingest_batch_splits_total")
        # a replay refused later, in another batch, does not overwrite the run's answer either
        replays = [
            (
                "fl/acme/dev-1/cmd-res",
                j({"id": c, "status": "rejected", "detail": "received before"}),
            )
            for c in sorted({json.loads(p)["id"] for _, p in results})
        ]
        await asyncio.to_thread(burst, broker, broker.pki.device, replays)
        await wait_for(lambda: _settled(worker, 600), 20, "the replays' answers")
    assert splits == 0
    rows = await fetch(timescale_dsn, "SELECT status FROM tenant_acme.commands")
    assert len(rows) == 200
    # a command runs once: the first answer is its result
    assert {r["status"] for r in rows} == {"ok"}
    assert await count(timescale_dsn, "fieldline.dead_letters") == 0


async def test_the_window_follows_a_shorter_tenant_retention(
    broker: BrokerUnderTest, timescale_dsn: str
) -> None:
    conn = await asyncpg.connect(timescale_dsn)
    try:
        await migrate_shared(conn)
        await add_tenant(conn, "acme", retention_days=2)
    finally:
        await conn.close()
    t = now_ms()
    messages = [
        ("fl/acme/dev-1/telemetry", j({"ts": t - 3 * DAY_MS, "metrics": {"old": 1}})),
        ("fl/acme/dev-1/telemetry", j({"ts": t - 1 * DAY_MS, "metrics": {"recent": 1}})),
    ]
    async with IngestWorker(worker_config(broker, timescale_dsn)) as worker:
        await worker.wait_connected(15)
        await asyncio.to_thread(burst, broker, broker.pki.device, messages)
        await wait_for(lambda: _settled(worker, 2), 15, "both messages")
    assert await count(timescale_dsn, "tenant_acme.numeric_values") == 1
    assert await _reasons(timescale_dsn) == {"too_old": 1}


async def test_twenty_thousand_metric_names_leave_at_most_the_limit(
    broker: BrokerUnderTest, timescale_dsn: str
) -> None:
    pki = broker.pki
    t = now_ms() - 60_000
    flood = [
        (
            "fl/acme/dev-1/telemetry",
            j({"ts": t + m, "metrics": {f"m{m}_{i}": i for i in range(250)}}),
        )
        for m in range(80)
    ]
    admission = AdmissionLimits(max_metrics_per_device=1000, new_metrics_per_minute=100_000)
    config = replace(worker_config(broker, timescale_dsn), admission=admission)
    async with IngestWorker(config) as worker:
        await worker.wait_connected(15)
        await asyncio.to_thread(burst, broker, pki.device, flood)
        canary = [("fl/acme/dev-2/telemetry", j({"ts": t, "metrics": {"temperature": 21.5}}))]
        await asyncio.to_thread(burst, broker, pki.device2, canary)
        await wait_for(lambda: _settled(worker, 81), 30, "the flood and the canary")
        refused = _metric(worker, "fieldline_ingest_dead_letters_total", reason="metric_limit")
        suppressed = _metric(
            worker, "fieldline_ingest_dead_letters_suppressed_total", reason="metric_limit"
        )
    per_device = {
        r["device_id"]: r["n"]
        for r in await fetch(
            timescale_dsn,
            "SELECT device_id, count(*) AS n FROM tenant_acme.metrics GROUP BY device_id",
        )
    }
    assert per_device == {"dev-1": 1000, "dev-2": 1}
    # 4 x 250 names fit, the other 76 messages are refused: 60 kept (the device's dead-letter
    # budget a minute), 16 counted only
    assert await _reasons(timescale_dsn) == {"metric_limit": 60}
    assert refused == 76
    assert suppressed == 16
    error = await fetchval(timescale_dsn, "SELECT error FROM fieldline.dead_letters LIMIT 1")
    assert "ingest.max_metrics_per_device (1000)" in error


async def test_new_metric_names_are_rate_limited_per_device(
    broker: BrokerUnderTest, timescale_dsn: str
) -> None:
    t = now_ms() - 60_000
    messages = [
        (
            "fl/acme/dev-1/telemetry",
            j({"ts": t + m, "metrics": {f"n{m}_{i}": i for i in range(10)}}),
        )
        for m in range(10)
    ]
    admission = AdmissionLimits(new_metrics_per_minute=50)
    config = replace(worker_config(broker, timescale_dsn), admission=admission)
    async with IngestWorker(config) as worker:
        await worker.wait_connected(15)
        await asyncio.to_thread(burst, broker, broker.pki.device, messages)
        await wait_for(lambda: _settled(worker, 10), 15, "the messages")
    assert await fetchval(timescale_dsn, "SELECT count(*) FROM tenant_acme.metrics") == 50
    assert await _reasons(timescale_dsn) == {"metric_rate": 5}


async def test_dead_letters_are_bounded_in_bytes_and_rate_per_device(
    broker: BrokerUnderTest, timescale_dsn: str
) -> None:
    pki = broker.pki
    big = b'{"metrics": {"x": "' + b"y" * 200_000 + b'"'  # not JSON: a dead letter
    junk = [("fl/acme/dev-1/telemetry", big)] + [
        ("fl/acme/dev-1/telemetry", b"not json %d" % i) for i in range(199)
    ]
    admission = AdmissionLimits(
        dead_letter_payload_bytes=1000, dead_letters_per_device_per_minute=20
    )
    config = replace(worker_config(broker, timescale_dsn), admission=admission)
    async with IngestWorker(config) as worker:
        await worker.wait_connected(15)
        await asyncio.to_thread(burst, broker, pki.device, junk)
        good = [("fl/acme/dev-2/telemetry", j({"metrics": {"a": 1}}))]
        bad2 = [("fl/acme/dev-2/telemetry", b"also not json")]
        await asyncio.to_thread(burst, broker, pki.device2, bad2 + good)
        await wait_for(lambda: _settled(worker, 202), 20, "every message")
        suppressed = _metric(
            worker, "fieldline_ingest_dead_letters_suppressed_total", reason="bad_json"
        )
        refused = _metric(worker, "fieldline_ingest_dead_letters_total", reason="bad_json")
    rows = await fetch(
        timescale_dsn,
        "SELECT device_id, payload, payload_size, payload_sha256 FROM fieldline.dead_letters "
        "ORDER BY time",
    )
    by_device = {d: [r for r in rows if r["device_id"] == d] for d in ("dev-1", "dev-2")}
    assert len(by_device["dev-1"]) == 20  # its budget; the other 180 only counted
    assert len(by_device["dev-2"]) == 1  # another device's budget is its own
    assert suppressed == 180
    assert refused == 201
    first = by_device["dev-1"][0]
    assert bytes(first["payload"]) == big[:1000]
    assert first["payload_size"] == len(big)
    assert bytes(first["payload_sha256"]) == hashlib.sha256(big).digest()
    assert await count(timescale_dsn, "tenant_acme.numeric_values") == 1


async def test_another_value_for_a_stored_timestamp_is_visible_a_redelivery_is_not(
    broker: BrokerUnderTest, timescale_dsn: str
) -> None:
    pki = broker.pki
    t = now_ms() - 60_000
    first = [("fl/acme/dev-1/telemetry", j({"ts": t, "metrics": {"a": 1.5, "mode": "auto"}}))]
    other = [("fl/acme/dev-1/telemetry", j({"ts": t, "metrics": {"a": 2.5, "mode": "auto"}}))]
    async with IngestWorker(worker_config(broker, timescale_dsn)) as worker:
        await worker.wait_connected(15)
        await asyncio.to_thread(burst, broker, pki.device, first)
        await wait_for(lambda: _settled(worker, 1), 10, "the first message")
        await asyncio.to_thread(burst, broker, pki.device, first)  # a true redelivery
        await wait_for(lambda: _settled(worker, 2), 10, "the redelivery")
        assert await count(timescale_dsn, "fieldline.dead_letters") == 0
        assert _metric(worker, "fieldline_ingest_conflicting_readings_total") == 0
        await asyncio.to_thread(burst, broker, pki.device, other)
        await wait_for(lambda: _settled(worker, 3), 10, "the other value")
        conflicts = _metric(worker, "fieldline_ingest_conflicting_readings_total")
    assert conflicts == 1  # `a` differs; `mode` is the same and says nothing
    assert await fetchval(timescale_dsn, "SELECT value FROM tenant_acme.numeric_values") == 1.5
    rows = await fetch(timescale_dsn, "SELECT reason, device_id, error FROM fieldline.dead_letters")
    assert [(r["reason"], r["device_id"]) for r in rows] == [("conflicting_value", "dev-1")]
    assert "stored 1.5, sent 2.5" in rows[0]["error"]


async def _at_least(dsn: str, table: str, n: int) -> bool:
    return await count(dsn, table) >= n


async def _settled(worker: IngestWorker, n: int) -> bool:
    return worker.metrics.received >= n and not worker.pipeline.pending


def _metric(worker: IngestWorker, name: str, **labels: str) -> float:
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0
