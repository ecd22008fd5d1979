"""The embedded broker's memory under a flood nobody reads: RSS over time, drops, throttling.

    python -m benchmarks.broker_memory                        # both attacks, limits on and off
    python -m benchmarks.broker_memory --attack stuck --seconds 30 --limits on
    python -m benchmarks.broker_memory --throughput           # benchmarks.broker's QoS 0/1 msg/s

Two attacks, each against `fieldline broker run` with its default byte limits (`on`) and with
them set so large they never bite (`off`, the count limits alone, as before issue 12):

- `stuck`: an operator subscribes to `fl/bench/#` at QoS 1 with a persistent session and then
  never reads its socket;
- `offline`: the ingest worker's persistent `service` session subscribes to
  `fl/+/+/telemetry` and disconnects, so the broker queues for it.

Meanwhile 2 devices publish 2 KB QoS 1 messages as fast as the broker reads them. Every 5 s it
prints the broker's RSS, messages received and dropped (by reason) and publishers paused.
Certificates are issued once into .fieldline/bench-memory/pki.

--throughput measures the cost of the accounting instead: benchmarks.broker's closed-loop
telemetry msg/s (4 publishers, one service subscriber) on two brokers started side by side,
limits on and off, runs alternating, medians printed.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.mqttload import client_context, connect_packet, open_client, subscribe_packet
from broker import wire
from certs import Pki, Role

TENANT = "bench"
PUBLISHERS = 2
REPO = Path(__file__).resolve().parents[1]
HUGE = str(1 << 50)
LIMITS_OFF = {
    "FIELDLINE_BROKER__MAX_QUEUED_BYTES": HUGE,
    "FIELDLINE_BROKER__MAX_INFLIGHT_BYTES": HUGE,
    "FIELDLINE_BROKER__SERVICE_MAX_QUEUED_BYTES": HUGE,
    "FIELDLINE_BROKER__SERVICE_MAX_INFLIGHT_BYTES": HUGE,
    "FIELDLINE_BROKER__MEMORY_BUDGET_BYTES": str(1 << 52),
}


def prepare_pki(home: Path) -> Pki:
    pki = Pki(home / "pki")
    if not pki.exists():
        pki.init_ca(name="fieldline bench CA")
        pki.issue_server("broker", hosts=["localhost"], ips=["127.0.0.1"])
        pki.issue("bench-svc", tenant=TENANT, role=Role.SERVICE)
        pki.issue("bench-ops", tenant=TENANT, role=Role.OPERATOR)
        pki.issue_many([f"pub-{i}" for i in range(PUBLISHERS)], tenant=TENANT, role=Role.DEVICE)
    return pki


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(port: int) -> dict[str, float]:
    """The broker's metrics that tell the story, by sample name (with labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = (
        "fieldline_broker_messages_received",
        "fieldline_broker_dropped_total",
        "fieldline_broker_disconnects_total",
        "fieldline_broker_held_bytes",
        "fieldline_broker_publishers_paused",
        "fieldline_broker_backpressure_pauses_total",
    )
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def start_broker(
    pki: Pki, workdir: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_port(), free_port()
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FIELDLINE_HOME": str(pki.root.parent),
        "FIELDLINE_LOG_LEVEL": "WARNING",
        **env,
    }
    argv = [sys.executable, "-m", "fieldline", "broker", "run", "--port", str(port),
            "--metrics-port", str(metrics_port)]  # fmt: skip
    with (workdir / "broker.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=environment, cwd=workdir)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit((workdir / "broker.log").read_text()[-2000:])
        try:
            scrape(metrics_port)
            return proc, port, metrics_port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the broker did not start")


def raw_client(pki: Pki, port: int, client_id: str) -> ssl.SSLSocket:
    bundle = pki.bundle(client_id)
    context = client_context(pki.ca_cert_path, bundle.cert, bundle.key)
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), 10), server_hostname="localhost"
    )
    return sock


def read_packet(sock: ssl.SSLSocket) -> bytes:
    head = sock.recv(2)
    length, shift, byte = 0, 0, head[1]
    while True:
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        byte = sock.recv(1)[0]
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return head[:1] + body


def subscribe(pki: Pki, port: int, client_id: str, topic_filter: str) -> ssl.SSLSocket:
    """A persistent session subscribed at QoS 1; the socket is returned unread from here on."""
    sock = raw_client(pki, port, client_id)
    sock.sendall(connect_packet(client_id, 600, clean=False))
    assert read_packet(sock)[0] == wire.CONNACK
    sock.sendall(subscribe_packet(1, topic_filter, 1))
    assert read_packet(sock)[0] >> 4 == 9
    return sock


def publisher_main(
    port: int, ca: str, bundles: list[tuple[str, str, str]], size: int, stop: Any
) -> None:
    """Devices publishing `size`-byte QoS 1 messages as fast as the broker reads them."""

    async def pump(client_id: str, cert: str, key: str) -> None:
        context = client_context(Path(ca), Path(cert), Path(key))
        proto = await open_client("127.0.0.1", port, context, client_id, keepalive=600)
        assert proto.transport is not None
        topic = f"fl/{TENANT}/{client_id}/telemetry".encode()
        payload = b'{"metrics":{"blob":"' + b"x" * (size - 23) + b'"}}'
        packet_id = 0
        while not stop.is_set() and not proto.closed.done():
            batch = bytearray()
            for _ in range(16):
                packet_id = packet_id % 65535 + 1
                batch += wire.publish(topic, payload, 1, False, packet_id=packet_id)
            proto.transport.write(bytes(batch))
            await proto.drain()
            await asyncio.sleep(0)
        if not proto.closed.done():
            proto.transport.write(b"\xe0\x00")
            proto.transport.close()

    async def run() -> None:
        await asyncio.gather(*(pump(*b) for b in bundles))

    asyncio.run(run())


def attack(pki: Pki, kind: str, limits: str, args: argparse.Namespace) -> dict[str, float]:
    env = {} if limits == "on" else dict(LIMITS_OFF)
    if args.max_queued:
        env["FIELDLINE_BROKER__MAX_QUEUED"] = env["FIELDLINE_BROKER__SERVICE_MAX_QUEUED"] = str(
            args.max_queued
        )
    proc, port, metrics_port = start_broker(pki, args.home / "run" / f"{kind}-{limits}", env)
    sockets: list[ssl.SSLSocket] = []
    peak = 0.0
    try:
        if kind == "stuck":
            sockets.append(subscribe(pki, port, "bench-ops", f"fl/{TENANT}/#"))
        else:
            subscribe(pki, port, "bench-svc", "fl/+/+/telemetry").close()
        ctx = mp.get_context("spawn")
        stop = ctx.Event()
        bundles = []
        for i in range(PUBLISHERS):
            b = pki.bundle(f"pub-{i}")
            bundles.append((f"pub-{i}", str(b.cert), str(b.key)))
        pub = ctx.Process(
            target=publisher_main, args=(port, str(pki.ca_cert_path), bundles, args.size, stop)
        )
        pub.start()
        start = time.monotonic()
        print(f"\n== {kind}, byte limits {limits} ==", flush=True)
        while (elapsed := time.monotonic() - start) < args.seconds:
            time.sleep(min(5.0, args.seconds - elapsed))
            rss = rss_mib(proc.pid)
            peak = max(peak, rss)
            if rss > args.rss_cap:
                print(f"  RSS {rss:,.0f} MiB is over --rss-cap: stopped", flush=True)
                break
            m = scrape(metrics_port)
            drops = {
                re.sub(r'.*reason="([^"]+)".*', r"\1", k): v
                for k, v in m.items()
                if k.startswith("fieldline_broker_dropped_total{") and v
            }
            cut = sum(
                v
                for k, v in m.items()
                if k.startswith("fieldline_broker_disconnects_total")
                and ("slow-consumer" in k or "memory-budget" in k)
            )
            held = sum(v for k, v in m.items() if k.startswith("fieldline_broker_held_bytes"))
            print(
                f"  {time.monotonic() - start:5.0f} s  RSS {rss:7,.0f} MiB  "
                f"received {m.get('fieldline_broker_messages_received_total', 0):>10,.0f}  "
                f"held {held / 2**20:7,.1f} MiB  "
                f"dropped {drops or '{}'}  cut off {cut:.0f}  "
                f"paused {m.get('fieldline_broker_backpressure_pauses_total', 0):.0f} times",
                flush=True,
            )
        stop.set()
        pub.join(20)
        if pub.is_alive():
            pub.kill()
        # afterwards a fresh client still connects and gets its message
        fresh = subscribe(pki, port, "bench-svc" if kind == "stuck" else "bench-ops", "fl/x/#")
        fresh.close()
        return {"peak_rss_mib": peak}
    finally:
        for sock in sockets:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def throughput(args: argparse.Namespace) -> None:
    """benchmarks.broker's msg/s on two brokers, byte limits on and off, runs alternating."""
    from benchmarks import broker as bench

    home = REPO / ".fieldline" / "bench"
    pki = bench.prepare_pki(home, 0)
    bench_env = {
        "FIELDLINE_BROKER__MAX_CONNECTIONS": "100000",
        "FIELDLINE_BROKER__MAX_QUEUED": "100000",
    }
    brokers = {}
    for limits in ("off", "on"):
        env = {**bench_env, **({} if limits == "on" else LIMITS_OFF)}
        workdir = args.home / "run" / f"throughput-{limits}"
        proc, port, _metrics = start_broker(pki, workdir, env)
        brokers[limits] = bench.RunningBroker("fieldline", port, proc, workdir / "broker.log")
    rates: dict[tuple[str, int], list[float]] = {}
    try:
        for _ in range(args.repeat):
            for qos in (0, 1):
                for limits, broker in brokers.items():
                    rate = bench.measure(broker, pki, qos, args.seconds, 2000)
                    rates.setdefault((limits, qos), []).append(rate)
                    print(f"  limits {limits:3}  QoS {qos}: {rate:,.0f} msg/s", flush=True)
    finally:
        for broker in brokers.values():
            broker.stop()
    print("\nbyte limits   QoS 0 msg/s (median)   QoS 1 msg/s (median)")
    for limits in brokers:
        q0, q1 = (statistics.median(rates[(limits, q)]) for q in (0, 1))
        print(f"{limits:>11}   {q0:>20,.0f}   {q1:>20,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attack", default="stuck,offline", help="stuck, offline or both")
    parser.add_argument("--limits", default="off,on", help="on, off or both")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--size", type=int, default=2048, help="payload bytes")
    parser.add_argument("--home", type=Path, default=REPO / ".fieldline" / "bench-memory")
    parser.add_argument(
        "--max-queued", type=int, default=0, help="count limits for every session (0: defaults)"
    )
    parser.add_argument("--rss-cap", type=float, default=4096, help="MiB: stop a run beyond")
    parser.add_argument("--throughput", action="store_true", help="msg/s, limits on vs off")
    parser.add_argument("--repeat", type=int, default=3, help="--throughput: runs per figure")
    args = parser.parse_args()
    if args.throughput:
        throughput(args)
        return
    pki = prepare_pki(args.home)
    results = {}
    for kind in args.attack.split(","):
        for limits in args.limits.split(","):
            results[(kind, limits)] = attack(pki, kind, limits, args)
    print("\nattack   byte limits   peak RSS")
    for (kind, limits), r in results.items():
        print(f"{kind:8} {limits:>11}   {r['peak_rss_mib']:,.0f} MiB")


if __name__ == "__main__":
    main()
