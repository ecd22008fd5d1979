"""`fieldline edge ...`: run an edge agent from its manifest, or check a manifest."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import typer

from core.console import cli_console
from core.logs import configure_service_logging
from core.settings import get_settings
from device_runtime.intake import ReplayPolicy
from edge_agent.agent import AgentOptions, EdgeAgent
from edge_agent.languard import LanLimits
from edge_agent.manifest import load_manifest

app = typer.Typer(
    help="The edge agent: a gateway that runs modules (simulated sensors and machines), "
    "routes their telemetry to the cloud and to windowed rules, and keeps everything it "
    "sends upstream in a durable outbox until the broker acknowledges it.",
    no_args_is_help=True,
)
console = cli_console()

MANIFEST = typer.Option(..., "--manifest", "-m", help="The agent's TOML manifest.")


@app.command()
def run(
    manifest: Path = MANIFEST,
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", min=0, max=65535, help="Serve Prometheus metrics on this port."
    ),
) -> None:
    """Run the agent until SIGTERM/Ctrl-C, then flush the outbox (up to 10 s) and go offline.

    Its identity is the manifest's agent.id, whose certificate must be issued
    (`fieldline certs issue ID --tenant T --role device`); its outbox and boot counter live
    under FIELDLINE_HOME/edge/ID/.
    """
    settings = get_settings()
    configure_service_logging(settings)
    spec = load_manifest(manifest)
    options = AgentOptions(
        home=settings.home,
        manifest_path=manifest,
        metrics_port=metrics_port,
        commands=ReplayPolicy(**settings.commands.model_dump()),
        lan=LanLimits.from_settings(settings.edge, settings.ingest),
    )
    asyncio.run(_serve(EdgeAgent(spec, options)))


async def _serve(agent: EdgeAgent) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    try:
        await stop.wait()
    finally:
        await agent.stop()


@app.command()
def check(manifest: Path = MANIFEST) -> None:
    """Validate a manifest without running it: modules, rules and routes, with their links.

    Exit 0 and a summary when it is valid; otherwise the error names the key that is wrong.
    """
    spec = load_manifest(manifest)
    console.print(
        f"[green]valid:[/green] agent {spec.agent.tenant}/{spec.agent.id}, "
        f"{len(spec.modules)} module(s), {len(spec.rules)} rule(s), {len(spec.routes)} route(s)",
        highlight=False,
    )
