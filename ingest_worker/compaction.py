"""Compaction: hot numeric rows older than `storage.compact_after` become packed rows.

Each tenant's `numeric_values` rows are moved, one UTC day and range of metric ids (about
`storage.compact_batch_rows` rows) per transaction, into `numeric_packed`: one row per
metric and day (or hour, for fast metrics) holding a regular time axis (or time offsets)
and values as small integers, element i of each array being sample i, so that reads decode
without running sums (migration tenant_0003_packed.sql says how). One statement deletes
the hot rows, unpacks the packed rows of the same metrics and day (late data), merges both
(a (metric, time) already packed keeps its packed value: the first stored wins, as with ON
CONFLICT DO NOTHING; a late reading with another value is told as a `conflicting_value` dead
letter per device, as the writer tells those of hot rows), and writes the packed rows back.
A reader's statement sees one snapshot, so it sees the window either before or after the
commit: never a gap or a double.
A killed compactor leaves its transaction uncommitted, which PostgreSQL rolls back: the
next run starts over from what is there, and running it twice changes nothing.
Readers go through `{schema}.numeric_series(metric, since, until)`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from ingest_worker.admission import CONFLICTING_VALUE
from ingest_worker.migrate import Tenant, list_tenants, quote_ident, tenant_schema

log = logging.getLogger("ingest")

DAY = timedelta(days=1)  # compaction's unit of time; numeric_series relies on it too
# a metric with more samples than this in a day is packed by the hour (rows of a slower one
# would be under the 2 kB past which PostgreSQL compresses, so it is packed by the day)
HOURLY_ABOVE = 4320
_ORIGIN = "'2000-01-01 00:00:00+00'::timestamptz"
# a per-tenant advisory lock: two workers never compact the same tenant at once
_LOCK_CLASS = 0x666C_636D  # "flcm"
_INT4_MAX = 2147483647

# candidate encodings of a value, tried smallest first: k / 10^d (a decimal the device sent)
# or k * 0.1^d (a reading rounded by multiplying, as numpy's round(x / res) * res does)
_STEPS = ((1.0, None), (10.0, 0.1), (100.0, 0.01), (1000.0, 0.001), (10000.0, 0.0001))
# |k| below 2^30: k fits int4 (and k - kb, kb = 0), and k / 10^4 stays exact
_K_MAX = 1073741823


def _candidates() -> list[tuple[float, float, str]]:
    """(multiplier, scale, SQL: value comes back from k) for each candidate encoding."""
    out = []
    for mult, step in _STEPS:
        # through bigint: an integer has no -0.0 and no NaN, so those stay float8; the
        # bound first, as float8 overflow is an error
        k = f"round(value * {mult!r})::bigint::float8"
        bound = f"abs(value) < {_K_MAX / mult!r}"
        out.append((mult, mult, f"CASE WHEN {bound} THEN float8send({k} / {mult!r}) = "
                                f"float8send(value) ELSE false END"))  # fmt: skip
        if step is not None:
            out.append((mult, -step, f"CASE WHEN {bound} THEN float8send({k} * {step!r}::float8)"
                                     f" = float8send(value) ELSE false END"))  # fmt: skip
    return out


def _pack_sql(schema: str) -> str:
    """One statement: move the hot rows of day [$1, $2) and metrics [$3, $4) into packed
    rows, re-packing with them the packed rows of the same metrics and day (late data)."""
    cands = _candidates()
    counts = ", ".join(
        f"count(*) FILTER (WHERE {sql}) AS c{i}" for i, (_m, _s, sql) in enumerate(cands)
    )
    best = "greatest(" + ", ".join(f"c{i}" for i in range(len(cands))) + ")"
    pick_scale = " ".join(
        f"WHEN c{i} = {best} THEN {scale!r}::float8" for i, (_m, scale, _q) in enumerate(cands)
    )
    pick_mult = " ".join(
        f"WHEN c{i} = {best} THEN {mult!r}::float8" for i, (mult, _s, _q) in enumerate(cands)
    )
    hour = f"date_bin('1 hour', time, {_ORIGIN})"
    # identifiers: a quoted schema name; the rest is this module's constants
    return f"""
    WITH moved AS (
        DELETE FROM {schema}.numeric_values
        WHERE time >= $1 AND time < $2 AND metric_id >= $3 AND metric_id < $4
        RETURNING metric_id, time, value, received
    ), old AS (
        DELETE FROM {schema}.numeric_packed p
        WHERE p.metric_id >= $3 AND p.metric_id < $4 AND p.bucket >= $1 AND p.bucket < $2
          AND p.metric_id IN (SELECT metric_id FROM moved)
        RETURNING p.*
    ), unpacked AS (
        SELECT o.metric_id, u.time, u.value, u.received FROM old o
        CROSS JOIN LATERAL {schema}.numeric_unpack(o.t0, o.n, o.step, o.tick, o.toff,
            o.ts, o.scale, o.kb, o.k2, o.k4, o.v, o.received) u
    ), merged AS (
        SELECT DISTINCT ON (metric_id, time) metric_id, time, value, received
        FROM (
            SELECT metric_id, time, value, received, 0 AS pri FROM unpacked
            UNION ALL
            SELECT metric_id, time, value, received, 1 FROM moved
        ) x
        ORDER BY metric_id, time, pri
    ), clashes AS (
        -- late readings for packed (metric, time) with another value: the writer could not
        -- see them (it does not look into packed rows), so they are told here, per device,
        -- as the writer tells those of hot rows
        SELECT m.device_id, count(*) AS n,
               min(format('%s at %s: stored %s, sent %s', coalesce(m.name, h.metric_id::text),
                          h.time, p.value, h.value)) AS example
        FROM moved h JOIN unpacked p USING (metric_id, time)
        LEFT JOIN {schema}.metrics m ON m.id = h.metric_id
        WHERE p.value IS DISTINCT FROM h.value
        GROUP BY m.device_id
    ), told AS (
        INSERT INTO fieldline.dead_letters (time, topic, reason, error, tenant_id, device_id)
        SELECT now(), format('fl/%s/%s/telemetry', $5::text, coalesce(device_id, '-')),
               '{CONFLICTING_VALUE}',
               format('%s reading(s) sent for timestamps already stored with another value '
                      '(the stored value is kept; found when compacting), e.g. %s', n, example),
               $5::text, device_id
        FROM clashes
        RETURNING 1
    ), bucketed AS (
        SELECT *, CASE WHEN count(*) OVER (PARTITION BY metric_id) > {HOURLY_ABOVE}
                       THEN {hour} ELSE $1 END AS bucket
        FROM merged
    ), timed AS (
        SELECT *, (extract(epoch FROM time - first_value(time) OVER w) * 1000000)::bigint
                  AS off,
                  (extract(epoch FROM time - lag(time) OVER w) * 1000000)::bigint AS gap
        FROM bucketed WINDOW w AS (PARTITION BY metric_id, bucket ORDER BY time)
    ), counted AS (
        SELECT metric_id, bucket, count(*) AS n, min(gap) AS mingap, max(gap) AS maxgap,
               max(off) AS maxoff,
               CASE WHEN bool_and(off % 1000000 = 0) THEN 1000000
                    WHEN bool_and(off % 1000 = 0) THEN 1000 ELSE 1 END AS tick,
               {counts}
        FROM timed GROUP BY metric_id, bucket
    ), kinds AS (
        SELECT metric_id, bucket, tick,
               CASE WHEN n = 1 THEN 1 WHEN mingap = maxgap THEN maxgap END AS step,
               maxoff / tick <= {_INT4_MAX} AS small,
               CASE WHEN {best} = 0 THEN NULL {pick_scale} END AS scale,
               CASE WHEN {best} = 0 THEN NULL {pick_mult} END AS mult
        FROM counted
    ), coded AS (
        SELECT t.*, k.tick, k.step, k.small, k.scale,
               CASE WHEN k.scale IS NULL THEN NULL
                    WHEN abs(t.value) < {_K_MAX}::float8 / k.mult
                    THEN round(t.value * k.mult)::bigint END AS kv
        FROM timed t JOIN kinds k USING (metric_id, bucket)
    ), checked AS (
        SELECT *, CASE WHEN kv IS NULL THEN false
                       WHEN scale > 0 THEN float8send(kv::float8 / scale) = float8send(value)
                       ELSE float8send(kv::float8 * -scale) = float8send(value) END AS exact
        FROM coded
    ), ranged AS (
        SELECT *, min(kv) FILTER (WHERE exact) OVER p AS kmin,
                  max(kv) FILTER (WHERE exact) OVER p AS kmax
        FROM checked WINDOW p AS (PARTITION BY metric_id, bucket)
    ), based AS (
        SELECT *, kmax - kmin <= 65535 AS short,
               CASE WHEN kmax - kmin <= 65535 THEN kmin + 32768 ELSE 0 END AS kb
        FROM ranged
    ), ins AS (
        INSERT INTO {schema}.numeric_packed
            (metric_id, bucket, n, t0, t1, step, tick, toff, ts, scale, kb, k2, k4, v,
             received)
        SELECT metric_id, bucket, count(*)::integer, min(time), max(time), step, tick,
               array_agg((off / tick)::integer ORDER BY time)
                   FILTER (WHERE step IS NULL AND small),
               array_agg(time ORDER BY time) FILTER (WHERE step IS NULL AND NOT small),
               scale, coalesce(kb, 0),
               array_agg(CASE WHEN exact THEN kv - kb ELSE 0 END::smallint ORDER BY time)
                   FILTER (WHERE short),
               array_agg(CASE WHEN exact THEN kv - kb ELSE 0 END::integer ORDER BY time)
                   FILTER (WHERE NOT short),
               CASE WHEN NOT bool_and(exact)
                    THEN array_agg(CASE WHEN exact THEN NULL ELSE value END ORDER BY time)
               END,
               CASE WHEN bool_or(received) THEN array_agg(received ORDER BY time) END
        FROM based GROUP BY metric_id, bucket, step, tick, small, scale, kb, short
        RETURNING n
    )
    SELECT (SELECT count(*) FROM moved) AS moved, count(*) AS buckets,
           coalesce(sum(n), 0) AS samples,
           (SELECT coalesce(sum(n), 0) FROM clashes) AS conflicts,
           (SELECT count(*) FROM told) AS told
    FROM ins
    """  # noqa: S608


@dataclass
class CompactionResult:
    """What one compaction pass of a tenant did."""

    tenant: str
    rows: int = 0  # hot rows moved
    buckets: int = 0  # packed hours written (new or merged)
    windows: int = 0  # transactions committed (a day and a range of metric ids each)
    seconds: float = 0.0
    done: bool = True  # False: stopped by the budget with older rows left
    skipped: bool = False  # another compactor holds the tenant's lock
    # late readings for packed (metric, time) with another value (the packed one is kept),
    # told as `conflicting_value` dead letters, one per device and transaction
    conflicts: int = 0


@dataclass
class CompactionTotals:
    """A pass over every tenant."""

    results: list[CompactionResult] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.results)


def _day_start(when: datetime) -> datetime:
    origin = datetime(2000, 1, 1, tzinfo=UTC)
    return origin + ((when - origin) // DAY) * DAY


async def compact_tenant(
    conn: asyncpg.Connection,
    tenant: str,
    older_than: timedelta,
    *,
    batch_rows: int = 200_000,
    budget_s: float | None = None,
    schema_name: str | None = None,
) -> CompactionResult:
    """Pack the tenant's hot rows of the UTC days that ended `older_than` ago or earlier, one
    day and range of metric ids (about `batch_rows` rows) per transaction, oldest first,
    until done or `budget_s` seconds have passed; then drop the hot chunks left empty."""
    schema = quote_ident(schema_name or tenant_schema(tenant))
    sql = _pack_sql(schema)
    result = CompactionResult(tenant)
    started = time.monotonic()
    now: datetime = await conn.fetchval("SELECT now()")
    cutoff = _day_start(now - older_than)
    span = 64  # metric ids per transaction, adapted to batch_rows as rows are seen
    oldest_sql = f"SELECT min(time) FROM {schema}.numeric_values WHERE time < $1"  # noqa: S608
    first_sql = (
        f"SELECT min(metric_id) FROM {schema}.numeric_values "  # noqa: S608
        "WHERE time >= $1 AND time < $2 AND metric_id >= $3"
    )
    while (oldest := await conn.fetchval(oldest_sql, cutoff)) is not None:
        lo = _day_start(oldest)
        hi = lo + DAY
        metric = await conn.fetchval(first_sql, lo, hi, -_INT4_MAX - 1)
        while metric is not None:
            if budget_s is not None and time.monotonic() - started >= budget_s:
                result.done = False
                result.seconds = time.monotonic() - started
                return result
            upto = min(metric + span, _INT4_MAX)
            async with conn.transaction():
                locked = await conn.fetchval(
                    "SELECT pg_try_advisory_xact_lock($1, hashtext($2))", _LOCK_CLASS, tenant
                )
                if not locked:
                    result.skipped = True
                    result.seconds = time.monotonic() - started
                    return result
                # the statement sorts its rows three times: in memory, not in temp files
                await conn.execute("SET LOCAL work_mem = '64MB'")
                row = await conn.fetchrow(sql, lo, hi, metric, upto, tenant)
            assert row is not None
            moved = int(row["moved"])
            result.rows += moved
            result.conflicts += int(row["conflicts"])
            result.buckets += int(row["buckets"])
            result.windows += 1
            if moved:
                span = max(1, min(span * 4, span * batch_rows // moved))
            metric = await conn.fetchval(first_sql, lo, hi, upto) if upto < _INT4_MAX else None
    if result.rows:
        await _drop_empty_chunks(conn, schema_name or tenant_schema(tenant), cutoff)
    result.seconds = time.monotonic() - started
    if result.rows:
        log.info(
            "event=compacted tenant=%s rows=%d buckets=%d transactions=%d seconds=%.2f "
            "conflicting=%d",
            tenant, result.rows, result.buckets, result.windows, result.seconds,
            result.conflicts,
        )  # fmt: skip
    return result


async def _drop_empty_chunks(conn: asyncpg.Connection, schema: str, cutoff: datetime) -> int:
    """Hot chunks wholly before `cutoff` and empty are dropped: deleted rows leave their
    index pages behind, which VACUUM does not give back. Each is locked first, and kept if a
    late row arrived; a writer holding it makes us skip it (lock_timeout), not wait."""
    has_ts = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
    )
    if not has_ts:
        return 0
    chunks = await conn.fetch(
        "SELECT chunk_schema, chunk_name FROM timescaledb_information.chunks "
        "WHERE hypertable_schema = $1 AND hypertable_name = 'numeric_values' "
        "AND range_end <= $2",
        schema,
        cutoff,
    )
    dropped = 0
    for chunk in chunks:
        name = f"{quote_ident(chunk['chunk_schema'])}.{quote_ident(chunk['chunk_name'])}"
        try:
            async with conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '500ms'")
                await conn.execute(f"LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE")
                if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {name})"):  # noqa: S608
                    continue
                await conn.execute(f"DROP TABLE {name}")
                dropped += 1
        except asyncpg.LockNotAvailableError:
            continue
    return dropped


async def compact_all(
    conn: asyncpg.Connection,
    older_than: timedelta,
    *,
    batch_rows: int = 200_000,
    budget_s: float | None = None,
    tenants: list[Tenant] | None = None,
) -> CompactionTotals:
    """Compact every tenant (or those given) within one shared time budget."""
    totals = CompactionTotals()
    started = time.monotonic()
    for tenant in tenants if tenants is not None else await list_tenants(conn):
        left = None if budget_s is None else max(0.0, budget_s - (time.monotonic() - started))
        if left is not None and left <= 0:
            totals.results.append(CompactionResult(tenant.id, done=False))
            continue
        totals.results.append(
            await compact_tenant(
                conn,
                tenant.id,
                older_than,
                batch_rows=batch_rows,
                budget_s=left,
                schema_name=tenant.schema_name,
            )
        )
    return totals


@dataclass(frozen=True)
class TableStats:
    """Rows (samples) and bytes of one table, indexes and TOAST included."""

    samples: int
    rows: int
    bytes: int

    @property
    def bytes_per_sample(self) -> float | None:
        return self.bytes / self.samples if self.samples else None


@dataclass(frozen=True)
class StorageStats:
    """A tenant's numeric storage: hot rows and packed hours."""

    tenant: str
    hot: TableStats
    packed: TableStats

    @property
    def total(self) -> TableStats:
        return TableStats(
            self.hot.samples + self.packed.samples,
            self.hot.rows + self.packed.rows,
            self.hot.bytes + self.packed.bytes,
        )

    def as_dict(self) -> dict[str, Any]:
        def one(t: TableStats) -> dict[str, Any]:
            return {"samples": t.samples, "rows": t.rows, "bytes": t.bytes,
                    "bytes_per_sample": t.bytes_per_sample}  # fmt: skip

        return {"tenant": self.tenant, "hot": one(self.hot), "packed": one(self.packed),
                "total": one(self.total)}  # fmt: skip


async def _table_bytes(conn: asyncpg.Connection, qualified: str) -> int:
    # hypertable_size covers the chunks (heap, TOAST, indexes); a plain table its own
    has_ts = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
    )
    if has_ts:
        size = await conn.fetchval("SELECT hypertable_size($1::regclass)", qualified)
        if size is not None:
            return int(size)
    return int(await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", qualified))


async def storage_stats(conn: asyncpg.Connection, tenant: str) -> StorageStats:
    """Exact sample counts and on-disk bytes of a tenant's hot and packed numeric tables."""
    schema = quote_ident(tenant_schema(tenant))
    hot_rows = int(await conn.fetchval(f"SELECT count(*) FROM {schema}.numeric_values"))  # noqa: S608
    packed = await conn.fetchrow(
        f"SELECT count(*) AS rows, coalesce(sum(n), 0) AS samples "  # noqa: S608
        f"FROM {schema}.numeric_packed"
    )
    assert packed is not None
    return StorageStats(
        tenant,
        TableStats(hot_rows, hot_rows, await _table_bytes(conn, f"{schema}.numeric_values")),
        TableStats(
            int(packed["samples"]),
            int(packed["rows"]),
            await _table_bytes(conn, f"{schema}.numeric_packed"),
        ),
    )
