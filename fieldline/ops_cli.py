"""Everyday commands: `fieldline devices list`, `tail`, `query` and `cmd send`."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
import typer
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import ValidationError
from rich.table import Table

from certs import CertsError, client_context
from core.console import cli_console
from core.errors import FieldlineError
from core.pgcluster import database_url
from core.settings import Settings, get_settings
from fleet.commands import record_command
from fleet.db import on
from fleet.devices import DeviceState, list_devices
from fleet.durations import parse_duration
from fleet.series import query
from schemas import topics
from schemas.limits import MAX_TTL_S
from schemas.messages import Command

console = cli_console()
devices_app = typer.Typer(help="The devices a tenant has: status, last seen, firmware, metrics.")
cmd_app = typer.Typer(help="Commands to devices, recorded in the tenant's `commands` table.")


def _json_default(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


@devices_app.command("list")
def devices_list(
    tenant: str = typer.Argument(..., help="The tenant id."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table."),
) -> None:
    """List a tenant's devices with their status, last seen time, firmware, boot and metrics."""
    rows = asyncio.run(on(database_url(tenant=tenant), lambda c: list_devices(c, tenant)))
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, default=_json_default))
        return
    table = Table(title=f"devices of {tenant}")
    for column in ("device", "status", "last seen", "firmware", "boot", "metrics"):
        table.add_column(column)
    for r in rows:
        last = r["last_seen"].isoformat(timespec="seconds") if r["last_seen"] else "-"
        table.add_row(
            r["id"], r["status"], last, r["fw"] or "-", str(r["boot"] or "-"),
            ", ".join(r["metrics"]),
        )  # fmt: skip
    console.print(table)


def query_command(
    tenant: str = typer.Argument(..., help="The tenant id."),
    device: str = typer.Argument(..., help="The device id."),
    metric: str = typer.Argument(..., help="The metric name, as the device sends it."),
    since: str = typer.Option("1h", "--since", help="How far back: 30s, 15m, 1h, 7d."),
    bucket: str = typer.Option("1m", "--bucket", help="Bucket width (time_bucket): 10s, 1m, 1h."),
    fmt: str = typer.Option("table", "--format", help="table, csv or json."),
) -> None:
    """Average, min, max and count of a numeric metric per time bucket (TimescaleDB time_bucket)."""
    if fmt not in ("table", "csv", "json"):
        raise FieldlineError(f"--format must be table, csv or json, not {fmt!r}")
    since_td, bucket_td = parse_duration(since), parse_duration(bucket)
    buckets = asyncio.run(
        on(
            database_url(tenant=tenant),
            lambda c: query(c, tenant, device, metric, since_td, bucket_td),
        )
    )
    if fmt == "json":
        for b in buckets:
            row = {"start": b.start.isoformat(), "avg": b.avg, "min": b.min, "max": b.max,
                   "count": b.count}  # fmt: skip
            typer.echo(json.dumps(row))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["start", "avg", "min", "max", "count"])
        for b in buckets:
            writer.writerow([b.start.isoformat(), b.avg, b.min, b.max, b.count])
    else:
        table = Table(title=f"{tenant}/{device} {metric}, last {since} per {bucket}")
        for column in ("bucket", "avg", "min", "max", "count"):
            table.add_column(column, justify="right")
        for b in buckets:
            table.add_row(
                b.start.isoformat(timespec="seconds"), f"{b.avg:.4g}", f"{b.min:.4g}",
                f"{b.max:.4g}", str(b.count),
            )  # fmt: skip
        console.print(table)


class _Operator:
    """The CLI's MQTT connection, as the operator certificate `operator` (settings)."""

    def __init__(self, settings: Settings, filters: list[str]) -> None:
        identity = settings.operator
        try:
            context = client_context(settings.pki_dir / "issued" / identity)
        except CertsError as exc:
            raise FieldlineError(
                f"the operator certificate: {exc}; issue it with `fieldline certs issue "
                f"{identity} --tenant T --role operator` or set FIELDLINE_OPERATOR"
            ) from exc
        self.messages: list[tuple[str, bytes]] = []
        self.arrived = threading.Condition()
        self.subscribed = threading.Event()
        # the client id must be the certificate's CN (the embedded broker insists), so two
        # CLI commands of one operator at once take the session from each other
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=identity, protocol=MQTTProtocolVersion.MQTTv311
        )
        self.connack: list[int] = []
        self.connected = threading.Event()
        self.client.on_connect = self._connected
        self.client.tls_set_context(context)
        self.client.on_message = self._message
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        host, port = settings.broker.host, settings.broker.port
        try:
            self.client.connect(host, port, keepalive=30)
        except OSError as exc:
            raise FieldlineError(f"cannot reach the broker at {host}:{port}: {exc}") from exc
        self.client.loop_start()
        if not self.connected.wait(10) or self.connack != [0]:
            self.close()
            raise FieldlineError(
                f"the broker at {host}:{port} refused {identity!r} (CONNACK {self.connack}): is "
                "its certificate an operator's, of this tenant, and not revoked?"
            )
        for topic_filter in filters:
            self.client.subscribe(topic_filter, qos=1)
        if filters and not self.subscribed.wait(10):
            self.close()
            raise FieldlineError(f"the broker at {host}:{port} did not confirm the subscription")

    def _connected(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack.append(int(getattr(reason, "value", reason)))
        self.connected.set()

    def _message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self.arrived:
            self.messages.append((message.topic, bytes(message.payload)))
            self.arrived.notify_all()

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        if not info.is_published():
            raise FieldlineError("the broker did not acknowledge the command within 10 s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client.reinitialise()  # closes loop_start()'s socket pair now (paho-mqtt#627)


@cmd_app.command("send")
def cmd_send(
    tenant: str = typer.Argument(..., help="The tenant id."),
    device: str = typer.Argument(..., help="The device id."),
    name: str = typer.Argument(..., help="reset, set-interval, sensor-add, sensor-remove, ..."),
    args: str = typer.Option("{}", "--args", help='The arguments as JSON, e.g. {"interval_s": 5}.'),
    ttl: int = typer.Option(
        60,
        "--ttl",
        min=1,
        max=MAX_TTL_S,
        help="Seconds after which the device answers expired (sent as ttl_s, with ts = now).",
    ),
    wait: bool = typer.Option(False, "--wait", help="Wait for the device's result and print it."),
    timeout: float = typer.Option(30.0, "--timeout", help="How long --wait waits (seconds)."),
) -> None:
    """Send a command to a device as the operator certificate, record it in `commands`, and
    with --wait print the device's answer (exit 1 unless it is ok; 3 on timeout)."""
    settings = get_settings()
    try:
        arguments = json.loads(args)
    except ValueError as exc:
        raise FieldlineError(f"--args is not JSON: {exc}") from exc
    if not isinstance(arguments, dict):
        raise FieldlineError('--args must be a JSON object, e.g. {"interval_s": 5}')
    try:
        # always ts and ttl_s: devices refuse a command that cannot expire
        command = Command.new(name, arguments, ttl_s=ttl)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "command"
        raise FieldlineError(f"{where}: {first['msg']}") from None
    dsn = database_url(settings, tenant)
    # an unknown device is refused here, before anything is recorded or published
    state = asyncio.run(on(dsn, lambda c: record_command(c, tenant, device, command)))
    if not state.online:
        # still sent: its persistent session at the broker keeps the command until it comes
        # back (as Mosquitto and AWS IoT do), and a device that is back within ttl runs it
        typer.echo(f"warning: {offline_line(state, ttl)}", err=True)
    result_topic = topics.command_result(tenant, device)
    operator = _Operator(settings, [result_topic] if wait else [])
    try:
        operator.publish(topics.command(tenant, device, name), command.model_dump_json().encode())
        typer.echo(f"sent {name} {command.id} to {tenant}/{device}")
        if not wait:
            return
        answer = _await_result(operator, str(command.id), timeout)
    finally:
        operator.close()
    if answer is None:
        why = "" if state.online else f" (it was {state.status} when sent)"
        typer.echo(f"no answer from {device} within {timeout:g} s{why}", err=True)
        raise typer.Exit(3)
    typer.echo(json.dumps(answer))
    if answer.get("status") != "ok":
        raise typer.Exit(1)


def offline_line(state: DeviceState, ttl_s: int, now: datetime | None = None) -> str:
    """One line for a command sent to a device that is not online: since when, and what then."""
    if state.last_seen is None:
        since = "never heard from"
    else:
        ago = ((now or datetime.now(UTC)) - state.last_seen).total_seconds()
        since = (
            f"last heard {state.last_seen.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC, {_ago(ago)} ago"
        )
    what = "offline" if state.status == "offline" else f"not known to be online ({state.status})"
    return (
        f"{state.id} is {what} ({since}): the broker queues the command for its session "
        f"and delivers it when it reconnects; after {ttl_s} s (--ttl) the device answers expired"
    )


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _await_result(operator: _Operator, command_id: str, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    seen = 0
    with operator.arrived:
        while True:
            for _topic, payload in operator.messages[seen:]:
                try:
                    body = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(body, dict) and body.get("id") == command_id:
                    return body
            seen = len(operator.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            operator.arrived.wait(left)


def tail_command(
    tenant: str = typer.Argument(..., help="The tenant id."),
    device: str | None = typer.Argument(None, help="One device; all of the tenant's if absent."),
    table: bool = typer.Option(False, "--table", help="A live table instead of JSON lines."),
    count: int | None = typer.Option(None, "--count", min=1, help="Stop after this many."),
    seconds: float | None = typer.Option(None, "--seconds", help="Stop after this long."),
) -> None:
    """Live telemetry of a tenant (or one device) as JSON lines, or as a table of latest values."""
    settings = get_settings()
    topic_filter = (
        topics.telemetry(tenant, device) if device else f"fl/{validate_tenant(tenant)}/+/telemetry"
    )
    operator = _Operator(settings, [topic_filter])
    latest: dict[str, dict[str, Any]] = {}
    shown = 0
    started = time.monotonic()
    try:
        while (count is None or shown < count) and (
            seconds is None or time.monotonic() - started < seconds
        ):
            with operator.arrived:
                if len(operator.messages) <= shown:
                    operator.arrived.wait(0.5)
                fresh = operator.messages[shown:]
            for topic, payload in fresh:
                if count is not None and shown >= count:
                    break
                shown += 1
                dev = topic.split("/")[2]
                try:
                    body = json.loads(payload)
                except ValueError:
                    continue
                if table:
                    latest[dev] = body.get("metrics") or {}
                else:
                    typer.echo(json.dumps({"device": dev, **body}))
            if table and fresh:
                view = Table(title=f"latest telemetry of {tenant}")
                view.add_column("device")
                view.add_column("metrics")
                for dev, metrics in sorted(latest.items()):
                    view.add_row(dev, json.dumps(metrics))
                console.print(view)
    except KeyboardInterrupt:
        pass
    finally:
        operator.close()


def validate_tenant(tenant: str) -> str:
    return topics.validate_id(tenant, "tenant id")
