"""The worker's schedules: devices that went silent are marked offline; old data is dropped."""

from __future__ import annotations

import logging

import asyncpg

from ingest_worker.migrate import RetentionMode, list_tenants, quote_ident

log = logging.getLogger("ingest")

# each table with the column retention goes by: numeric_packed rows are dropped by the
# start of their day (or hour), so a packed row is kept while any of it is within retention
_VALUE_TABLES = {
    "numeric_values": "time",
    "numeric_packed": "bucket",
    "text_values": "time",
    "events": "time",
}
# plain tables (few rows, read by index): rows are deleted whatever the mode
_PLAIN_TABLES = {"numeric_packed"}


async def mark_silent_devices(conn: asyncpg.Connection, offline_after_s: float) -> dict[str, int]:
    """Devices online but unheard for `offline_after_s` go offline, with a presence event.

    Decided from `devices.last_seen` in the database, so several workers sharing the load
    agree: a device is silent only if no worker has heard it.
    """
    marked: dict[str, int] = {}
    for tenant in await list_tenants(conn):
        schema = quote_ident(tenant.schema_name)
        rows = await conn.fetch(
            f"""
            WITH gone AS (
                UPDATE {schema}.devices SET status = 'offline'
                WHERE status = 'online' AND last_seen < now() - make_interval(secs => $1)
                RETURNING id, last_seen
            )
            INSERT INTO {schema}.events (time, device_id, kind, severity, body)
            SELECT now(), id, 'presence', 'warning',
                   jsonb_build_object('from', 'online', 'to', 'offline', 'cause', 'timeout',
                                      'last_seen', last_seen, 'after_s', $1::float8)
            FROM gone
            ON CONFLICT DO NOTHING
            RETURNING device_id
            """,
            offline_after_s,
        )
        if rows:
            marked[tenant.id] = len(rows)
            log.info(
                "event=devices_offline tenant=%s devices=%s cause=timeout",
                tenant.id, ",".join(r["device_id"] for r in rows),
            )  # fmt: skip
    return marked


async def apply_retention(conn: asyncpg.Connection, mode: RetentionMode) -> dict[str, int]:
    """Each tenant's `retention_days`: drop_chunks on TimescaleDB's Apache build, a retention
    policy where the licence has them, DELETE without TimescaleDB. Chunks (or rows) dropped."""
    dropped: dict[str, int] = {}
    for tenant in await list_tenants(conn):
        if tenant.retention_days is None:
            continue
        schema = quote_ident(tenant.schema_name)
        count = 0
        for table, column in _VALUE_TABLES.items():
            name = f"{schema}.{table}"
            if mode is RetentionMode.DROP_CHUNKS and table not in _PLAIN_TABLES:
                rows = await conn.fetch(
                    "SELECT drop_chunks($1::regclass, "
                    "older_than => now() - make_interval(days => $2))",
                    name,
                    tenant.retention_days,
                )
                count += len(rows)
            elif mode is RetentionMode.POLICY and table not in _PLAIN_TABLES:
                await conn.execute(
                    "SELECT add_retention_policy($1::regclass, make_interval(days => $2), "
                    "if_not_exists => true)",
                    name,
                    tenant.retention_days,
                )
            else:
                status = await conn.execute(
                    f"DELETE FROM {name} WHERE {column} < now() - make_interval(days => $1) "
                    + ("- interval '1 day'" if table == "numeric_packed" else ""),
                    tenant.retention_days,
                )
                count += int(status.split()[-1])
        if count:
            dropped[tenant.id] = count
            log.info(
                "event=retention tenant=%s days=%d removed=%d",
                tenant.id,
                tenant.retention_days,
                count,
            )
    return dropped
