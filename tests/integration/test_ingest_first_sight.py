"""Workers meeting a tenant for the first time: the tenant's tables are complete before anyone
writes into them, however many workers race for it and whatever a crash left half done."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from ingest_worker.decode import Decoded, decode_message
from ingest_worker.migrate import Scope, add_tenant, load_migrations, migrate_shared, reader_role
from ingest_worker.registry import Registry
from ingest_worker.writer import Narrowing, write_narrowed
from schemas.limits import DEFAULT_LIMITS

pytestmark = pytest.mark.integration

TENANT = load_migrations(Scope.TENANT)


def telemetry(
    tenant: str,
    device: str,
    first: int,
    n: int,
    metrics: Callable[[int], dict[str, float]] = lambda _i: {"t": 21.5, "h": 40.0},
) -> list[Decoded]:
    """n messages (two metrics each unless `metrics` says), each with its own timestamp."""
    now = time.time()
    base = int(now * 1000) - 3_600_000
    return [
        decode_message(
            None,
            f"fl/{tenant}/{device}/telemetry",
            json.dumps({"ts": base + i, "seq": i, "metrics": metrics(i)}).encode(),
            now,
            DEFAULT_LIMITS,
        )
        for i in range(first, first + n)
    ]


@pytest.fixture
async def db(timescale_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own, beside the writers' connections."""
    conn = await asyncpg.connect(timescale_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def write_stream(
    dsn: str, registry: Registry, tenant: str, device: str, batches: int, size: int
) -> None:
    """One writer of a worker: its own connection, the worker's registry, no retries (a
    deadlock or a missing table must fail the test, not be papered over)."""
    conn = await asyncpg.connect(dsn)
    try:
        for b in range(batches):
            # one try, no retries: a deadlock would split the batch into dead letters, which
            # the row counts of the tests then see
            batch = telemetry(tenant, device, b * size, size)
            await write_narrowed(conn, registry, tenant, batch, Narrowing(tries=1))
    finally:
        await conn.close()


async def test_two_workers_meeting_new_tenants_at_once_write_everything_once(
    db: asyncpg.Connection, timescale_dsn: str
) -> None:
    await migrate_shared(db)
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
        dead = await db.fetch("SELECT reason, error FROM fieldline.dead_letters")
        assert dead == [], f"round {round_}: {[dict(r) for r in dead][:3]}"
        table = f"tenant_{tenant}.numeric_values"
        rows = await db.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608
        assert rows == 4 * 4 * 25 * 2, f"round {round_}"
        assert await _tenant_versions(db, tenant) == [m.version for m in TENANT]


async def _tenant_versions(conn: asyncpg.Connection, tenant: str) -> list[int]:
    rows = await conn.fetch(
        "SELECT version FROM fieldline.schema_migrations WHERE scope = $1 ORDER BY version",
        f"tenant:{tenant}",
    )
    return [r["version"] for r in rows]


async def test_a_tenant_recorded_but_not_fully_migrated_is_finished_before_writing(
    db: asyncpg.Connection, timescale_dsn: str
) -> None:
    await add_tenant(db, "acme")
    # what an older worker (or one killed between migrations) leaves behind: the tenant
    # is recorded, its migrations from 0002 on are not applied
    newest = (await _tenant_versions(db, "acme"))[-1]
    assert newest >= 2
    await db.execute(
        "DELETE FROM fieldline.schema_migrations WHERE scope = 'tenant:acme' AND version >= 2"
    )
    await db.execute("ALTER TABLE tenant_acme.numeric_values DROP COLUMN received")
    await db.execute("ALTER TABLE tenant_acme.text_values DROP COLUMN received")
    await db.execute(
        "ALTER TABLE tenant_acme.devices DROP COLUMN seq, DROP COLUMN seq_gaps, "
        "DROP COLUMN seq_ahead, DROP COLUMN seq_hole_at, DROP COLUMN seq_hole_mark"
    )

    await write_stream(timescale_dsn, Registry(), "acme", "dev-1", 2, 10)

    assert await db.fetchval("SELECT count(*) FROM fieldline.dead_letters") == 0
    assert await db.fetchval("SELECT count(*) FROM tenant_acme.numeric_values") == 40
    assert (await _tenant_versions(db, "acme"))[-1] == newest


async def test_a_tenant_whose_first_migration_was_cut_short_is_completed(
    db: asyncpg.Connection, timescale_dsn: str
) -> None:
    await add_tenant(db, "acme")
    # killed after the tables, before the tenants row: the next first sight completes it
    await db.execute("DELETE FROM fieldline.tenants WHERE id = 'acme'")
    await write_stream(timescale_dsn, Registry(), "acme", "dev-1", 1, 10)
    assert await db.fetchval("SELECT count(*) FROM tenant_acme.numeric_values") == 20
    assert await db.fetchval("SELECT count(*) FROM fieldline.tenants") == 1


async def test_reader_grants_are_restored_when_missing(db: asyncpg.Connection) -> None:
    role = reader_role("acme")
    await add_tenant(db, "acme")
    await db.execute(f'REVOKE SELECT ON tenant_acme.numeric_values FROM "{role}"')  # noqa: S608
    can_read = "SELECT has_table_privilege($1, 'tenant_acme.numeric_values', 'SELECT')"
    assert await db.fetchval(can_read, role) is False
    await add_tenant(db, "acme")
    assert await db.fetchval(can_read, role) is True


async def test_a_row_the_database_refuses_is_dead_lettered_alone(
    db: asyncpg.Connection, timescale_dsn: str
) -> None:
    """Permanent errors dead-letter only the offending rows, even in a connection's first batch
    (whose rolled back transaction also took the connection's staging table with it)."""
    await add_tenant(db, "acme")
    # a rule of the operator's that the schemas know nothing about
    await db.execute(
        "ALTER TABLE tenant_acme.numeric_values ADD CONSTRAINT plausible CHECK (value < 1000)"
    )
    items = telemetry("acme", "dev-1", 0, 10, metrics=lambda i: {"t": 5000 if i == 3 else i})
    writer = await asyncpg.connect(timescale_dsn)  # fresh: nothing staged yet
    try:
        await write_narrowed(writer, Registry(), "acme", items, Narrowing())
        # and the connection still writes afterwards
        await write_narrowed(
            writer, Registry(), "acme", telemetry("acme", "dev-2", 0, 5), Narrowing()
        )
    finally:
        await writer.close()
    dead = await db.fetch("SELECT reason, error, payload FROM fieldline.dead_letters")
    assert [r["reason"] for r in dead] == ["db_rejected"]
    assert "plausible" in dead[0]["error"]
    assert b"5000" in bytes(dead[0]["payload"])
    values = await db.fetch(
        "SELECT v.value FROM tenant_acme.numeric_values v "
        "JOIN tenant_acme.metrics m ON m.id = v.metric_id WHERE m.device_id = 'dev-1' "
        "ORDER BY v.time"
    )
    assert [r["value"] for r in values] == [float(i) for i in range(10) if i != 3]
    assert await db.fetchval("SELECT count(*) FROM tenant_acme.numeric_values") == 9 + 10
