"""Events of devices, and alerts: the events of severity warning and above."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fleet.db import Db, check_id, schema, tenant_tables

ALERT_SEVERITIES = ("warning", "error", "critical")


async def events(
    db: Db,
    tenant: str,
    since: datetime,
    limit: int,
    *,
    device: str | None = None,
    alerts_only: bool = False,
    max_body_bytes: int | None = None,
) -> list[dict[str, Any]]:
    """Events since `since`, newest first, of one device or all; alerts_only keeps warning,
    error and critical (the edge rules' alerts and the devices' own). A body larger than
    `max_body_bytes` (as JSON text) becomes {"truncated": true, "bytes", "message"}."""
    if device is not None:
        check_id(device, "device id")
    severities = list(ALERT_SEVERITIES) if alerts_only else None
    s = schema(tenant)
    # a device may send events of up to a whole payload each (256 KiB): a page of them must
    # not cost the reader hundreds of MiB, so big bodies are cut in SQL, before they travel
    body = (
        "body" if max_body_bytes is None else
        "CASE WHEN octet_length(body::text) <= $5 THEN body ELSE jsonb_build_object("
        "'truncated', true, 'bytes', octet_length(body::text), "
        "'message', left(body->>'message', 1024)) END AS body"
    )  # fmt: skip
    extra = () if max_body_bytes is None else (max_body_bytes,)
    async with tenant_tables(tenant):
        rows = await db.fetch(
            f"SELECT time, device_id AS device, kind, severity, {body} FROM {s}.events "  # noqa: S608
            "WHERE time >= $1 AND ($2::text IS NULL OR device_id = $2) "
            "AND ($3::text[] IS NULL OR severity = ANY($3::text[])) "
            "ORDER BY time DESC LIMIT $4",
            since, device, severities, limit, *extra,
        )  # fmt: skip
    return [{**dict(r), "body": decode_json(r["body"])} for r in rows]


def truncated(found: list[dict[str, Any]]) -> int:
    """How many of `events`' rows had their body cut."""
    bodies = [e["body"] for e in found]
    return sum(1 for b in bodies if isinstance(b, dict) and b.keys() == _CUT and b["truncated"])


_CUT = {"truncated", "bytes", "message"}


def decode_json(value: Any) -> Any:
    """A jsonb column as asyncpg returns it (text) decoded; None stays None."""
    return json.loads(value) if isinstance(value, str) else value
