"""Soak: the database down for minutes under steady traffic; the worker's memory, then exactly once.

    python -m benchmarks.ingest_outage                       # 300 s down at 2,000 msg/s
    python -m benchmarks.ingest_outage --down 20 --rate 500 --junk-bytes 100000

Mosquitto (the rendered config, as `benchmarks.ingest` runs it), the worker
(`fieldline ingest run`, a subprocess) and PostgreSQL + TimescaleDB run on this machine. A
device publishes --rate msg/s (10 metrics each, every message its own `ts`) while PostgreSQL
is stopped for --down seconds; the worker's RSS, queue and retries are printed every 10 s
(the goal: under 300 MB, whatever the outage's length). With --junk-bytes, every message is
followed by one that is not JSON, that big: dead letters, which pile up in the worker while
the database is down (they did, to 3 GB, before the queue was bounded in bytes). Then
PostgreSQL comes back and every message must be stored exactly once: --rate x --down x 10
distinct numeric rows, no more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks.ingest import (
    METRICS,
    REPO,
    TENANT,
    Stack,
    Worker,
    start_stack,
    start_worker,
    stop_stack,
)

DEVICE = "pub-0"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Publisher(threading.Thread):
    """One device at a steady rate, QoS 1, its PUBACKs read (and counted) by another thread."""

    def __init__(self, stack: Stack, rate: int, seconds: float, first: int, junk: int) -> None:
        super().__init__(daemon=True)
        from tests.mqtt_raw import RawClient

        self.client = RawClient(
            "127.0.0.1", stack.port, stack.pki.ca_cert_path, stack.pki.bundle(DEVICE), timeout=30
        )
        assert self.client.connect(DEVICE)[1] == 0
        self.rate, self.seconds, self.first = rate, seconds, first
        self.junk = b"{" + b"x" * max(0, junk - 1) if junk else b""
        self.sent = 0
        self.acked = 0
        self.base = int(time.time() * 1000) - 3_600_000  # an hour ago: inside any window
        self._reader = threading.Thread(target=self._read_acks, daemon=True)

    def payload(self, i: int) -> bytes:
        metrics: dict[str, Any] = {f"m{k}": (i + k) % 1000 + 0.5 for k in range(METRICS)}
        return json.dumps({"ts": self.base + i, "metrics": metrics}).encode()

    def run(self) -> None:
        from broker import wire

        self._reader.start()
        topic = f"fl/{TENANT}/{DEVICE}/telemetry".encode()
        total = int(self.rate * self.seconds)
        tick = 0.01
        started = time.monotonic()
        i = self.first
        while self.sent < total:
            n = min(max(1, int(self.rate * tick)), total - self.sent)
            data = bytearray()
            for _ in range(n):
                data += wire.publish(topic, self.payload(i), 1, False, packet_id=i % 32767 + 1)
                if self.junk:
                    data += wire.publish(topic, self.junk, 1, False, packet_id=i % 32767 + 32768)
                i += 1
            self.client.send(bytes(data))
            self.sent += n
            time.sleep(max(0.0, started + self.sent / self.rate - time.monotonic()))

    def _read_acks(self) -> None:
        try:
            while True:
                first, _body = self.client.read_packet(60)
                if first >> 4 == 4:
                    self.acked += 1
        except (OSError, ConnectionError):
            return


async def stored(dsn: str) -> tuple[int, int]:
    """(numeric rows, distinct (metric, time) among them)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        table = f"tenant_{TENANT}"  # a constant of the benchmark
        n = await conn.fetchval(f"SELECT count(*) FROM {table}.numeric_values")  # noqa: S608
        distinct = await conn.fetchval(
            f"SELECT count(DISTINCT (metric_id, time)) FROM {table}.numeric_values"  # noqa: S608
        )
        return int(n), int(distinct)
    finally:
        await conn.close()


def report(worker: Worker, started: float, publisher: Publisher, peak: list[float]) -> None:
    rss = rss_mib(worker.proc.pid)
    peak[0] = max(peak[0], rss)
    try:
        m = worker.metrics()
    except OSError:
        m = {}
    print(
        f"  t={time.monotonic() - started:5.0f} s  worker RSS {rss:6.1f} MiB  "
        f"published {publisher.sent:>8,}  held {m.get('fieldline_ingest_queue_depth', 0):>7,.0f} "
        f"msgs / {m.get('fieldline_ingest_queue_bytes', 0) / 1e6:6.1f} MB  "
        f"db retries {m.get('fieldline_ingest_db_retries_total', 0):>5,.0f}",
        flush=True,
    )


def run(stack: Stack, args: argparse.Namespace) -> bool:
    worker = start_worker(stack, "lean")
    peak = [0.0]
    # the tenant exists and the worker has written once before the outage
    warm = Publisher(stack, 1000, 0.2, 0, args.junk_bytes)
    warm.start()
    warm.join()
    deadline = time.monotonic() + 60
    while worker.rows() < warm.sent * METRICS:
        if time.monotonic() > deadline:
            raise SystemExit("the warm-up messages were not written")
        time.sleep(0.1)
    print(f"PostgreSQL down for {args.down:.0f} s at {args.rate:,} msg/s ...", flush=True)
    asyncio.run(stack.pg.stop())
    publisher = Publisher(stack, args.rate, args.down, warm.sent, args.junk_bytes)
    started = time.monotonic()
    publisher.start()
    next_report = started
    while publisher.is_alive():
        if time.monotonic() >= next_report:
            report(worker, started, publisher, peak)
            next_report += 10
        time.sleep(0.2)
    report(worker, started, publisher, peak)
    print("PostgreSQL back; draining ...", flush=True)
    asyncio.run(stack.pg.start())
    back = time.monotonic()
    total = warm.sent + publisher.sent
    expected = total * METRICS
    next_report = back + 10
    while True:
        n, distinct = asyncio.run(stored(stack.dsn))
        if n >= expected:
            break
        if time.monotonic() >= next_report:
            report(worker, started, publisher, peak)
            next_report += 10
        if time.monotonic() - back > args.drain_timeout:
            print(f"FAILED: {n:,} of {expected:,} rows after {args.drain_timeout:.0f} s")
            return False
        time.sleep(0.5)
    drained = time.monotonic() - back
    time.sleep(3)  # anything extra (a duplicate) would have arrived by now
    n, distinct = asyncio.run(stored(stack.dsn))
    report(worker, started, publisher, peak)
    worker.stop()
    ok = n == distinct == expected
    print(
        f"{'OK' if ok else 'FAILED'}: {total:,} messages published (+ as many junk: "
        f"{bool(args.junk_bytes)}; {publisher.acked:,} PUBACKs from the broker), "
        f"{n:,} numeric rows stored of {expected:,} "
        f"expected, {distinct:,} distinct; drained in {drained:.1f} s after PostgreSQL came "
        f"back; worker peak RSS {peak[0]:.0f} MiB (sampled every 10 s and at the end)"
    )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--down", type=float, default=300.0, help="seconds PostgreSQL is down")
    parser.add_argument("--rate", type=int, default=2000, help="messages per second")
    parser.add_argument(
        "--junk-bytes", type=int, default=0, help="follow each message with junk this big"
    )
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--home", type=Path, default=REPO / ".fieldline" / "bench-outage")
    args = parser.parse_args()
    if args.rate * args.down * (2 if args.junk_bytes else 1) > 650_000:
        sys.exit("--rate x --down is more than Mosquitto queues here (700,000 messages)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    args.home.mkdir(parents=True, exist_ok=True)
    stack = start_stack(args.home)
    try:
        ok = run(stack, args)
    finally:
        stop_stack(stack)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
