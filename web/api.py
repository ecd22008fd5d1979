"""The JSON API under /api/v1 (docs/web.md has the table)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticSerializationError

from fleet import commands, devices, events, platform, series
from fleet.durations import bucket_seconds, time_range
from schemas import topics
from schemas.limits import MAX_TTL_S
from schemas.messages import Command
from web.auth import ApiError, caller, require, scope_tenant, state_of
from web.publisher import NoCertificateError, PublishError
from web.state import WebState
from web.tokens import Token, TokenRole

router = APIRouter(prefix="/api/v1")

# the commands every device takes (device_runtime) and the simulator's; others may be sent
KNOWN_COMMANDS = ["reset", "set-interval", "sensor-add", "sensor-remove"]


def _version() -> str:
    try:
        return metadata.version("fieldline")
    except metadata.PackageNotFoundError:
        return "unknown"


def bounded(state: WebState, value: int, name: str, low: int, high: int, setting: str) -> int:
    """`value` if low <= value <= high, else ApiError 400 naming the bound (and counting it)."""
    if value < low or value > high:
        if value > high:
            state.metrics.refused.labels(f"{name}_limit").inc()
        raise ApiError(400, f"{name} must be between {low} and {high} ({setting}), not {value}")
    return value


def _since(text: str) -> datetime:
    # a duration back from now or an ISO time, before now
    return time_range(text, None)[0]


def latest_json(values: dict[str, series.Latest]) -> dict[str, Any]:
    """{metric: {"time", "value"}} of series.latest_values."""
    return {name: {"time": v.time, "value": v.value} for name, v in values.items()}


def device_json(row: dict[str, Any], latest: dict[str, series.Latest]) -> dict[str, Any]:
    """A device as the API shows it."""
    return {
        "id": row["id"], "status": row["status"], "last_seen": row["last_seen"],
        "first_seen": row["first_seen"], "fw": row["fw"], "boot": row["boot"],
        "metrics": list(row["metrics"]), "latest": latest_json(latest),
        "commands": KNOWN_COMMANDS,
    }  # fmt: skip


@router.get("/health", summary="Liveness and database reachability (no token needed)")
async def health(request: Request) -> dict[str, Any]:
    """`database` is ok or unreachable; the API answers either way."""
    state = state_of(request)
    database = "ok"
    try:
        pool = await state.shared()
        await asyncio.wait_for(pool.fetchval("SELECT 1"), 3)
    except Exception:  # any failure to answer is "unreachable"; details are in /metrics+logs
        database = "unreachable"
    return {"status": "ok", "database": database, "version": _version()}


@router.get("/whoami", summary="The token's id, name, tenant and role")
async def whoami(token: Token = Depends(caller)) -> dict[str, Any]:
    return {"token_id": token.id, "name": token.name, "tenant": token.tenant,
            "role": token.role.value}  # fmt: skip


@router.get("/tenants", summary="The tenants this token sees (admin: all)")
async def tenants(request: Request, token: Token = Depends(caller)) -> dict[str, Any]:
    state = state_of(request)
    if token.role is TokenRole.ADMIN:
        known = set(await platform.tenants(await state.shared()))
        return {"tenants": sorted(known | set(state.settings.tenant_databases))}
    return {"tenants": [token.tenant]}


@router.get("/tenants/{tenant}/devices", summary="The tenant's devices with latest values")
async def list_devices(
    request: Request,
    tenant: str,
    search: str | None = Query(None, max_length=64, description="Part of the device id."),
    token: Token = Depends(caller),
) -> dict[str, Any]:
    state = state_of(request)
    db = await state.tenant(scope_tenant(token, tenant))
    rows = await devices.list_devices(db, tenant, search)
    latest = await series.latest_values(db, tenant, [r["id"] for r in rows])
    return {"devices": [device_json(r, latest.get(r["id"], {})) for r in rows]}


@router.get("/tenants/{tenant}/devices/{device}", summary="One device, with its metrics' info")
async def get_device(
    request: Request, tenant: str, device: str, token: Token = Depends(caller)
) -> dict[str, Any]:
    state = state_of(request)
    db = await state.tenant(scope_tenant(token, tenant))
    row = await devices.get_device(db, tenant, device)
    latest = await series.latest_values(db, tenant, [device])
    infos = await devices.metric_infos(db, tenant, device)
    return {**device_json(row, latest.get(device, {})),
            "metric_info": [i.public() for i in infos]}  # fmt: skip


@router.get("/tenants/{tenant}/devices/{device}/metrics", summary="A device's metrics")
async def get_metrics(
    request: Request, tenant: str, device: str, token: Token = Depends(caller)
) -> dict[str, Any]:
    state = state_of(request)
    db = await state.tenant(scope_tenant(token, tenant))
    return {"metrics": [i.public() for i in await devices.metric_infos(db, tenant, device)]}


@router.get(
    "/tenants/{tenant}/devices/{device}/metrics/{metric}",
    summary="A numeric metric downsampled to at most `points` buckets (min/avg/max/count)",
)
async def get_series(
    request: Request,
    tenant: str,
    device: str,
    metric: str,
    since: str = Query("24h", description="ISO 8601 time or a duration back from now (24h)."),
    until: str | None = Query(None, description="ISO 8601 time or a duration; default now."),
    points: int = Query(500, description="At most this many buckets, 2..web.max_points."),
    token: Token = Depends(caller),
) -> dict[str, Any]:
    state = state_of(request)
    bounded(state, points, "points", 2, state.settings.web.max_points, "web.max_points")
    start, end = time_range(since, until)
    db = await state.tenant(scope_tenant(token, tenant))
    info = await devices.numeric_metric(db, tenant, device, metric)
    step = bucket_seconds(start, end, points)
    rows = await series.buckets(db, tenant, info.id, start, end, timedelta(seconds=step))
    return {
        "tenant": tenant, "device": device, "metric": metric, "unit": info.unit,
        "since": start, "until": end, "bucket_s": step,
        "points": [{"t": b.start, "min": b.min, "avg": b.avg, "max": b.max, "count": b.count}
                   for b in rows],
    }  # fmt: skip


@router.get("/tenants/{tenant}/devices/{device}/events", summary="A device's events")
async def device_events(
    request: Request,
    tenant: str,
    device: str,
    since: str = Query("24h"),
    limit: int = Query(100, description="1..web.max_limit"),
    token: Token = Depends(caller),
) -> dict[str, Any]:
    state = state_of(request)
    bounded(state, limit, "limit", 1, state.settings.web.max_limit, "web.max_limit")
    db = await state.tenant(scope_tenant(token, tenant))
    await devices.device_state(db, tenant, device)
    found = await events.events(db, tenant, _since(since), limit, device=device,
                                max_body_bytes=state.settings.web.max_event_body_bytes)  # fmt: skip
    return {"events": _counted(state, found)}


@router.get("/tenants/{tenant}/alerts", summary="Events of severity warning and above")
async def alerts(
    request: Request,
    tenant: str,
    since: str = Query("24h"),
    limit: int = Query(100, description="1..web.max_limit"),
    token: Token = Depends(caller),
) -> dict[str, Any]:
    state = state_of(request)
    bounded(state, limit, "limit", 1, state.settings.web.max_limit, "web.max_limit")
    db = await state.tenant(scope_tenant(token, tenant))
    found = await events.events(db, tenant, _since(since), limit, alerts_only=True,
                                max_body_bytes=state.settings.web.max_event_body_bytes)  # fmt: skip
    return {"events": _counted(state, found)}


def _counted(state: WebState, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cut = events.truncated(found)
    if cut:
        state.metrics.truncated.labels("event_body").inc(cut)
    return found


@router.get("/tenants/{tenant}/devices/{device}/commands", summary="A device's commands")
async def device_commands(
    request: Request,
    tenant: str,
    device: str,
    limit: int = Query(20, description="1..web.max_limit"),
    token: Token = Depends(caller),
) -> dict[str, Any]:
    state = state_of(request)
    bounded(state, limit, "limit", 1, state.settings.web.max_limit, "web.max_limit")
    db = await state.tenant(scope_tenant(token, tenant))
    await devices.device_state(db, tenant, device)
    return {"commands": await commands.list_commands(db, tenant, limit, device=device)}


class CommandRequest(BaseModel):
    """A command to send: name, arguments and how long the device may still run it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="reset, set-interval, sensor-add, sensor-remove, ...")
    args: dict[str, Any] = Field(default_factory=dict, description='e.g. {"interval_s": 5}')
    ttl_s: int = Field(default=60, ge=1, le=MAX_TTL_S, description="then: expired")


@router.post(
    "/tenants/{tenant}/devices/{device}/commands",
    status_code=202,
    summary="Send a command (operator or admin); its result arrives later (GET or stream)",
)
async def send_command(
    request: Request,
    tenant: str,
    device: str,
    body: CommandRequest,
    token: Token = Depends(caller),
) -> dict[str, Any]:
    state = state_of(request)
    require(state, token, TokenRole.OPERATOR, "sending a command")
    db = await state.tenant(scope_tenant(token, tenant))
    try:
        command = Command.new(body.name, body.args, ttl_s=body.ttl_s)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "command"
        raise ApiError(400, f"{where}: {first['msg']}") from None
    try:
        # a lone surrogate (\ud800) passes JSON parsing but is not text: nothing could store
        # or send it (PostgreSQL's jsonb refuses it): a 400 here, not a 503 from the database
        payload = command.model_dump_json().encode()
    except PydanticSerializationError:
        raise ApiError(400, "args: a string is not valid Unicode (a lone surrogate such as "
                            "\\ud800): send UTF-8 text") from None  # fmt: skip
    try:
        state.publisher.context(tenant)  # before anything is recorded
    except NoCertificateError as exc:
        state.metrics.commands.labels("no_certificate").inc()
        raise ApiError(503, str(exc)) from None
    # an unknown device is a 404 here, before anything is recorded or published
    device_now = await commands.record_command(db, tenant, device, command)
    topic = topics.command(tenant, device, command.name)
    try:
        await state.publisher.publish(tenant, topic, payload)
    except (PublishError, NoCertificateError) as exc:
        state.metrics.commands.labels("broker_failed").inc()
        await commands.mark_unsent(db, tenant, str(command.id), str(exc))
        raise ApiError(503, f"the command was not sent: {exc}") from None
    state.metrics.commands.labels("sent").inc()
    out: dict[str, Any] = await commands.get_command(db, tenant, str(command.id))
    if not device_now.online:
        out["warning"] = (
            f"{device} is {device_now.status}: the broker keeps the command for its session and "
            f"delivers it when it reconnects; after {body.ttl_s} s the device answers expired"
        )
    return out


@router.get("/tenants/{tenant}/commands/{command_id}", summary="One command and its result")
async def get_command(
    request: Request, tenant: str, command_id: str, token: Token = Depends(caller)
) -> dict[str, Any]:
    state = state_of(request)
    db = await state.tenant(scope_tenant(token, tenant))
    return await commands.get_command(db, tenant, command_id)


@router.get("/dead-letters", summary="Messages the ingest workers refused (admin only)")
async def dead_letters(
    request: Request, limit: int = Query(100), token: Token = Depends(caller)
) -> dict[str, Any]:
    state = state_of(request)
    require(state, token, TokenRole.ADMIN, "reading dead letters")
    bounded(state, limit, "limit", 1, state.settings.web.max_limit, "web.max_limit")
    return {"dead_letters": await platform.dead_letters(await state.shared(), limit)}
