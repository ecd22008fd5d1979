"""`fieldline ingest ...`: run an ingest worker, or check that one is healthy."""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.error
import urllib.request

import typer
from rich.console import Console

from core.logs import configure_logging
from core.pgcluster import database_url
from core.settings import get_settings
from ingest_worker.database import connect
from ingest_worker.service import (
    IngestWorker,
    serve,
    worker_config,
)

app = typer.Typer(
    help="The ingest worker: MQTT -> validate -> enrich -> batch -> TimescaleDB -> PUBACK. "
    "A message is acknowledged only after its rows are committed, so nothing is lost or "
    "duplicated whatever crashes.",
    no_args_is_help=True,
)
console = Console()


@app.command()
def run(
    client: str | None = typer.Option(
        None, "--client", help="Receive path: lean (asyncio) or paho (default: ingest.client)."
    ),
    share_group: str | None = typer.Option(
        None,
        "--share-group",
        help="Subscribe as $share/GROUP/... so several workers split the load (Mosquitto).",
    ),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", min=0, max=65535, help="Prometheus port, 0 for none."
    ),
) -> None:
    """Consume fl/+/+/{telemetry,status,events,cmd-res} into TimescaleDB until SIGTERM/Ctrl-C.

    Connects as the `service` certificate `ingest.identity` (default ingest-1) with a
    persistent session, so the broker queues while the worker is down. On SIGTERM it commits
    and acknowledges what it holds before it disconnects.
    """
    settings = get_settings()
    configure_logging(settings.log_level)
    overrides = {
        k: v
        for k, v in (
            ("client", client),
            ("share_group", share_group),
            ("metrics_port", metrics_port),
        )
        if v is not None
    }
    ingest = settings.ingest.model_copy(update=overrides)
    config = worker_config(settings.model_copy(update={"ingest": ingest}))
    asyncio.run(serve(IngestWorker(config)))


@app.command()
def check(
    max_age: float = typer.Option(
        120.0, "--max-age", help="Fail when the last commit is older than this (seconds)."
    ),
    url: str | None = typer.Option(
        None, "--url", help="The worker's metrics URL (default: http://ingest.metrics_bind:port)."
    ),
) -> None:
    """Health check for monitors: exit 0 if the worker is up, connected and committing.

    Reads the running worker's metrics endpoint and opens a database connection; prints what
    is wrong and exits 1 otherwise.
    """
    settings = get_settings()
    i = settings.ingest
    problems: list[str] = []
    target = url or f"http://{i.metrics_bind}:{i.metrics_port}/metrics"
    try:
        with urllib.request.urlopen(target, timeout=5) as response:  # noqa: S310 - our endpoint
            text = response.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        problems.append(f"no worker answers at {target} ({exc}); is `fieldline ingest run` up?")
        text = ""
    values = _metrics(text)
    if text:
        if values.get("fieldline_ingest_broker_connected") != 1.0:
            problems.append("the worker is not connected to the broker")
        last = values.get("fieldline_ingest_last_commit_timestamp_seconds", 0.0)
        pending = values.get("fieldline_ingest_acks_pending", 0.0)
        if pending and time.time() - last > max_age:
            problems.append(
                f"{pending:.0f} messages wait and nothing committed for {max_age:.0f} s"
            )

    async def database() -> None:
        conn = await connect(database_url(settings), timeout=5)
        await conn.close()

    try:
        asyncio.run(database())
    except Exception as exc:  # any failure is the answer here
        problems.append(str(exc))
    if problems:
        for problem in problems:
            console.print(f"[red]unhealthy:[/red] {problem}", highlight=False)
        sys.exit(1)
    console.print("[green]healthy[/green]")


def _metrics(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                continue
    return values
