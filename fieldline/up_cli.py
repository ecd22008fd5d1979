"""`fieldline up`: run the whole local stack with a live view until Ctrl-C."""

from __future__ import annotations

import asyncio
import signal

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from core.console import cli_console
from core.errors import FieldlineError
from core.logs import configure_service_logging
from core.settings import get_settings
from fieldline.lock import StackLock
from fieldline.stack import WATCHER_ID, LocalStack, StackOptions, View, watch_command

console = cli_console()


def up(
    devices: int = typer.Option(20, "--devices", min=1, help="Simulated devices in the fleet."),
    broker: str = typer.Option(
        "embedded",
        "--broker",
        help="embedded (fieldline's own broker), mosquitto, or nats (a JetStream cluster).",
    ),
    nodes: int | None = typer.Option(
        None,
        "--nodes",
        min=1,
        max=32,
        help="With --broker nats: nats-server nodes on loopback; node K's MQTT port is "
        "broker.port + K - 1 (default: nats.nodes, 3).",
    ),
    tenant: str = typer.Option("demo", "--tenant", help="The tenant the demo's devices use."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between a device's messages."),
    seconds: float | None = typer.Option(None, "--seconds", help="Stop after this long."),
) -> None:
    """Run everything: certificates, PostgreSQL + TimescaleDB, the broker, an ingest worker,
    an edge agent (machine reset), a simulated fleet and the web console (on loopback, port
    web.port), with a live view; Ctrl-C stops it.

    Data stays under FIELDLINE_HOME, so a second `fieldline up` continues where this one
    stopped. Set FIELDLINE_DATABASE_URL to use your own PostgreSQL.
    """
    if broker == "amqtt":  # its name before the broker owned its engine; scripts still say it
        broker = "embedded"
    if broker not in ("embedded", "mosquitto", "nats"):
        raise FieldlineError(f"--broker must be embedded, mosquitto or nats, not {broker!r}")
    if nodes is not None and broker != "nats":
        raise FieldlineError("--nodes is for --broker nats")
    settings = get_settings()
    configure_service_logging(settings, "WARNING" if console.is_terminal else None)
    options = StackOptions(
        tenant=tenant, devices=devices, interval_s=interval, broker=broker,
        nodes=nodes or settings.nats.nodes,
    )  # fmt: skip
    # before anything starts: a second stack must neither start nor stop anything
    with StackLock(settings.home):
        asyncio.run(_run(LocalStack(settings, options), seconds))


def _render(view: View, stack: LocalStack) -> Group:
    head = Table(show_header=False, box=None)
    head.add_row("rows/s (last 10 s)", f"{view.rows_per_s:,.0f}")
    head.add_row("devices online", f"{view.online} / {view.devices}")
    if stack.agent is not None:
        head.add_row("edge outbox", f"{stack.agent.outbox.depth()}")
    latest = Table(title="latest values")
    latest.add_column("device")
    latest.add_column("values")
    for device, values in list(view.latest.items())[:25]:
        latest.add_row(device, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
    alerts = Table(title="recent alerts")
    for column in ("time", "device", "kind"):
        alerts.add_column(column)
    for alert in view.alerts:
        alerts.add_row(*alert)
    commands = Table(title="recent commands")
    for column in ("time", "device", "command", "status"):
        commands.add_column(column)
    for command in view.commands:
        commands.add_row(*command)
    return Group(head, latest, alerts, commands)


async def _run(stack: LocalStack, seconds: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    console.print(
        "starting: certificates, database, broker, worker, edge agent, fleet ...", soft_wrap=True
    )
    try:
        await stack.start()
        # its own identity: with the CLI's, it and `fieldline tail` took each other's session
        console.print(f"[green]up[/green]. Watch the raw traffic (as {WATCHER_ID}) with:",
                      highlight=False, soft_wrap=True)  # fmt: skip
        # a line to paste: never wrapped, never read as markup (a path may hold brackets)
        console.print(watch_command(stack.settings, stack.options.tenant), highlight=False,
                      soft_wrap=True, markup=False)  # fmt: skip
        if stack.web is not None:
            # the URL and the path are lines to paste: never wrapped, never read as markup
            console.print(f"The web console: {stack.web.url} (API docs: {stack.web.url}docs)",
                          highlight=False, soft_wrap=True, markup=False)  # fmt: skip
            console.print(f"Its operator token for {stack.options.tenant} is in "
                          f"{stack.web_token_file} (paste it at the login)",
                          highlight=False, soft_wrap=True, markup=False)  # fmt: skip
        console.print("Ctrl-C stops everything.", highlight=False, soft_wrap=True)
        if seconds is not None:
            loop.call_later(seconds, stop.set)
        if console.is_terminal:
            with Live(_render(stack.view, stack), console=console, auto_refresh=False) as live:
                while not stop.is_set():
                    live.update(_render(await stack.refresh(), stack), refresh=True)
                    await _wait(stop, 2.0)
        else:
            while not stop.is_set():
                view = await stack.refresh()
                console.print(
                    f"rows/s {view.rows_per_s:,.0f}, devices online {view.online}/"
                    f"{view.devices}, alerts {len(view.alerts)}", highlight=False, soft_wrap=True,
                )  # fmt: skip
                await _wait(stop, 10.0)
    finally:
        console.print("stopping ...", soft_wrap=True)
        await stack.stop()
        console.print("stopped.", soft_wrap=True)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return
