"""One batch of one tenant into TimescaleDB, in two short transactions, idempotently.

Everything a batch stores goes in together: metric ids created on first sight, numeric and
text values, events, command results and the batch's dead letters. The device rows (last
seen, presence, seq tracking) follow in a second transaction, before anything is
acknowledged; both are idempotent, so a crash between them is repaired by the redelivery.
Values are inserted with `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO
NOTHING` on their unique `(metric_id, time)`, so a message delivered twice (after a crash,
before its PUBACK) writes nothing the second time. Errors are sorted the way Telegraf's
postgresql output does: transient ones (connection lost, deadlock, out of resources) are
retried by the caller with nothing acknowledged; permanent ones are narrowed down to the
messages that cause them, which become dead letters.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import struct
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import asyncpg

from ingest_worker.admission import (
    CONFLICTING_VALUE,
    METRIC_LIMIT,
    METRIC_RATE,
    TOO_OLD,
    bound_payload,
    earliest_allowed,
)
from ingest_worker.decode import DB_REJECTED, KIND_CHANGED, WRONG_TENANT, Decoded
from ingest_worker.errors import StorageError
from ingest_worker.registry import MetricRef, Registry
from ingest_worker.sequence import SeqTrack, advance
from schemas.messages import MetricKind, Quantity

# how stale `devices.last_seen` may get (presence times out after ingest.offline_after_s)
LAST_SEEN_RESOLUTION = timedelta(seconds=1)

log = logging.getLogger("ingest")


class Failure(Enum):
    """What a failed write says, and so what the worker does next."""

    # the connection or the server is gone: retried for as long as it takes, nothing split
    # and nothing acknowledged (the delivery guarantee rests on this)
    UNREACHABLE = "unreachable"
    # this batch failed but may pass if tried again (a deadlock, a lock or statement timeout):
    # retried `ingest.transient_tries` times, then split to find the message at fault
    TRANSIENT = "transient"
    # this batch will fail again (a constraint, bad data, out of memory, a program limit):
    # split at once; the message the database refuses becomes a dead letter
    PERMANENT = "permanent"


# the server going down (57P01-57P03) or refusing connections (53300) is the database, not
# the batch; 57014 is our statement_timeout (or an operator's pg_cancel_backend)
_UNREACHABLE_STATES = frozenset({"57P01", "57P02", "57P03", "53300"})
_TRANSIENT_STATES = frozenset({"40001", "40P01", "55P03", "57014"})


def classify(exc: BaseException) -> Failure:
    """Sort a write's failure by SQLSTATE: the database unreachable, this batch failing
    transiently, or for good. Anything unexpected counts as the batch's own fault."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        if state.startswith("08") or state in _UNREACHABLE_STATES:
            return Failure.UNREACHABLE
        return Failure.TRANSIENT if state in _TRANSIENT_STATES else Failure.PERMANENT
    # StorageError: no connection could be made, or a tenant's migration failed (no message
    # is at fault for either: retried, never turned into dead letters)
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError | StorageError):
        return Failure.UNREACHABLE
    return Failure.PERMANENT


def is_transient(exc: BaseException) -> bool:
    """Worth trying the same batch again: the database unreachable, or a transient failure."""
    return classify(exc) is not Failure.PERMANENT


def sqlstate(exc: BaseException) -> str:
    """The SQLSTATE of a database error, or the exception's type (for labels and logs)."""
    return str(getattr(exc, "sqlstate", None) or type(exc).__name__)


class DeadLetterError(StorageError):
    """A refused message's dead letter could not be written either: retried, never dropped."""


@dataclass
class Written:
    """What a committed batch wrote (for metrics) and what the cache learnt from it."""

    numeric: int = 0
    text: int = 0
    events: int = 0
    results: int = 0
    dead: int = 0
    gaps: int = 0
    gaps_forced: int = 0  # of them, counted because the seq bitmap was full, not by age
    transitions: list[tuple[str, str | None, str]] = field(default_factory=list)
    metrics: dict[tuple[str, str], dict[str, MetricRef]] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    devices: dict[tuple[str, str], tuple[str, datetime]] = field(default_factory=dict)
    # readings whose (metric, time) was already stored with another value, per device
    conflicts: dict[str, list[str]] = field(default_factory=dict)
    conflict_readings: int = 0
    # dead letters past their device's budget: counted (by reason), not stored
    suppressed: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.numeric + self.text + self.events + self.results


async def write_batch(
    conn: asyncpg.Connection,
    registry: Registry,
    tenant: str | None,
    items: Sequence[Decoded],
    *,
    devices: bool = True,
) -> Written:
    """Write one tenant's batch (tenant None: dead letters without a tenant): its rows in one
    transaction, then (unless `devices` is False: the caller runs `write_devices` later,
    before acknowledging) its device rows in another.

    Raises the database's exception; the caller retries transient ones and narrows down
    permanent ones. Caches are updated by the caller with `apply()` after the commit.
    """
    out = Written()
    schema = await registry.schema(conn, tenant) if tenant is not None else None
    try:
        async with conn.transaction():
            if schema is not None and tenant is not None:
                await _check_owners(conn, registry, tenant, items, out)
                await _window(conn, registry, tenant, items)
                numeric, text = await _readings(conn, registry, schema, tenant, items, out)
                await _values(conn, schema, numeric, text, out)
                await _events(conn, schema, items, out)
                await _results(conn, schema, items, out)
            await _dead_letters(conn, registry, tenant, items, out)
        if devices and schema is not None and tenant is not None:
            # Device rows in a transaction of their own, after the values committed: their
            # row locks are held for a few milliseconds, not across a 20,000-row insert and its
            # commit. In one transaction, a second writer with the same devices waited for
            # the first one's whole commit (41% of a backlog drain's wall time, measured:
            # docs/benchmarks.md). Nothing is acknowledged before both commit, and the device
            # step is idempotent (seq bits already set stay set, last_seen only grows, a
            # transition already made is not made again), so a crash between the two
            # transactions is repaired by the redelivery.
            async with conn.transaction():
                await _devices(conn, registry, schema, tenant, items, out)
    except BaseException:
        # a staging table created in the rolled back transaction went with it
        _staged.pop(conn, None)
        raise
    return out


async def write_devices(
    conn: asyncpg.Connection, registry: Registry, tenant: str, items: Sequence[Decoded]
) -> Written:
    """The device rows of messages whose rows are committed (one batch or several, in the
    order they committed), in one transaction; the registry learns the rows after it."""
    out = Written()
    schema = await registry.schema(conn, tenant)
    async with conn.transaction():
        await _devices(conn, registry, schema, tenant, items, out)
    apply(registry, out)
    return out


def apply(registry: Registry, written: Written) -> None:
    """After the commit: remember what the database now has."""
    for device, refs in written.metrics.items():
        registry.metrics.setdefault(device, {}).update(refs)
    registry.owners.update(written.owners)
    registry.devices.update(written.devices)


@dataclass
class Narrowing:
    """How `write_narrowed` retries and splits a failing batch, and whom it tells."""

    # tries of a batch failing transiently before it is split (a batch of one message:
    # refused); a part of a split batch gets one try before it is split again (or refused)
    tries: int = 3
    backoff_s: float = 0.1
    # a part committed: its messages, what it wrote, seconds its transaction took
    committed: Callable[[list[Decoded], Written, float], None] = lambda *_a: None
    # a transient failure about to be retried, or a batch about to be split
    failed: Callable[[BaseException, int, bool], None] = lambda *_a: None
    # False: device rows are left to the caller (`write_devices`), off the writer's path
    devices: bool = True


async def write_narrowed(
    conn: asyncpg.Connection,
    registry: Registry,
    tenant: str | None,
    items: list[Decoded],
    policy: Narrowing,
) -> None:
    """Write `items`; whatever the database refuses, isolate it into dead letters.

    A batch failing for good, or `policy.tries` times transiently, is split in halves, each
    tried once and split alike, until the messages at fault are alone; a single message the
    database refuses becomes a dead letter `db_rejected` with the SQLSTATE and message.
    Each committed part goes to `policy.committed`. A `Failure.UNREACHABLE` error is raised
    (the caller reconnects and calls again with the messages not committed yet), and so is
    a `DeadLetterError`: a message is never acknowledged without its row.
    """
    await _narrow(conn, registry, tenant, items, policy, whole=True)


async def _narrow(
    conn: asyncpg.Connection,
    registry: Registry,
    tenant: str | None,
    items: list[Decoded],
    policy: Narrowing,
    *,
    whole: bool,
) -> None:
    # once a batch has failed `tries` times, its parts are searched, not retried: one try
    # each, down to the single message (a slow poison costs one statement_timeout per
    # halving, not `tries` of them; a batch of one message is the whole and gets `tries`)
    tries = policy.tries if whole else 1
    attempt = 0
    while True:
        attempt += 1
        started = time.monotonic()
        try:
            written = await write_batch(conn, registry, tenant, items, devices=policy.devices)
        except Exception as exc:
            failure = classify(exc)
            if failure is Failure.UNREACHABLE:
                raise
            if tenant is not None:
                registry.forget_tenant(tenant)  # a dropped schema is made again next time
            retry = failure is Failure.TRANSIENT and attempt < tries
            policy.failed(exc, len(items), retry)
            if retry:
                await asyncio.sleep(policy.backoff_s * 2 ** (attempt - 1))
                continue
            if len(items) == 1:
                await _reject(conn, registry, items[0], exc, policy)
                return
            half = len(items) // 2
            log.warning(
                "event=batch_split tenant=%s messages=%d sqlstate=%s error=%r",
                tenant, len(items), sqlstate(exc), str(exc)[:200],
            )  # fmt: skip
            await _narrow(conn, registry, tenant, items[:half], policy, whole=False)
            await _narrow(conn, registry, tenant, items[half:], policy, whole=False)
            return
        apply(registry, written)
        policy.committed(items, written, time.monotonic() - started)
        return


async def _reject(
    conn: asyncpg.Connection,
    registry: Registry,
    item: Decoded,
    exc: BaseException,
    policy: Narrowing,
) -> None:
    """One message the database refuses: its dead letter, alone, in a transaction of its own
    (no tenant schema needed). If even that fails, the message is left as it was and the
    failure raised as a DeadLetterError, so it is retried with the database, never dropped."""
    saved = copy.copy(item)
    if not item.dead:
        item.kill(DB_REJECTED, f"SQLSTATE {sqlstate(exc)}: {type(exc).__name__}: {exc}"[:1000])
    log.warning(
        "event=db_rejected topic=%s sqlstate=%s error=%r",
        item.topic, sqlstate(exc), str(exc)[:200],
    )  # fmt: skip
    started = time.monotonic()
    try:
        written = await write_batch(conn, registry, None, [item])
    except Exception as failed:
        for f in dataclasses.fields(item):
            setattr(item, f.name, getattr(saved, f.name))
        raise DeadLetterError(
            f"the dead letter of a message on {item.topic} could not be written "
            f"({sqlstate(failed)}: {failed}); after {sqlstate(exc)}: {exc}"
        ) from failed
    policy.committed([item], written, time.monotonic() - started)


def statement_chunks(
    rows: Sequence[Any], size: Callable[[Any], int], budget: int
) -> Iterator[Sequence[Any]]:
    """Consecutive runs of `rows` of at most `budget` bytes by `size` (a larger row alone)."""
    start, total = 0, 0
    for end, row in enumerate(rows):
        n = size(row)
        if end > start and total + n > budget:
            yield rows[start:end]
            start, total = end, 0
        total += n
    if start < len(rows):
        yield rows[start:]


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


async def _window(
    conn: asyncpg.Connection, registry: Registry, tenant: str, items: Sequence[Decoded]
) -> None:
    """Refuse messages dated before the backfill window or the tenant's retention.

    A sample far in the past lands in a chunk of its own: a few messages with timestamps a
    day apart since 2000 once made PostgreSQL run out of lock memory in one transaction.
    Events are rows of a hypertable too, and a status's ts dates its presence event.
    """
    window: timedelta | None = None
    latest = datetime.min.replace(tzinfo=UTC)  # every message's own cutoff is at most this
    for item in items:
        oldest = item.oldest
        if oldest is None or item.dead_reason is not None:
            continue
        if window is None:
            window = earliest_allowed(
                registry.admission.max_backfill, await registry.retention_days(conn, tenant)
            )
            # items come in receive order: the last one's cutoff is the latest of the batch
            latest = max(items[0].received_at, items[-1].received_at) - window
        if oldest >= latest or oldest >= item.received_at - window:
            continue  # the common case answered by one comparison
        item.kill(
            TOO_OLD,
            f"{oldest.isoformat()} is older than the accepted window ({window.days} days "
            "before receipt: ingest.max_backfill_s or the tenant's retention); the message "
            "was not stored",
        )


_KIND_OF: dict[type, MetricKind] = {
    float: MetricKind.NUMERIC,
    int: MetricKind.NUMERIC,
    bool: MetricKind.BOOL,
    str: MetricKind.TEXT,
}
_TEXT = MetricKind.TEXT
_NUMERIC = MetricKind.NUMERIC
_NO_REFS: dict[str, MetricRef] = {}
Row = tuple[datetime, int, Any, bool]
# a reading waiting for its metric id: message, time, PostgreSQL time, received, name, value,
# unit, kind
Pending = tuple[Decoded, datetime, int, bool, str, Any, "str | None", MetricKind]


def _scalar(value: Any) -> tuple[float | str, MetricKind]:
    """A validated scalar as stored: bools and ints as doubles, strings as text."""
    kind = _KIND_OF[type(value)]
    if kind is _TEXT:
        return value, kind
    return float(value), kind


# Numeric values are sent as PostgreSQL's binary COPY rows built here: asyncpg's
# `copy_records_to_table` encodes a datetime per row (and takes a datetime per row to build),
# which cost more than the rest of the row. A timestamptz is int64 microseconds since
# 2000-01-01 UTC; a double and a boolean are written as asyncpg writes them.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 UTC in epoch microseconds
# asyncpg writes 9999-12-31 23:59:59.999999 and 0001-01-01 as infinity and -infinity
_PG_INFINITY = {252_455_615_999_999_999: 2**63 - 1, -63_082_281_600_000_000: -(2**63)}
_NUMERIC_ROW = struct.Struct(">hiqiiidi?")  # 4 fields: time, metric_id, value, received
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, no extension
_COPY_TRAILER = b"\xff\xff"


def pg_time(micros: int) -> int:
    """The binary timestamptz of epoch microseconds, as asyncpg encodes the same instant."""
    pg = micros - _PG_EPOCH_US
    return _PG_INFINITY.get(pg, pg)


def epoch_micros(when: datetime) -> int:
    """Epoch microseconds of an aware datetime, exactly."""
    return (when - _EPOCH) // _US


def numeric_copy(rows: Sequence[bytes]) -> bytes:
    """A binary COPY stream of `numeric_values` rows (time, metric_id, value, received)."""
    return b"".join((_COPY_HEADER, *rows, _COPY_TRAILER))


async def _readings(
    conn: asyncpg.Connection,
    registry: Registry,
    schema: str,
    tenant: str,
    items: Sequence[Decoded],
    out: Written,
) -> tuple[list[bytes], list[Row]]:
    """Rows for numeric_values (binary COPY rows) and text_values, with metric ids (created
    on first sight).

    One pass over the readings; metrics seen for the first time, or with a new unit or kind,
    wait for one round trip that creates or updates them. A message that sends a metric with
    another kind than it has (a number where text was) becomes a dead letter. The id of a
    numeric metric is looked up once per device and name in a batch, not once per row.
    """
    numeric: list[bytes] = []
    add = numeric.append
    pack = _NUMERIC_ROW.pack
    text: list[Row] = []
    pending: list[Pending] = []
    known, fresh = registry.metrics, out.metrics
    # per device: its refs, and the ids of its numeric metrics met in this batch
    by_device: dict[str, tuple[dict[str, MetricRef], dict[str, int]]] = {}
    for item in _live(items):
        device = item.device or ""
        got = by_device.get(device)
        if got is None:
            key = (tenant, device)
            refs = known.get(key, _NO_REFS)
            if fresh and key in fresh:  # created earlier in this (uncommitted) transaction
                refs = {**refs, **fresh[key]}
            got = by_device[device] = (refs, {})
        refs, numbers = got
        samples = item.samples
        micros = item.micros
        if micros is None or len(micros) != len(samples):
            micros = [epoch_micros(when) for when, _stamped, _metrics in samples]
        for (when, stamped, metrics), us in zip(samples, micros, strict=True):
            pg = us - _PG_EPOCH_US
            if pg in _PG_INFINITY:
                pg = _PG_INFINITY[pg]
            for name, v in metrics.items():
                t = type(v)
                if t is float or t is int:  # a plain number: NUMERIC, no unit to compare
                    mid = numbers.get(name)
                    if mid is None:
                        ref = refs.get(name)
                        if ref is not None and ref.kind is _NUMERIC:
                            mid = numbers[name] = ref.id
                    if mid is not None:
                        # an int is packed as float(v) is: the same correctly rounded double
                        add(pack(4, 8, pg, 4, mid, 8, v, 1, stamped))
                        continue
                unit = None
                if type(v) is Quantity:
                    unit, v = v.u, v.v
                value, kind = _scalar(v)
                ref = refs.get(name)
                if ref is not None and ref.kind is kind and (unit is None or unit == ref.unit):
                    if kind is _TEXT:
                        text.append((when, ref.id, value, stamped))
                    else:
                        add(pack(4, 8, pg, 4, ref.id, 8, value, 1, stamped))
                else:
                    pending.append((item, when, pg, stamped, name, value, unit, kind))
    if not pending:
        return numeric, text
    resolved, refused = await _resolve(conn, registry, schema, tenant, pending, out)
    killed = False
    for item, when, pg, stamped, name, value, _unit, kind in pending:
        if item.dead:
            continue
        ref = resolved.get((item.device or "", name))
        if ref is None:
            reason, why = refused[(item.device or "", name)]
            item.kill(reason, why)
            killed = True
            continue
        if ref.kind is not kind:
            item.kill(
                KIND_CHANGED,
                f"metric {name!r} of device {item.device!r} is {ref.kind.value}, this message "
                f"sends it as {kind.value}; use a new metric name for a new kind",
            )
            killed = True
            continue
        if kind is _TEXT:
            text.append((when, ref.id, value, stamped))
        else:
            add(pack(4, 8, pg, 4, ref.id, 8, value, 1, stamped))
    if killed:
        # rows of the messages just refused may already be in the lists: start again without
        # them (all their metrics are known now, so this pass needs no round trip)
        return await _readings(conn, registry, schema, tenant, items, out)
    return numeric, text


async def _resolve(
    conn: asyncpg.Connection,
    registry: Registry,
    schema: str,
    tenant: str,
    pending: list[Pending],
    out: Written,
) -> tuple[dict[tuple[str, str], MetricRef], dict[tuple[str, str], tuple[str, str]]]:
    """Refs of the metrics these readings need, created within each device's metric budget.

    Returns the refs by (device, name), and the names refused by (device, name) with the
    dead-letter reason and message for the messages that carry them.
    """
    wanted: dict[tuple[str, str], tuple[str | None, MetricKind]] = {}
    for item, _when, _pg, _stamped, name, _value, unit, kind in pending:
        key = (item.device or "", name)
        if key not in wanted or unit is not None:
            wanted[key] = (unit, kind)
    devices, names = [k[0] for k in wanted], [k[1] for k in wanted]
    # the device row must exist before its metrics (foreign key)
    await conn.execute(
        f"INSERT INTO {schema}.devices (id) SELECT DISTINCT unnest($1::text[]) "
        "ON CONFLICT (id) DO NOTHING",
        devices,
    )
    rows = list(await _fetch_metrics(conn, schema, devices, names))
    missing = [k for k in wanted if k not in {(r["device_id"], r["name"]) for r in rows}]
    refused: dict[tuple[str, str], tuple[str, str]] = {}
    if missing:
        granted = await _metric_budget(conn, registry, schema, tenant, missing, refused)
        if granted:
            await conn.execute(
                f"INSERT INTO {schema}.metrics (device_id, name, unit, display_name, kind) "
                "SELECT d, n, u, n, k FROM unnest($1::text[], $2::text[], $3::text[], "
                "$4::text[]) AS t(d, n, u, k) ON CONFLICT (device_id, name) DO NOTHING",
                [k[0] for k in granted], [k[1] for k in granted],
                [wanted[k][0] for k in granted], [wanted[k][1].value for k in granted],
            )  # fmt: skip
            rows += await _fetch_metrics(
                conn, schema, [k[0] for k in granted], [k[1] for k in granted]
            )
    resolved: dict[tuple[str, str], MetricRef] = {}
    new_units: dict[int, str] = {}
    for row in rows:
        key = (row["device_id"], row["name"])
        ref = MetricRef(row["id"], MetricKind(row["kind"]), row["unit"])
        unit = wanted[key][0]
        if unit is not None and unit != ref.unit and wanted[key][1] is ref.kind:
            new_units[ref.id] = unit
            ref = MetricRef(ref.id, ref.kind, unit)
        resolved[key] = ref
        out.metrics.setdefault((tenant, key[0]), {})[key[1]] = ref
    if new_units:
        await conn.execute(
            f"UPDATE {schema}.metrics m SET unit = t.u FROM unnest($1::int[], $2::text[]) "
            "AS t(i, u) WHERE m.id = t.i",
            list(new_units),
            list(new_units.values()),
        )
    return resolved, refused


async def _fetch_metrics(
    conn: asyncpg.Connection, schema: str, devices: list[str], names: list[str]
) -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT m.device_id, m.name, m.id, m.kind, m.unit FROM {schema}.metrics m "
            "JOIN unnest($1::text[], $2::text[]) AS t(d, n) ON m.device_id = t.d "
            "AND m.name = t.n",
            devices,
            names,
        )
    )


async def _metric_budget(
    conn: asyncpg.Connection,
    registry: Registry,
    schema: str,
    tenant: str,
    missing: list[tuple[str, str]],
    refused: dict[tuple[str, str], tuple[str, str]],
) -> list[tuple[str, str]]:
    """The new (device, name) pairs each device may still create; the others into `refused`.

    The device rows are locked (in one order for every writer) while their metrics are
    counted, so two writers creating names for one device cannot both stay under the cap.
    """
    limits = registry.admission
    by_device: dict[str, list[str]] = {}
    for device, name in missing:
        by_device.setdefault(device, []).append(name)
    counts = {
        row["id"]: row["n"]
        for row in await conn.fetch(
            f"SELECT d.id, (SELECT count(*) FROM {schema}.metrics m WHERE m.device_id = d.id) "
            f"AS n FROM {schema}.devices d WHERE d.id = ANY($1::text[]) ORDER BY d.id "
            "FOR UPDATE OF d",
            sorted(by_device),
        )
    }
    now = time.monotonic()
    granted: list[tuple[str, str]] = []
    for device, names in by_device.items():
        room = max(0, limits.max_metrics_per_device - counts.get(device, 0))
        allowed = min(room, len(names))
        rate = registry.new_metrics.take(f"{tenant}/{device}", allowed, now) if allowed else 0
        granted += [(device, n) for n in names[:rate]]
        for name in names[rate:allowed]:
            refused[(device, name)] = (
                METRIC_RATE,
                f"device {device!r} creates metric names faster than "
                f"ingest.new_metrics_per_minute ({limits.new_metrics_per_minute}); {name!r} "
                "was refused: send it again later, or raise the limit",
            )
        for name in names[allowed:]:
            refused[(device, name)] = (
                METRIC_LIMIT,
                f"device {device!r} has {counts.get(device, 0)} metrics, the limit is "
                f"ingest.max_metrics_per_device ({limits.max_metrics_per_device}); {name!r} "
                "was refused: reuse a metric name, or raise the limit",
            )
    return granted


def delivered_retained(item: Decoded) -> bool:
    """Whether the broker delivered it with the retain flag: a stored message sent because
    the worker subscribed, not something the device said now (both receivers' sources,
    `ingest_worker.mqtt.Delivery` and paho's message, have a `retain` attribute)."""
    return bool(getattr(item.source, "retain", False))


@dataclass
class _DeviceState:
    """What one batch says about one device, in receive order."""

    seen: datetime | None  # the latest live message; None: only retained statuses
    at: datetime
    status: str | None = "online"  # traffic from a device means it is there; None: unchanged
    by_status: bool = False
    fw: str | None = None
    boots: list[int] = field(default_factory=list)  # boot counters announced, in order
    # (boot, first seq, last seq) of each message that carries a seq, in receive order
    sequences: list[tuple[int | None, int, int]] = field(default_factory=list)


def _device_states(live: list[Decoded]) -> dict[str, _DeviceState]:
    states: dict[str, _DeviceState] = {}
    for item in live:
        device = item.device or ""
        retained = item.status is not None and delivered_retained(item)
        state = states.get(device)
        if state is None:
            state = states[device] = _DeviceState(None, item.received_at, status=None)
        if not retained:
            state.seen = (
                item.received_at if state.seen is None else max(state.seen, item.received_at)
            )
        if item.status is not None:
            # a retained status is what the device said some time ago, replayed because the
            # worker subscribed: it never moves last_seen, and an `online` in it is not
            # presence (a dead device's retained `online` would otherwise bring it back);
            # `offline` (its Will), its firmware and boot counter are recorded as said
            if not retained or item.status.state.value == "offline":
                state.status, state.by_status = item.status.state.value, True
                state.at = item.status.ts or item.received_at
            state.fw = item.status.fw or state.fw
            if item.status.boot is not None:
                state.boots.append(item.status.boot)
        else:
            state.status, state.at = "online", item.received_at
        if item.first_seq is not None and item.seq is not None:
            state.sequences.append((item.boot, item.first_seq, item.seq))
        elif item.boot is not None:
            state.boots.append(item.boot)
    return states


def _track(row: Any) -> SeqTrack:
    """A device's sequence as its row stores it."""
    return SeqTrack(
        row["boot"],
        row["seq"],
        SeqTrack.bitmap(row["seq_ahead"]),
        row["seq_hole_at"],
        row["seq_hole_mark"],
    )


async def _devices(
    conn: asyncpg.Connection,
    registry: Registry,
    schema: str,
    tenant: str,
    items: Sequence[Decoded],
    out: Written,
) -> None:
    """Device rows: last seen, presence, firmware, boot, `seq` gaps; transitions as events.

    The rows are read FOR UPDATE and written back at the end of the batch's transaction:
    gaps are counted on the committed sequence whatever the order the batches commit in
    (`ingest_worker.sequence`), so two writers (or workers) never count a reordering as loss
    nor the same messages twice, and the locks are held only until the commit.
    """
    live = _live(items)
    if not live:
        return
    states = _device_states(live)
    # a device heard within the last second, with nothing new to say, keeps its row as it is:
    # every batch would otherwise lock (and rewrite) the rows of all its devices
    cached = registry.devices
    for device in list(states):
        state, known = states[device], cached.get((tenant, device))
        if state.status is None and state.fw is None and not state.boots and known is not None:
            del states[device]  # only retained `online` statuses of a device with a row
        elif (
            state.seen is not None
            and known is not None
            and not state.by_status
            and not state.sequences
            and not state.boots
            and known[0] == "online"
            and state.seen - known[1] < LAST_SEEN_RESOLUTION
        ):
            del states[device]
    if not states:
        return
    ids = sorted(states)  # one lock order for every writer: no deadlocks between them
    # a device whose row this worker wrote has one; any other may not (the ownership alone
    # is committed with the batch's rows, before this runs when the caller defers it)
    new = [d for d in ids if (tenant, d) not in cached]
    if new:
        await conn.execute(
            f"INSERT INTO {schema}.devices (id) SELECT unnest($1::text[]) "
            "ON CONFLICT (id) DO NOTHING",
            new,
        )
    current = {
        row["id"]: row
        for row in await conn.fetch(
            f"SELECT id, status, boot, seq, seq_ahead, seq_hole_at, seq_hole_mark, last_seen, "
            f"now() AS now FROM {schema}.devices WHERE id = ANY($1::text[]) "
            "ORDER BY id FOR UPDATE",
            ids,
        )
    }
    tracks: list[SeqTrack] = []
    gaps: list[int] = []
    for device in ids:
        row, state = current[device], states[device]
        track = _track(row)
        if state.boots or state.sequences or track.ahead:
            # the database's clock (transaction start) ages the holes: one clock for all workers
            track, added, forced = advance(
                track, state.boots, state.sequences, row["now"], registry.sequence
            )
            out.gaps_forced += forced
        else:
            added = 0
        tracks.append(track)
        gaps.append(added)
        out.gaps += added
    st = [states[d] for d in ids]
    await conn.execute(
        f"""
        UPDATE {schema}.devices d SET
            last_seen = GREATEST(d.last_seen, n.seen), status = COALESCE(n.status, d.status),
            fw = COALESCE(n.fw, d.fw), boot = n.boot, seq = n.seq, seq_ahead = n.ahead,
            seq_hole_at = n.hole_at, seq_hole_mark = n.mark, seq_gaps = d.seq_gaps + n.gaps
        FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::bigint[],
                    $6::bigint[], $7::bytea[], $8::timestamptz[], $9::bigint[], $10::bigint[])
             AS n(id, seen, status, fw, boot, seq, ahead, hole_at, mark, gaps)
        WHERE d.id = n.id
        """,
        ids, [s.seen for s in st], [s.status for s in st], [s.fw for s in st],
        [t.boot for t in tracks], [t.seq for t in tracks], [t.ahead_bytes() for t in tracks],
        [t.hole_at for t in tracks], [t.hole_mark for t in tracks], gaps,
    )  # fmt: skip
    times: list[datetime] = []
    devices: list[str] = []
    bodies: list[str] = []
    for device, state in zip(ids, st, strict=True):
        old = current[device]["status"]
        status = state.status or old
        seen = max((t for t in (current[device]["last_seen"], state.seen) if t), default=None)
        if seen is not None:
            out.devices[(tenant, device)] = (status, seen)
        if state.status is None or old == state.status:
            continue
        out.transitions.append((device, old, state.status))
        times.append(state.at)
        devices.append(device)
        cause = "status" if state.by_status else "traffic"
        bodies.append(json.dumps({"from": old or "unknown", "to": state.status, "cause": cause}))
    if times:
        await conn.execute(
            f"INSERT INTO {schema}.events (time, device_id, kind, severity, body) "
            "SELECT t, d, 'presence', 'info', b::jsonb "
            "FROM unnest($1::timestamptz[], $2::text[], $3::text[]) AS u(t, d, b) "
            "ON CONFLICT DO NOTHING",
            times,
            devices,
            bodies,
        )
        out.events += len(times)


# Values go through COPY into a session's temporary staging table, then one INSERT ... ON
# CONFLICT DO NOTHING into the hypertable: COPY does not die on a duplicate (which a redelivery
# is), and it beats unnest() arrays, whose encoding asyncpg checks element by element.
_STAGE = {
    "numeric_values": ("fl_stage_numeric", "double precision"),
    "text_values": ("fl_stage_text", "text"),
}
_COLUMNS = ["time", "metric_id", "value", "received"]
_staged: weakref.WeakKeyDictionary[asyncpg.Connection, set[str]] = weakref.WeakKeyDictionary()


async def _stage(
    conn: asyncpg.Connection,
    table: str,
    schema: str,
    rows: list[Row] | list[bytes],
    out: Written,
) -> None:
    """Rows into the session's staging table by COPY (numeric ones as binary COPY rows from
    `_readings`), then into the hypertable; conflicting values are reported in `out`."""
    stage, value_type = _STAGE[table]
    made = _staged.setdefault(conn, set())
    if stage not in made:  # once per connection: temporary tables live as long as it
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} (time timestamptz, metric_id integer, "
            f"value {value_type}, received boolean) ON COMMIT DELETE ROWS"
        )
        made.add(stage)
    if rows and type(rows[0]) is bytes:
        # a memoryview: asyncpg takes bytes for a file name
        data = memoryview(numeric_copy(rows))
        await conn.copy_to_table(stage, source=data, columns=_COLUMNS, format="binary")
    else:
        await conn.copy_records_to_table(stage, records=rows, columns=_COLUMNS)
    status = await conn.execute(
        f"INSERT INTO {schema}.{table} (time, metric_id, value, received) "
        f"SELECT time, metric_id, value, received FROM {stage} ON CONFLICT DO NOTHING"
    )
    if int(status.rsplit(" ", 1)[-1]) < len(rows):
        # some (metric, time) were there already: a redelivery (same value, silently nothing)
        # or a device sending another value for a stored timestamp, which must not be silent
        await _conflicts(conn, schema, table, stage, out)


async def _conflicts(
    conn: asyncpg.Connection, schema: str, table: str, stage: str, out: Written
) -> None:
    rows = await conn.fetch(
        f"SELECT m.device_id, count(*) AS n, min(format('%s at %s: stored %s, sent %s', m.name, "
        f"s.time, t.value, s.value)) AS example FROM {stage} s "
        f"JOIN {schema}.{table} t ON t.metric_id = s.metric_id AND t.time = s.time "
        f"JOIN {schema}.metrics m ON m.id = s.metric_id "
        "WHERE t.value IS DISTINCT FROM s.value GROUP BY m.device_id"
    )
    for row in rows:
        out.conflict_readings += row["n"]
        out.conflicts.setdefault(row["device_id"], []).append(
            f"{row['n']} reading(s) sent for timestamps already stored with another value "
            f"(the stored value is kept), e.g. {row['example']}"
        )


async def _values(
    conn: asyncpg.Connection, schema: str, numeric: list[bytes], text: list[Row], out: Written
) -> None:
    if numeric:
        await _stage(conn, "numeric_values", schema, numeric, out)
        out.numeric = len(numeric)
    if text:
        await _stage(conn, "text_values", schema, text, out)
        out.text = len(text)


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
    # one row per command id, the FIRST answer: a command runs at most once, so a later answer
    # to the same id is the device refusing a replay (`rejected`, "received before") and must
    # not overwrite the result of the run; ON CONFLICT DO UPDATE also refuses to touch a row
    # twice in one statement (21000)
    last: dict[Any, Decoded] = {}
    for item in _live(items):
        if item.result is not None and item.result.id not in last:
            last[item.result.id] = item
    if not last:
        return
    rows = list(last.values())
    ids, devices, statuses, results, times, received = [], [], [], [], [], []
    for item in rows:
        result = item.result
        assert result is not None
        ids.append(result.id)
        devices.append(item.device)
        statuses.append(result.status.value)
        results.append(json.dumps({"status": result.status.value, "detail": result.detail}))
        times.append(result.ts or item.received_at)
        received.append(item.received_at)
    # a result for a command nobody recorded (sent with mosquitto_pub, say) gets a row too;
    # a device can only ever update its own commands
    # across batches the first answer is the first RECEIVED, not the first committed: two
    # writers can commit a device's later batch first (answered_at, tenant migration 0005)
    await conn.execute(
        f"INSERT INTO {schema}.commands AS c (id, device_id, name, status, result, updated_at, "
        "answered_at) SELECT i, d, 'unknown', s, r::jsonb, t, a FROM unnest($1::uuid[], "
        "$2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[]) "
        "AS u(i, d, s, r, t, a) "
        "ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, result = EXCLUDED.result, "
        "updated_at = EXCLUDED.updated_at, answered_at = EXCLUDED.answered_at "
        "WHERE c.device_id = EXCLUDED.device_id AND (c.status IN ('pending', 'sent') "
        "OR EXCLUDED.answered_at < c.answered_at)",
        ids, devices, statuses, results, times, received,
    )  # fmt: skip
    out.results += len(rows)


# a dead letter statement carries at most this many payload bytes (PostgreSQL refuses a
# message over 1 GB; a backlog of dead letters after an outage once made one that large)
DEAD_LETTER_STATEMENT_BYTES = 8 * 1024 * 1024


async def _dead_letters(
    conn: asyncpg.Connection,
    registry: Registry,
    tenant: str | None,
    items: Sequence[Decoded],
    out: Written,
) -> None:
    """Dead letters of the batch, each within its device's budget, in bounded statements.

    A dead letter keeps a prefix of the payload with its size and sha256; past the device's
    budget (ingest.dead_letters_per_device_per_minute) it is counted in `out.suppressed` only.
    """
    limits = registry.admission
    now = time.monotonic()
    rows: list[tuple[Any, ...]] = []
    for item in items:
        if not item.dead:
            continue
        if item.keep is None:  # decided once: a retried batch stores the same dead letters
            key = f"{item.tenant}/{item.device}"
            item.keep = registry.dead_letter_budget.take(key, 1, now) == 1
        if not item.keep:
            reason = item.dead_reason or "unknown"
            out.suppressed[reason] = out.suppressed.get(reason, 0) + 1
            continue
        kept = bound_payload(item.payload, limits.dead_letter_payload_bytes)
        rows.append((
            item.received_at, item.topic, kept.prefix, kept.size, kept.sha256,
            item.dead_reason, item.dead_error, item.tenant, item.device,
        ))  # fmt: skip
    if tenant is not None:
        for device, notes in out.conflicts.items():
            # the data was stored; what was refused is the other value: counted, and kept as
            # a dead letter within the same budget so it is visible where the others are
            if registry.dead_letter_budget.take(f"{tenant}/{device}", 1, now) != 1:
                out.suppressed[CONFLICTING_VALUE] = out.suppressed.get(CONFLICTING_VALUE, 0) + 1
                continue
            rows.append((
                datetime.now(UTC), f"fl/{tenant}/{device}/telemetry", None, None, None,
                CONFLICTING_VALUE, "; ".join(notes)[:2000], tenant, device,
            ))  # fmt: skip
    for chunk in statement_chunks(rows, _dead_letter_bytes, DEAD_LETTER_STATEMENT_BYTES):
        await _insert_dead_letters(conn, list(chunk))
    out.dead += sum(1 for r in rows if r[5] != CONFLICTING_VALUE)


def _dead_letter_bytes(row: tuple[Any, ...]) -> int:
    """What a dead letter row weighs in a statement: its payload and its error text."""
    return len(row[2] or b"") + len(row[6] or "")


async def _insert_dead_letters(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> None:
    await conn.execute(
        "INSERT INTO fieldline.dead_letters (time, topic, payload, payload_size, payload_sha256, "
        "reason, error, tenant_id, device_id) SELECT * FROM unnest($1::timestamptz[], "
        "$2::text[], $3::bytea[], $4::int[], $5::bytea[], $6::text[], $7::text[], $8::text[], "
        "$9::text[])",
        *([row[c] for row in rows] for c in range(9)),
    )
