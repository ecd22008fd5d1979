"""The shared schema's lists: tenants and dead letters."""

from __future__ import annotations

import base64
from typing import Any

from fleet.db import Db

DEAD_LETTER_SHOWN_BYTES = 1024


async def tenants(db: Db) -> list[str]:
    """Every tenant recorded in `fieldline.tenants`, by id."""
    rows = await db.fetch("SELECT id FROM fieldline.tenants ORDER BY id")
    return [r["id"] for r in rows]


async def tenant_exists(db: Db, tenant: str) -> bool:
    """Whether the tenant is recorded (its schema exists)."""
    return bool(await db.fetchval("SELECT EXISTS (SELECT 1 FROM fieldline.tenants WHERE id = $1)",
                                  tenant))  # fmt: skip


async def dead_letters(db: Db, limit: int) -> list[dict[str, Any]]:
    """The newest dead letters, their payloads cut to 1 KiB and base64-encoded."""
    rows = await db.fetch(
        "SELECT time, topic, reason, error, tenant_id AS tenant, device_id AS device, "
        "substring(payload FROM 1 FOR $1) AS payload FROM fieldline.dead_letters "
        "ORDER BY time DESC LIMIT $2",
        DEAD_LETTER_SHOWN_BYTES, limit,
    )  # fmt: skip
    out = []
    for r in rows:
        row = dict(r)
        payload = row.pop("payload")
        row["payload_b64"] = base64.b64encode(payload).decode() if payload is not None else None
        out.append(row)
    return out
