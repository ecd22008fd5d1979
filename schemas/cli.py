"""`fieldline schemas ...`: the wire contract's command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from schemas.errors import InvalidIdError, PayloadError
from schemas.export import DEFAULT_DIR, SCHEMA_FILES, check_json_schemas, export_json_schemas
from schemas.messages import Telemetry, decode
from schemas.topics import (
    Kind,
    command,
    device_command_filter,
    device_topics,
    validate_id,
)

app = typer.Typer(
    help="The wire contract: topics, message models and their JSON Schema files.",
    no_args_is_help=True,
)


@app.command("export")
def export_command(
    out: Path = typer.Option(
        DEFAULT_DIR,
        "--out",
        "-o",
        help="Directory to write the *.schema.json files into (created if missing).",
        file_okay=False,
    ),
    check: bool = typer.Option(
        False,
        "--check",
        help="Write nothing; exit 1 listing the files that are missing or out of date "
        "(use it in CI after changing a model).",
    ),
) -> None:
    """Write the JSON Schema file of every message, for device developers.

    One file per message: telemetry, status, command, command-result, event.

    The output is deterministic (sorted keys, 2-space indent): commit it, diff it.
    """
    if check:
        stale = check_json_schemas(out)
        if stale:
            typer.echo(
                f"out of date in {out}: {', '.join(stale)}; run `fieldline schemas export`",
                err=True,
            )
            raise typer.Exit(1)
        typer.echo(f"all {len(SCHEMA_FILES)} schema files in {out} are up to date")
        return
    for path in export_json_schemas(out):
        typer.echo(str(path))


@app.command("topics")
def topics_command(
    tenant: str = typer.Argument(..., help="Tenant id, e.g. 'acme'."),
    device: str = typer.Argument(..., help="Device id, e.g. 'pump-1'."),
) -> None:
    """Print the topics of one device and the filter it subscribes to.

    Ids are 1-64 of a-z 0-9 _ - starting with a letter or digit; anything else is refused.
    """
    try:
        validate_id(tenant, "tenant id")
        validate_id(device, "device id")
    except InvalidIdError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    rows = [
        (kind.value, topic, "publish, QoS 1" + (", retained" if kind is Kind.STATUS else ""))
        for kind, topic in device_topics(tenant, device).items()
    ]
    rows.append(
        (
            Kind.COMMAND.value,
            command(tenant, device, "reset").replace("/reset", "/{name}"),
            "receive, QoS 1",
        )
    )
    width = max(len(topic) for _, topic, _ in rows)
    for kind_name, topic, how in rows:
        typer.echo(f"{kind_name:<10} {topic:<{width}}  {how}")
    typer.echo(f"{'subscribe':<10} {device_command_filter(tenant, device)}")
    typer.echo(f'{"will":<10} {device_topics(tenant, device)[Kind.STATUS]}  {{"state": "offline"}}')


@app.command("validate")
def validate_command(
    kind: Kind = typer.Argument(
        ...,
        help="The topic kind the payload is for: telemetry, status, events, cmd or cmd-res.",
        case_sensitive=False,
    ),
    file: str = typer.Argument(..., help="Payload file (raw bytes as published), or - for stdin."),
) -> None:
    """Validate a payload file as the ingest worker would; print it normalised, or the error.

    Exit status 1 when the payload is refused, with the worker's dead-letter reason code.
    """
    try:
        payload = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        typer.echo(f"error: cannot read {file}: {exc.strerror}", err=True)
        raise typer.Exit(2) from None
    try:
        message = decode(kind, payload)
    except PayloadError as exc:
        typer.echo(f"invalid {kind.value} payload [{exc.reason}]: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"valid {kind.value} payload ({type(message).__name__})")
    typer.echo(json.dumps(message.model_dump(mode="json", exclude_none=True), indent=2))
    if isinstance(message, Telemetry):
        typer.echo("readings (bools are stored as 1/0):")
        for ts, seq, reading in message.iter_readings():
            when = ts.isoformat(timespec="milliseconds").replace("+00:00", "Z") if ts else "-"
            unit = f" {reading.unit}" if reading.unit else ""
            typer.echo(
                f"  {when}  seq={seq if seq is not None else '-'}  "
                f"{reading.name}={reading.value!r}{unit}  [{reading.kind.value}]"
            )
