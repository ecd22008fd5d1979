"""Ingest throughput, latency and memory: paho and insert ceilings against the worker end to end.

    python -m benchmarks.ingest                        # ~10 min
    python -m benchmarks.ingest --messages 100000 --live-messages 50000
    python -m benchmarks.ingest --latency-only --latency-runs 5
    python -m benchmarks.ingest --compare-clients --rounds 4   # lean vs paho receive path
    python -m benchmarks.ingest --ceiling --rounds 4  # vs a minimal idempotent worker (~6 min)

Publisher (mosquitto_pub, a C client, 4 devices), Mosquitto with the rendered config,
the worker and PostgreSQL + TimescaleDB all run on this machine. It measures:

(a) a bare paho-mqtt QoS 1 subscriber that only acknowledges: draining a backlog, and live;
(b) the idempotent insert alone (`INSERT ... SELECT FROM unnest ... ON CONFLICT DO NOTHING`,
    the worker's batch size, the worker's number of connections) for the same rows;
(c) `fieldline ingest run` end to end, lean receive path: draining a backlog of
    --messages single messages (10 metrics each) and of --backlog-messages backlog messages
    (100 samples each), and live traffic at full speed;
(d) the same with `--client paho` (paho-mqtt driven on the worker's event loop);
and the publish-to-commit latency at a steady --rate msg/s (--latency-runs runs, each
after a CPU probe: this shared machine's CPU speed varies by half from minute to minute),
and the worker's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from benchmarks.broker import free_port
from broker.mosquitto import MosquittoOptions, write_mosquitto_files
from certs import Pki, Role
from core.pgcluster import EmbeddedPostgres
from ingest_worker.mqtt import MQTT311, open_subscriber
from ingest_worker.service import client_context

REPO = Path(__file__).resolve().parents[1]
TENANT = "bench"
PUBLISHERS = 4
METRICS = 10


# -- set-up ----------------------------------------------------------------------------------
def prepare_pki(home: Path) -> Pki:
    pki = Pki(home / "pki")
    if not pki.exists():
        pki.init_ca(name="fieldline ingest bench CA")
        pki.issue_server("broker", hosts=["localhost"], ips=["127.0.0.1"])
        pki.issue("ingest-1", tenant="platform", role=Role.SERVICE)
        pki.issue("bench-paho", tenant="platform", role=Role.SERVICE)
        pki.issue_many([f"pub-{i}" for i in range(PUBLISHERS)], tenant=TENANT, role=Role.DEVICE)
    if not (pki.root / "issued" / "bench-ref").exists():
        # before Mosquitto's config is rendered: its ACL names every service identity
        pki.issue("bench-ref", tenant="platform", role=Role.SERVICE)
    return pki


@dataclass
class Stack:
    pki: Pki
    home: Path
    port: int
    mosquitto: subprocess.Popen[bytes]
    pg: EmbeddedPostgres
    dsn: str
    scratch: Path
    tag: int = 0
    workers: list[Worker] = field(default_factory=list)

    def next_tag(self) -> int:
        """Each phase publishes rows of its own (its own ts range): nothing collides."""
        self.tag += 1
        return self.tag


def start_stack(home: Path) -> Stack:
    pki = prepare_pki(home)
    port = free_port()
    options = MosquittoOptions(
        bind="127.0.0.1",
        port=port,
        run_as="root" if os.geteuid() == 0 else None,
        max_queued_messages=700_000,
        max_queued_bytes=2 * 1024**3,
        log_dest=f"file {home / 'mosquitto.log'}",
    )
    files = write_mosquitto_files(pki, home / "mosquitto", options=options)
    mosquitto = subprocess.Popen(
        ["mosquitto", "-c", str(files.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    scratch = Path(tempfile.mkdtemp(prefix="fl-bench-pg-"))
    scratch.chmod(0o711)
    # tuned as a production server would be (timescaledb-tune gives 25% of RAM): with the
    # 128 MB default the latency run's ~140 MB of chunk and indexes overflow the buffers
    # after ~15 s and commits slow down 2-3x
    pg = EmbeddedPostgres(scratch / "pg", extra_settings={"shared_buffers": "2GB"})
    asyncio.run(pg.start())
    time.sleep(0.5)
    return Stack(pki, home, port, mosquitto, pg, pg.dsn(), scratch)


def stop_stack(stack: Stack) -> None:
    for worker in stack.workers:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()
    stack.mosquitto.send_signal(signal.SIGTERM)
    stack.mosquitto.wait(30)
    asyncio.run(stack.pg.stop())
    shutil.rmtree(stack.scratch, ignore_errors=True)


# -- publishing ------------------------------------------------------------------------------
# timestamps start 6 days back: the worker refuses samples older than ingest.max_backfill_s
BASE_MS = int(time.time() * 1000) - 6 * 24 * 3600 * 1000


def lines(tag: int, device: int, n: int, samples: int, first: int = 0) -> bytes:
    """n payloads, one per line: single messages of 10 metrics, or backlogs of `samples`."""
    # inside the worker's backfill window (7 days): 5.5 h per tag, 33 min per device
    base = BASE_MS + tag * 20_000_000 + device * 2_000_000
    out = []
    if samples == 1:
        for i in range(first, first + n):
            metrics = ",".join(f'"m{k}":{(i + k) % 1000}.5' for k in range(METRICS))
            out.append(f'{{"ts":{base + i},"seq":{i},"metrics":{{{metrics}}}}}')
    else:
        for i in range(first, first + n):
            start = base + i * samples
            body = ",".join(
                f'{{"ts":{start + s},"metrics":{{"level":{(i + s) % 1000}.25}}}}'
                for s in range(samples)
            )
            out.append(f'{{"samples":[{body}]}}')
    return ("\n".join(out) + "\n").encode()


# libmosquitto queues everything `-l` reads and reuses packet ids past 65,535 unacknowledged
# (eclipse-mosquitto/mosquitto#2431); the broker then drops the connection ("out of memory").
PER_PROCESS = 60_000


# (tag, device, n, samples, first) -> n payloads, one per line
Lines = Callable[[int, int, int, int, int], bytes]


def publish(
    stack: Stack, tag: int, total: int, samples: int = 1, make_lines: Lines = lines
) -> float:
    """mosquitto_pub -l from 4 devices at full speed (payloads from `make_lines`); returns
    seconds taken."""
    per = total // PUBLISHERS
    started = time.monotonic()
    for first in range(0, per, PER_PROCESS):
        _publish_round(stack, tag, first, min(PER_PROCESS, per - first), samples, make_lines)
    return time.monotonic() - started


def _publish_round(
    stack: Stack, tag: int, first: int, n: int, samples: int, make_lines: Lines
) -> None:
    procs = []
    for d in range(PUBLISHERS):
        ident = f"pub-{d}"
        bundle = stack.pki.root / "issued" / ident
        proc = subprocess.Popen(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(stack.port), "-i", ident,
             "--cafile", str(stack.pki.ca_cert_path), "--cert", str(bundle / "cert.pem"),
             "--key", str(bundle / "key.pem"), "-t", f"fl/{TENANT}/{ident}/telemetry",
             "-q", "1", "-M", "1000", "-l"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        procs.append((proc, make_lines(tag, d, n, samples, first)))
    writers = [threading.Thread(target=_feed, args=p) for p in procs]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    for proc, _data in procs:
        proc.wait(600)
        if proc.returncode:
            raise SystemExit(
                f"mosquitto_pub failed: {proc.stderr.read().decode() if proc.stderr else ''}"
            )


def _feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.close()


# -- (a) paho, acknowledging only --------------------------------------------------------------
class PahoCounter:
    """A bare paho-mqtt 2 QoS 1 subscriber on fl/+/+/telemetry that only acknowledges."""

    def __init__(self, stack: Stack) -> None:
        self.count = 0
        bundle = stack.pki.root / "issued" / "bench-paho"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="bench-paho", clean_session=False,
            protocol=MQTTProtocolVersion.MQTTv311,
        )  # fmt: skip
        self.client.tls_set(
            str(stack.pki.ca_cert_path), str(bundle / "cert.pem"), str(bundle / "key.pem")
        )
        self.client.max_inflight_messages_set(1000)
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe("fl/+/+/telemetry", 1)
        self.client.connect("127.0.0.1", stack.port)
        self.client.loop_start()
        self.subscribed.wait(10)

    def _on_message(self, *_args: Any) -> None:
        self.count += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def paho_drain(stack: Stack, expected: int) -> float:
    counter = PahoCounter(stack)
    started = time.monotonic()
    while counter.count < expected:
        time.sleep(0.01)
        if time.monotonic() - started > 600:
            raise SystemExit(f"paho got {counter.count} of {expected}")
    rate = counter.count / (time.monotonic() - started)
    counter.close()
    return rate


def paho_live(stack: Stack, total: int) -> float:
    counter = PahoCounter(stack)
    tag = stack.next_tag()
    thread = threading.Thread(target=publish, args=(stack, tag, total))
    started = time.monotonic()
    thread.start()
    while counter.count < total and time.monotonic() - started < 600:
        time.sleep(0.01)
    rate = counter.count / (time.monotonic() - started)
    thread.join()
    counter.close()
    return rate


def wipe_session(stack: Stack, client_id: str) -> None:
    """Connect once with a clean session: the broker drops what it queued for that client."""

    async def run() -> None:
        context = client_context(stack.pki.root, client_id)
        sub = await open_subscriber(
            "127.0.0.1", stack.port, context, lambda d: None, version=MQTT311
        )
        await sub.handshake(client_id, clean_start=True, keepalive=0)
        await sub.close()

    asyncio.run(run())


# -- (b) the insert alone --------------------------------------------------------------------
async def insert_ceiling(dsn: str, rows: int, batch: int, connections: int) -> float:
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE SCHEMA IF NOT EXISTS rawbench")
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS rawbench.numeric_values (time timestamptz NOT NULL, "
        "metric_id integer NOT NULL, value double precision NOT NULL, received boolean NOT NULL "
        "DEFAULT false, UNIQUE (metric_id, time))"
    )
    await conn.execute(
        "SELECT create_hypertable('rawbench.numeric_values', by_range('time', INTERVAL '1 day'), "
        "if_not_exists => TRUE)"
    )
    await conn.execute("TRUNCATE rawbench.numeric_values")
    await conn.close()
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2023, 11, 14, tzinfo=UTC)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for start in range(0, rows, batch):
        queue.put_nowait(start)

    async def writer() -> None:
        c = await asyncpg.connect(dsn)
        while not queue.empty():
            start = queue.get_nowait()
            n = min(batch, rows - start)
            times = [t0 + timedelta(milliseconds=(start + i) // METRICS) for i in range(n)]
            ids = [(start + i) % METRICS + 1 for i in range(n)]
            values = [float(i) for i in range(n)]
            async with c.transaction():
                await c.execute(
                    "INSERT INTO rawbench.numeric_values (time, metric_id, value, received) "
                    "SELECT * FROM unnest($1::timestamptz[], $2::int[], $3::float8[], $4::bool[]) "
                    "ON CONFLICT DO NOTHING",
                    times, ids, values, [False] * n,
                )  # fmt: skip
        await c.close()

    started = time.monotonic()
    await asyncio.gather(*(writer() for _ in range(connections)))
    return rows / (time.monotonic() - started)


# -- (c)/(d) the worker ----------------------------------------------------------------------
@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    metrics_port: int
    peak_rss_mib: float = 0.0
    _sampler: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            text = r.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def rows(self) -> float:
        return self.metrics().get(
            'fieldline_ingest_rows_written_total{table="numeric_values"}', 0.0
        )

    def sample(self) -> None:
        while not self._stop.is_set():
            try:
                for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_rss_mib = max(self.peak_rss_mib, int(line.split()[1]) / 1024)
            except OSError:
                return
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def start_worker(
    stack: Stack,
    client: str,
    tree: Path = REPO,
    extra: tuple[str, ...] = (),
    until: str = "fieldline_ingest_broker_connected",
    **settings: str,
) -> Worker:
    """`fieldline ingest run` from `tree` (this checkout, or another one to compare with);
    `extra` arguments and FIELDLINE_* `settings` (benchmarks.nats_ingest: --source nats).
    Returns once the metric `until` is above 0: connected, or having received a message."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "FIELDLINE_HOME": str(stack.home),
        "FIELDLINE_DATABASE_URL": stack.dsn,
        "FIELDLINE_BROKER__HOST": "127.0.0.1",
        "FIELDLINE_BROKER__PORT": str(stack.port),
        "FIELDLINE_INGEST__METRICS_PORT": str(port),
        "FIELDLINE_LOG_LEVEL": "WARNING",
        **settings,
    }
    log = (stack.home / f"worker-{client}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fieldline", "ingest", "run", "--client", client, *extra],
        stdout=log, stderr=log, env=env,
    )  # fmt: skip
    worker = Worker(proc, port)
    stack.workers.append(worker)
    deadline = time.monotonic() + 60
    while True:
        try:
            if worker.metrics().get(until, 0.0) > 0:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(
                "the worker did not start; see " + str(stack.home / f"worker-{client}.log")
            )
        time.sleep(0.005 if until != "fieldline_ingest_broker_connected" else 0.05)
    worker._sampler = threading.Thread(target=worker.sample, daemon=True)
    worker._sampler.start()
    return worker


def worker_drain(
    stack: Stack,
    client: str,
    rows: int,
    messages: int,
    tree: Path = REPO,
    *,
    from_connect: bool = False,
    settings: dict[str, str] | None = None,
) -> tuple[float, float, float]:
    """Start a worker on a queued backlog; (msg/s, rows/s, peak RSS MiB) until all committed,
    timed from the process start, or (`from_connect`) from its first message received."""
    started = time.monotonic()
    if from_connect:
        # from the first message received: with a resumed session the backlog flows before
        # the SUBACK, so "connected" comes after up to Receive Maximum messages are in
        worker = start_worker(
            stack, client, tree, (), "fieldline_ingest_messages_received_total", **(settings or {})
        )
        started = time.monotonic()
        profile(stack, worker.proc.pid, "worker")
    else:
        worker = start_worker(stack, client, tree, (), **(settings or {}))
    try:
        # a fresh process: its counter starts at 0, and may already have moved by the time
        # the worker reports itself connected (the backlog arrives with the CONNACK)
        while worker.rows() < rows:
            time.sleep(0.02 if from_connect else 0.05)
            if time.monotonic() - started > 900:
                raise SystemExit(f"the worker wrote {worker.rows():,.0f} of {rows:,} rows")
        took = time.monotonic() - started
    finally:
        worker.stop()
    return messages / took, rows / took, worker.peak_rss_mib


def worker_live(stack: Stack, client: str, messages: int) -> tuple[float, float, float]:
    worker = start_worker(stack, client)
    try:
        rows = messages * METRICS
        tag = stack.next_tag()
        thread = threading.Thread(target=publish, args=(stack, tag, messages))
        started = time.monotonic()
        thread.start()
        while worker.rows() < rows:
            time.sleep(0.05)
            if time.monotonic() - started > 900:
                raise SystemExit(f"the worker wrote {worker.rows():,.0f} of {rows:,} rows")
        took = time.monotonic() - started
        thread.join()
    finally:
        worker.stop()
    return messages / took, rows / took, worker.peak_rss_mib


def steady_latency(
    stack: Stack, rate: int, seconds: float, warmup: float = 3.0
) -> tuple[float, float, float]:
    """Publish at `rate` msg/s with ts = now; the worker's p50/p99 publish-to-commit, and RSS.

    Steady means after `warmup` seconds: the first batches create the metrics and the chunk
    (a one-off of 100-250 ms here), which the histogram snapshot taken then leaves out."""
    worker = start_worker(stack, "lean")
    from broker import wire
    from tests.mqtt_raw import RawClient

    bundle = stack.pki.bundle("pub-0")
    client = RawClient("127.0.0.1", stack.port, stack.pki.ca_cert_path, bundle, timeout=30)
    client.connect("pub-0")
    reader = threading.Thread(target=_drain_acks, args=(client,), daemon=True)
    reader.start()
    topic = f"fl/{TENANT}/pub-0/telemetry".encode()
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    # the metrics of each slot, rendered once: the publisher should not be the bottleneck.
    # Messages of one tick share a millisecond; each slot has metric names of its own, so no
    # two rows share (metric, time) and none is dropped as a redelivery.
    bodies = [
        ",".join(f'"m{k}_{slot}":{slot}.5' for k in range(METRICS)).encode()
        for slot in range(per_tick)
    ]
    started = time.monotonic()
    sent = 0
    packet_id = 0
    before: dict[str, float] | None = None
    while time.monotonic() - started < warmup + seconds:
        if before is None and time.monotonic() - started >= warmup:
            before = worker.metrics()
        ts = str(int(time.time() * 1000)).encode()
        batch = bytearray()
        for slot in range(per_tick):
            packet_id = packet_id % 65535 + 1
            sent += 1
            payload = b'{"ts":' + ts + b',"metrics":{' + bodies[slot] + b"}}"
            batch += wire.publish(topic, payload, 1, False, packet_id=packet_id)
        client.send(bytes(batch))
        time.sleep(max(0.0, started + (sent / rate) - time.monotonic()))
    time.sleep(2)
    after = worker.metrics()
    values = {k: v - (before or {}).get(k, 0.0) for k, v in after.items()}
    if os.environ.get("BENCH_DEBUG"):
        for k, v in sorted(values.items()):
            if any(
                part in k
                for part in ("commit_seconds", "lag_seconds_bucket", "batch_rows_sum",
                             "batch_rows_count")
            ):  # fmt: skip
                print("   ", k, v)
    worker.stop()
    client.close()
    buckets = sorted(
        (float(k.split('le="')[1].split('"')[0]), v)
        for k, v in values.items()
        if k.startswith("fieldline_ingest_publish_to_commit_seconds_bucket") and "+Inf" not in k
    )
    total = values.get("fieldline_ingest_publish_to_commit_seconds_count", 0.0)
    return _quantile(buckets, total, 0.5), _quantile(buckets, total, 0.99), worker.peak_rss_mib


def cpu_probe() -> float:
    """Milliseconds for a fixed pure-Python loop: how fast the machine is right now."""
    started = time.perf_counter()
    sum(i * i for i in range(3_000_000))
    return (time.perf_counter() - started) * 1000


def latency_runs(stack: Stack, args: argparse.Namespace) -> tuple[float, float, float]:
    """--latency-runs steady runs, each printed with its CPU probe; the median run's figures."""
    runs = []
    for n in range(args.latency_runs):
        probe = cpu_probe()
        lat = steady_latency(stack, args.rate, args.latency_seconds, args.warmup_seconds)
        runs.append(lat)
        print(
            f"latency at {args.rate:,} msg/s, run {n + 1}: p50 {lat[0] * 1000:.1f} ms, "
            f"p99 {lat[1] * 1000:.1f} ms, worker RSS {lat[2]:.0f} MiB (CPU probe {probe:.0f} ms)",
            flush=True,
        )
    runs.sort(key=lambda r: r[1])
    median = runs[len(runs) // 2]
    return median[0], median[1], max(r[2] for r in runs)


def _drain_acks(client: Any) -> None:
    try:
        while True:
            client.read_packet(60)
    except (OSError, ConnectionError):
        return


def _quantile(buckets: list[tuple[float, float]], total: float, q: float) -> float:
    """Prometheus' histogram_quantile: linear within the bucket that holds the q-th value."""
    if not total:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            return lower + (bound - lower) * (rank - below) / max(cumulative - below, 1e-9)
        lower, below = bound, cumulative
    return float("inf")


def compare_trees(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """The lean worker of another checkout (--compare-tree) and of this one, alternately on
    the same backlogs, --rounds times (use an even number): the cost of a change, side by
    side in one run."""
    trees = {"baseline": args.compare_tree.resolve(), "this tree": REPO}
    n, m = args.messages, args.backlog_messages
    got: dict[str, dict[str, list[float]]] = {k: {"single": [], "backlog": []} for k in trees}
    start_worker(stack, "lean").stop()
    for round_ in range(args.rounds):
        # ABBA: whoever runs second meets a bigger table, so the order alternates by round
        order = list(trees.items())
        for name, tree in order if round_ % 2 == 0 else reversed(order):
            probe = cpu_probe()
            publish(stack, stack.next_tag(), n)
            single = worker_drain(stack, "lean", n * METRICS, n, tree)
            publish(stack, stack.next_tag(), m, samples=100)
            backlog = worker_drain(stack, "lean", m * 100, m, tree)
            got[name]["single"].append(single[0])
            got[name]["backlog"].append(backlog[1])
            print(
                f"round {round_ + 1} {name:9}: {single[0]:,.0f} msg/s single messages, "
                f"{backlog[1]:,.0f} rows/s 100-sample backlog (CPU probe {probe:.0f} ms)",
                flush=True,
            )
    medians = {
        name: {k: sorted(v)[len(v) // 2] for k, v in runs.items()} for name, runs in got.items()
    }
    base, this = medians["baseline"], medians["this tree"]
    print("\nmedians            baseline   this tree   ratio")
    for key, unit in (("single", "msg/s"), ("backlog", "rows/s")):
        print(
            f"  {key:8} {unit:6} {base[key]:>10,.0f} {this[key]:>11,.0f}   "
            f"{this[key] / base[key]:.1%}"
        )
    return {"runs": got, "medians": medians}


# -- the idempotent ceiling, side by side -------------------------------------------------------
def _reference(stack: Stack, messages: int, *extra: str) -> dict[str, Any]:
    """benchmarks.ingest_reference in a process of its own, as the worker runs in one."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.ingest_reference", "--port", str(stack.port),
         "--pki", str(stack.pki.root), "--cafile", str(stack.pki.ca_cert_path),
         "--dsn", stack.dsn, "--messages", str(messages), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    if messages:
        profile(stack, proc.pid, "reference")
    out, err = proc.communicate(timeout=1000)
    if proc.returncode:
        raise SystemExit(f"the reference worker failed: {err.strip()[-2000:]}")
    return dict(json.loads(out.strip().splitlines()[-1])) if messages else {}


def profile(stack: Stack, pid: int, name: str) -> None:
    """With BENCH_PROFILE=DIR: py-spy samples the process (idle threads too, which is where
    it waits) until it exits, into DIR/<name>-<n>.txt (collapsed stacks; flamegraph.pl or
    speedscope read them)."""
    where = os.environ.get("BENCH_PROFILE")
    if not where:
        return
    Path(where).mkdir(parents=True, exist_ok=True)
    n = len(list(Path(where).glob(f"{name}-*.txt"))) + 1
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--idle", "--threads", "--rate", "200",
         "--format", "raw", "-o", str(Path(where) / f"{name}-{n}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def reference_drain(stack: Stack, messages: int, client: str) -> tuple[float, float]:
    """The reference on a queued backlog: (msg/s, rows/s) from its CONNACK to its last commit."""
    got = _reference(stack, messages, "--client", client)
    took = got["finished_at"] - got["connected_at"]
    return got["messages"] / took, got["rows"] / took


def load() -> str:
    """The machine's load average (1 min), to quote with figures from a shared machine."""
    return f"{os.getloadavg()[0]:.2f}"


def ceiling(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """`fieldline ingest run` and the minimal idempotent worker (benchmarks.ingest_reference)
    drain the same backlog (the broker queues every message for every session), in an order
    that rotates by round, --rounds times; then the same for the 100-sample backlog, next to
    the insert alone. With --compare-tree, that checkout's worker drains it too (it shares
    the worker's session, so it gets a backlog of its own, published again). The reference
    is timed from its CONNACK, a worker from its first message received (both within
    milliseconds of the backlog starting to flow) to the last commit."""
    extra = {k: v for k, v in (kv.split("=", 1) for kv in args.worker_setting)}
    trees = {"worker": REPO}
    if args.compare_tree is not None:
        trees["baseline"] = args.compare_tree.resolve()
    who_all = [*trees, "reference"]
    n, m = args.messages, args.backlog_messages
    start_worker(stack, "lean", **extra).stop()  # both sessions first, so both get the backlog
    _reference(stack, 0, "--prepare-only")
    single: dict[str, list[float]] = {k: [] for k in who_all}
    backlog: dict[str, list[float]] = {k: [] for k in [*who_all, "insert"]}

    def drain(who: str, tag_rows: int, messages: int, samples: int) -> float:
        if who == "reference":
            return reference_drain(stack, messages, args.reference_client)[1]
        return worker_drain(
            stack, "lean", tag_rows, messages, trees[who], from_connect=True, settings=extra
        )[1]

    def phase(messages: int, samples: int, order: list[str]) -> dict[str, float]:
        rates: dict[str, float] = {}
        published_for_worker = False
        publish(stack, stack.next_tag(), messages, samples=samples)
        for who in order:
            if who in trees and published_for_worker:
                # the worker's session drained the first copy: another for this tree (the
                # reference's session still holds the first, so it gets one extra to skip)
                publish(stack, stack.next_tag(), messages, samples=samples)
            rows = messages * (METRICS if samples == 1 else samples)
            rates[who] = drain(who, rows, messages, samples)
            published_for_worker |= who in trees
        if len(trees) > 1:
            _reference(stack, 0, "--prepare-only")  # the copies published for other trees
        return rates

    for round_ in range(args.rounds):
        order = who_all[round_ % len(who_all) :] + who_all[: round_ % len(who_all)]
        if round_ % 2 and len(who_all) > 2:
            # three or more: every one also runs after each other one; with two the rotation
            # alone alternates them (reversing it too would put the worker first every round)
            order.reverse()
        load_before = load()
        rates = phase(n, 1, order)
        for k, v in rates.items():
            single[k].append(v)
        print(
            f"round {round_ + 1} (order {', '.join(order)}), {n:,} messages x {METRICS} "
            "metrics: " + ", ".join(f"{k} {v:,.0f} rows/s" for k, v in rates.items())
            + f"; worker/reference {rates['worker'] / rates['reference']:.2f}"
            + (
                f", baseline/reference {rates['baseline'] / rates['reference']:.2f}"
                if "baseline" in rates else ""
            )
            + f" (load {load_before} -> {load()})",
            flush=True,
        )  # fmt: skip
        if not m:
            continue
        load_before = load()
        rates = phase(m, 100, order)
        rates["insert"] = asyncio.run(
            insert_ceiling(stack.dsn, args.insert_rows, args.batch_rows, 2)
        )
        for k, v in rates.items():
            backlog[k].append(v)
        print(
            f"round {round_ + 1}, {m:,} messages x 100 samples: "
            + ", ".join(f"{k} {v:,.0f} rows/s" for k, v in rates.items())
            + f"; worker/insert {rates['worker'] / rates['insert']:.0%}"
            + f" (load {load_before} -> {load()})",
            flush=True,
        )
    for name, ratios in (
        ("worker", [w / r for w, r in zip(single["worker"], single["reference"], strict=True)]),
        *(
            [("baseline", [b / r for b, r in zip(single["baseline"], single["reference"],
                                                  strict=True)])]
            if "baseline" in trees else []
        ),
    ):  # fmt: skip
        print(
            f"\n{name} / idempotent ceiling, single messages: rounds "
            f"{', '.join(f'{r:.2f}' for r in ratios)}; median {_median(ratios):.2f}, "
            f"min {min(ratios):.2f} (target >= 0.80 in every round)"
        )
    if backlog["insert"]:
        ratios = [w / i for w, i in zip(backlog["worker"], backlog["insert"], strict=True)]
        print(
            f"worker / insert alone, 100-sample backlog: rounds "
            f"{', '.join(f'{r:.0%}' for r in ratios)}; median {_median(ratios):.0%} "
            "(target >= 70%)"
        )
    return {"single": single, "backlog": backlog}


CLIENT_KEYS = (("single", "msg/s"), ("live", "msg/s"), ("backlog", "rows/s"))


def compare_clients(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """The worker with `--client lean` and with `--client paho`, alternately (ABBA) on the
    same backlogs and live traffic, --rounds times: medians, and lean/paho ratios."""
    clients = ("lean", "paho")
    n, m, live = args.messages, args.backlog_messages, args.live_messages
    got: dict[str, dict[str, list[float]]] = {c: {k: [] for k, _u in CLIENT_KEYS} for c in clients}
    start_worker(stack, "lean").stop()  # the session (both clients share the client id)
    for round_ in range(args.rounds):
        # whoever runs second meets a bigger table, so the order alternates by round
        for client in clients if round_ % 2 == 0 else reversed(clients):
            probe = cpu_probe()
            publish(stack, stack.next_tag(), n)
            single = worker_drain(stack, client, n * METRICS, n)
            flowing = worker_live(stack, client, live)
            publish(stack, stack.next_tag(), m, samples=100)
            backlog = worker_drain(stack, client, m * 100, m)
            got[client]["single"].append(single[0])
            got[client]["live"].append(flowing[0])
            got[client]["backlog"].append(backlog[1])
            print(
                f"round {round_ + 1} {client}: {single[0]:,.0f} msg/s single-message backlog, "
                f"{flowing[0]:,.0f} msg/s live, {backlog[1]:,.0f} rows/s 100-sample backlog, "
                f"RSS {max(single[2], flowing[2], backlog[2]):.0f} MiB (CPU probe {probe:.0f} ms)",
                flush=True,
            )
    medians = {c: {k: _median(v) for k, v in runs.items()} for c, runs in got.items()}
    # each round's lean/paho pair ran within a minute: its ratio is less exposed to the
    # machine's speed drifting than the ratio of the medians
    pairs = {
        k: _median([a / b for a, b in zip(got["lean"][k], got["paho"][k], strict=True)])
        for k, _u in CLIENT_KEYS
    }
    print(f"\nmedians of {args.rounds} rounds       lean       paho   lean/paho   pairs' median")
    for key, unit in CLIENT_KEYS:
        lean, paho = medians["lean"][key], medians["paho"][key]
        print(
            f"  {key:8} {unit:6} {lean:>14,.0f} {paho:>10,.0f} {lean / paho:>10.2f}x "
            f"{pairs[key]:>14.2f}x"
        )
    return {"runs": got, "medians": medians, "pair_ratios": pairs}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# -- the run ---------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=300_000, help="backlog of single messages")
    parser.add_argument("--backlog-messages", type=int, default=30_000, help="100-sample messages")
    parser.add_argument("--live-messages", type=int, default=200_000)
    parser.add_argument("--rate", type=int, default=5000, help="steady msg/s for the latency")
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument(
        "--warmup-seconds", type=float, default=3.0, help="traffic before the latency counts"
    )
    parser.add_argument("--home", type=Path, default=REPO / ".fieldline" / "bench-ingest")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--latency-only", action="store_true", help="measure only the steady-rate latency"
    )
    parser.add_argument("--latency-runs", type=int, default=3, help="the median one is reported")
    parser.add_argument(
        "--compare-tree",
        type=Path,
        help="another checkout (e.g. a `git worktree` of main): its worker and this one's "
        "drain the same backlogs alternately, --rounds times; nothing else is measured",
    )
    parser.add_argument(
        "--compare-clients",
        action="store_true",
        help="the worker's two receive paths (lean, paho on the event loop) alternately on "
        "--messages, --live-messages and --backlog-messages, --rounds times; nothing else",
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="the worker and a minimal idempotent worker (benchmarks.ingest_reference) drain "
        "the same --messages and --backlog-messages backlogs alternately, --rounds times, "
        "with the insert alone next to the 100-sample backlog; nothing else",
    )
    parser.add_argument(
        "--reference-client",
        choices=("paho", "lean"),
        default="lean",
        help="the reference's MQTT client under --ceiling: the worker's own (the ceiling of "
        "the database path), or paho-mqtt (slower than the worker here: docs/benchmarks.md)",
    )
    parser.add_argument(
        "--worker-setting",
        action="append",
        default=[],
        metavar="FIELDLINE_X=v",
        help="an environment setting for the worker under --ceiling (repeatable)",
    )
    parser.add_argument(
        "--insert-rows", type=int, default=2_000_000, help="rows of the insert alone (b)"
    )
    parser.add_argument(
        "--batch-rows", type=int, default=20_000, help="rows per batch of the insert alone (b)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds of --compare-tree, --compare-clients or --ceiling",
    )
    args = parser.parse_args()
    # `kill` stops the run like Ctrl-C: through the finally blocks, so nothing is left running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    args.home.mkdir(parents=True, exist_ok=True)
    stack = start_stack(args.home)
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} cores", "messages": args.messages}
    try:
        if args.ceiling:
            results["ceiling"] = ceiling(stack, args)
            return
        if args.compare_tree is not None:
            results["compare"] = compare_trees(stack, args)
            return
        if args.compare_clients:
            results["compare_clients"] = compare_clients(stack, args)
            return
        if args.latency_only:
            results["latency"] = lat = latency_runs(stack, args)
            print(f"median run: p50 {lat[0] * 1000:.1f} ms, p99 {lat[1] * 1000:.1f} ms")
            return
        n = args.messages
        # sessions first, so the broker queues the backlog for both subscribers
        start_worker(stack, "lean").stop()
        PahoCounter(stack).close()
        print(f"publishing a backlog of {n:,} messages x {METRICS} metrics ...", flush=True)
        took = publish(stack, stack.next_tag(), n)
        results["publish_msgs_per_s"] = n / took
        print(f"  mosquitto_pub x{PUBLISHERS}: {n / took:,.0f} msg/s into Mosquitto", flush=True)
        results["a_drain"] = paho_drain(stack, n)
        print(f"(a) paho ack-only drain: {results['a_drain']:,.0f} msg/s", flush=True)
        c = worker_drain(stack, "lean", n * METRICS, n)
        results["c_drain"] = c
        print(
            f"(c) worker (lean) drain: {c[0]:,.0f} msg/s, {c[1]:,.0f} rows/s, RSS {c[2]:.0f} MiB",
            flush=True,
        )
        wipe_session(stack, "bench-paho")
        publish(stack, stack.next_tag(), n)
        d = worker_drain(stack, "paho", n * METRICS, n)
        results["d_drain"] = d
        print(
            f"(d) worker (paho) drain: {d[0]:,.0f} msg/s, {d[1]:,.0f} rows/s, RSS {d[2]:.0f} MiB",
            flush=True,
        )
        m = args.backlog_messages
        publish(stack, stack.next_tag(), m, samples=100)
        cb = worker_drain(stack, "lean", m * 100, m)
        results["c_backlog"] = cb
        print(f"(c) worker (lean) drain of {m:,} 100-sample messages: {cb[0]:,.0f} msg/s, "
              f"{cb[1]:,.0f} rows/s, RSS {cb[2]:.0f} MiB", flush=True)  # fmt: skip
        b = asyncio.run(insert_ceiling(stack.dsn, args.insert_rows, args.batch_rows, 2))
        results["b_insert"] = b
        print(
            f"(b) idempotent insert alone (batches of 20,000, 2 connections): {b:,.0f} rows/s",
            flush=True,
        )
        wipe_session(stack, "bench-paho")
        live = args.live_messages
        results["a_live"] = paho_live(stack, live)
        print(f"(a) paho ack-only live: {results['a_live']:,.0f} msg/s", flush=True)
        wipe_session(stack, "bench-paho")
        cl = worker_live(stack, "lean", live)
        results["c_live"] = cl
        print(
            f"(c) worker (lean) live: {cl[0]:,.0f} msg/s, {cl[1]:,.0f} rows/s, RSS {cl[2]:.0f} MiB",
            flush=True,
        )
        dl = worker_live(stack, "paho", live)
        results["d_live"] = dl
        print(
            f"(d) worker (paho) live: {dl[0]:,.0f} msg/s, {dl[1]:,.0f} rows/s, RSS {dl[2]:.0f} MiB",
            flush=True,
        )
        results["latency"] = lat = latency_runs(stack, args)
        print(f"median run: p50 {lat[0] * 1000:.1f} ms, p99 {lat[1] * 1000:.1f} ms", flush=True)
    finally:
        stop_stack(stack)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    _summary(results)


def _summary(r: dict[str, Any]) -> None:
    peak = max(r[k][2] for k in ("c_drain", "d_drain", "c_backlog", "c_live", "d_live", "latency"))
    rows = [
        (
            "(c)/(a) single messages, backlog drain",
            f"{r['c_drain'][0] / r['a_drain']:.0%}",
            ">= 70%",
        ),
        ("(c)/(a) single messages, live", f"{r['c_live'][0] / r['a_live']:.0%}", ">= 70%"),
        ("(c)/(b) backlog messages, rows/s", f"{r['c_backlog'][1] / r['b_insert']:.0%}", ">= 60%"),
        ("(c)/(d) lean / paho receive, drain", f"{r['c_drain'][0] / r['d_drain'][0]:.2f}x", ""),
        ("(c)/(d) lean / paho receive, live", f"{r['c_live'][0] / r['d_live'][0]:.2f}x", ""),
        ("p99 publish-to-commit, median run", f"{r['latency'][1] * 1000:.1f} ms", "<= 50 ms"),
        ("worker peak RSS", f"{peak:.0f} MiB", "<= 250 MB"),
    ]
    print("\nsummary")
    for label, value, target in rows:
        print(f"  {label:40} {value:>9}  {('target ' + target) if target else ''}")


if __name__ == "__main__":
    main()
