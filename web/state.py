"""What one app holds: settings, database pools, the bounds' counters, the publisher."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from core.errors import FieldlineError
from core.pgcluster import database_url
from core.settings import Settings
from ingest_worker.database import mask_dsn
from web.errors import WebError
from web.limits import RateLimiter, StreamSlots
from web.metrics import WebMetrics
from web.publisher import CommandPublisher


class DatabaseUnavailableError(WebError):
    """PostgreSQL cannot be reached (a 503)."""


class WebState:
    """The app's shared state (app.state.web)."""

    def __init__(
        self, settings: Settings, dsn: str | None = None, *, metrics_open: bool = False
    ) -> None:
        self.settings = settings
        self._dsn = dsn
        self.metrics_open = metrics_open
        self.metrics = WebMetrics()
        self.rate = RateLimiter(settings.web.rate_per_s, settings.web.rate_burst)
        per_min = settings.web.auth_failures_per_min
        self.auth_failures = RateLimiter(per_min / 60.0, per_min)  # keyed by client address
        self.streams = StreamSlots(settings.web.max_streams_per_token)
        self.publisher = CommandPublisher(settings)
        self.stopping = asyncio.Event()
        self._pools: dict[str, Any] = {}
        self._pool_lock = asyncio.Lock()

    def shared_dsn(self) -> str:
        """The database of the shared schema (tokens, tenants, dead letters)."""
        if self._dsn is None:
            try:
                self._dsn = database_url(self.settings)
            except FieldlineError as exc:  # the embedded cluster is not running
                raise DatabaseUnavailableError(str(exc)) from exc
        return self._dsn

    def tenant_dsn(self, tenant: str) -> str:
        """A tenant's own database (tenant_databases) or the shared one."""
        return self.settings.tenant_databases.get(tenant) or self.shared_dsn()

    async def pool(self, dsn: str) -> Any:
        """The connection pool of a database, created on first use."""
        pool = self._pools.get(dsn)
        if pool is not None:
            return pool
        async with self._pool_lock:
            if dsn not in self._pools:
                timeout_ms = int(self.settings.web.statement_timeout_s * 1000)
                try:
                    self._pools[dsn] = await asyncpg.create_pool(
                        dsn, min_size=0, max_size=self.settings.web.db_pool_size, timeout=5,
                        server_settings={"statement_timeout": str(timeout_ms),
                                         "application_name": "fieldline-web"},
                    )  # fmt: skip
                except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                    raise DatabaseUnavailableError(
                        f"the database at {mask_dsn(dsn)} is unreachable ({exc}); try again "
                        "shortly, or check that it runs"
                    ) from exc
            return self._pools[dsn]

    async def shared(self) -> Any:
        """The shared database's pool."""
        return await self.pool(self.shared_dsn())

    async def tenant(self, tenant: str) -> Any:
        """A tenant's database's pool."""
        return await self.pool(self.tenant_dsn(tenant))

    async def close(self) -> None:
        """End live streams and close every pool."""
        self.stopping.set()
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            await pool.close()
