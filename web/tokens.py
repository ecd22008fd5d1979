"""API tokens: `flt_<12 hex id>_<43 chars secret>`, stored as a sha256, bound to a role and a
tenant (admin: every tenant)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg

from fleet.db import Db, check_id
from web.errors import WebError

_TOKEN = re.compile(r"^flt_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_NO_TABLE = (
    "the database has no fieldline.api_tokens table: run `fieldline db init` (or start an "
    "ingest worker, or `fieldline web run`) to apply the migrations"
)


class TokenRole(StrEnum):
    """viewer reads, operator also sends commands (both one tenant); admin: every tenant."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    def at_least(self, other: TokenRole) -> bool:
        """Whether this role may do what `other` may."""
        order = [TokenRole.VIEWER, TokenRole.OPERATOR, TokenRole.ADMIN]
        return order.index(self) >= order.index(other)


@dataclass(frozen=True)
class Token:
    """A token's record (never its secret)."""

    id: str
    name: str
    tenant: str | None
    role: TokenRole
    created_at: datetime | None = None
    revoked_at: datetime | None = None


def new_secret() -> tuple[str, str]:
    """(id, token): a fresh id and the whole token text, printed once and never stored."""
    token_id = secrets.token_hex(6)
    return token_id, f"flt_{token_id}_{secrets.token_urlsafe(32)}"


def parse(token: str) -> str | None:
    """The id of a well-formed token, else None."""
    match = _TOKEN.match(token)
    return match.group(1) if match else None


def token_hash(token: str) -> bytes:
    """What the database keeps of a token."""
    return hashlib.sha256(token.encode()).digest()


async def create_token(db: Db, role: TokenRole, tenant: str | None, name: str) -> tuple[Token, str]:
    """Store a new token; returns its record and the token text (shown once)."""
    if (role is TokenRole.ADMIN) != (tenant is None):
        raise WebError("an admin token has no tenant; viewer and operator tokens need one")
    if tenant is not None:
        check_id(tenant, "tenant id")
    if not name or len(name) > 200 or not name.isprintable():
        raise WebError("a token name is 1 to 200 printable characters")
    token_id, text = new_secret()
    try:
        row = await db.fetchrow(
            "INSERT INTO fieldline.api_tokens (id, name, tenant_id, role, token_hash) "
            "VALUES ($1, $2, $3, $4, $5) RETURNING created_at",
            token_id, name, tenant, role.value, token_hash(text),
        )  # fmt: skip
    except asyncpg.UndefinedTableError as exc:
        raise WebError(_NO_TABLE) from exc
    return Token(token_id, name, tenant, role, row["created_at"]), text


async def verify(db: Db, token: str) -> Token | None:
    """The token's record if it is well formed, known, matches and is not revoked."""
    token_id = parse(token)
    if token_id is None:
        return None
    try:
        row = await db.fetchrow(
            "SELECT id, name, tenant_id, role, token_hash, created_at, revoked_at "
            "FROM fieldline.api_tokens WHERE id = $1",
            token_id,
        )
    except asyncpg.UndefinedTableError as exc:
        raise WebError(_NO_TABLE) from exc
    if row is None or row["revoked_at"] is not None:
        return None
    if not hmac.compare_digest(bytes(row["token_hash"]), token_hash(token)):
        return None
    return _record(row)


def _record(row: asyncpg.Record) -> Token:
    return Token(row["id"], row["name"], row["tenant_id"], TokenRole(row["role"]),
                 row["created_at"], row["revoked_at"])  # fmt: skip


async def list_tokens(db: Db) -> list[Token]:
    """Every token, revoked ones included, oldest first."""
    try:
        rows = await db.fetch(
            "SELECT id, name, tenant_id, role, created_at, revoked_at "
            "FROM fieldline.api_tokens ORDER BY created_at, id"
        )
    except asyncpg.UndefinedTableError as exc:
        raise WebError(_NO_TABLE) from exc
    return [_record(r) for r in rows]


async def revoke(db: Db, token_id: str) -> Token:
    """Revoke a token by id (its next request is a 401); WebError if there is no such id."""
    if token_id.startswith("flt_"):  # the whole token pasted: its id is in it
        token_id = parse(token_id) or token_id
    try:
        row = await db.fetchrow(
            "UPDATE fieldline.api_tokens SET revoked_at = coalesce(revoked_at, now()) "
            "WHERE id = $1 RETURNING id, name, tenant_id, role, created_at, revoked_at",
            token_id,
        )
    except asyncpg.UndefinedTableError as exc:
        raise WebError(_NO_TABLE) from exc
    if row is None:
        raise WebError(f"no token {token_id!r}: `fieldline web token list` shows the ids")
    return _record(row)


async def is_active(db: Db, token_id: str) -> bool:
    """Whether the token of this id exists and is not revoked (long streams re-check it)."""
    active = await db.fetchval(
        "SELECT revoked_at IS NULL FROM fieldline.api_tokens WHERE id = $1", token_id
    )
    return bool(active)
