"""`fieldline ingest ...`: run an ingest worker, or check that one is healthy."""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.error
import urllib.request

import typer

from core.console import cli_console
from core.logs import configure_service_logging
from core.pgcluster import database_url
from core.settings import get_settings
from ingest_worker.database import connect
from ingest_worker.jetstream import NatsSetupError, ensure_ingest_consumer
from ingest_worker.service import (
    IngestError,
    IngestWorker,
    nats_target,
    serve,
    worker_config,
)

app = typer.Typer(
    help="The ingest worker: MQTT -> validate -> enrich -> batch -> TimescaleDB -> PUBACK. "
    "A message is acknowledged only after its rows are committed, so nothing is lost or "
    "duplicated whatever crashes.",
    no_args_is_help=True,
)
console = cli_console()


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
    source: str | None = typer.Option(
        None,
        "--source",
        help="mqtt: subscribe to the broker; nats: pull from the NATS JetStream cluster's "
        "FIELDLINE stream (default: ingest.source).",
    ),
    nats_url: list[str] | None = typer.Option(
        None,
        "--nats-url",
        help="A NATS node's client URL, tls://HOST:PORT; repeat it or give a comma list "
        "(default: ingest.nats_urls, else every node of the `nats` section).",
    ),
) -> None:
    """Consume fl/+/+/{telemetry,status,events,cmd-res} into TimescaleDB until SIGTERM/Ctrl-C.

    Connects as the `service` certificate `ingest.identity` (default ingest-1) with a
    persistent session, so the broker queues while the worker is down. On SIGTERM it commits
    and acknowledges what it holds before it disconnects.

    With --source nats it pulls from the durable consumer `ingest.nats_consumer` that all
    workers share, and acknowledges each message once its rows are committed.
    """
    settings = get_settings()
    configure_service_logging(settings)
    if source is not None and source not in ("mqtt", "nats"):
        console.print(f"[red]--source {source}: use mqtt or nats[/red]", highlight=False)
        raise typer.Exit(2)
    urls = _nats_urls(nats_url)
    overrides = {
        k: v
        for k, v in (
            ("client", client),
            ("share_group", share_group),
            ("metrics_port", metrics_port),
            ("source", source),
            ("nats_urls", urls or None),
        )
        if v is not None
    }
    ingest = settings.ingest.model_copy(update=overrides)
    config = worker_config(settings.model_copy(update={"ingest": ingest}))
    asyncio.run(serve(IngestWorker(config)))


@app.command("nats-ensure")
def nats_ensure(
    nats_url: list[str] | None = typer.Option(
        None,
        "--nats-url",
        help="A NATS node's client URL, tls://HOST:PORT; repeat it or give a comma list "
        "(default: ingest.nats_urls, else every node of the `nats` section).",
    ),
    stream: str | None = typer.Option(
        None, "--stream", help="$MQTT_msgs or FIELDLINE (default: ingest.nats_stream)."
    ),
) -> None:
    """Create (or update) the durable consumer the workers share. Run it before devices publish.

    nats-server stores a QoS 1 MQTT publish in its stream $MQTT_msgs, and PUBACKs it, only
    after that store; but the stream keeps a message only if some consumer wanted it when it
    arrived. So the consumer must exist first. When $MQTT_msgs does not exist yet (no MQTT
    client has ever connected), one MQTT connection with the worker's certificate makes
    nats-server create it. Idempotent; every worker also does this at start.
    """
    settings = get_settings()
    if stream is not None and stream not in ("$MQTT_msgs", "FIELDLINE"):
        console.print(f"[red]--stream {stream}: use $MQTT_msgs or FIELDLINE[/red]", highlight=False)
        raise typer.Exit(2)
    urls = _nats_urls(nats_url)
    overrides = {k: v for k, v in (("nats_urls", urls or None), ("nats_stream", stream)) if v}
    ingest = settings.ingest.model_copy(update=overrides)

    async def go() -> str:
        from core.natsconn import connect

        target = nats_target(settings.model_copy(update={"ingest": ingest}))
        nc = await connect(
            servers=list(target.urls), tls=target.context, name=f"{target.name}-ensure",
            connect_timeout=int(target.connect_timeout), allow_reconnect=False,
        )  # fmt: skip
        try:
            return (await ensure_ingest_consumer(nc, target)).describe(target)
        finally:
            await nc.close()

    try:
        line = asyncio.run(go())
    except (IngestError, NatsSetupError) as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(1) from None
    except Exception as exc:  # nats-py raises many kinds (refused, timeout, TLS, permissions)
        console.print(
            f"[red]the NATS cluster ({', '.join(ingest.nats_urls) or 'the nats section'}): "
            f"{str(exc) or type(exc).__name__}[/red]",
            highlight=False,
        )
        raise typer.Exit(1) from None
    console.print(line, highlight=False)


def _nats_urls(given: list[str] | None) -> list[str]:
    """--nats-url values (repeated or comma lists); a bad one is one line and exit 2."""
    urls = [u.strip() for item in given or [] for u in item.split(",") if u.strip()]
    bad = [u for u in urls if not u.startswith(("tls://", "nats://"))]
    if bad:
        console.print(f"[red]--nats-url {bad[0]}: give tls://HOST:PORT[/red]", highlight=False)
        raise typer.Exit(2)
    return urls


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
