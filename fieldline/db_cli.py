"""`fieldline db ...`: the embedded PostgreSQL + TimescaleDB cluster, migrations and tenants."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

import asyncpg
import typer
from rich.table import Table

from core.console import cli_console
from core.pgcluster import cluster, database_url
from core.settings import get_settings
from fleet.durations import parse_duration
from ingest_worker.compaction import StorageStats, compact_all, storage_stats
from ingest_worker.database import connect, mask_dsn
from ingest_worker.errors import StorageError
from ingest_worker.migrate import (
    MigrationReport,
    Tenant,
    add_tenant,
    detect_capabilities,
    list_tenants,
    migrate_all,
    tenant_schema,
)

app = typer.Typer(
    help="The database: the embedded PostgreSQL + TimescaleDB cluster, migrations, tenants. "
    "Set FIELDLINE_DATABASE_URL to use your own server instead of the embedded one.",
    no_args_is_help=True,
)
tenants_app = typer.Typer(help="Tenants: one schema `tenant_<id>` each.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")

console = cli_console()
T = TypeVar("T")


def _with_connection(work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    async def run() -> T:
        conn = await connect(database_url())
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


def _print_report(report: MigrationReport) -> None:
    caps = report.capabilities
    if caps.timescaledb:
        console.print(
            f"TimescaleDB {caps.timescaledb} ({caps.license or 'unknown'} licence; "
            f"retention by {caps.retention.value})"
        )
    for label in report.applied:
        console.print(f"[green]applied[/green] {label}")
    if not report.applied:
        console.print(f"up to date ({len(report.skipped)} migrations already applied)")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


@app.command()
def start() -> None:
    """Create (on first use) and start the embedded cluster under FIELDLINE_HOME/pg."""
    pg = cluster()
    asyncio.run(pg.start())
    console.print(f"PostgreSQL running: {pg.dsn(with_password=False)}")
    console.print("`fieldline db url --show-password` prints the full URL.")


@app.command()
def stop() -> None:
    """Stop the embedded cluster (fast shutdown; data stays under FIELDLINE_HOME/pg)."""
    pg = cluster()
    if not pg.running():
        console.print("the embedded cluster is not running")
        return
    asyncio.run(pg.stop())
    console.print("PostgreSQL stopped")


@app.command()
def url(
    show_password: bool = typer.Option(
        False, "--show-password", help="Print the password too (it is hidden by default)."
    ),
) -> None:
    """Print the URL the other commands connect to."""
    dsn = database_url()
    typer.echo(dsn if show_password else mask_dsn(dsn))


@app.command()
def status() -> None:
    """Whether the database answers, its TimescaleDB version and licence, and its tenants."""

    async def work(conn: asyncpg.Connection) -> None:
        caps = await detect_capabilities(conn)
        version = await conn.fetchval("SHOW server_version")
        console.print(f"PostgreSQL {version} at {mask_dsn(database_url())}")
        if caps.timescaledb:
            console.print(
                f"TimescaleDB {caps.timescaledb}, licence {caps.license}: "
                f"retention by {caps.retention.value}"
            )
        else:
            console.print("[yellow]TimescaleDB not available: plain tables[/yellow]")
        try:
            tenants = await list_tenants(conn)
        except StorageError:  # an uninitialised database is a normal status
            console.print("not initialised: run `fieldline db init`")
            return
        console.print(f"{len(tenants)} tenant(s): {', '.join(t.id for t in tenants) or '-'}")

    _with_connection(work)


@app.command()
def init() -> None:
    """Apply the migrations: the shared schema, then every known tenant. Safe to run twice."""
    _print_report(_with_connection(migrate_all))


@tenants_app.command("add")
def tenants_add(
    tenant: str = typer.Argument(
        ..., help="Tenant id: 1-64 of a-z 0-9 _ -, starting alphanumeric."
    ),
    retention_days: int | None = typer.Option(
        None, "--retention-days", min=1, help="Drop telemetry older than this many days."
    ),
    chunk_interval: str = typer.Option(
        "1 day",
        "--chunk-interval",
        help="Hypertable chunk size, e.g. '6 hours'. One chunk plus its indexes should fit "
        "in about a quarter of the server's memory.",
    ),
) -> None:
    """Create a tenant's schema `tenant_<id>` (devices, metrics, values, events, commands)."""
    report = _with_connection(
        lambda conn: add_tenant(
            conn, tenant, retention_days=retention_days, chunk_interval=chunk_interval
        )
    )
    _print_report(report)
    console.print(f"tenant [bold]{tenant}[/bold] ready in schema {tenant_schema(tenant)}")


@tenants_app.command("list")
def tenants_list(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """The tenants, their schemas and retention."""
    tenants = _with_connection(list_tenants)
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "id": t.id,
                        "schema": t.schema_name,
                        "retention_days": t.retention_days,
                        "created_at": t.created_at.isoformat(),
                    }
                    for t in tenants
                ],
                indent=2,
            )
        )
        return
    table = Table("tenant", "schema", "retention (days)", "created")
    for t in tenants:
        table.add_row(
            t.id, t.schema_name, str(t.retention_days or "-"), f"{t.created_at:%Y-%m-%d %H:%M}"
        )
    console.print(table)


def _tenants(all_tenants: list[Tenant], tenant: str | None) -> list[Tenant]:
    if tenant is None:
        return all_tenants
    chosen = [t for t in all_tenants if t.id == tenant]
    if not chosen:
        known = ", ".join(t.id for t in all_tenants) or "none"
        raise StorageError(f"no tenant {tenant!r} in this database (tenants: {known})")
    return chosen


@app.command()
def compact(
    tenant: str | None = typer.Argument(None, help="Tenant id; every tenant when omitted."),
    older_than: str | None = typer.Option(
        None,
        "--older-than",
        help="Pack hot rows of UTC days that ended this long ago (30m, 12h, 1d); default "
        "storage.compact_after_s. The day in progress is never packed.",
    ),
) -> None:
    """Pack old numeric rows now, as the ingest workers do on their schedule.

    Safe while workers run (one compactor per tenant at a time; the others skip it) and to
    interrupt: each transaction is a day of a range of metrics, all or nothing."""
    settings = get_settings()
    after = (
        parse_duration(older_than)
        if older_than is not None
        else timedelta(seconds=settings.storage.compact_after_s)
    )

    async def work(conn: asyncpg.Connection) -> None:
        chosen = _tenants(await list_tenants(conn), tenant)
        totals = await compact_all(
            conn, after, batch_rows=settings.storage.compact_batch_rows, tenants=chosen
        )
        for r in totals.results:
            note = " (another compactor holds this tenant: skipped)" if r.skipped else ""
            if r.conflicts:
                note += (
                    f"; {r.conflicts:,} late reading(s) with another value than the packed one"
                    " kept, recorded as conflicting_value dead letters"
                )
            console.print(
                f"{r.tenant}: {r.rows:,} rows packed into {r.buckets:,} rows in "
                f"{r.windows:,} transactions, {r.seconds:.1f} s{note}",
                soft_wrap=True,
            )

    _with_connection(work)


@app.command()
def stats(
    tenant: str | None = typer.Argument(None, help="Tenant id; every tenant when omitted."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Numeric samples and bytes per tenant: hot rows, packed (compacted) rows, and the
    bytes per sample of each (heap, TOAST and indexes: what the disk holds)."""

    async def work(conn: asyncpg.Connection) -> list[StorageStats]:
        chosen = _tenants(await list_tenants(conn), tenant)
        return [await storage_stats(conn, t.id) for t in chosen]

    found = _with_connection(work)
    if as_json:
        typer.echo(json.dumps([s.as_dict() for s in found], indent=2))
        return
    table = Table("tenant", "part", "samples", "rows", "bytes", "B/sample")
    for st in found:
        for part, t in (("hot", st.hot), ("packed", st.packed), ("total", st.total)):
            per = f"{t.bytes_per_sample:.1f}" if t.bytes_per_sample is not None else "-"
            table.add_row(st.tenant, part, f"{t.samples:,}", f"{t.rows:,}", f"{t.bytes:,}", per)
    console.print(table)
