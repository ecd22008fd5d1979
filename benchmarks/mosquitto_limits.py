"""What idle and unauthenticated connections cost the rendered Mosquitto, and how long they live.

    python -m benchmarks.mosquitto_limits                     # 2,000 / 300 / 50 / 20, 30 s
    python -m benchmarks.mosquitto_limits --seconds 120 --sample 10
    python -m benchmarks.mosquitto_limits --max-connections 1000   # as rendered with that limit
    python -m benchmarks.mosquitto_limits --broker fieldline       # the embedded broker instead
    python -m benchmarks.mosquitto_limits --idle 0 --tls 0 --slow 0 --slow-large 600 \
        --large-bytes 2000000 --memory-limit 1073741824 --seconds 15  # reserving memory_limit

Starts the broker on a free loopback port (Mosquitto with the files `fieldline broker
mosquitto-config` renders, or `fieldline broker run`), then opens, with one device certificate:
  idle       TCP connections that never start TLS,
  tls        TLS connections (device certificate) that never send CONNECT,
  slow       TLS connections dripping a CONNECT one byte every --drip seconds,
  slow-large the same, with a CONNECT that declares --large-bytes (Mosquitto allocates that
             at once, and a packet with more than 1,000 bytes to come refreshes its keepalive).
Every --sample seconds it prints how many of each are still open (the broker closing one is
seen as POLLRDHUP/POLLHUP on its socket), whether a fresh device still gets a CONNACK, and the
broker's RSS and open files (and, for Mosquitto, its heap, which memory_limit caps).
Counts are capped (--idle <= 15,000 in all) and so is the time (--seconds <= 600); every
socket is closed and the broker stopped at the end. Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import select
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from benchmarks.broker import RunningBroker, wait_ready
from benchmarks.mqttload import client_context, connect_packet
from broker import wire
from broker.mosquitto import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MEMORY_LIMIT,
    MosquittoOptions,
    write_mosquitto_files,
)
from certs import Pki, Role
from core.pgcluster import free_port

REPO = Path(__file__).resolve().parents[1]
HOME = REPO / ".fieldline" / "bench" / "limits"
KINDS = ("idle", "tls", "slow", "slow-large")
MAX_SOCKETS = 15_000
MAX_SECONDS = 600
GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR


def prepare_pki(home: Path) -> Pki:
    """A CA, a server certificate, the attacker's device, a probe device and an admin (cached)."""
    pki = Pki(home / "pki")
    if not pki.exists():
        pki.init_ca(name="fieldline limits bench CA")
        pki.issue_server("broker", hosts=["localhost"], ips=["127.0.0.1"])
        pki.issue("attacker", tenant="bench", role=Role.DEVICE)
        pki.issue("probe", tenant="bench", role=Role.DEVICE)
        pki.issue("bench-admin", tenant="platform", role=Role.ADMIN)
    return pki


# -- the broker ------------------------------------------------------------------------------
class Broker(RunningBroker):
    """A running broker (benchmarks.broker's), and how many files it holds open."""

    def open_files(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            return -1


def start_broker(kind: str, pki: Pki, workdir: Path, options: MosquittoOptions) -> Broker:
    """The broker on a free loopback port, ready once a TLS handshake completes."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / f"{kind}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if kind == "fieldline":
        env.update(FIELDLINE_HOME=str(pki.root.parent), FIELDLINE_LOG_LEVEL="WARNING")
        if options.max_connections > 0:
            env["FIELDLINE_BROKER__MAX_CONNECTIONS"] = str(options.max_connections)
        argv = [sys.executable, "-m", "fieldline", "broker", "run", "--port", str(port),
                "--metrics-port", "0"]  # fmt: skip
    else:
        # as root mosquitto would drop to the `mosquitto` account; the files belong to us
        run_as = "root" if os.geteuid() == 0 else None
        options = replace(options, bind="127.0.0.1", port=port, run_as=run_as)
        files = write_mosquitto_files(pki, workdir / "mosquitto", options=options)
        argv = ["mosquitto", "-c", str(files.config)]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, env=env, cwd=workdir)
    broker = Broker(kind, port, proc, log)
    wait_ready(broker, _context(pki, "probe"))
    return broker


def _context(pki: Pki, name: str) -> ssl.SSLContext:
    bundle = pki.bundle(name)
    return client_context(pki.ca_cert_path, bundle.cert, bundle.key)


# -- the connections -------------------------------------------------------------------------
@dataclass
class Conn:
    kind: str
    sock: socket.socket
    drip: bytes = b""  # what is left to send, one byte at a time
    next_drip: float = 0.0
    open: bool = True


@dataclass
class Attack:
    """Every connection opened, and how many the broker refused while they were being opened."""

    conns: list[Conn] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    poller: select.poll = field(default_factory=select.poll)
    by_fd: dict[int, Conn] = field(default_factory=dict)

    def add(self, conn: Conn) -> None:
        self.conns.append(conn)
        self.by_fd[conn.sock.fileno()] = conn
        self.poller.register(conn.sock.fileno(), GONE)

    def reap(self) -> None:
        """Mark what the broker closed: the peer's FIN (POLLRDHUP) or a reset."""
        for fd, _events in self.poller.poll(0):
            conn = self.by_fd.pop(fd)
            conn.open = False
            self.poller.unregister(fd)

    def still_open(self, kind: str) -> int:
        return sum(1 for c in self.conns if c.kind == kind and c.open)

    def opened(self, kind: str) -> int:
        return sum(1 for c in self.conns if c.kind == kind)

    def drip(self, now: float, every: float) -> None:
        for conn in self.conns:
            if conn.open and conn.drip and now >= conn.next_drip:
                try:
                    conn.sock.send(conn.drip[:1])
                except (OSError, ssl.SSLError):
                    continue  # the broker closed it; reap() sees that
                conn.drip = conn.drip[1:]
                conn.next_drip = now + every

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.sock.close()


def open_connections(
    attack: Attack,
    kind: str,
    count: int,
    port: int,
    context: ssl.SSLContext,
    large: int,
    drip: float,
) -> None:
    """Open `count` connections of one kind, one after the other (a refused one is counted)."""
    for _ in range(count):
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            attack.refused[kind] += 1
            continue
        sock: socket.socket = raw
        if kind != "idle":
            try:
                sock = context.wrap_socket(raw, server_hostname="localhost")
            except (OSError, ssl.SSLError):
                raw.close()
                attack.refused[kind] += 1
                continue
        sock.setblocking(False)
        conn = Conn(kind, sock)
        if kind == "slow":
            # all of an honest CONNECT but its last byte
            conn.drip = connect_packet("attacker", 60)[:-1]
        elif kind == "slow-large":
            # the length at once (the broker allocates it), then the body a byte at a time
            with contextlib.suppress(OSError, ssl.SSLError):
                sock.send(b"\x10" + wire.varint(large))
            conn.drip = bytes(MAX_SECONDS)
        attack.add(conn)
        attack.drip(time.monotonic(), drip)


# -- what the broker says --------------------------------------------------------------------
def probe(port: int, context: ssl.SSLContext) -> str:
    """Whether a fresh device gets CONNACK 0 within 5 s: `ok 12ms`, or why not."""
    started = time.monotonic()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(connect_packet("probe", 30))
            connack = b""
            while len(connack) < 4:
                chunk = tls.recv(4 - len(connack))
                if not chunk:
                    return "closed"
                connack += chunk
            with contextlib.suppress(OSError):
                tls.sendall(b"\xe0\x00")
    except (OSError, ssl.SSLError) as exc:
        return f"refused ({type(exc).__name__})"
    if connack[0] != 0x20 or connack[3] != 0:
        return f"CONNACK {connack[3]}"
    return f"ok {1000 * (time.monotonic() - started):.0f}ms"


class HeapWatch:
    """$SYS/broker/heap/current (Mosquitto's tracked heap, what memory_limit caps), as admin."""

    def __init__(self, port: int, pki: Pki) -> None:
        self.value: int | None = None
        admin = pki.bundle("bench-admin")
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="bench-admin",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.client.tls_set(str(pki.ca_cert_path), str(admin.cert), str(admin.key))
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe("$SYS/broker/heap/current")
        self.client.connect("127.0.0.1", port, 60)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        with contextlib.suppress(ValueError):
            self.value = int(message.payload)

    def mib(self) -> str:
        return "-" if self.value is None else f"{self.value / 1024 / 1024:.1f}"

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- the run ---------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> None:
    counts = {"idle": args.idle, "tls": args.tls, "slow": args.slow, "slow-large": args.slow_large}
    total = sum(counts.values())
    if total > MAX_SOCKETS or min(counts.values()) < 0:
        raise SystemExit(f"at most {MAX_SOCKETS:,} connections in all, none negative")
    if not 1 <= args.seconds <= MAX_SECONDS:
        raise SystemExit(f"--seconds must be 1..{MAX_SECONDS}")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and total + 200 > hard:
        raise SystemExit(
            f"{total:,} connections need more open files than this shell allows ({hard})"
        )
    # the broker inherits it: Mosquitto's own ceiling is its LimitNOFILE in production
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pki = prepare_pki(HOME)
    options = MosquittoOptions(max_connections=args.max_connections, memory_limit=args.memory_limit)
    broker = start_broker(args.broker, pki, HOME / "run", options)
    attack = Attack()
    heap: HeapWatch | None = None
    try:
        if broker.kind == "mosquitto":
            heap = HeapWatch(broker.port, pki)
        probe_context = _context(pki, "probe")
        time.sleep(1.0)
        rss_before = broker.rss_mib()
        files = broker.open_files()
        print(
            f"{broker.kind}: before the attack RSS {rss_before:.1f} MiB, {files} open files, "
            f"probe {probe(broker.port, probe_context)}"
        )
        attacker = _context(pki, "attacker")
        started = time.monotonic()
        for kind in KINDS:
            open_connections(
                attack, kind, counts[kind], broker.port, attacker, args.large_bytes, args.drip
            )
        opened_in = time.monotonic() - started
        time.sleep(1.0)
        rss_opened = broker.rss_mib()
        started = time.monotonic()  # the clock runs from the moment all are open
        print(
            f"opened in {opened_in:.1f} s: "
            + ", ".join(f"{k} {attack.opened(k)}/{counts[k]}" for k in KINDS)
            + (f" (refused {sum(attack.refused.values())})" if any(attack.refused.values()) else "")
        )
        print(f"{'t/s':>5} " + " ".join(f"{k:>10}" for k in KINDS)
              + f" {'probe':>18} {'RSS MiB':>8} {'files':>6} {'heap MiB':>8}")  # fmt: skip
        next_sample = started
        end = started + args.seconds
        rss_with = rss_before
        while True:
            now = time.monotonic()
            attack.drip(now, args.drip)
            attack.reap()
            if now >= next_sample or now >= end:
                rss_with = broker.rss_mib()
                row = " ".join(f"{attack.still_open(k):>10}" for k in KINDS)
                print(f"{now - started:>5.0f} {row} {probe(broker.port, probe_context):>18} "
                      f"{rss_with:>8.1f} {broker.open_files():>6} "
                      f"{heap.mib() if heap else '-':>8}", flush=True)  # fmt: skip
                next_sample = now + args.sample
                if now >= end:
                    break
            time.sleep(min(0.5, max(0.0, min(next_sample, end) - time.monotonic())))
        print(
            f"{args.seconds} s after the last was opened, still open: "
            + ", ".join(f"{k} {attack.still_open(k)}/{attack.opened(k)}" for k in KINDS)
        )
        opened = len(attack.conns)
        if opened:
            per = (rss_opened - rss_before) * 1024 / opened
            print(
                f"RSS {rss_before:.1f} MiB before, {rss_opened:.1f} MiB with {opened:,} open: "
                f"{per:.1f} KiB per connection; {rss_with:.1f} MiB at the end"
            )
    finally:
        attack.close()
        if heap is not None:
            heap.stop()
        broker.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=("mosquitto", "fieldline"), default="mosquitto")
    parser.add_argument("--idle", type=int, default=2000, help="TCP connections, no TLS")
    parser.add_argument("--tls", type=int, default=300, help="TLS connections, no CONNECT")
    parser.add_argument("--slow", type=int, default=50, help="CONNECTs dripped a byte at a time")
    parser.add_argument("--slow-large", type=int, default=20, help="large CONNECTs dripped")
    parser.add_argument(
        "--large-bytes", type=int, default=1_000_000, help="a slow-large CONNECT's declared size"
    )
    parser.add_argument("--drip", type=float, default=10.0, help="seconds between dripped bytes")
    parser.add_argument(
        "--seconds", type=int, default=30, help=f"how long to hold them (<= {MAX_SECONDS})"
    )
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between report lines")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="rendered max_connections (-1: none)")  # fmt: skip
    parser.add_argument("--memory-limit", type=int, default=DEFAULT_MEMORY_LIMIT,
                        help="rendered memory_limit in bytes (0: none)")  # fmt: skip
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
