"""The live stream: server-sent events of presence, a device's latest values, commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from fleet import commands, devices, series
from fleet.errors import FleetError
from web import tokens
from web.api import latest_json
from web.auth import ApiError, caller, scope_tenant, state_of
from web.state import WebState
from web.tokens import Token

log = logging.getLogger("fieldline.web")
router = APIRouter(prefix="/api/v1")
# a revoked token's stream ends within this long
_RECHECK_S = 15.0


def frame(event: str, data: Any) -> bytes:
    """One server-sent event."""
    text = json.dumps(data, default=lambda v: v.isoformat() if hasattr(v, "isoformat") else str(v))
    return f"event: {event}\ndata: {text}\n\n".encode()


@router.get(
    "/tenants/{tenant}/stream",
    summary="Server-sent events: devices, values (of `device`), command, ping",
    response_class=StreamingResponse,
)
async def stream(
    request: Request,
    tenant: str,
    device: str | None = Query(None, description="Also stream this device's latest values."),
    token: Token = Depends(caller),
) -> StreamingResponse:
    state = state_of(request)
    db = await state.tenant(scope_tenant(token, tenant))
    if device is not None:
        await devices.device_state(db, tenant, device)  # 404 before the stream starts
    if not state.streams.acquire(token.id):
        state.metrics.refused.labels("too_many_streams").inc()
        raise ApiError(
            429,
            f"this token has {state.settings.web.max_streams_per_token} live streams open "
            "already (web.max_streams_per_token): close one first",
        )
    state.metrics.streams.inc()
    return StreamingResponse(
        _events(state, db, token, tenant, device),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    state: WebState, db: Any, token: Token, tenant: str, device: str | None
) -> AsyncIterator[bytes]:
    web = state.settings.web
    presence: list[tuple[str, str, Any]] | None = None
    values: dict[str, Any] | None = None
    known: dict[str, tuple[str, Any]] | None = None
    last_ping = last_check = time.monotonic()
    try:
        while not state.stopping.is_set():
            try:
                now_presence = [
                    (d.id, d.status, d.last_seen) for d in await devices.presence(db, tenant)
                ]
                if now_presence != presence:
                    presence = now_presence
                    shown = [{"id": i, "status": s, "last_seen": t} for i, s, t in presence]
                    yield frame("devices", {"devices": shown})
                if device is not None:
                    latest = await series.latest_values(db, tenant, [device])
                    now_values = latest_json(latest.get(device, {}))
                    if now_values != values:
                        values = now_values
                        yield frame("values", {"device": device, "values": values})
                rows = await commands.list_commands(db, tenant, 50, device=device)
                now_known = {r["id"]: (r["status"], r["updated_at"]) for r in rows}
                if known is not None:
                    for row in reversed(rows):  # oldest change first
                        if known.get(row["id"]) != now_known[row["id"]]:
                            yield frame("command", row)
                known = now_known
            except FleetError:
                pass  # the tenant has no schema yet: nothing to show until it has
            moment = time.monotonic()
            if moment - last_ping >= web.stream_ping_s:
                last_ping = moment
                yield frame("ping", {})
            if moment - last_check >= _RECHECK_S:
                last_check = moment
                if not await tokens.is_active(await state.shared(), token.id):
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.stopping.wait(), web.stream_poll_s)
    finally:
        state.streams.release(token.id)
        state.metrics.streams.dec()
