"""`fieldline capacity`: data volume, network traffic, ingest workers and the chunk interval."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from core.console import cli_console
from fieldline.capacity import (
    DEFAULT_WORKER_MSGS_PER_S,
    DEFAULT_WORKER_ROWS_PER_S,
    HOT_DAYS,
    PACKED_BYTES_PER_SAMPLE,
    SECONDS_PER_MONTH,
    STORED_BYTES_PER_ROW,
    CapacityError,
    CapacityInputs,
    CapacityReport,
    estimate,
    human_bits_per_s,
    human_bytes,
)

_HELP = f"""Estimate data volume, network traffic, ingest workers and the chunk interval.

\b
rows/s     = devices x sensors x rate
messages/s = devices x rate x ceil(sensors / metrics-per-message)
payload/s  = messages/s x bytes
wire up    = messages/s x TLS(MQTT 3.1.1 QoS 1 PUBLISH: 1 + varint
             + 2 + topic fl/<tenant>/<device>/telemetry + 2 + bytes)
wire down  = messages/s x TLS(PUBACK, 4 bytes)
TLS(x)     = x + 29 bytes per record (AES-GCM, TLS 1.2: 5 header
             + 8 nonce + 16 tag) or + 22 (TLS 1.3); no TCP/IP headers
per month  = per second x 30.44 days; total = per month x months
stored     = rows x {STORED_BYTES_PER_ROW} bytes (measured: heap and both
             indexes, uncompressed)
compacted  = rows x {PACKED_BYTES_PER_SAMPLE} bytes (measured on the ARMA and UCI
             data by benchmarks/storage.py) + the last {HOT_DAYS} days as rows
workers    = ceil(1.5 x max(messages/s / worker-msgs-per-s,
                            rows/s / worker-rows-per-s))
chunk      = 0.25 x RAM / stored bytes/s, rounded down to one of
             1, 5, 15, 30 min, 1, 2, 6, 12 h, 1, 7 days
"""


def capacity(
    devices: int = typer.Option(..., "--devices", help="Devices publishing telemetry."),
    sensors: int = typer.Option(..., "--sensors", help="Sensors (metrics) per device."),
    rate: float = typer.Option(..., "--rate", help="Samples per second per sensor (Hz)."),
    payload_bytes: int = typer.Option(..., "--bytes", help="Payload bytes per message (JSON)."),
    months: float = typer.Option(..., "--months", help="Months of data kept (retention)."),
    metrics_per_message: int | None = typer.Option(
        None,
        "--metrics-per-message",
        help="Metrics one message carries (default: all of a device's sensors).",
    ),
    ram_gib: float = typer.Option(24.0, "--ram-gib", help="RAM of the database server, GiB."),
    worker_msgs_per_s: float = typer.Option(
        DEFAULT_WORKER_MSGS_PER_S,
        "--worker-msgs-per-s",
        help="Messages/s one ingest worker sustains (docs/benchmarks.md: ~9,000 on 2 cores).",
    ),
    worker_rows_per_s: float = typer.Option(
        DEFAULT_WORKER_ROWS_PER_S,
        "--worker-rows-per-s",
        help="Rows/s one ingest worker sustains (docs/benchmarks.md: ~92,000 on 2 cores).",
    ),
    tenant_id_length: int = typer.Option(8, "--tenant-id-length", help="Characters."),
    device_id_length: int = typer.Option(12, "--device-id-length", help="Characters."),
    tls_version: str = typer.Option("1.2", "--tls-version", help="1.2 or 1.3 (AES-GCM)."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    try:
        inputs = CapacityInputs(
            devices=devices,
            sensors=sensors,
            rate_hz=rate,
            payload_bytes=payload_bytes,
            months=months,
            metrics_per_message=metrics_per_message,
            ram_gib=ram_gib,
            worker_msgs_per_s=worker_msgs_per_s,
            worker_rows_per_s=worker_rows_per_s,
            tenant_id_length=tenant_id_length,
            device_id_length=device_id_length,
            tls_version=tls_version,  # type: ignore[arg-type]  # validate() checks it
        )
        report = estimate(inputs)
    except CapacityError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps({"inputs": _inputs_dict(inputs), **report.as_dict()}, indent=2))
        return
    console = cli_console()
    console.print(_table(inputs, report))
    console.print(
        f"link: {human_bits_per_s(report.wire_bytes_per_s_up)} up, "
        f"{human_bits_per_s(report.wire_bytes_per_s_down)} down (TCP/IP headers not counted)",
        highlight=False,
    )
    console.print(
        f"ingest workers: [bold]{report.workers}[/bold] (bound by {report.workers_bound_by}, "
        "50% headroom)",
        highlight=False,
    )
    console.print(
        f"chunk interval: [bold]{report.chunk_interval}[/bold] "
        f"({human_bytes(report.chunk_bytes)} per chunk; 25% of {inputs.ram_gib:g} GiB RAM)",
        highlight=False,
    )
    for warning in report.warnings:
        console.print(f"[yellow]note:[/yellow] {warning}", highlight=False)


capacity.__doc__ = _HELP


def _inputs_dict(inputs: CapacityInputs) -> dict[str, object]:
    return {
        "devices": inputs.devices,
        "sensors": inputs.sensors,
        "rate_hz": inputs.rate_hz,
        "payload_bytes": inputs.payload_bytes,
        "months": inputs.months,
        "metrics_per_message": inputs.metrics_per_message or inputs.sensors,
        "ram_gib": inputs.ram_gib,
        "worker_msgs_per_s": inputs.worker_msgs_per_s,
        "worker_rows_per_s": inputs.worker_rows_per_s,
        "tls_version": inputs.tls_version,
    }


def _table(inputs: CapacityInputs, r: CapacityReport) -> Table:
    months = inputs.months
    per_month = SECONDS_PER_MONTH
    table = Table(
        title=f"{inputs.devices:,} devices x {inputs.sensors} sensors at {inputs.rate_hz:g} Hz, "
        f"{inputs.payload_bytes} B/message"
    )
    table.add_column("")
    table.add_column("per second", justify="right")
    table.add_column("per month", justify="right")
    table.add_column(f"{months:g} months", justify="right")

    def volume(label: str, per_s: float) -> None:
        table.add_row(
            label,
            human_bytes(per_s) + "/s",
            human_bytes(per_s * per_month),
            human_bytes(per_s * per_month * months),
        )

    for label, per_s in (("rows", r.rows_per_s), ("messages", r.messages_per_s)):
        table.add_row(
            label,
            f"{per_s:,.0f}" if per_s >= 10 else f"{per_s:,.2f}",
            f"{per_s * per_month:,.0f}",
            f"{per_s * per_month * months:,.0f}",
        )
    volume("payload", r.payload_bytes_per_s)
    volume(f"wire up ({r.publish_wire_bytes} B/msg)", r.wire_bytes_per_s_up)
    volume(f"wire down ({r.puback_wire_bytes} B/ack)", r.wire_bytes_per_s_down)
    table.add_row(
        f"stored ({r.stored_bytes_per_row:g} B/row)",
        human_bytes(r.rows_per_s * r.stored_bytes_per_row) + "/s",
        human_bytes(r.stored_bytes_per_month),
        human_bytes(r.stored_bytes_total),
    )
    table.add_row(
        f"compacted ({r.packed_bytes_per_sample:g} B/sample)",
        human_bytes(r.rows_per_s * r.packed_bytes_per_sample) + "/s",
        human_bytes(r.compacted_bytes_per_month),
        human_bytes(r.compacted_bytes_total),
    )
    return table
