"""`fieldline web ...`: run the HTTP API and console, and manage its API tokens."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import typer
from rich.table import Table

from core.console import cli_console
from core.logs import configure_service_logging
from core.pgcluster import database_url
from core.settings import get_settings
from ingest_worker.database import connect
from ingest_worker.errors import StorageError
from ingest_worker.migrate import migrate_shared
from web import tokens
from web.errors import WebError
from web.server import WebServer
from web.tokens import Token, TokenRole

app = typer.Typer(
    help="The HTTP API and web console (docs/web.md): `web run` serves them, `web token` "
    "issues the bearer tokens that open them.",
    no_args_is_help=True,
)
token_app = typer.Typer(
    help="API tokens: viewer (read) or operator (read + send commands) of one tenant, or admin "
    "(every tenant, dead letters). Only a hash is stored: the token is printed once.",
    no_args_is_help=True,
)
app.add_typer(token_app, name="token")
console = cli_console()
T = TypeVar("T")


@app.command("run")
def run(
    host: str | None = typer.Option(
        None,
        "--host",
        help="Listen address (default web.host, 127.0.0.1). Anything but "
        "loopback needs HTTPS: a `fieldline certs server` certificate (web.server_cert).",
    ),
    port: int | None = typer.Option(
        None, "--port", min=0, max=65535, help="Port (default web.port, 8080; 0: a free one)."
    ),
) -> None:
    """Serve the API under /api/v1, the console at /, Swagger UI at /docs until Ctrl-C."""
    settings = get_settings()
    configure_service_logging(settings)
    server = WebServer(settings, host=host, port=port)  # refuses HTTP beyond loopback here
    asyncio.run(_serve(server))


async def _serve(server: WebServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    console.print(f"serving the console at {server.url} (API docs at {server.url}docs); "
                  "Ctrl-C stops", highlight=False, soft_wrap=True, markup=False)  # fmt: skip
    try:
        await stop.wait()
    finally:
        await server.stop()


def _on_database(work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work` on a connection to the shared database, its migrations applied."""

    async def go() -> T:
        try:
            conn = await connect(database_url(get_settings()), timeout=10)
        except StorageError as exc:
            raise WebError(str(exc)) from None
        try:
            await migrate_shared(conn)  # the token table comes with shared_0004
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


@token_app.command("create")
def token_create(
    tenant: str | None = typer.Argument(None, help="The tenant the token sees (not with --admin)."),
    role: TokenRole = typer.Option(
        TokenRole.VIEWER, "--role", help="viewer reads; operator also sends commands."
    ),
    admin: bool = typer.Option(
        False, "--admin", help="An admin token: every tenant, dead letters."
    ),
    name: str | None = typer.Option(None, "--name", help="What it is for (shown in `list`)."),
) -> None:
    """Create a token and print it once (only its sha256 is stored)."""
    if admin:
        if tenant is not None:
            raise WebError("an --admin token sees every tenant: give no TENANT")
        role = TokenRole.ADMIN
    elif tenant is None:
        raise WebError("give the TENANT the token sees, or --admin for every tenant")
    elif role is TokenRole.ADMIN:
        raise WebError("use --admin (without TENANT) for an admin token")

    async def work(conn: Any) -> tuple[Token, str]:
        label = name or (f"{role.value} of {tenant}" if tenant else "admin")
        return await tokens.create_token(conn, role, tenant, label)

    record, text = _on_database(work)
    where = f"tenant {record.tenant}" if record.tenant else "every tenant"
    console.print(f"created token {record.id} ({record.role.value}, {where}); it is shown "
                  "only now, keep it:", highlight=False, soft_wrap=True)  # fmt: skip
    typer.echo(text)


@token_app.command("list")
def token_list(
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table."),
) -> None:
    """Every token: id, name, tenant, role, created, revoked (never the secret)."""
    found = _on_database(tokens.list_tokens)
    if as_json:
        for t in found:
            typer.echo(json.dumps({
                "id": t.id, "name": t.name, "tenant": t.tenant, "role": t.role.value,
                "created_at": t.created_at.isoformat() if t.created_at else None,
                "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
            }))  # fmt: skip
        return
    table = Table(title="API tokens")
    for column in ("id", "name", "tenant", "role", "created", "revoked"):
        table.add_column(column)
    for t in found:
        table.add_row(
            t.id, t.name, t.tenant or "(all)", t.role.value,
            t.created_at.isoformat(timespec="seconds") if t.created_at else "-",
            t.revoked_at.isoformat(timespec="seconds") if t.revoked_at else "-",
        )  # fmt: skip
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: str = typer.Argument(..., metavar="ID", help="The token's id (`web token list`)."),
) -> None:
    """Revoke a token: its next request is refused (401), its live streams end within 15 s."""

    async def work(conn: Any) -> Token:
        return await tokens.revoke(conn, token_id)

    record = _on_database(work)
    console.print(f"revoked token {record.id} ({record.name})", highlight=False, soft_wrap=True)
