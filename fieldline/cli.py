"""The `fieldline` command: one typer app composed of each package's sub-app."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from broker.cli import app as broker_app
from broker.errors import BrokerError
from certs.cli import app as certs_app
from certs.errors import CertsError
from core.errors import FieldlineError
from device_runtime.errors import DeviceError
from edge_agent.cli import app as edge_app
from edge_agent.errors import EdgeError
from fieldline import __version__
from fieldline.capacity_cli import capacity
from fieldline.db_cli import app as db_app
from fieldline.ops_cli import cmd_app, devices_app, query_command, tail_command
from fieldline.up_cli import up
from ingest_worker.cli import app as ingest_app
from ingest_worker.errors import StorageError
from schemas.cli import app as schemas_app
from schemas.errors import SchemaError
from simulator.cli import app as sim_app
from simulator.errors import SimulatorError
from web.cli import app as web_app
from web.errors import WebError

app = typer.Typer(
    name="fieldline",
    help="Industrial telemetry from field devices to TimescaleDB over secure MQTT, "
    "and commands back.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(certs_app, name="certs")
app.add_typer(broker_app, name="broker")
app.add_typer(ingest_app, name="ingest")
app.add_typer(schemas_app, name="schemas")
app.add_typer(db_app, name="db")
app.add_typer(sim_app, name="sim")
app.add_typer(edge_app, name="edge")
app.command("capacity")(capacity)
app.add_typer(devices_app, name="devices")
app.add_typer(cmd_app, name="cmd")
app.command("query")(query_command)
app.command("tail")(tail_command)
app.command("up")(up)
app.add_typer(web_app, name="web")

_KNOWN_ERRORS = (
    FieldlineError,
    CertsError,
    SchemaError,
    StorageError,
    BrokerError,
    SimulatorError,
    DeviceError,
    EdgeError,
    WebError,
)


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        typer.echo(f"fieldline {__version__}")
        raise typer.Exit()


def main() -> None:
    """Entry point: our own errors become one red line and exit code 2, not a traceback."""
    try:
        app()
    except _KNOWN_ERRORS as exc:
        message = escape(str(exc))  # "[build-system]" in a message is text, not markup
        Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        sys.exit(2)
