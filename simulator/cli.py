"""`fieldline sim ...`: fit sensor models to real data, run simulated devices and fleets."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from certs import Pki
from certs.errors import CertsError
from core.console import cli_console
from core.logs import configure_service_logging
from core.settings import Settings, get_settings
from device_runtime.intake import ReplayPolicy
from simulator import arma
from simulator.errors import SimulatorError
from simulator.fleet import KINDS, Fleet, FleetConfig, FleetStats, Kind, bundle_dirs, device_ids

app = typer.Typer(
    help="Simulated sensors and devices. `fit` turns a column of real measurements into an "
    "ARMA sensor model (JSON) that simulated devices replay with realistic autocorrelation; "
    "the shipped humidity and temperature models were made this way from the UCI Occupancy "
    "Detection data.",
    no_args_is_help=True,
)
console = cli_console()


@app.command()
def fit(
    csv_path: Path = typer.Argument(
        ..., metavar="CSV", help="A CSV file with a header row.", exists=True, dir_okay=False
    ),
    column: str = typer.Option(..., "--column", "-c", help="The column to model."),
    max_p: int = typer.Option(5, "--max-p", min=0, max=10, help="Largest AR order tried."),
    max_q: int = typer.Option(5, "--max-q", min=0, max=10, help="Largest MA order tried."),
    min_root: float = typer.Option(
        arma.MIN_ROOT,
        "--min-root",
        min=1.0,
        help="Reject fits with an AR root modulus below this (nearly a random walk: it drifts).",
    ),
    stabilise: bool = typer.Option(
        False,
        "--stabilise",
        help="Also try every fit rejected for its roots with its AR part damped to --min-root "
        "and the rest re-estimated.",
    ),
    maxiter: int = typer.Option(500, "--maxiter", min=1, help="Optimiser iterations per fit."),
    resolution: float | None = typer.Option(
        None,
        "--resolution",
        min=0.0,
        help="The sensor's quantisation step; default: estimated from the data's decimals.",
    ),
    name: str | None = typer.Option(None, "--name", help="Model name (e.g. humidity)."),
    unit: str | None = typer.Option(None, "--unit", help="Unit of the values (e.g. %RH)."),
    lo: float | None = typer.Option(None, "--lo", help="Simulated values never go below this."),
    hi: float | None = typer.Option(None, "--hi", help="Simulated values never go above this."),
    citation: str | None = typer.Option(None, "--citation", help="Credit for the data."),
    time_column: str = typer.Option(
        "time", "--time-column", help="ISO 8601 timestamps giving the sampling interval."
    ),
    plot_dir: Path | None = typer.Option(
        None, "--plot", metavar="DIR", help="Write PNG plots (series, ACF/PACF, AIC grid, fit)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", metavar="FILE", help="Write the model JSON here (else print it)."
    ),
) -> None:
    """Fit ARMA(p, q) models to one column and keep the best acceptable one.

    Runs an ADF test and ACF/PACF, fits every p in 0..max-p and q in 0..max-q by maximum
    likelihood, rejects fits that did not converge or whose AR roots are too close to the
    unit circle, and chooses the lowest AIC among the rest. Indoor humidity is nearly a
    random walk over days: every AR fit of it is rejected unless --stabilise is given (the
    shipped humidity model was fitted with --stabilise --lo 0 --hi 100).
    """
    result = arma.fit_csv(
        csv_path,
        column,
        max_p=max_p,
        max_q=max_q,
        min_root=min_root,
        stabilise=stabilise,
        maxiter=maxiter,
        resolution=resolution,
        name=name,
        unit=unit,
        lo=lo,
        hi=hi,
        citation=citation,
        time_column=time_column or None,
    )
    _print_result(result)
    if plot_dir is not None:
        for path in arma.plot(result, plot_dir):
            console.print(f"plot: {path}")
    if out is not None:
        console.print(f"model written: {arma.save_model(result.model, out)}")
    else:
        console.print_json(result.model.model_dump_json())


def _print_result(result: arma.FitResult) -> None:
    model = result.model
    adf = result.adf
    where = f"{model.source.file}, column {model.source.column}" if model.source else "series"
    y = result.series
    console.print(
        f"{where}: {y.size} values, mean {y.mean():.4g}, sd {y.std():.4g}", highlight=False
    )
    verdict = "stationary" if adf.stationary else "a unit root is not rejected (p >= 0.05)"
    console.print(
        f"ADF statistic {adf.statistic:.3f}, p = {adf.p_value:.3f} ({adf.lags} lags): {verdict}; "
        f"PACF last significant lag: {result.pacf_cutoff}"
    )
    table = Table(title="AIC grid", show_lines=False)
    for header in ("model", "AIC", "min AR root", "s", "verdict"):
        table.add_column(header, justify="left" if header in ("model", "verdict") else "right")
    for c in sorted(result.candidates, key=lambda c: (c.p, c.q, c.stabilised is not None)):
        if c is result.chosen:
            verdict = "[bold green]chosen[/]"
        elif c.accepted:
            verdict = "accepted"
        else:
            verdict = f"[red]rejected[/]: {escape(c.reason or '')}"
        table.add_row(
            c.label,
            "-" if c.aic is None else f"{c.aic:.2f}",
            "-" if c.min_root is None else f"{c.min_root:.4f}",
            f"{c.seconds:.1f}",
            verdict,
        )
    console.print(table)
    rejected = result.rejected
    if rejected:
        console.print(
            f"{len(rejected)} rejected: " + "; ".join(f"{c.label} {c.reason}" for c in rejected)
        )
    chosen = Table(title=f"chosen: {result.chosen.label}", show_header=False)
    chosen.add_column("field")
    chosen.add_column("value")
    chosen.add_row("ar", ", ".join(f"{v:.6g}" for v in model.ar) or "-")
    chosen.add_row("ma", ", ".join(f"{v:.6g}" for v in model.ma) or "-")
    chosen.add_row("mean", f"{model.mean:.6g}")
    chosen.add_row("sigma", f"{model.sigma:.6g}")
    chosen.add_row("resolution", f"{model.resolution:g}")
    chosen.add_row("AR root moduli", ", ".join(f"{v:.4f}" for v in model.ar_root_moduli) or "-")
    chosen.add_row("AIC", f"{model.aic:.2f}" if model.aic is not None else "-")
    if model.stabilised:
        s = model.stabilised
        chosen.add_row(
            "stabilised",
            f"AR damped by {s.damping:.5f}^k: smallest root {s.original_min_root:.4f} -> "
            f"{model.ar_root_moduli[0]:.4f}, AIC {s.original_aic:.2f} -> {model.aic:.2f}",
        )
    console.print(chosen)
    hint = result.hint()
    if hint:
        console.print(f"[yellow]note:[/] {escape(hint)}")


# -- devices and fleets -------------------------------------------------------------------------
def _stats_table(stats: FleetStats, title: str) -> Table:
    table = Table(title=title, show_header=False, box=None)
    table.add_row("devices online", f"{stats.online:,} / {stats.devices:,}")
    table.add_row("messages/s requested", f"{stats.requested_rate:,.1f}")
    table.add_row("messages/s achieved", f"{stats.achieved_rate:,.1f}")
    table.add_row("published", f"{stats.published:,}")
    table.add_row("awaiting PUBACK", f"{stats.unacknowledged:,}")
    table.add_row("commands answered", f"{stats.commands:,}")
    table.add_row("model step", f"{stats.tick_ms:.2f} ms")
    if stats.behind:
        table.add_row("[red]cannot keep up[/red]", "[red]achieved < 95% of requested[/red]")
    if stats.last_error:
        table.add_row("[yellow]last error[/yellow]", stats.last_error)
    return table


async def _run_fleet(fleet: Fleet, seconds: float | None, title: str, live: bool) -> FleetStats:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, fleet.request_stop)
    console.print(f"connecting {len(fleet.devices):,} device(s) ...", highlight=False)
    try:
        await fleet.start()
        runner = asyncio.create_task(fleet.run(seconds))
        if live:
            table = _stats_table(fleet.stats, title)
            with Live(table, console=console, auto_refresh=False) as view:
                while not runner.done():
                    await asyncio.wait({runner}, timeout=0.5)
                    view.update(_stats_table(fleet.stats, title), refresh=True)
        else:
            await runner
        stats = runner.result()
    finally:
        await fleet.stop()
    if not live:
        console.print(_stats_table(stats, title))
    if stats.behind:
        console.print(
            f"[red]the fleet could not keep up:[/red] {stats.achieved_rate:,.0f} of "
            f"{stats.requested_rate:,.0f} msg/s; fewer devices, a longer --interval, or "
            "more processes",
            highlight=False,
        )
    return stats


def _target(host: str | None, port: int | None) -> tuple[str, int, Settings]:
    settings = get_settings()
    return host or settings.broker.host, port or settings.broker.port, settings


@app.command()
def device(
    device_id: str = typer.Option(..., "--id", help="The device id (its certificate's CN)."),
    tenant: str = typer.Option(..., "--tenant", help="The tenant the device belongs to."),
    kind: str = typer.Option(
        "arma", "--kind", help="arma (temperature + humidity), pico (thermistor) or machine."
    ),
    interval: float = typer.Option(5.0, "--interval", help="Seconds between messages."),
    sensors: int = typer.Option(2, "--sensors", min=1, help="ARMA sensors (kind arma)."),
    certs: Path | None = typer.Option(
        None, "--certs", help="A directory with <id>/{ca,cert,key}.pem (default: the local CA)."
    ),
    host: str | None = typer.Option(None, "--host", help="Broker (default: broker.host)."),
    port: int | None = typer.Option(None, "--port", help="Broker port (default: broker.port)."),
    seconds: float | None = typer.Option(None, "--seconds", help="Stop after this long."),
    seed: int | None = typer.Option(None, "--seed", help="Seed the models (reproducible runs)."),
) -> None:
    """Run one simulated device (arma, pico or machine) with its own certificate.

    It publishes a retained birth and registers a Will, both with its boot counter; sends
    telemetry with seq; answers reset, set-interval, sensor-add and sensor-remove; and
    reconnects with backoff. Its certificate must exist (`fieldline certs issue ID
    --tenant T`). Stops on Ctrl-C, publishing its offline status.
    """
    host, port, settings = _target(host, port)
    configure_service_logging(settings)
    config = FleetConfig(
        tenant=tenant, ids=(device_id,), kind=_kind(kind), sensors=sensors,
        interval_s=interval, host=host, port=port, seed=seed,
        replay=ReplayPolicy(**settings.commands.model_dump()),
    )  # fmt: skip
    if certs is not None:
        dirs = {device_id: certs / device_id}
    else:
        pki = Pki(settings.pki_dir)
        try:
            bundle = pki.bundle(device_id)
        except CertsError as exc:
            raise SimulatorError(
                f"{exc}; issue it with `fieldline certs issue {device_id} --tenant {tenant}`"
            ) from exc
        if bundle.identity.tenant != tenant:
            raise SimulatorError(
                f"{device_id!r} belongs to tenant {bundle.identity.tenant!r}, not {tenant!r}"
            )
        dirs = {device_id: bundle.directory}
    fleet = Fleet(config, dirs, settings.home / "sim")
    asyncio.run(_run_fleet(fleet, seconds, f"{tenant}/{device_id} ({kind})", console.is_terminal))


@app.command()
def fleet(
    tenant: str = typer.Option(..., "--tenant", help="The tenant of every device."),
    devices: int = typer.Option(10, "--devices", min=1, help="How many devices."),
    sensors: int = typer.Option(2, "--sensors", min=1, help="ARMA sensors per device."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between a device's messages."),
    kind: str = typer.Option("arma", "--kind", help="arma, pico or machine."),
    prefix: str = typer.Option("sim", "--prefix", help="Device ids are PREFIX-0001, ..."),
    certs: Path | None = typer.Option(
        None, "--certs", help="Read bundles from DIR/<id>/ instead of issuing from the local CA."
    ),
    host: str | None = typer.Option(None, "--host", help="Broker (default: broker.host)."),
    port: int | None = typer.Option(None, "--port", help="Broker port (default: broker.port)."),
    seconds: float | None = typer.Option(None, "--seconds", help="Stop after this long."),
    seed: int | None = typer.Option(None, "--seed", help="Seed the models (reproducible runs)."),
) -> None:
    """Run a fleet of simulated devices in one process, one TLS connection each.

    Together they publish DEVICES/INTERVAL messages per second; a live table shows the rate
    achieved, and the command exits 1 when it could not keep up. Certificates missing from
    the local CA are issued (one registry write); with Mosquitto, re-render its config
    afterwards (`fieldline broker mosquitto-config`) so its ACL names the new devices.
    """
    host, port, settings = _target(host, port)
    configure_service_logging(settings)
    config = FleetConfig(
        tenant=tenant, devices=devices, sensors=sensors, interval_s=interval, kind=_kind(kind),
        prefix=prefix, host=host, port=port, seed=seed,
        replay=ReplayPolicy(**settings.commands.model_dump()),
    )  # fmt: skip
    ids = device_ids(config)
    dirs = bundle_dirs(ids, tenant, pki=Pki(settings.pki_dir), certs_dir=certs)
    fleet_ = Fleet(config, dirs, settings.home / "sim")
    title = f"{tenant}: {devices:,} x {kind}, {sensors} sensor(s), every {interval:g} s"
    stats = asyncio.run(_run_fleet(fleet_, seconds, title, console.is_terminal))
    if stats.behind:
        sys.exit(1)


def _kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise SimulatorError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    return kind
