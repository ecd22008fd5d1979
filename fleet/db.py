"""Connections and tenant schemas for the fleet queries."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import asyncpg

from fleet.errors import BadInputError, NotFoundError
from ingest_worker.database import connect
from ingest_worker.migrate import quote_ident, tenant_schema
from schemas.errors import SchemaError
from schemas.topics import validate_id

T = TypeVar("T")


class Db(Protocol):
    """What the queries need: an asyncpg Connection, or a Pool (each call takes a connection)."""

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...
    async def fetchrow(self, query: str, *args: Any) -> Any: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    async def execute(self, query: str, *args: Any) -> str: ...


def check_id(value: str, what: str) -> str:
    """A tenant, device or command name as ids are spelt; BadInputError naming `what`."""
    try:
        return validate_id(value, what)
    except SchemaError as exc:
        raise BadInputError(str(exc)) from None


def schema(tenant: str) -> str:
    """The quoted schema of a tenant, for SQL text (ids are validated, then quoted)."""
    return quote_ident(tenant_schema(check_id(tenant, "tenant id")))


@asynccontextmanager
async def tenant_tables(tenant: str) -> AsyncIterator[None]:
    """Turn a missing tenant schema into NotFoundError (the tenant has sent nothing yet)."""
    try:
        yield
    # a tenant without a schema: its tables, the schema itself, or its read functions
    except (
        asyncpg.UndefinedTableError,
        asyncpg.InvalidSchemaNameError,
        asyncpg.UndefinedFunctionError,
    ) as exc:
        raise NotFoundError(
            f"tenant {tenant!r} has no data yet (no schema): check the name, or that an ingest "
            "worker has received something from it"
        ) from exc


async def on(dsn: str, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run `work` on a fresh connection to `dsn` (the CLI's one-shot queries)."""
    conn = await connect(dsn, timeout=10)
    try:
        return await work(conn)
    finally:
        await conn.close()
