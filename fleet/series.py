"""Every read of `numeric_values`: downsampled series, latest values, recent row counts.

Kept in this one module on purpose: storage compaction (issue #18) will read a union of hot
and compacted rows, and only these functions need to change for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fleet.db import Db, schema, tenant_tables
from fleet.devices import numeric_metric


@dataclass(frozen=True)
class Bucket:
    """One time bucket of a metric."""

    start: datetime
    avg: float
    min: float
    max: float
    count: int


@dataclass(frozen=True)
class Latest:
    """A metric's newest numeric value."""

    time: datetime
    value: float


async def buckets(
    db: Db,
    tenant: str,
    metric_id: int,
    start: datetime,
    end: datetime,
    bucket: timedelta,
    *,
    origin: datetime | None = None,
) -> list[Bucket]:
    """min/avg/max/count per time_bucket of one metric for start <= time < end, computed in
    SQL; buckets are counted from `origin` (default: start), empty ones are absent."""
    s = schema(tenant)
    async with tenant_tables(tenant):
        rows = await db.fetch(
            f"SELECT time_bucket($1::interval, time, $2::timestamptz) AS start, "  # noqa: S608
            "avg(value) AS avg, min(value) AS min, max(value) AS max, count(*) AS count "
            f"FROM {s}.numeric_series($3, $4, $5) "
            "GROUP BY 1 ORDER BY 1",
            bucket, origin or start, metric_id, start, end,
        )  # fmt: skip
    return [Bucket(r["start"], r["avg"], r["min"], r["max"], r["count"]) for r in rows]


async def latest_values(
    db: Db, tenant: str, devices: list[str] | None = None
) -> dict[str, dict[str, Latest]]:
    """{device: {metric: newest value}} of the tenant's numeric metrics (or those devices')."""
    s = schema(tenant)
    async with tenant_tables(tenant):
        rows = await db.fetch(
            f"SELECT m.device_id, m.name, v.time, v.value FROM {s}.metrics m "  # noqa: S608
            f"CROSS JOIN LATERAL (SELECT time, value FROM {s}.numeric_series(m.id, "
            f"{s}.numeric_newest(m.id), 'infinity') ORDER BY time DESC LIMIT 1) v "
            "WHERE m.kind <> 'text' AND ($1::text[] IS NULL OR m.device_id = ANY($1::text[])) "
            "ORDER BY 1, 2",
            devices,
        )
    out: dict[str, dict[str, Latest]] = {}
    for r in rows:
        out.setdefault(r["device_id"], {})[r["name"]] = Latest(r["time"], r["value"])
    return out


async def recent_rows(db: Db, tenant: str, seconds: float) -> int:
    """numeric_values rows of the tenant whose time is within the last `seconds`."""
    s = schema(tenant)
    async with tenant_tables(tenant):
        count = await db.fetchval(
            f"SELECT count(*) FROM {s}.numeric_series(NULL, now() - $1::interval, "  # noqa: S608
            "'infinity')",
            timedelta(seconds=seconds),
        )
    return int(count)


# time_bucket's own default origin (a Monday): CLI buckets fall on whole minutes and hours
ALIGNED = datetime(2000, 1, 3, tzinfo=UTC)


async def query(
    db: Db, tenant: str, device: str, metric: str, since: timedelta, bucket: timedelta
) -> list[Bucket]:
    """time_bucket aggregates of one numeric metric over the last `since` (`fieldline query`),
    buckets aligned to whole units; NotFoundError names the metrics the device has."""
    info = await numeric_metric(db, tenant, device, metric)
    end = datetime.now(UTC)
    return await buckets(db, tenant, info.id, end - since, end, bucket, origin=ALIGNED)
