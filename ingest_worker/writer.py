"""One batch of one tenant into TimescaleDB, in one transaction, idempotently.

Everything a batch produces goes in together: device rows and presence, metric ids created
on first sight, numeric and text values, events, command results and the batch's dead
letters. Values are inserted with `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO
NOTHING` on their unique `(metric_id, time)`, so a message delivered twice (after a crash,
before its PUBACK) writes nothing the second time. Errors are sorted the way Telegraf's
postgresql output does: transient ones (connection lost, deadlock, out of resources) are
retried by the caller with nothing acknowledged; permanent ones are narrowed down to the
messages that cause them, which become dead letters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from ingest_worker.decode import DB_REJECTED, KIND_CHANGED, WRONG_TENANT, Decoded
from ingest_worker.registry import MetricRef, Registry
from schemas.messages import MetricKind

# SQLSTATE classes after which the same transaction may well succeed later
_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")


def is_transient(exc: BaseException) -> bool:
    """Connection trouble, deadlocks, serialization failures, out of resources, shutdowns."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in _TRANSIENT_CLASSES
    return isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError | ConnectionError)


@dataclass
class Written:
    """What a committed batch wrote (for metrics) and what the cache learnt from it."""

    numeric: int = 0
    text: int = 0
    events: int = 0
    results: int = 0
    dead: int = 0
    gaps: int = 0
    transitions: list[tuple[str, str | None, str]] = field(default_factory=list)
    metrics: dict[tuple[str, str, str], MetricRef] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    sequences: dict[tuple[str, str], tuple[int | None, int | None]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.numeric + self.text + self.events + self.results


async def write_batch(
    conn: asyncpg.Connection, registry: Registry, tenant: str | None, items: Sequence[Decoded]
) -> Written:
    """Write one tenant's batch (tenant None: dead letters without a tenant) in one transaction.

    Raises the database's exception; the caller retries transient ones and narrows down
    permanent ones. Caches are updated by the caller with `apply()` after the commit.
    """
    out = Written()
    schema = await registry.schema(conn, tenant) if tenant is not None else None
    async with conn.transaction():
        if schema is not None and tenant is not None:
            await _check_owners(conn, registry, tenant, items, out)
            await _resolve_metrics(conn, registry, schema, tenant, items, out)
            await _devices(conn, registry, schema, tenant, items, out)
            await _values(conn, registry, schema, tenant, items, out)
            await _events(conn, schema, items, out)
            await _results(conn, schema, items, out)
        await _dead_letters(conn, items, out)
    return out


def apply(registry: Registry, written: Written) -> None:
    """After the commit: remember what the database now has."""
    registry.metrics.update(written.metrics)
    registry.owners.update(written.owners)
    registry.sequences.update(written.sequences)


async def write_narrowed(
    conn: asyncpg.Connection, registry: Registry, tenant: str | None, items: list[Decoded]
) -> Written:
    """After a permanent error: write halves separately until single messages are left; a
    single message the database refuses becomes a dead letter with the database's reason."""
    try:
        written = await write_batch(conn, registry, tenant, items)
    except asyncpg.PostgresError as exc:
        if is_transient(exc):
            raise
        if len(items) == 1:
            item = items[0]
            item.kill(DB_REJECTED, f"{type(exc).__name__}: {exc}"[:1000])
            written = await write_batch(conn, registry, tenant, items)
            return written
        half = len(items) // 2
        first = await write_narrowed(conn, registry, tenant, items[:half])
        apply(registry, first)
        second = await write_narrowed(conn, registry, tenant, items[half:])
        return _merge(first, second)
    apply(registry, written)
    return written


def _merge(a: Written, b: Written) -> Written:
    merged = Written(
        a.numeric + b.numeric, a.text + b.text, a.events + b.events, a.results + b.results,
        a.dead + b.dead, a.gaps + b.gaps, a.transitions + b.transitions,
    )  # fmt: skip
    for source in (a, b):
        merged.metrics.update(source.metrics)
        merged.owners.update(source.owners)
        merged.sequences.update(source.sequences)
    return merged


# -- the steps of a batch ----------------------------------------------------------------------
def _live(items: Sequence[Decoded]) -> list[Decoded]:
    return [i for i in items if not i.dead and not i.ignored and i.device is not None]


async def _check_owners(
    conn: asyncpg.Connection,
    registry: Registry,
    tenant: str,
    items: Sequence[Decoded],
    out: Written,
) -> None:
    """A device id belongs to the first tenant it was seen in (ids are unique across tenants)."""
    unknown = sorted(
        {i.device or "" for i in _live(items) if registry.owners.get(i.device or "") is None}
    )
    owners = dict(registry.owners)
    if unknown:
        rows = await conn.fetch(
            "WITH claim AS (INSERT INTO fieldline.device_owners (device_id, tenant_id) "
            "SELECT unnest($1::text[]), $2 ON CONFLICT (device_id) DO NOTHING RETURNING device_id) "
            "SELECT device_id, tenant_id FROM fieldline.device_owners WHERE device_id = ANY($1) "
            "UNION ALL SELECT device_id, $2 FROM claim",
            unknown,
            tenant,
        )
        for row in rows:
            owners[row["device_id"]] = row["tenant_id"]
            out.owners[row["device_id"]] = row["tenant_id"]
    for item in _live(items):
        owner = owners.get(item.device or "")
        if owner is not None and owner != tenant:
            item.kill(
                WRONG_TENANT,
                f"device {item.device!r} belongs to tenant {owner!r}, not {tenant!r}; device ids "
                "are unique across tenants (is the broker's ACL in force?)",
            )


async def _resolve_metrics(
    conn: asyncpg.Connection,
    registry: Registry,
    schema: str,
    tenant: str,
    items: Sequence[Decoded],
    out: Written,
) -> None:
    """Metric ids for every (device, name) of the batch, created on first sight."""
    wanted: dict[tuple[str, str], tuple[str | None, MetricKind]] = {}
    for item in _live(items):
        for _when, r, _stamped in item.readings:
            key = (item.device or "", r.name)
            if (tenant, *key) not in registry.metrics and key not in wanted:
                wanted[key] = (r.unit, r.kind)
    if wanted:
        devices, names = [k[0] for k in wanted], [k[1] for k in wanted]
        units = [v[0] for v in wanted.values()]
        kinds = [v[1].value for v in wanted.values()]
        # the device row must exist before its metrics (foreign key)
        await conn.execute(
            f"INSERT INTO {schema}.devices (id) SELECT DISTINCT unnest($1::text[]) "
            "ON CONFLICT (id) DO NOTHING",
            devices,
        )
        await conn.execute(
            f"INSERT INTO {schema}.metrics (device_id, name, unit, display_name, kind) "
            "SELECT d, n, u, n, k FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) "
            "AS t(d, n, u, k) ON CONFLICT (device_id, name) DO NOTHING",
            devices, names, units, kinds,
        )  # fmt: skip
        rows = await conn.fetch(
            f"SELECT m.device_id, m.name, m.id, m.kind, m.unit FROM {schema}.metrics m "
            "JOIN unnest($1::text[], $2::text[]) AS t(d, n) ON m.device_id = t.d AND m.name = t.n",
            devices,
            names,
        )
        for row in rows:
            ref = MetricRef(row["id"], MetricKind(row["kind"]), row["unit"])
            out.metrics[(tenant, row["device_id"], row["name"])] = ref
    changed_units: dict[int, str] = {}
    for item in _live(items):
        for _when, r, _stamped in item.readings:
            metric = (tenant, item.device or "", r.name)
            found = out.metrics.get(metric) or registry.metrics.get(metric)
            if found is None:  # pragma: no cover - every wanted key was selected above
                raise RuntimeError(f"metric {metric} has no id")
            ref = found
            if ref.kind is not r.kind:
                item.kill(
                    KIND_CHANGED,
                    f"metric {r.name!r} of device {item.device!r} is {ref.kind.value}, this "
                    f"message sends it as {r.kind.value}; use a new metric name for a new kind",
                )
                break
            if r.unit is not None and r.unit != ref.unit:
                changed_units[ref.id] = r.unit
                out.metrics[metric] = MetricRef(ref.id, ref.kind, r.unit)
    if changed_units:
        await conn.execute(
            f"UPDATE {schema}.metrics m SET unit = t.u FROM unnest($1::int[], $2::text[]) "
            "AS t(i, u) WHERE m.id = t.i",
            list(changed_units),
            list(changed_units.values()),
        )


async def _devices(
    conn: asyncpg.Connection,
    registry: Registry,
    schema: str,
    tenant: str,
    items: Sequence[Decoded],
    out: Written,
) -> None:
    """Device rows: last seen, presence, firmware, boot, sequence gaps; transitions as events."""
    live = _live(items)
    if not live:
        return
    seen: dict[str, dict[str, Any]] = {}
    for item in live:
        assert item.device is not None
        state = seen.setdefault(
            item.device,
            {"seen": item.received_at, "status": None, "fw": None, "boot": None, "seq": None,
             "gaps": 0, "at": item.received_at},
        )  # fmt: skip
        state["seen"] = max(state["seen"], item.received_at)
        if item.status is not None:
            state["status"] = item.status.state.value
            state["at"] = item.status.ts or item.received_at
            state["fw"] = item.status.fw or state["fw"]
            state["boot"] = item.status.boot if item.status.boot is not None else state["boot"]
        else:
            state["status"] = "online"  # traffic from a device means it is there
            state["at"] = item.received_at
        if item.boot is not None:
            state["boot"] = item.boot
    await _count_gaps(conn, registry, schema, tenant, live, seen, out)
    ids = list(seen)
    rows = await conn.fetch(
        f"""
        WITH new(id, seen, status, fw, boot, seq, gaps) AS (
            SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[],
                                 $5::bigint[], $6::bigint[], $7::bigint[])
        ),
        old AS (SELECT d.id, d.status FROM {schema}.devices d JOIN new USING (id)),
        up AS (
            INSERT INTO {schema}.devices AS d (id, last_seen, status, fw, boot, seq, seq_gaps)
            SELECT id, seen, status, fw, boot, seq, gaps FROM new
            ON CONFLICT (id) DO UPDATE SET
                last_seen = GREATEST(d.last_seen, EXCLUDED.last_seen),
                status = EXCLUDED.status,
                fw = COALESCE(EXCLUDED.fw, d.fw),
                boot = COALESCE(EXCLUDED.boot, d.boot),
                seq = COALESCE(EXCLUDED.seq, d.seq),
                seq_gaps = d.seq_gaps + EXCLUDED.seq_gaps
            RETURNING d.id, d.status
        )
        SELECT up.id, old.status AS old_status, up.status AS new_status
        FROM up LEFT JOIN old USING (id)
        WHERE old.status IS DISTINCT FROM up.status
        """,
        ids,
        [seen[d]["seen"] for d in ids],
        [seen[d]["status"] for d in ids],
        [seen[d]["fw"] for d in ids],
        [seen[d]["boot"] for d in ids],
        [seen[d]["seq"] for d in ids],
        [seen[d]["gaps"] for d in ids],
    )
    if rows:
        times: list[datetime] = []
        devices: list[str] = []
        bodies: list[str] = []
        for row in rows:
            state = seen[row["id"]]
            cause = (
                "status"
                if any(i.status is not None for i in live if i.device == row["id"])
                else "traffic"
            )
            out.transitions.append((row["id"], row["old_status"], row["new_status"]))
            times.append(state["at"])
            devices.append(row["id"])
            bodies.append(
                json.dumps(
                    {
                        "from": row["old_status"] or "unknown",
                        "to": row["new_status"],
                        "cause": cause,
                    }
                )
            )
        await conn.execute(
            f"INSERT INTO {schema}.events (time, device_id, kind, severity, body) "
            "SELECT t, d, 'presence', 'info', b::jsonb "
            "FROM unnest($1::timestamptz[], $2::text[], $3::text[]) AS u(t, d, b) "
            "ON CONFLICT DO NOTHING",
            times,
            devices,
            bodies,
        )
        out.events += len(rows)


async def _count_gaps(
    conn: asyncpg.Connection,
    registry: Registry,
    schema: str,
    tenant: str,
    live: list[Decoded],
    seen: dict[str, dict[str, Any]],
    out: Written,
) -> None:
    """`seq` gaps per device, in receive order; a new `boot` starts counting afresh."""
    with_seq = [i for i in live if i.first_seq is not None]
    if not with_seq:
        return
    unknown = sorted(
        {i.device or "" for i in with_seq} - {d for t, d in registry.sequences if t == tenant}
    )
    last: dict[str, tuple[int | None, int | None]] = {
        d: registry.sequences[(tenant, d)] for t, d in registry.sequences if t == tenant
    }
    if unknown:
        for row in await conn.fetch(
            f"SELECT id, boot, seq FROM {schema}.devices WHERE id = ANY($1)", unknown
        ):
            last[row["id"]] = (row["boot"], row["seq"])
    for item in with_seq:
        device = item.device or ""
        boot, seq = last.get(device, (None, None))
        if item.boot is not None and item.boot != boot:
            boot, seq = item.boot, None  # a restart: seq starts again
        assert item.first_seq is not None
        assert item.seq is not None
        if seq is not None and item.first_seq > seq + 1:
            gap = item.first_seq - seq - 1
            seen[device]["gaps"] += gap
            out.gaps += gap
        if seq is None or item.seq > seq:
            seq = item.seq
        last[device] = (boot, seq)
        seen[device]["seq"] = seq
        out.sequences[(tenant, device)] = (boot, seq)


async def _values(
    conn: asyncpg.Connection,
    registry: Registry,
    schema: str,
    tenant: str,
    items: Sequence[Decoded],
    out: Written,
) -> None:
    n_time: list[datetime] = []
    n_id: list[int] = []
    n_value: list[float] = []
    n_recv: list[bool] = []
    t_time: list[datetime] = []
    t_id: list[int] = []
    t_value: list[str] = []
    t_recv: list[bool] = []
    metrics, cached = out.metrics, registry.metrics
    for item in _live(items):
        device = item.device or ""
        for when, r, stamped in item.readings:
            key = (tenant, device, r.name)
            ref = metrics.get(key) or cached[key]
            if r.kind is MetricKind.TEXT:
                t_time.append(when)
                t_id.append(ref.id)
                t_value.append(str(r.value))
                t_recv.append(stamped)
            else:
                n_time.append(when)
                n_id.append(ref.id)
                n_value.append(float(r.value))
                n_recv.append(stamped)
    if n_time:
        await conn.execute(
            f"INSERT INTO {schema}.numeric_values (time, metric_id, value, received) "
            "SELECT * FROM unnest($1::timestamptz[], $2::int[], $3::float8[], $4::bool[]) "
            "ON CONFLICT DO NOTHING",
            n_time, n_id, n_value, n_recv,
        )  # fmt: skip
        out.numeric = len(n_time)
    if t_time:
        await conn.execute(
            f"INSERT INTO {schema}.text_values (time, metric_id, value, received) "
            "SELECT * FROM unnest($1::timestamptz[], $2::int[], $3::text[], $4::bool[]) "
            "ON CONFLICT DO NOTHING",
            t_time, t_id, t_value, t_recv,
        )  # fmt: skip
        out.text = len(t_time)


async def _events(
    conn: asyncpg.Connection, schema: str, items: Sequence[Decoded], out: Written
) -> None:
    rows = [(i.event.ts or i.received_at, i.device, i) for i in _live(items) if i.event is not None]
    if not rows:
        return
    bodies = []
    for _when, _device, item in rows:
        assert item.event is not None
        body: dict[str, Any] = dict(item.event.data)
        if item.event.message is not None:
            body = {"message": item.event.message, **body}
        bodies.append(json.dumps(body))
    await conn.execute(
        f"INSERT INTO {schema}.events (time, device_id, kind, severity, body) "
        "SELECT t, d, k, s, b::jsonb FROM unnest($1::timestamptz[], $2::text[], $3::text[], "
        "$4::text[], $5::text[]) AS u(t, d, k, s, b) ON CONFLICT DO NOTHING",
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2].event.kind for r in rows if r[2].event is not None],
        [r[2].event.severity.value for r in rows if r[2].event is not None],
        bodies,
    )
    out.events += len(rows)


async def _results(
    conn: asyncpg.Connection, schema: str, items: Sequence[Decoded], out: Written
) -> None:
    rows = [i for i in _live(items) if i.result is not None]
    if not rows:
        return
    ids, devices, statuses, results, times = [], [], [], [], []
    for item in rows:
        result = item.result
        assert result is not None
        ids.append(result.id)
        devices.append(item.device)
        statuses.append(result.status.value)
        results.append(json.dumps({"status": result.status.value, "detail": result.detail}))
        times.append(result.ts or item.received_at)
    # a result for a command nobody recorded (sent with mosquitto_pub, say) gets a row too;
    # a device can only ever update its own commands
    await conn.execute(
        f"INSERT INTO {schema}.commands AS c (id, device_id, name, status, result, updated_at) "
        "SELECT i, d, 'unknown', s, r::jsonb, t FROM unnest($1::uuid[], $2::text[], $3::text[], "
        "$4::text[], $5::timestamptz[]) AS u(i, d, s, r, t) "
        "ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, result = EXCLUDED.result, "
        "updated_at = EXCLUDED.updated_at WHERE c.device_id = EXCLUDED.device_id",
        ids, devices, statuses, results, times,
    )  # fmt: skip
    out.results += len(rows)


async def _dead_letters(conn: asyncpg.Connection, items: Sequence[Decoded], out: Written) -> None:
    dead = [i for i in items if i.dead]
    if not dead:
        return
    await conn.execute(
        "INSERT INTO fieldline.dead_letters (time, topic, payload, reason, error, tenant_id, "
        "device_id) SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::bytea[], $4::text[], "
        "$5::text[], $6::text[], $7::text[])",
        [i.received_at for i in dead],
        [i.topic for i in dead],
        [i.payload for i in dead],
        [i.dead_reason for i in dead],
        [i.dead_error for i in dead],
        [i.tenant for i in dead],
        [i.device for i in dead],
    )
    out.dead += len(dead)
