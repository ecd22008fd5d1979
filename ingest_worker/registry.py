"""What the worker knows about tenants, devices and metrics, so a batch needs no lookups.

Filled from the database on first sight and updated only after a batch commits: a rolled
back transaction must not leave ids in the cache that the database does not have.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from ingest_worker.admission import AdmissionLimits, TokenBuckets
from ingest_worker.migrate import add_tenant, quote_ident, tenant_ready, tenant_schema
from ingest_worker.sequence import SeqWindow
from schemas.messages import MetricKind


@dataclass(frozen=True, slots=True)
class MetricRef:
    id: int
    kind: MetricKind
    unit: str | None


@dataclass
class Registry:
    """Caches shared by the worker's writers (one event loop: no locks needed but for DDL)."""

    chunk_interval: str = "1 day"
    schemas: dict[str, str] = field(default_factory=dict)  # tenant -> quoted schema name
    owners: dict[str, str] = field(default_factory=dict)  # device -> its tenant
    # (tenant, device) -> (status, last_seen) as last written
    devices: dict[tuple[str, str], tuple[str, datetime]] = field(default_factory=dict)
    metrics: dict[tuple[str, str], dict[str, MetricRef]] = field(default_factory=dict)  # by device
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    # how long and how far a hole in a device's seq may stay open before it counts as loss
    sequence: SeqWindow = field(default_factory=SeqWindow)
    # tenant -> (retention_days, when it was read): a changed retention is seen within a minute
    retention: dict[str, tuple[int | None, float]] = field(default_factory=dict)
    _tenant_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        # per device ("tenant/device"): metric names it may still create, dead letters it may
        # still have stored; shared by the writers, so two batches cannot both spend a budget
        self.new_metrics = TokenBuckets(self.admission.new_metrics_per_minute)
        self.dead_letter_budget = TokenBuckets(self.admission.dead_letters_per_device_per_minute)

    async def retention_days(self, conn: asyncpg.Connection, tenant: str) -> int | None:
        """The tenant's retention in days (None: kept for ever), re-read once a minute."""
        now = time.monotonic()
        known = self.retention.get(tenant)
        if known is not None and now - known[1] < 60.0:
            return known[0]
        days = await conn.fetchval(
            "SELECT retention_days FROM fieldline.tenants WHERE id = $1", tenant
        )
        self.retention[tenant] = (days, now)
        return int(days) if days is not None else None

    async def schema(self, conn: asyncpg.Connection, tenant: str) -> str:
        """The tenant's quoted schema, created (with its tables) on first sight."""
        known = self.schemas.get(tenant)
        if known is not None:
            return known
        async with self._tenant_lock:  # DDL once, even with several writers
            if tenant not in self.schemas:
                # not just "recorded": a tenant half migrated by another worker (or by a
                # crashed one) is finished here before anything is written into it
                if not await tenant_ready(conn, tenant):
                    await add_tenant(conn, tenant, chunk_interval=self.chunk_interval)
                self.schemas[tenant] = quote_ident(tenant_schema(tenant))
        return self.schemas[tenant]

    def forget_tenant(self, tenant: str) -> None:
        """After a failure that may mean the schema went away: ask the database again."""
        self.schemas.pop(tenant, None)
