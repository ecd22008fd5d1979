"""SQL migrations of the shared `fieldline` schema and the tenant schemas; safe to run twice."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from importlib import resources
from typing import Any

import asyncpg

from ingest_worker.errors import StorageError
from schemas.errors import SchemaError
from schemas.topics import validate_id

log = logging.getLogger(__name__)

SHARED_SCHEMA = "fieldline"
# one lock for every migrator in the cluster, so two workers starting together do not race
_LOCK_KEY = 0x666C_6D69_6772  # "flmigr"
_FILE_RE = re.compile(r"^(shared|tenant)_(\d{4})_([a-z0-9_]+)\.sql$")
_INTERVAL_RE = re.compile(r"^\d+ (minutes?|hours?|days?|weeks?)$")


class Scope(StrEnum):
    SHARED = "shared"
    TENANT = "tenant"


class RetentionMode(StrEnum):
    """How old data is removed: what the installed TimescaleDB licence allows."""

    POLICY = "policy"  # add_retention_policy (Timescale licence)
    DROP_CHUNKS = "drop_chunks"  # Apache build: the worker calls drop_chunks on a schedule
    DELETE = "delete"  # no TimescaleDB: plain DELETE


@dataclass(frozen=True)
class Migration:
    """One numbered migration, with an optional TimescaleDB-only part."""

    scope: Scope
    version: int
    name: str
    sql: str
    timescale_sql: str | None

    @property
    def checksum(self) -> str:
        body = self.sql + "\n--timescale--\n" + (self.timescale_sql or "")
        return hashlib.sha256(body.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Capabilities:
    """What the database offers: TimescaleDB version and licence, if any."""

    timescaledb: str | None
    license: str | None

    @property
    def hypertables(self) -> bool:
        return self.timescaledb is not None

    @property
    def retention(self) -> RetentionMode:
        if self.timescaledb is None:
            return RetentionMode.DELETE
        return RetentionMode.POLICY if self.license == "timescale" else RetentionMode.DROP_CHUNKS


@dataclass
class MigrationReport:
    """What a run applied, what it found already applied, and what it warns about."""

    capabilities: Capabilities
    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Tenant:
    id: str
    schema_name: str
    retention_days: int | None
    created_at: datetime


def load_migrations(scope: Scope) -> list[Migration]:
    """The packaged migrations of one scope, in version order."""
    folder = resources.files("ingest_worker.migrations")
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _FILE_RE.match(entry.name)
        if not match or match.group(1) != scope.value:
            continue
        ts_entry = folder / entry.name.replace(".sql", ".timescale.sql")
        found.append(
            Migration(
                scope=scope,
                version=int(match.group(2)),
                name=match.group(3),
                sql=entry.read_text(),
                timescale_sql=ts_entry.read_text() if ts_entry.is_file() else None,
            )
        )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise StorageError(f"duplicate {scope} migration versions: {versions}")
    return found


# PostgreSQL truncates identifiers to 63 bytes; a schema name must leave room for "_reader"
_MAX_SCHEMA_NAME = 63 - len("_reader")


def tenant_schema(tenant: str) -> str:
    """The schema name of a tenant: `tenant_<id>`, shortened with a hash for very long ids."""
    try:
        validate_id(tenant, "tenant id")
    except SchemaError as exc:
        raise StorageError(str(exc)) from exc
    name = f"tenant_{tenant}"
    if len(name) <= _MAX_SCHEMA_NAME:
        return name
    # truncation alone would let two long ids share a schema: keep a digest of the whole id
    digest = hashlib.sha256(tenant.encode()).hexdigest()[:8]
    return f"tenant_{tenant[: _MAX_SCHEMA_NAME - len('tenant_') - 9]}_{digest}"


def quote_ident(name: str) -> str:
    """A double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


async def detect_capabilities(conn: asyncpg.Connection) -> Capabilities:
    """Create the TimescaleDB extension if the server has it loaded; report what we got."""
    available = await conn.fetchval(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
    )
    if available is None:
        return Capabilities(None, None)
    preload = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
    if "timescaledb" not in str(preload):
        # CREATE EXTENSION without the preload is FATAL and would close our connection
        log.warning(
            "TimescaleDB %s is installed but not preloaded: add "
            "shared_preload_libraries = 'timescaledb' to postgresql.conf and restart",
            available,
        )
        return Capabilities(None, None)
    try:
        async with conn.transaction():
            # IF NOT EXISTS still races with a concurrent migrator: serialise on our lock
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except asyncpg.InsufficientPrivilegeError as exc:
        log.warning("cannot create the timescaledb extension: %s", exc)
        return Capabilities(None, None)
    version = await conn.fetchval(
        "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
    )
    license_ = await conn.fetchval("SELECT current_setting('timescaledb.license', true)")
    return Capabilities(str(version), str(license_) if license_ else None)


async def _bootstrap(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await _create_bookkeeping(conn)


async def _create_bookkeeping(conn: asyncpg.Connection) -> None:
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SHARED_SCHEMA}")
    await conn.execute(
        f"""
        CREATE TABLE IF NOT EXISTS {SHARED_SCHEMA}.schema_migrations (
            scope       text NOT NULL,
            version     integer NOT NULL,
            name        text NOT NULL,
            checksum    text NOT NULL,
            hypertables boolean NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (scope, version)
        )
        """
    )


async def _apply(
    conn: asyncpg.Connection,
    scope_key: str,
    migrations: list[Migration],
    caps: Capabilities,
    report: MigrationReport,
    params: dict[str, str],
) -> None:
    for mig in migrations:
        label = f"{scope_key}:{mig.version:04d}_{mig.name}"
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            row = await conn.fetchrow(
                f"SELECT checksum FROM {SHARED_SCHEMA}.schema_migrations "
                "WHERE scope = $1 AND version = $2",
                scope_key,
                mig.version,
            )
            if row is not None:
                if row["checksum"] != mig.checksum:
                    report.warnings.append(
                        f"{label} was applied from a different file (checksum changed); "
                        "migrations are append-only: add a new one instead of editing"
                    )
                report.skipped.append(label)
                continue
            await conn.execute(_render(mig.sql, params))
            if mig.timescale_sql is not None and caps.hypertables:
                await conn.execute(_render(mig.timescale_sql, params))
            await conn.execute(
                f"INSERT INTO {SHARED_SCHEMA}.schema_migrations "
                "(scope, version, name, checksum, hypertables) VALUES ($1, $2, $3, $4, $5)",
                scope_key,
                mig.version,
                mig.name,
                mig.checksum,
                caps.hypertables and mig.timescale_sql is not None,
            )
            report.applied.append(label)


def _render(sql: str, params: dict[str, str]) -> str:
    # not str.format: the SQL has literal braces ('{}'::jsonb)
    for key, value in params.items():
        sql = sql.replace("{" + key + "}", value)
    return sql


def _no_timescale_warning(caps: Capabilities) -> str | None:
    if caps.hypertables:
        return None
    return (
        "TimescaleDB is not available: tables are plain PostgreSQL tables (no hypertables, no "
        "time_bucket); run `make setup` and preload timescaledb for production volumes"
    )


async def migrate_shared(conn: asyncpg.Connection) -> MigrationReport:
    """Create or upgrade the shared `fieldline` schema."""
    try:
        caps = await detect_capabilities(conn)
        report = MigrationReport(caps)
        if warning := _no_timescale_warning(caps):
            report.warnings.append(warning)
        await _bootstrap(conn)
        await _apply(conn, SHARED_SCHEMA, load_migrations(Scope.SHARED), caps, report, {})
    except asyncpg.PostgresError as exc:
        raise StorageError(f"migrating the shared schema failed: {exc}") from exc
    return report


async def add_tenant(
    conn: asyncpg.Connection,
    tenant: str,
    *,
    retention_days: int | None = None,
    chunk_interval: str = "1 day",
) -> MigrationReport:
    """Create (or upgrade) a tenant's schema and record the tenant; idempotent."""
    tenant_schema(tenant)
    if not _INTERVAL_RE.match(chunk_interval):
        raise StorageError(
            f"chunk interval {chunk_interval!r} is invalid; use e.g. '6 hours' or '1 day'"
        )
    if retention_days is not None and retention_days <= 0:
        raise StorageError(f"retention of {retention_days} days is invalid; give a positive number")
    report = await migrate_shared(conn)
    await _migrate_tenant(conn, tenant, report, retention_days, chunk_interval)
    return report


async def _migrate_tenant(
    conn: asyncpg.Connection,
    tenant: str,
    report: MigrationReport,
    retention_days: int | None,
    chunk_interval: str,
) -> None:
    schema = tenant_schema(tenant)
    params = {"schema": quote_ident(schema), "tenant": tenant, "chunk_interval": chunk_interval}
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
        await _apply(
            conn,
            f"tenant:{tenant}",
            load_migrations(Scope.TENANT),
            report.capabilities,
            report,
            params,
        )
        # the tenants row comes last: a worker that finds it may write at once, and a
        # worker writing while another still runs DDL on the same tables deadlocks with it
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            if warning := await _grant_reader(conn, tenant, schema):
                report.warnings.append(warning)
            # DO NOTHING unless there is a retention to set: DO UPDATE locks the row
            on_conflict = (
                "DO NOTHING"
                if retention_days is None
                else "DO UPDATE SET retention_days = EXCLUDED.retention_days"
            )
            await conn.execute(
                f"INSERT INTO {SHARED_SCHEMA}.tenants (id, schema_name, retention_days) "
                f"VALUES ($1, $2, $3) ON CONFLICT (id) {on_conflict}",
                tenant,
                schema,
                retention_days,
            )
    except asyncpg.PostgresError as exc:
        raise StorageError(f"migrating tenant {tenant!r} failed: {exc}") from exc


async def tenant_ready(conn: asyncpg.Connection, tenant: str) -> bool:
    """Whether the tenant is recorded with every tenant migration this code knows applied."""
    versions = [m.version for m in load_migrations(Scope.TENANT)]
    ready = await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM {SHARED_SCHEMA}.tenants WHERE id = $1) AND "
        f"(SELECT count(*) FROM {SHARED_SCHEMA}.schema_migrations "
        "WHERE scope = $2 AND version = ANY($3::int[])) = cardinality($3::int[])",
        tenant,
        f"tenant:{tenant}",
        versions,
    )
    return bool(ready)


def reader_role(tenant: str) -> str:
    """The read-only role of a tenant (for dashboards): it sees that tenant's schema only."""
    return f"{tenant_schema(tenant)}_reader"


async def _reader_complete(conn: asyncpg.Connection, role: str, schema: str) -> bool:
    # GRANT rewrites catalog rows of every table in the schema: only when something is missing
    complete = await conn.fetchval(
        "SELECT has_schema_privilege($1, $2, 'USAGE') AND NOT EXISTS ("
        "  SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        "  WHERE n.nspname = $2 AND c.relkind IN ('r', 'p', 'v', 'm')"
        "  AND NOT has_table_privilege($1, c.oid, 'SELECT'))",
        role,
        schema,
    )
    return bool(complete)


async def _grant_reader(conn: asyncpg.Connection, tenant: str, schema: str) -> str | None:
    """Create the reader role and its grants if missing (called under the migration lock)."""
    name = reader_role(tenant)
    role = quote_ident(name)
    qschema = quote_ident(schema)
    try:
        async with conn.transaction():  # a savepoint: a refusal must not abort the caller
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name)
            if exists and await _reader_complete(conn, name, schema):
                return None
            if not exists:
                # roles are cluster-wide but our lock is per database: a migrator of another
                # database may create the same role at the same moment
                with contextlib.suppress(
                    asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError
                ):
                    async with conn.transaction():
                        await conn.execute(f"CREATE ROLE {role} NOLOGIN")
            await conn.execute(f"REVOKE ALL ON SCHEMA {qschema} FROM PUBLIC")
            await conn.execute(f"GRANT USAGE ON SCHEMA {qschema} TO {role}")
            await conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {qschema} TO {role}")
            await conn.execute(
                f"ALTER DEFAULT PRIVILEGES IN SCHEMA {qschema} GRANT SELECT ON TABLES TO {role}"
            )
    except asyncpg.InsufficientPrivilegeError as exc:
        return f"could not create the read-only role {role} ({exc}); grant CREATEROLE to have it"
    return None


async def migrate_all(conn: asyncpg.Connection) -> MigrationReport:
    """Upgrade the shared schema and every known tenant to the newest migrations."""
    report = await migrate_shared(conn)
    for tenant in await list_tenants(conn):
        # the chunk interval only matters when a hypertable is first created
        await _migrate_tenant(conn, tenant.id, report, None, "1 day")
    return report


async def list_tenants(conn: asyncpg.Connection) -> list[Tenant]:
    """Every tenant recorded in `fieldline.tenants`."""
    try:
        rows: list[Any] = await conn.fetch(
            "SELECT id, schema_name, retention_days, created_at "
            f"FROM {SHARED_SCHEMA}.tenants ORDER BY id"
        )
    except asyncpg.UndefinedTableError as exc:
        raise StorageError(
            "the database is not initialised: run `fieldline db init` first"
        ) from exc
    return [Tenant(r["id"], r["schema_name"], r["retention_days"], r["created_at"]) for r in rows]
