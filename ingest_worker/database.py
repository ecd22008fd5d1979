"""Connecting to PostgreSQL: one place that turns driver errors into StorageError."""

from __future__ import annotations

import re

import asyncpg

from ingest_worker.errors import StorageError

_PASSWORD_RE = re.compile(r"(postgres(?:ql)?://[^:/@]+:)([^@]*)(@)")


def mask_dsn(dsn: str) -> str:
    """The DSN with its password replaced by ***, for logs and messages."""
    return _PASSWORD_RE.sub(r"\1***\3", dsn)


async def connect(dsn: str, *, timeout: float = 10.0) -> asyncpg.Connection:
    """Open one connection; failures say where we tried to connect, never the password."""
    try:
        return await asyncpg.connect(dsn, timeout=timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StorageError(
            f"cannot connect to PostgreSQL at {mask_dsn(dsn)}: {exc}; is it running? "
            "(`fieldline db start` for the embedded cluster, or check FIELDLINE_DATABASE_URL)"
        ) from exc
