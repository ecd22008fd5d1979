"""Workers meeting a tenant for the first time: the tenant's tables are complete before anyone
writes into them, however many workers race for it and whatever a crash left half done."""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import pytest

from ingest_worker.decode import Decoded, decode_message
from ingest_worker.migrate import Scope, add_tenant, load_migrations, migrate_shared, reader_role
from ingest_worker.registry import Registry
from ingest_worker.writer import write_narrowed
from schemas.limits import DEFAULT_LIMITS

pytestmark = pytest.mark.integration

TENANT = load_migrations(Scope.TENANT)


def telemetry(tenant: str, device: str, first: int, n: int) -> list[Decoded]:
    """n messages of two metrics each, every one with its own timestamp."""
    now = time.time()
    base = int(now * 1000) - 3_600_000
    return [
        decode_message(
            None,
            f"fl/{tenant}/{device}/telemetry",
            json.dumps({"ts": base + i, "seq": i, "metrics": {"t": 21.5, "h": 40.0}}).encode(),
            now,
            DEFAULT_LIMITS,
        )
        for i in range(first, first + n)
    ]


async def write_stream(
    dsn: str, registry: Registry, tenant: str, device: str, batches: int, size: int
) -> None:
    """One writer of a worker: its own connection, the worker's registry, no retries (a
    deadlock or a missing table must fail the test, not be papered over)."""
    conn = await asyncpg.connect(dsn)
    try:
        for b in range(batches):
            await write_narrowed(conn, registry, tenant, telemetry(tenant, device, b * size, size))
    finally:
        await conn.close()


async def test_two_workers_meeting_new_tenants_at_once_write_everything_once(
    timescale_dsn: str,
) -> None:
    conn = await asyncpg.connect(timescale_dsn)
    try:
        await migrate_shared(conn)
        # before the fix this raced within a handful of rounds: a worker found the tenants row
        # of a tenant still being migrated, wrote into missing tables (dead letters) or
        # deadlocked with the other worker's ALTER TABLE
        for round_ in range(12):
            tenant = f"new{round_}"
            workers = [Registry(), Registry()]
            await asyncio.gather(
                *[
                    write_stream(timescale_dsn, workers[w], tenant, f"{tenant}-d{w}{k}", 4, 25)
                    for w in range(2)
                    for k in range(2)  # two writers per worker
                ]
            )
            dead = await conn.fetch("SELECT reason, error FROM fieldline.dead_letters")
            assert dead == [], f"round {round_}: {[dict(r) for r in dead][:3]}"
            table = f"tenant_{tenant}.numeric_values"
            rows = await conn.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608
            assert rows == 4 * 4 * 25 * 2, f"round {round_}"
            assert await _tenant_versions(conn, tenant) == [m.version for m in TENANT]
    finally:
        await conn.close()


async def _tenant_versions(conn: asyncpg.Connection, tenant: str) -> list[int]:
    rows = await conn.fetch(
        "SELECT version FROM fieldline.schema_migrations WHERE scope = $1 ORDER BY version",
        f"tenant:{tenant}",
    )
    return [r["version"] for r in rows]


async def test_a_tenant_recorded_but_not_fully_migrated_is_finished_before_writing(
    timescale_dsn: str,
) -> None:
    conn = await asyncpg.connect(timescale_dsn)
    try:
        await add_tenant(conn, "acme")
        # what an older worker (or one killed between migrations) leaves behind: the tenant
        # is recorded, its newest migration is not applied
        newest = (await _tenant_versions(conn, "acme"))[-1]
        assert newest >= 2
        await conn.execute(
            "DELETE FROM fieldline.schema_migrations WHERE scope = 'tenant:acme' AND version = $1",
            newest,
        )
        await conn.execute("ALTER TABLE tenant_acme.numeric_values DROP COLUMN received")
        await conn.execute("ALTER TABLE tenant_acme.text_values DROP COLUMN received")
        await conn.execute("ALTER TABLE tenant_acme.devices DROP COLUMN seq, DROP COLUMN seq_gaps")

        await write_stream(timescale_dsn, Registry(), "acme", "dev-1", 2, 10)

        assert await conn.fetchval("SELECT count(*) FROM fieldline.dead_letters") == 0
        assert await conn.fetchval("SELECT count(*) FROM tenant_acme.numeric_values") == 40
        assert (await _tenant_versions(conn, "acme"))[-1] == newest
    finally:
        await conn.close()


async def test_a_tenant_whose_first_migration_was_cut_short_is_completed(
    timescale_dsn: str,
) -> None:
    conn = await asyncpg.connect(timescale_dsn)
    try:
        await add_tenant(conn, "acme")
        # killed after the tables, before the tenants row: the next first sight completes it
        await conn.execute("DELETE FROM fieldline.tenants WHERE id = 'acme'")
        await write_stream(timescale_dsn, Registry(), "acme", "dev-1", 1, 10)
        assert await conn.fetchval("SELECT count(*) FROM tenant_acme.numeric_values") == 20
        assert await conn.fetchval("SELECT count(*) FROM fieldline.tenants") == 1
    finally:
        await conn.close()


async def test_reader_grants_are_restored_when_missing(timescale_dsn: str) -> None:
    conn = await asyncpg.connect(timescale_dsn)
    role = reader_role("acme")
    try:
        await add_tenant(conn, "acme")
        await conn.execute(f'REVOKE SELECT ON tenant_acme.numeric_values FROM "{role}"')  # noqa: S608
        can_read = "SELECT has_table_privilege($1, 'tenant_acme.numeric_values', 'SELECT')"
        assert await conn.fetchval(can_read, role) is False
        await add_tenant(conn, "acme")
        assert await conn.fetchval(can_read, role) is True
    finally:
        await conn.close()


async def test_a_row_the_database_refuses_is_dead_lettered_alone(timescale_dsn: str) -> None:
    """Permanent errors dead-letter only the offending rows, even in a connection's first batch
    (whose rolled back transaction also took the connection's staging table with it)."""
    conn = await asyncpg.connect(timescale_dsn)
    try:
        await add_tenant(conn, "acme")
        # a rule of the operator's that the schemas know nothing about
        await conn.execute(
            "ALTER TABLE tenant_acme.numeric_values ADD CONSTRAINT plausible CHECK (value < 1000)"
        )
        now = time.time()
        base = int(now * 1000) - 60_000
        items = [
            decode_message(
                None,
                "fl/acme/dev-1/telemetry",
                json.dumps({"ts": base + i, "metrics": {"t": 5000 if i == 3 else i}}).encode(),
                now,
                DEFAULT_LIMITS,
            )
            for i in range(10)
        ]
        writer = await asyncpg.connect(timescale_dsn)  # fresh: nothing staged yet
        try:
            await write_narrowed(writer, Registry(), "acme", items)
            # and the connection still writes afterwards
            await write_narrowed(writer, Registry(), "acme", telemetry("acme", "dev-2", 0, 5))
        finally:
            await writer.close()
        dead = await conn.fetch("SELECT reason, error, payload FROM fieldline.dead_letters")
        assert [r["reason"] for r in dead] == ["db_rejected"]
        assert "plausible" in dead[0]["error"]
        assert b"5000" in bytes(dead[0]["payload"])
        values = await conn.fetch(
            "SELECT v.value FROM tenant_acme.numeric_values v "
            "JOIN tenant_acme.metrics m ON m.id = v.metric_id WHERE m.device_id = 'dev-1' "
            "ORDER BY v.time"
        )
        assert [r["value"] for r in values] == [float(i) for i in range(10) if i != 3]
        assert await conn.fetchval("SELECT count(*) FROM tenant_acme.numeric_values") == 9 + 10
    finally:
        await conn.close()
