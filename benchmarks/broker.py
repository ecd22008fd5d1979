"""Broker throughput without and with a fleet of subscribed devices; connections and memory.

    python -m benchmarks.broker                       # all three brokers, 10,000 devices
    python -m benchmarks.broker --brokers fieldline --devices 2000 --seconds 3
    python -m benchmarks.broker --brokers fieldline --capacity 19000
    python -m benchmarks.broker --compare --brokers fieldline-memory,fieldline --repeat 4

For each broker (plain amqtt 0.12.1 as shipped, fieldline's embedded broker, Mosquitto with the
config `fieldline broker mosquitto-config` renders) it measures telemetry msg/s at QoS 0 and
QoS 1 from 4 publishing devices to one service subscriber (`fl/+/+/telemetry`), first with no
other clients, then with N connected devices each subscribed to its own `fl/T/D/cmd/#`. The
load is closed-loop: publishers keep at most --window messages between publish and delivery,
so a slow broker is measured at its own pace instead of queueing without bound. Memory is the
broker process's RSS at 1,000 and 5,000 (and N) connections; --capacity keeps connecting
devices to the embedded broker until it refuses or the count is reached.

`fieldline` is the embedded broker as it ships (durable: its store under the benchmark's home),
`fieldline-memory` the same with `broker.durable = false`. The subscriber holds a persistent
session (CleanSession 0, as the ingest worker does), so a durable broker stores every QoS 1
message for it and acknowledges the publisher only once it is committed. `--compare` runs the
named brokers side by side instead: all started at once, measured in alternating order (ABBA)
`--repeat` times each, no fleet, and prints each one's median as a share of the first's.

Certificates for the fleet are issued once into .fieldline/bench/pki and reused.
Publisher, subscriber and fleet run in their own processes, on the same 2 cores as the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import resource
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from asyncio import sslproto
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from benchmarks.mqttload import client_context, open_client
from broker import wire
from broker.mosquitto import MosquittoOptions, write_mosquitto_files
from certs import Pki, Role

TENANT = "bench"
PUBLISHERS = 4
PAYLOAD = b'{"ts":1732269600123,"seq":17,"metrics":{"temperature":21.43,"humidity":45.1}}'
REPO = Path(__file__).resolve().parents[1]


# -- PKI -------------------------------------------------------------------------------------
def device_ids(n: int) -> list[str]:
    return [f"d{i:05d}" for i in range(n)]


def prepare_pki(home: Path, devices: int) -> Pki:
    """A CA, a server certificate, a service, publishers and `devices` fleet devices (cached)."""
    pki = Pki(home / "pki")
    if not pki.exists():
        pki.init_ca(name="fieldline bench CA")
        pki.issue_server("broker", hosts=["localhost"], ips=["127.0.0.1"])
        pki.issue("bench-svc", tenant=TENANT, role=Role.SERVICE)
        pki.issue_many([f"pub-{i}" for i in range(PUBLISHERS)], tenant=TENANT, role=Role.DEVICE)
    have = {r.id for r in pki.records() if r.revoked_at is None}
    missing = [d for d in device_ids(devices) if d not in have]
    for start in range(0, len(missing), 2000):
        chunk = missing[start : start + 2000]
        print(f"  issuing {len(chunk)} device certificates ...", flush=True)
        pki.issue_many(chunk, tenant=TENANT, role=Role.DEVICE, days=3650)
    return pki


def bundle_paths(pki: Pki, client_id: str) -> tuple[str, str, str]:
    directory = pki.root / "issued" / client_id
    return client_id, str(directory / "cert.pem"), str(directory / "key.pem")


# -- brokers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningBroker:
    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_broker(kind: str, pki: Pki, workdir: Path) -> RunningBroker:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / f"{kind}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if kind in ("fieldline", "fieldline-memory"):
        env.update(
            FIELDLINE_HOME=str(pki.root.parent),
            FIELDLINE_LOG_LEVEL="WARNING",
            FIELDLINE_BROKER__MAX_CONNECTIONS="100000",
            FIELDLINE_BROKER__MAX_QUEUED="100000",
            FIELDLINE_BROKER__DURABLE=str(kind == "fieldline").lower(),
            FIELDLINE_BROKER__STORE_PATH=str(workdir / "store.sqlite3"),
        )
        with contextlib.suppress(FileNotFoundError):
            for suffix in ("", "-wal", "-shm"):
                (workdir / f"store.sqlite3{suffix}").unlink()
        argv = [sys.executable, "-m", "fieldline", "broker", "run", "--port", str(port),
                "--metrics-port", "0"]  # fmt: skip
    elif kind == "mosquitto":
        options = MosquittoOptions(
            bind="127.0.0.1",
            port=port,
            run_as="root" if os.geteuid() == 0 else None,
            log_dest=f"file {log.with_suffix('.mosquitto.log')}",
        )
        files = write_mosquitto_files(pki, workdir / "mosquitto", options=options)
        argv = ["mosquitto", "-c", str(files.config)]
    elif kind == "amqtt":
        config = workdir / "amqtt.json"
        server = pki.bundle("broker")
        config.write_text(
            json.dumps(
                {
                    "listeners": {
                        "default": {
                            "type": "tcp",
                            "bind": f"127.0.0.1:{port}",
                            "max_connections": -1,
                            "ssl": True,
                            "cafile": str(pki.ca_cert_path),
                            "certfile": str(server.cert),
                            "keyfile": str(server.key),
                        }
                    },
                    "plugins": {
                        "amqtt.plugins.authentication.AnonymousAuthPlugin": {
                            "allow_anonymous": True,
                        }
                    },
                }
            )
        )
        argv = [sys.executable, "-m", "benchmarks.broker", "--serve-plain", str(config)]
    else:
        raise SystemExit(
            f"unknown broker {kind!r}: fieldline, fieldline-memory, mosquitto or amqtt"
        )
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, env=env, cwd=workdir)
    broker = RunningBroker(kind, port, proc, log)
    context = client_context(pki.ca_cert_path, None, None)
    service = pki.bundle("bench-svc")
    context.load_cert_chain(str(service.cert), str(service.key))
    return wait_ready(broker, context)


def wait_ready(broker: RunningBroker, context: ssl.SSLContext) -> RunningBroker:
    """Once a TLS handshake with `context` completes; exits the benchmark if it never does."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if broker.proc.poll() is not None:
            raise SystemExit(f"{broker.kind} exited: {broker.log.read_text()[-2000:]}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", broker.port), 1) as raw,
        ):
            context.wrap_socket(raw, server_hostname="localhost").close()
            return broker
        time.sleep(0.1)
    broker.stop()
    raise SystemExit(f"{broker.kind} did not start: {broker.log.read_text()[-2000:]}")


def serve_plain(config_file: str) -> None:
    """amqtt 0.12.1 exactly as shipped, for comparison (run in its own process)."""
    from amqtt.broker import Broker

    config = json.loads(Path(config_file).read_text())

    async def run() -> None:
        broker = Broker(config)
        await broker.start()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await broker.shutdown()

    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run())


# -- load processes --------------------------------------------------------------------------
def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def subscriber_main(
    port: int, ca: str, bundle: tuple[str, str, str], qos: int,
    received: Synchronized[int], ready: Any, stop: Any,
) -> None:  # fmt: skip
    """One service client on fl/+/+/telemetry, in a persistent session as the ingest worker
    holds (the last round's leftovers wiped first); publishes its count into `received`."""

    async def run() -> None:
        client_id, cert, key = bundle
        context = client_context(Path(ca), Path(cert), Path(key))
        wipe = await open_client("127.0.0.1", port, context, client_id)
        assert wipe.transport is not None
        wipe.transport.write(b"\xe0\x00")
        wipe.transport.close()
        await asyncio.sleep(0.2)
        proto = await open_client(
            "127.0.0.1", port, context, client_id, subscribe=("fl/+/+/telemetry", qos),
            clean=False,
        )  # fmt: skip
        ready.set()
        while not stop.is_set():
            received.value = proto.received
            await asyncio.sleep(0.002)
        received.value = proto.received
        assert proto.transport is not None
        proto.transport.write(b"\xe0\x00")
        proto.transport.close()

    asyncio.run(run())


def publisher_main(
    port: int, ca: str, bundles: list[tuple[str, str, str]], qos: int, window: int,
    received: Synchronized[int], published: Synchronized[int], stop: Any,
) -> None:  # fmt: skip
    """Devices publishing their telemetry, at most `window` messages ahead of delivery."""

    async def pump(client_id: str, cert: str, key: str) -> None:
        context = client_context(Path(ca), Path(cert), Path(key))
        proto = await open_client("127.0.0.1", port, context, client_id)
        assert proto.transport is not None
        topic = f"fl/{TENANT}/{client_id}/telemetry".encode()
        packet_id, sent, batch_size = 0, 0, 20
        while not stop.is_set() and not proto.closed.done():
            if published.value - received.value > window or (qos and sent - proto.acked > 400):
                await asyncio.sleep(0.0005)
                continue
            batch = bytearray()
            for _ in range(batch_size):
                packet_id = packet_id % 65535 + 1
                batch += wire.publish(topic, PAYLOAD, qos, False, packet_id=packet_id)
            proto.transport.write(bytes(batch))
            sent += batch_size
            published.value += batch_size
            await proto.drain()
        proto.transport.write(b"\xe0\x00")
        proto.transport.close()

    async def run() -> None:
        await asyncio.gather(*(pump(*b) for b in bundles))

    asyncio.run(run())


def fleet_main(port: int, ca: str, devices: list[tuple[str, str, str]], pipe: Connection) -> None:
    """Idle devices, each subscribed to its own cmd/#; grows on ("grow", n), pings, reports."""
    _raise_nofile()
    # as in the broker: asyncio's 256 KiB read buffer per TLS connection would cost GiBs here
    sslproto.SSLProtocol.max_size = 32 * 1024

    async def run() -> None:
        loop = asyncio.get_running_loop()
        protocols: list[Any] = []
        failures: list[str] = []
        gate = asyncio.Semaphore(64)
        contexts: dict[str, ssl.SSLContext] = {}

        async def one(client_id: str, cert: str, key: str) -> None:
            async with gate:
                try:
                    context = client_context(Path(ca), Path(cert), Path(key))
                    contexts[client_id] = context
                    proto = await open_client(
                        "127.0.0.1",
                        port,
                        context,
                        client_id,
                        keepalive=120,
                        subscribe=(f"fl/{TENANT}/{client_id}/cmd/#", 1),
                        timeout=60,
                    )
                    protocols.append(proto)
                except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
                    failures.append(f"{client_id}: {exc!r}"[:200])

        async def ping() -> None:
            # every device pings once per 40 s, at its own moment, as a real fleet does
            while True:
                if not protocols:
                    await asyncio.sleep(1)
                    continue
                gap = 40 / len(protocols)
                for proto in list(protocols):
                    if proto.transport is not None and not proto.transport.is_closing():
                        proto.transport.write(b"\xc0\x00")
                    await asyncio.sleep(gap)

        pinger = loop.create_task(ping())
        while True:
            command = await loop.run_in_executor(None, pipe.recv)
            if command[0] == "grow":
                target, started = command[1], time.monotonic()
                start = len(protocols) + len(failures)
                await asyncio.gather(*(one(*d) for d in devices[start:target]))
                alive = sum(1 for p in protocols if not p.closed.done())
                pipe.send(
                    ("grown", alive, len(failures), failures[-1:], time.monotonic() - started)
                )
            else:
                pinger.cancel()
                for proto in protocols:
                    if proto.transport is not None:
                        proto.transport.close()
                pipe.send(("stopped",))
                return

    asyncio.run(run())


# -- the measurement -------------------------------------------------------------------------
@dataclass
class BrokerResult:
    kind: str
    samples: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # subs -> qos -> runs
    rss_mib: dict[int, float] = field(default_factory=dict)
    connect_s: float = 0.0
    connected: int = 0
    failures: int = 0
    capacity: dict[str, Any] = field(default_factory=dict)


def measure(broker: RunningBroker, pki: Pki, qos: int, seconds: float, window: int) -> float:
    ctx = mp.get_context("spawn")
    received, published = ctx.Value("q", 0), ctx.Value("q", 0)
    ready, stop = ctx.Event(), ctx.Event()
    ca = str(pki.ca_cert_path)
    sub = ctx.Process(
        target=subscriber_main,
        args=(broker.port, ca, bundle_paths(pki, "bench-svc"), qos, received, ready, stop),
    )
    sub.start()
    if not ready.wait(60):
        raise SystemExit("the subscriber could not connect")
    pubs = [bundle_paths(pki, f"pub-{i}") for i in range(PUBLISHERS)]
    pub = ctx.Process(
        target=publisher_main,
        args=(broker.port, ca, pubs, qos, window, received, published, stop),
    )
    pub.start()
    time.sleep(1.5)  # warm-up
    c0, t0 = received.value, time.monotonic()
    time.sleep(seconds)
    c1, t1 = received.value, time.monotonic()
    stop.set()
    pub.join(30)
    sub.join(30)
    for proc in (pub, sub):
        if proc.is_alive():
            proc.kill()
    time.sleep(1.0)  # let the broker drop the sessions before the next round
    return float(c1 - c0) / (t1 - t0)


class Fleet:
    def __init__(self, broker: RunningBroker, pki: Pki, count: int) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        devices = [bundle_paths(pki, d) for d in device_ids(count)]
        self.proc = ctx.Process(
            target=fleet_main, args=(broker.port, str(pki.ca_cert_path), devices, child)
        )
        self.proc.start()

    def grow(self, target: int) -> tuple[int, int, list[str], float]:
        self.pipe.send(("grow", target))
        _tag, alive, failures, last, took = self.pipe.recv()
        return alive, failures, last, took

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self.pipe.send(("stop",))
            self.pipe.recv()
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


def measure_rates(
    broker: RunningBroker, pki: Pki, args: argparse.Namespace, label: str
) -> dict[int, list[float]]:
    """QoS 0 and QoS 1, alternating, `--repeat` times each (the median is what counts)."""
    samples: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(args.repeat):
        for qos in (0, 1):
            samples[qos].append(measure(broker, pki, qos, args.seconds, args.window))
    for qos, values in samples.items():
        print(
            f"  {label}, QoS {qos}: median {statistics.median(values):,.0f} msg/s "
            f"(runs {', '.join(f'{v:,.0f}' for v in values)})",
            flush=True,
        )
    return samples


def run_broker(kind: str, pki: Pki, args: argparse.Namespace, workdir: Path) -> BrokerResult:
    print(f"\n== {kind} ==", flush=True)
    result = BrokerResult(kind)
    broker = start_broker(kind, pki, workdir / kind)
    fleet: Fleet | None = None
    try:
        result.samples["0"] = measure_rates(broker, pki, args, "no subscriptions")
        fleet = Fleet(broker, pki, max(args.devices, args.capacity if kind == "fieldline" else 0))
        total = 0.0
        for step in sorted({s for s in (1000, 5000, args.devices) if s <= args.devices}):
            alive, failures, last, took = fleet.grow(step)
            total += took
            result.rss_mib[step] = broker.rss_mib()
            result.connected, result.failures = alive, failures
            error = f": {last[0]}" if last else ""
            print(
                f"  {alive:,} devices connected and subscribed ({failures} failed{error}), "
                f"{took:.1f} s; broker RSS {result.rss_mib[step]:,.0f} MiB",
                flush=True,
            )
        result.connect_s = total
        time.sleep(args.settle)  # the connection storm is over before anything is measured
        result.samples[str(args.devices)] = measure_rates(
            broker, pki, args, f"{result.connected:,} subscriptions"
        )
        if kind == "fieldline" and args.capacity > args.devices:
            alive, failures, last, took = fleet.grow(args.capacity)
            result.capacity = {
                "target": args.capacity, "connected": alive, "failed": failures,
                "last_error": last[0] if last else None, "seconds": took,
                "rss_mib": broker.rss_mib(),
                "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
            }  # fmt: skip
            print(
                f"  capacity: {alive:,} concurrent TLS devices ({failures} failed), "
                f"RSS {result.capacity['rss_mib']:,.0f} MiB",
                flush=True,
            )
    finally:
        if fleet is not None:
            fleet.stop()
        broker.stop()
    return result


def print_table(results: list[BrokerResult], devices: int) -> None:
    names = NAMES
    median = statistics.median
    print(f"\n{'broker':24} {'subscriptions':>13} {'QoS 0 msg/s':>12} {'QoS 1 msg/s':>12}")
    for r in results:
        for label, runs in r.samples.items():
            subs = 0 if label == "0" else r.connected
            q0, q1 = median(runs[0]), median(runs[1])
            print(f"{names[r.kind]:24} {subs:>13,} {q0:>12,.0f} {q1:>12,.0f}")
    for r in results:
        name = names[r.kind]
        if str(devices) in r.samples:
            ratios = [
                median(r.samples[str(devices)][q]) / median(r.samples["0"][q]) for q in (0, 1)
            ]
            verdict = "meets" if min(ratios) >= 0.70 else "misses"
            print(
                f"{name}: with {r.connected:,} subscribed devices {ratios[0]:.0%} (QoS 0) and "
                f"{ratios[1]:.0%} (QoS 1) of the throughput without: {verdict} the 70% target"
            )
        mem = ", ".join(f"{n:,} connections {m:,.0f} MiB" for n, m in r.rss_mib.items())
        print(f"{name}: RSS {mem}; connecting took {r.connect_s:.0f} s")
        if r.capacity:
            c = r.capacity
            error = f"; last error {c['last_error']}" if c["last_error"] else ""
            print(
                f"{name}: held {c['connected']:,} concurrent TLS device connections of "
                f"{c['target']:,} tried (RSS {c['rss_mib']:,.0f} MiB; per-process file "
                f"limit {c['fd_limit']:,}{error})"
            )


NAMES = {
    "amqtt": "plain amqtt 0.12.1",
    "fieldline": "fieldline (durable)",
    "fieldline-memory": "fieldline, not durable",
    "mosquitto": "Mosquitto 2 (rendered)",
}


def compare(kinds: list[str], pki: Pki, args: argparse.Namespace) -> None:
    """The brokers side by side: all running, measured in ABBA order, medians compared."""
    brokers = [start_broker(kind, pki, args.home / "run" / kind) for kind in kinds]
    samples: dict[str, dict[int, list[float]]] = {k: {0: [], 1: []} for k in kinds}
    try:
        for round_ in range(args.repeat):
            order = brokers if round_ % 2 == 0 else brokers[::-1]
            for broker in order:
                for qos in (1, 0):
                    rate = measure(broker, pki, qos, args.seconds, args.window)
                    samples[broker.kind][qos].append(rate)
                    print(f"  round {round_ + 1} {broker.kind} QoS {qos}: {rate:,.0f} msg/s")
    finally:
        for broker in brokers:
            broker.stop()
    median = statistics.median
    base = kinds[0]
    print(f"\n{'broker':26} {'QoS 0 msg/s':>12} {'QoS 1 msg/s':>12} {'QoS 1 vs first':>15}")
    for kind in kinds:
        q0, q1 = median(samples[kind][0]), median(samples[kind][1])
        share = q1 / median(samples[base][1])
        print(f"{NAMES[kind]:26} {q0:>12,.0f} {q1:>12,.0f} {share:>15.0%}")
    print(f"(medians of {args.repeat} alternating rounds of {args.seconds:.0f} s each)")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-plain":
        serve_plain(sys.argv[2])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--brokers", default="amqtt,fieldline,mosquitto")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--window", type=int, default=2000, help="messages in flight end to end")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median counts)")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds after connecting")
    parser.add_argument(
        "--capacity", type=int, default=0, help="embedded broker: connect this many"
    )
    parser.add_argument("--home", type=Path, default=REPO / ".fieldline" / "bench")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--compare", action="store_true", help="the brokers side by side (ABBA), no fleet"
    )
    args = parser.parse_args()
    _raise_nofile()
    if args.compare:
        compare(args.brokers.split(","), prepare_pki(args.home, 0), args)
        return
    print(
        f"preparing certificates for {max(args.devices, args.capacity):,} devices in {args.home}",
        flush=True,
    )
    pki = prepare_pki(args.home, max(args.devices, args.capacity))
    results = [run_broker(kind, pki, args, args.home / "run") for kind in args.brokers.split(",")]
    print_table(results, args.devices)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
