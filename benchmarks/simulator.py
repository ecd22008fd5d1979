"""Simulator throughput: the vectorised engine's cost per sensor-sample.

    python -m benchmarks.simulator                          # engine: 10k and 1M sensors
    python -m benchmarks.simulator --sensors 10000 --seconds 5 --repeat 5
    python -m benchmarks.simulator --model temperature --disturbed --json engine.json

Engine: N sensors of one shipped model (humidity, ARMA(4,3), by default) in one
`simulator.engine.Engine`, ticked for --seconds; a tick is the whole fleet's next value
(innovations, the ARMA recursion, mean, quantisation, clipping; with --disturbed also noise,
spikes and drift on every sensor). Reported: time per tick and ns per sensor-sample, the
median of --repeat runs (and the best), plus the time to add the N sensors. Single process,
single thread of Python; numpy may use a second core for nothing here (all ufuncs are
elementwise).

Fleet (`--sections fleet`): --fleet-devices devices (1,000) with --fleet-sensors ARMA
sensors each (10), one TLS connection per device, publishing every --fleet-interval seconds
(1) through Mosquitto with the rendered config, all on this machine; a `mosquitto_sub`
operator counts what arrives. Reported: the rate requested and achieved, the share the
subscriber saw, the CPU of the fleet process and of Mosquitto, the model step.

    python -m benchmarks.simulator --sections fleet --fleet-devices 1000 --fleet-seconds 30

Sections run in the order given by --sections; each has its own arguments and returns a
dict of figures that --json writes under the section's name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.broker import free_port
from broker.mosquitto import MosquittoOptions, write_mosquitto_files
from certs import Pki, Role
from simulator.arma import DEFAULT_MODELS, default_model
from simulator.engine import Engine
from simulator.fleet import Fleet, FleetConfig, bundle_dirs, device_ids
from simulator.perturbations import parse_disturbances

REPO = Path(__file__).resolve().parents[1]

# --- engine -------------------------------------------------------------------------------


@dataclass
class EngineFigure:
    sensors: int
    model: str
    order: tuple[int, int]
    disturbed: bool
    add_s: float
    ticks: int
    tick_us_median: float
    tick_us_best: float
    ns_per_sample: float


def engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--sensors", default="10000,1000000", help="comma-separated fleet sizes to time"
    )
    group.add_argument("--model", choices=DEFAULT_MODELS, default="humidity")
    group.add_argument("--seconds", type=float, default=2.0, help="ticking time per run")
    group.add_argument("--repeat", type=int, default=3, help="runs per size (median counts)")
    group.add_argument(
        "--disturbed", action="store_true", help="give every sensor noise, spikes and drift"
    )
    group.add_argument("--seed", type=int, default=1)


def bench_engine(
    sensors: int, model_name: str, seconds: float, repeat: int, disturbed: bool, seed: int
) -> EngineFigure:
    """Time `Engine.step()` for one fleet size."""
    model = default_model(model_name)
    Engine().add(model)  # the one-off import of statsmodels, outside the timing
    engine = Engine(seed, capacity=sensors)
    specs = parse_disturbances(
        [
            {"type": "noise", "sigma": 0.05},
            {"type": "spike", "probability": 0.001, "a": 2.0, "b": 5.0},
            {"type": "drift", "r": 1e-6},
        ]
        if disturbed
        else []
    )
    start = time.perf_counter()
    engine.add_many(model, sensors, disturbances=specs, interval_s=1.0)
    add_s = time.perf_counter() - start
    engine.step()  # first touch of every array outside the timing
    per_tick: list[float] = []
    total_ticks = 0
    for _ in range(repeat):
        ticks = 0
        start = time.perf_counter()
        deadline = start + seconds
        while ticks < 3 or time.perf_counter() < deadline:
            engine.step()
            ticks += 1
        per_tick.append((time.perf_counter() - start) / ticks)
        total_ticks += ticks
    median = statistics.median(per_tick)
    return EngineFigure(
        sensors=sensors,
        model=model_name,
        order=(model.p, model.q),
        disturbed=disturbed,
        add_s=add_s,
        ticks=total_ticks,
        tick_us_median=median * 1e6,
        tick_us_best=min(per_tick) * 1e6,
        ns_per_sample=median / sensors * 1e9,
    )


def engine_section(args: argparse.Namespace) -> dict[str, Any]:
    figures = []
    for size in (int(s) for s in args.sensors.split(",") if s.strip()):
        fig = bench_engine(size, args.model, args.seconds, args.repeat, args.disturbed, args.seed)
        figures.append(fig)
        print(
            f"engine {fig.sensors:>9,} sensors {fig.model} ARMA{fig.order}"
            f"{' disturbed' if fig.disturbed else ''}: "
            f"{fig.tick_us_median:>10,.1f} us/tick (best {fig.tick_us_best:,.1f}), "
            f"{fig.ns_per_sample:5.1f} ns per sensor-sample, "
            f"{fig.ticks} ticks; adding them took {fig.add_s:.2f} s",
            flush=True,
        )
    return {"figures": [asdict(f) for f in figures]}


# -- a fleet through Mosquitto -------------------------------------------------------------------
def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fleet_bench(
    home: Path, devices: int, sensors: int, interval: float, seconds: float
) -> dict[str, float]:
    """Run a fleet against Mosquitto (rendered config) and count what a subscriber receives."""
    pki = Pki(home / "pki")
    if not pki.exists():
        pki.init_ca(name="fieldline simulator bench CA")
        pki.issue_server("broker", hosts=["localhost"], ips=["127.0.0.1"])
        pki.issue("bench-watch", tenant="bench", role=Role.OPERATOR)
    config = FleetConfig(
        tenant="bench", devices=devices, sensors=sensors, interval_s=interval, prefix="fleet",
        host="127.0.0.1", port=free_port(), seed=1,
    )  # fmt: skip
    dirs = bundle_dirs(device_ids(config), "bench", pki=pki, certs_dir=None)
    options = MosquittoOptions(
        bind="127.0.0.1", port=config.port, run_as="root" if os.geteuid() == 0 else None,
        log_dest=f"file {home / 'mosquitto.log'}",
    )  # fmt: skip
    files = write_mosquitto_files(pki, home / "mosquitto", options=options)
    broker = subprocess.Popen(
        ["mosquitto", "-c", str(files.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(0.5)
    watcher = _Watcher(pki, config.port, home / "watched.txt")
    try:
        return asyncio.run(_drive(config, dirs, home, seconds, broker.pid, watcher))
    finally:
        watcher.close()
        broker.terminate()
        broker.wait(10)


class _Watcher:
    """An operator counting the fleet's telemetry: `mosquitto_sub`, a process of its own, so
    its CPU is not the fleet's."""

    def __init__(self, pki: Pki, port: int, out: Path) -> None:
        bundle = pki.bundle("bench-watch")
        self.out = out
        self.proc = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(bundle.ca),
             "--cert", str(bundle.cert), "--key", str(bundle.key), "-i", "bench-watch",
             "-q", "0", "-t", "fl/bench/+/telemetry", "-F", "%t"],
            stdout=out.open("wb"), stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def count(self) -> int:
        return sum(1 for _ in self.out.open("rb"))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def _drive(
    config: FleetConfig, dirs: dict[str, Path], home: Path, seconds: float, broker_pid: int,
    watcher: _Watcher,
) -> dict[str, float]:  # fmt: skip
    fleet = Fleet(config, dirs, home / "state")
    t0 = time.monotonic()
    await fleet.start(timeout=120)
    connect_s = time.monotonic() - t0
    await fleet.run(seconds=2.0)  # warm-up: every device has published, the rate window fills
    published0 = fleet.stats.published
    cpu0, broker0, wall0 = time.process_time(), _cpu_seconds(broker_pid), time.monotonic()
    stats = await fleet.run(seconds=seconds)
    wall = time.monotonic() - wall0
    cpu, broker_cpu = time.process_time() - cpu0, _cpu_seconds(broker_pid) - broker0
    await fleet.stop()
    watcher.close()
    seen, published = watcher.count(), stats.published
    return {
        "devices": config.devices,
        "connect_s": connect_s,
        "requested_msgs_per_s": stats.requested_rate,
        "published_msgs_per_s": (stats.published - published0) / wall,
        "delivered_percent": 100 * seen / published if published else 0.0,
        "fleet_cpu_percent": 100 * cpu / wall,
        "mosquitto_cpu_percent": 100 * broker_cpu / wall,
        "model_step_ms": stats.tick_ms,
    }


def fleet_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fleet")
    group.add_argument("--fleet-devices", type=int, default=1000, help="devices [1000]")
    group.add_argument("--fleet-sensors", type=int, default=10, help="sensors per device [10]")
    group.add_argument("--fleet-interval", type=float, default=1.0, help="s per message [1]")
    group.add_argument("--fleet-seconds", type=float, default=30.0, help="measured run [30]")
    group.add_argument(
        "--fleet-home", type=Path, default=REPO / ".fieldline" / "bench-sim", help="PKI, state"
    )


def fleet_section(args: argparse.Namespace) -> dict[str, Any]:
    """A fleet through Mosquitto with the rendered config: the rate achieved and the CPU used."""
    home, devices, sensors = args.fleet_home, args.fleet_devices, args.fleet_sensors
    interval, seconds = args.fleet_interval, args.fleet_seconds
    home.mkdir(parents=True, exist_ok=True)
    print(f"fleet: {devices:,} devices x {sensors} sensors every {interval:g} s "
          f"through Mosquitto, {seconds:g} s measured ...", flush=True)  # fmt: skip
    r = fleet_bench(home, devices, sensors, interval, seconds)
    print(f"  connected in {r['connect_s']:.1f} s; requested {r['requested_msgs_per_s']:,.0f} "
          f"msg/s, published {r['published_msgs_per_s']:,.0f} msg/s "
          f"({r['delivered_percent']:.1f}% seen by a subscriber)", flush=True)  # fmt: skip
    print(f"  CPU: fleet process {r['fleet_cpu_percent']:.0f}% of one core, Mosquitto "
          f"{r['mosquitto_cpu_percent']:.0f}%; model step {r['model_step_ms']:.2f} ms",
          flush=True)  # fmt: skip
    return r


# --- main ---------------------------------------------------------------------------------

Section = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Any]]
SECTIONS: dict[str, Section] = {
    "engine": (engine_arguments, engine_section),
    "fleet": (fleet_arguments, fleet_section),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"which of {', '.join(SECTIONS)} to run"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    for add_arguments, _ in SECTIONS.values():
        add_arguments(parser)
    args = parser.parse_args()
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    results = {name: SECTIONS[name][1](args) for name in chosen}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
