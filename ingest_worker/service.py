"""The ingest worker as a service: receive, decode, batch, write, acknowledge; drain on stop.

`IngestWorker` is an async context manager (or start()/stop()). The runner (`serve`) owns the
signals: on SIGTERM or SIGINT the worker stops reading, writes and commits what it holds,
acknowledges it, disconnects (its session stays on the broker) and closes the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client import start_http_server

import certs
from certs import CertsError
from core.pgcluster import database_url
from core.retry import Backoff
from core.settings import IngestSettings, Settings, StorageSettings
from ingest_worker.admission import CONFLICTING_VALUE, AdmissionLimits
from ingest_worker.compaction import compact_all
from ingest_worker.database import connect
from ingest_worker.decode import Decoded
from ingest_worker.errors import StorageError
from ingest_worker.jetstream import (
    JetStreamReceiver,
    NatsTarget,
    cluster_mqtt,
    cluster_urls,
    store_budget,
)
from ingest_worker.maintenance import apply_retention, mark_silent_devices
from ingest_worker.metrics import IngestMetrics
from ingest_worker.migrate import RetentionMode, detect_capabilities, migrate_all
from ingest_worker.pipeline import Pipeline
from ingest_worker.receive import BrokerTarget, LeanReceiver, PahoReceiver
from ingest_worker.registry import Registry
from ingest_worker.sequence import SeqWindow
from ingest_worker.writer import (
    Failure,
    Narrowing,
    Written,
    classify,
    sqlstate,
    write_devices,
    write_narrowed,
)
from schemas.limits import Limits
from schemas.topics import Kind, service_filters, shared

log = logging.getLogger("ingest")


class IngestError(StorageError):
    """The worker cannot start: its certificate, the broker or the database is missing."""


# the settings model is the one source of defaults
_DEFAULTS = IngestSettings()
_STORAGE = StorageSettings()


@dataclass(frozen=True)
class WorkerConfig:
    """What one worker does; the defaults are the settings model's (`ingest.*`)."""

    dsn: str
    target: BrokerTarget
    client: str = _DEFAULTS.client
    # "nats": pull from the JetStream cluster `nats` describes instead of subscribing to `target`
    source: str = _DEFAULTS.source
    nats: NatsTarget | None = None
    batch_max_rows: int = _DEFAULTS.batch_max_rows
    batch_max_wait_s: float = _DEFAULTS.batch_max_wait_ms / 1000
    writers: int = _DEFAULTS.writers
    queue_max: int = _DEFAULTS.queue_max
    queue_max_rows: int = _DEFAULTS.queue_max_rows
    queue_max_bytes: int = _DEFAULTS.queue_max_bytes
    transient_tries: int = _DEFAULTS.transient_tries
    statement_timeout_s: float = _DEFAULTS.statement_timeout_s
    offline_after_s: float = _DEFAULTS.offline_after_s
    max_future_skew_s: float = _DEFAULTS.max_future_skew_s
    max_payload_bytes: int = _DEFAULTS.max_payload_bytes
    max_samples: int = _DEFAULTS.max_samples
    max_metrics_per_message: int = _DEFAULTS.max_metrics_per_message
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    sequence: SeqWindow = field(default_factory=SeqWindow)
    retention_every_s: float = _DEFAULTS.retention_every_s
    # compaction of old numeric rows (`storage.*`): every compact_every_s, at most
    # compact_budget_s per pass
    compact_after_s: float = _STORAGE.compact_after_s
    compact_every_s: float = _STORAGE.compact_every_s
    compact_budget_s: float = _STORAGE.compact_budget_s
    compact_batch_rows: int = _STORAGE.compact_batch_rows
    chunk_interval: str = "1 day"
    metrics_port: int = 0
    metrics_bind: str = _DEFAULTS.metrics_bind
    drain_timeout_s: float = 30.0
    # tenants routed to a database of their own (docs/design.md: storage scales out by tenant);
    # every other tenant, and dead letters without one, go to `dsn`
    tenant_dsns: Mapping[str, str] = field(default_factory=dict)

    def dsn_for(self, tenant: str | None) -> str:
        """The database a tenant's rows go to."""
        return self.tenant_dsns.get(tenant, self.dsn) if tenant else self.dsn

    def all_dsns(self) -> list[str]:
        """Every database this worker writes to, the default first."""
        return list(dict.fromkeys([self.dsn, *self.tenant_dsns.values()]))


def client_context(pki_dir: Path, identity: str) -> ssl.SSLContext:
    """TLS with the worker's own certificate, from FIELDLINE_HOME/pki/issued/<identity>/."""
    try:
        return certs.client_context(pki_dir / "issued" / identity)
    except CertsError as exc:
        raise IngestError(
            f"the worker's certificate: {exc}; "
            f"`fieldline certs issue {identity} --tenant platform --role service`"
        ) from exc


def subscriptions(share_group: str | None) -> tuple[str, ...]:
    """The service's four filters, as `$share/<group>/...` when workers split the load."""
    filters = service_filters()
    return tuple(shared(share_group, f) for f in filters) if share_group else filters


# what a maintenance or compaction pass may meet from one database: logged, counted, and the
# connection replaced; the next pass tries again
_MAINTENANCE_ERRORS = (StorageError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError)


async def _drop_connection(conns: dict[str, asyncpg.Connection], dsn: str) -> None:
    """Forget a failed connection and close it quietly: the next use opens a new one."""
    failed = conns.pop(dsn, None)
    if failed is not None:
        with contextlib.suppress(Exception):
            await failed.close()


class IngestWorker:
    """One worker process: a broker session, `writers` database connections, the schedules."""

    def __init__(self, config: WorkerConfig, metrics: IngestMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or IngestMetrics()
        self.receiver: LeanReceiver | PahoReceiver | JetStreamReceiver
        if config.source == "nats":
            if config.nats is None:
                raise IngestError("ingest.source is nats but no NATS cluster is configured")
            self.receiver = JetStreamReceiver(config.nats, self.metrics)
        elif config.client == "paho":
            self.receiver = PahoReceiver(config.target, self.metrics)
        else:
            self.receiver = LeanReceiver(config.target, self.metrics)
        limits = Limits(
            max_future_skew=timedelta(seconds=config.max_future_skew_s),
            max_payload_bytes=config.max_payload_bytes,
            max_samples=config.max_samples,
            max_metrics=config.max_metrics_per_message,
        )
        self.pipeline = Pipeline(
            limits=limits,
            max_rows=config.batch_max_rows,
            max_wait_s=config.batch_max_wait_s,
            queue_max=config.queue_max,
            queue_max_rows=config.queue_max_rows,
            queue_max_bytes=config.queue_max_bytes,
            ack=self.receiver.ack,
            pause=self.receiver.pause,
            resume=self.receiver.resume,
            metrics=self.metrics,
        )
        self.registry = Registry(
            chunk_interval=config.chunk_interval,
            admission=config.admission,
            sequence=config.sequence,
        )
        # parts of batches whose rows are committed, waiting for their device rows (one task
        # writes those for all writers, several batches at once) before they are acknowledged
        self._device_work: list[tuple[str, str, list[Decoded], Written, float]] = []
        self._device_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._receiving: asyncio.Task[None] | None = None
        self._http: Any = None
        self._retention = RetentionMode.DELETE

    async def __aenter__(self) -> IngestWorker:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        for index, dsn in enumerate(self.config.all_dsns()):
            conn = await self._connect_db(dsn)
            try:
                report = await migrate_all(conn)  # the shared schema and every tenant
                for warning in report.warnings:
                    log.warning("event=migration_warning detail=%r", warning)
                if index == 0:
                    self._retention = (await detect_capabilities(conn)).retention
            finally:
                await conn.close()
        if self.config.metrics_port:
            self._http, _thread = start_http_server(
                self.config.metrics_port, self.config.metrics_bind, registry=self.metrics.registry
            )
        self.metrics.up.set(1)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._writer(n)) for n in range(self.config.writers)]
        self._tasks.append(loop.create_task(self._device_writer()))
        self._tasks.append(loop.create_task(self._maintain()))
        self._tasks.append(loop.create_task(self._compactor()))
        self._receiving = loop.create_task(self.receiver.run(self.pipeline.accept))
        log.info(
            "event=started source=%s client=%s writers=%d batch_rows=%d receive_maximum=%d",
            self.config.source, self.config.client, self.config.writers,
            self.config.batch_max_rows,
            self.config.target.receive_maximum,
        )  # fmt: skip

    async def wait_connected(self, timeout: float) -> None:
        """Until the first broker session is up (tests and `fieldline up` wait on this)."""
        await asyncio.wait_for(self.receiver.ready.wait(), timeout)

    async def stop(self) -> None:
        """Stop reading, commit and acknowledge what is held, disconnect, close."""
        self.receiver.pause()
        drained = await self.pipeline.drain(self.config.drain_timeout_s)
        if not drained:
            log.warning(
                "event=drain_timeout pending=%d detail='unacknowledged messages will be "
                "redelivered by the broker'",
                len(self.pipeline.pending),
            )
        await self.receiver.stop()
        if self._receiving is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._receiving, 10)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            self._http.shutdown()
        self.metrics.up.set(0)
        log.info("event=stopped drained=%s", drained)

    async def _connect_db(self, dsn: str | None = None) -> asyncpg.Connection:
        return await connect(dsn or self.config.dsn)

    # -- writing ----------------------------------------------------------------------------
    async def _writer(self, index: int) -> None:
        conns: dict[str, asyncpg.Connection] = {}  # one per database this writer has used
        try:
            while True:
                got = await self.pipeline.next_batch()
                if got is None:
                    return
                tenant, items = got
                dsn = self.config.dsn_for(tenant)
                conn = await self._write_until_committed(conns.get(dsn), dsn, tenant, items)
                if conn is None:
                    conns.pop(dsn, None)
                else:
                    conns[dsn] = conn
        finally:
            for conn in conns.values():
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _connect_writer(self, dsn: str) -> asyncpg.Connection:
        """A writer's connection: no statement may run longer than ingest.statement_timeout_s,
        so one try of a batch is bounded (a timeout counts as a transient failure)."""
        conn = await self._connect_db(dsn)
        timeout_ms = int(self.config.statement_timeout_s * 1000)
        try:
            await conn.execute(f"SET statement_timeout = {timeout_ms}")
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        return conn

    async def _write_until_committed(
        self,
        conn: asyncpg.Connection | None,
        dsn: str,
        tenant: str | None,
        items: list[Decoded],
    ) -> asyncpg.Connection | None:
        """Write the batch, acknowledging each part as it commits. The database unreachable
        (or a dead letter unwritable): retried for as long as it takes with what is left,
        nothing acknowledged meanwhile, the connection replaced. Anything else is the batch's
        own: `write_narrowed` isolates the messages at fault into dead letters."""

        def committed(part: list[Decoded], written: Written, seconds: float) -> None:
            if tenant is None:
                self._committed(part, written, seconds)  # dead letters only: no device rows
            else:
                self._device_work.append((dsn, tenant, part, written, seconds))
                self._device_wake.set()

        policy = Narrowing(
            tries=self.config.transient_tries,
            committed=committed,
            failed=lambda exc, n, retry: self._failed(tenant, exc, n, retry),
            devices=False,
        )
        backoff = Backoff(0.1, 5.0)
        left = items
        while left:
            try:
                if conn is None or conn.is_closed():
                    conn = await self._connect_writer(dsn)
                await write_narrowed(conn, self.registry, tenant, left, policy)
                return conn
            except (StorageError, asyncpg.PostgresError, OSError, TimeoutError,
                    asyncpg.InterfaceError) as exc:  # fmt: skip
                left = [i for i in left if not i.done]  # parts committed before it failed
                self.metrics.retries.inc()
                if tenant is not None:
                    self.registry.forget_tenant(tenant)
                delay = backoff.next()
                log.warning(
                    "event=db_retry tenant=%s messages=%d error=%r retry_in=%.1fs",
                    tenant, len(left), str(exc)[:200], delay,
                )  # fmt: skip
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                conn = None
                await asyncio.sleep(delay)
        return conn

    async def _device_writer(self) -> None:
        """Device rows (last seen, presence, seq) of committed batches, off the writers' path:
        everything waiting is written per tenant in one short transaction, then acknowledged.
        A writer's batch then costs the database what the bare idempotent insert does, and
        two writers never wait for each other's device row locks (docs/benchmarks.md)."""
        conns: dict[str, asyncpg.Connection] = {}
        try:
            while True:
                await self._device_wake.wait()
                self._device_wake.clear()
                work, self._device_work = self._device_work, []
                groups: dict[tuple[str, str], list[tuple[list[Decoded], Written, float]]] = {}
                for dsn, tenant, items, written, seconds in work:
                    groups.setdefault((dsn, tenant), []).append((items, written, seconds))
                for (dsn, tenant), parts in groups.items():
                    items = [i for part, _w, _s in parts for i in part]
                    devices = await self._write_devices(conns, dsn, tenant, items)
                    for n, (part, written, seconds) in enumerate(parts):
                        if n == 0:  # the device rows' counts go with the first part
                            written.gaps, written.gaps_forced = devices.gaps, devices.gaps_forced
                            written.transitions = devices.transitions
                            written.events += devices.events
                        self._committed(part, written, seconds)
        finally:
            for conn in conns.values():
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _write_devices(
        self, conns: dict[str, asyncpg.Connection], dsn: str, tenant: str, items: list[Decoded]
    ) -> Written:
        """Until committed: the database unreachable, or failing transiently, is retried with
        nothing acknowledged. A failure of its own `ingest.transient_tries` times over gives
        the device rows of these messages up (their rows are stored): logged and counted."""
        backoff = Backoff(0.1, 5.0)
        tries = 0
        while True:
            conn = conns.get(dsn)
            try:
                if conn is None or conn.is_closed():
                    conn = conns[dsn] = await self._connect_writer(dsn)
                return await write_devices(conn, self.registry, tenant, items)
            except (StorageError, asyncpg.PostgresError, OSError, TimeoutError,
                    asyncpg.InterfaceError) as exc:  # fmt: skip
                failure = classify(exc)
                self.registry.forget_tenant(tenant)
                if failure is not Failure.UNREACHABLE:
                    self.metrics.batch_failures.labels(failure.value, sqlstate(exc)).inc()
                    tries += 1
                    if tries >= self.config.transient_tries and failure is Failure.PERMANENT:
                        log.error(
                            "event=device_rows_failed tenant=%s messages=%d sqlstate=%s "
                            "error=%r detail='rows stored; last seen and seq not updated'",
                            tenant, len(items), sqlstate(exc), str(exc)[:200],
                        )  # fmt: skip
                        return Written()
                else:
                    await _drop_connection(conns, dsn)
                self.metrics.retries.inc()
                delay = backoff.next()
                log.warning(
                    "event=device_rows_retry tenant=%s messages=%d error=%r retry_in=%.1fs",
                    tenant, len(items), str(exc)[:200], delay,
                )  # fmt: skip
                await asyncio.sleep(delay)

    def _failed(self, tenant: str | None, exc: BaseException, messages: int, retry: bool) -> None:
        """A try of a batch failed for a reason of its own (not the connection)."""
        failure = classify(exc)
        self.metrics.batch_failures.labels(failure.value, sqlstate(exc)).inc()
        if retry:
            self.metrics.retries.inc()
            log.warning(
                "event=batch_retry tenant=%s messages=%d sqlstate=%s error=%r",
                tenant, messages, sqlstate(exc), str(exc)[:200],
            )  # fmt: skip
        elif messages > 1:
            self.metrics.batch_splits.inc()

    def _committed(self, items: list[Decoded], written: Written, seconds: float) -> None:
        """A part of a batch committed: count it, then acknowledge (in receive order)."""
        now = time.time()
        self.metrics.commit_seconds.observe(seconds)
        self.metrics.last_commit = now
        self.metrics.rows.labels("numeric_values").inc(written.numeric)
        self.metrics.rows.labels("text_values").inc(written.text)
        self.metrics.rows.labels("events").inc(written.events)
        self.metrics.rows.labels("commands").inc(written.results)
        if written.gaps:
            self.metrics.seq_gaps.inc(written.gaps)
            self.metrics.seq_gaps_forced.inc(written.gaps_forced)
        for reason, n in written.suppressed.items():
            self.metrics.dead_letters_suppressed.labels(reason).inc(n)
        if written.conflicts:
            self.metrics.conflicts.inc(written.conflict_readings)
            self.metrics.dead_letters.labels(CONFLICTING_VALUE).inc(len(written.conflicts))
        for _device, _old, new in written.transitions:
            self.metrics.presence.labels(new).inc()
        for item in items:
            self.metrics.lag_seconds.observe(now - item.received_at.timestamp())
            if item.dead_reason is not None:
                self.metrics.dead_letters.labels(item.dead_reason).inc()
            elif item.kind is Kind.TELEMETRY and item.samples and not item.samples[-1][1]:
                self.metrics.publish_lag_seconds.observe(now - item.samples[-1][0].timestamp())
        self.pipeline.committed(items)

    # -- schedules --------------------------------------------------------------------------
    async def _compactor(self) -> None:
        """Compaction on its own schedule and connection (a pass of up to
        storage.compact_budget_s must not delay presence or retention)."""
        conns: dict[str, asyncpg.Connection] = {}
        try:
            await asyncio.sleep(min(5.0, self.config.compact_every_s))
            while True:
                for dsn in self.config.all_dsns():
                    try:
                        conn = conns.get(dsn)
                        if conn is None or conn.is_closed():
                            conn = conns[dsn] = await self._connect_db(dsn)
                        await self._compact(conn)
                    except _MAINTENANCE_ERRORS as exc:
                        log.warning("event=compaction_failed error=%r", str(exc)[:200])
                        self.metrics.compaction_runs.labels("failed").inc()
                        await _drop_connection(conns, dsn)
                await asyncio.sleep(self.config.compact_every_s)
        finally:
            for conn in conns.values():
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _compact(self, conn: asyncpg.Connection) -> None:
        """One bounded compaction pass over the tenants of one database."""
        started = time.monotonic()
        totals = await compact_all(
            conn,
            timedelta(seconds=self.config.compact_after_s),
            batch_rows=self.config.compact_batch_rows,
            budget_s=self.config.compact_budget_s,
        )
        self.metrics.compaction_seconds.observe(time.monotonic() - started)
        self.metrics.compacted_rows.inc(totals.rows)
        self.metrics.compacted_buckets.inc(sum(r.buckets for r in totals.results))
        self.metrics.conflicts.inc(sum(r.conflicts for r in totals.results))
        done = all(r.done for r in totals.results)
        self.metrics.compaction_runs.labels("ok" if done else "partial").inc()

    async def _maintain(self) -> None:
        conns: dict[str, asyncpg.Connection] = {}
        every = max(0.5, self.config.offline_after_s / 4)
        next_retention = time.monotonic() + min(5.0, self.config.retention_every_s)
        try:
            while True:
                await asyncio.sleep(every)
                retention_due = time.monotonic() >= next_retention
                if retention_due:
                    next_retention = time.monotonic() + self.config.retention_every_s
                for dsn in self.config.all_dsns():
                    try:
                        conn = conns.get(dsn)
                        if conn is None or conn.is_closed():
                            conn = conns[dsn] = await self._connect_db(dsn)
                        marked = await mark_silent_devices(conn, self.config.offline_after_s)
                        if marked:
                            self.metrics.presence.labels("offline").inc(sum(marked.values()))
                        if retention_due:
                            await apply_retention(conn, self._retention)
                            self.metrics.retention_runs.labels("ok").inc()
                    except _MAINTENANCE_ERRORS as exc:
                        log.warning("event=maintenance_failed error=%r", str(exc)[:200])
                        self.metrics.retention_runs.labels("failed").inc()
                        await _drop_connection(conns, dsn)
        finally:
            for conn in conns.values():
                with contextlib.suppress(Exception):
                    await conn.close()


async def serve(worker: IngestWorker) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop (the runner owns the signals)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with worker:
        # what start-up allocated (modules, models, codecs) lives as long as the process: out
        # of the collector's full passes, which stalled every batch in flight for 30-40 ms
        gc.freeze()
        # a backlog keeps ~200,000 rows of objects alive for a while; with the default
        # thresholds the collector walked them over and over (5 s of a 27 s drain, measured),
        # with these ~1 s. Reference counting frees almost everything the worker makes anyway.
        gc.set_threshold(10_000, 50, 100)
        log.info("event=ready")
        await stop.wait()
        log.info("event=stopping")


def nats_target(settings: Settings, context: ssl.SSLContext | None = None) -> NatsTarget:
    """The JetStream consumer as the settings describe it (`ingest.nats_*`, the `nats` section),
    as the `service` certificate `ingest.identity`."""
    i = settings.ingest
    return NatsTarget(
        urls=tuple(i.nats_urls or cluster_urls(settings.nats)),
        context=context or client_context(settings.pki_dir, i.identity),
        name=i.identity,
        consumer=i.nats_consumer,
        stream=i.nats_stream,
        mqtt=tuple(cluster_mqtt(settings.nats)),
        max_ack_pending=i.nats_max_ack_pending,
        ack_wait_s=i.nats_ack_wait_s,
        fetch_batch=i.nats_fetch_batch,
        fetch_max_bytes=i.nats_fetch_max_bytes,
        store_budget_bytes=store_budget(i.nats_stream, settings.nats),
    )


def worker_config(settings: Settings) -> WorkerConfig:
    """The worker as the settings describe it (`ingest.*`, `broker.host/port`, the database)."""
    i = settings.ingest
    target = BrokerTarget(
        host=settings.broker.host,
        port=settings.broker.port,
        context=client_context(settings.pki_dir, i.identity),
        client_id=i.identity,
        filters=subscriptions(i.share_group),
        protocol=i.protocol,
        keepalive=settings.broker.keepalive_s,
        session_expiry=i.session_expiry_s,
        receive_maximum=i.receive_maximum,
    )
    nats = nats_target(settings, target.context) if i.source == "nats" else None
    return WorkerConfig(
        dsn=database_url(settings),
        target=target,
        client=i.client,
        source=i.source,
        nats=nats,
        batch_max_rows=i.batch_max_rows,
        batch_max_wait_s=i.batch_max_wait_ms / 1000,
        writers=i.writers,
        queue_max=i.queue_max,
        queue_max_rows=i.queue_max_rows,
        queue_max_bytes=i.queue_max_bytes,
        transient_tries=i.transient_tries,
        statement_timeout_s=i.statement_timeout_s,
        offline_after_s=i.offline_after_s,
        max_future_skew_s=i.max_future_skew_s,
        max_payload_bytes=i.max_payload_bytes,
        max_samples=i.max_samples,
        max_metrics_per_message=i.max_metrics_per_message,
        admission=AdmissionLimits(
            max_backfill=timedelta(seconds=i.max_backfill_s),
            max_metrics_per_device=i.max_metrics_per_device,
            new_metrics_per_minute=i.new_metrics_per_minute,
            dead_letter_payload_bytes=i.dead_letter_payload_bytes,
            dead_letters_per_device_per_minute=i.dead_letters_per_device_per_minute,
        ),
        sequence=SeqWindow(wait=timedelta(seconds=i.seq_reorder_window_s), span=i.seq_reorder_span),
        retention_every_s=i.retention_every_s,
        compact_after_s=settings.storage.compact_after_s,
        compact_every_s=settings.storage.compact_every_s,
        compact_budget_s=settings.storage.compact_budget_s,
        compact_batch_rows=settings.storage.compact_batch_rows,
        metrics_port=i.metrics_port,
        metrics_bind=i.metrics_bind,
        tenant_dsns=settings.tenant_databases,
    )
