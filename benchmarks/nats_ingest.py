"""A 3-node NATS JetStream cluster versus one Mosquitto, side by side in one run.

    python -m benchmarks.nats_ingest                       # ~2 min
    python -m benchmarks.nats_ingest --messages 40000 --rounds 4

Both brokers are rendered by fieldline (benchmarks.ingest's Mosquitto stack, `broker.nats`'s
cluster via tests.fixtures.nats.NatsCluster), on this machine with PostgreSQL + TimescaleDB
and one `fieldline ingest run`. Rounds alternate A B B A so drift in this shared machine's
CPU speed falls on both. It prints:

- QoS 1 msg/s end to end: mosquitto_pub (4 devices, 10 metrics a message) at full speed into
  the broker (node 1 for NATS) until the worker has committed every row;
- recovery after a node kill: kill -9 (Mosquitto: and start it again at once, it is the only
  node; NATS: the node leading $MQTT_msgs, the stream the worker consumes and every PUBACK
  waits for, left dead), then a paho device publishing every 50 ms (to a surviving node for
  NATS) — the seconds from the kill to the first committed row published after it.

The worker consumes `$MQTT_msgs` (ingest.nats_stream's default), its consumer ensured before
anything publishes. `--without-fieldline` deletes the `fl.>` stream FIELDLINE first, to see
what its second replicated write of every message costs.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from benchmarks.ingest import (
    METRICS,
    Stack,
    Worker,
    prepare_pki,
    publish,
    start_stack,
    start_worker,
    stop_stack,
)
from certs import Role
from tests.fixtures.nats import NatsCluster, run_async

STREAM = "$MQTT_msgs"


def start_nats(stack: Stack) -> NatsCluster:
    """The rendered 3-node cluster on free ports, FIELDLINE stream ensured."""
    admin_dir = stack.pki.root / "issued" / "bench-admin"
    admin = (
        stack.pki.bundle("bench-admin")
        if admin_dir.is_dir()
        else stack.pki.issue("bench-admin", tenant="platform", role=Role.ADMIN)
    )
    # what NatsCluster reads; the worker's own certificate ensures its consumer
    shim = cast(
        Any, SimpleNamespace(pki=stack.pki, admin=admin, service=stack.pki.bundle("ingest-1"))
    )
    workdir = stack.home / "nats"
    # a fresh cluster each run: on the state a killed run left, nats-server 2.9.10 once gave
    # the consumer a delivered sequence past the stream's last one, and it skipped the first
    # two messages of the next run (they stayed in $MQTT_msgs, undelivered; docs/broker.md)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    cluster = NatsCluster(shim, workdir, 3).start_all()
    # before anything publishes: $MQTT_msgs keeps only what a consumer wanted on arrival
    ensured = cluster.ensure_ingest_consumer(stream=STREAM, ack_wait_s=10.0)
    print(f"{STREAM}: consumer {ensured.consumer}, leader {ensured.leader}", flush=True)
    return cluster


def drop_fieldline(cluster: NatsCluster) -> None:
    """Delete the `fl.>` stream (as the admin): MQTT publishes are then written once."""

    async def go() -> None:
        nc = await cluster.connect(connect_timeout=2)
        try:
            await nc.jetstream(timeout=10).delete_stream("FIELDLINE")
        finally:
            await nc.close()

    run_async(go)


def worker_for(stack: Stack, cluster: NatsCluster, kind: str) -> Worker:
    if kind == "mosquitto":
        return start_worker(stack, "lean")
    urls = ",".join(cluster.client_urls)
    return start_worker(
        stack, "lean", extra=("--source", "nats", "--nats-url", urls),
        FIELDLINE_INGEST__NATS_ACK_WAIT_S="10", FIELDLINE_INGEST__NATS_STREAM=STREAM,
        FIELDLINE_NATS__MQTT_PORT=str(cluster.mqtt_ports[0]),
    )  # fmt: skip


def throughput(stack: Stack, cluster: NatsCluster, kind: str, messages: int) -> float:
    """msg/s from the first PUBLISH to the last row committed."""
    target = stack if kind == "mosquitto" else replace(stack, port=cluster.node(1).port)
    worker = worker_for(stack, cluster, kind)
    try:
        rows = messages * METRICS
        tag = stack.next_tag()
        started = time.monotonic()
        thread = threading.Thread(target=publish, args=(target, tag, messages))
        thread.start()
        while worker.rows() < rows:
            time.sleep(0.05)
            if time.monotonic() - started > 600:
                raise SystemExit(f"{kind}: {worker.rows():,.0f} of {rows:,} rows")
        took = time.monotonic() - started
        thread.join()
    finally:
        worker.stop()
    return messages / took


def recovery(stack: Stack, cluster: NatsCluster, kind: str) -> float:
    """Seconds from a node's kill -9 to the first committed row published after it."""
    worker = worker_for(stack, cluster, kind)
    bundle = stack.pki.root / "issued" / "pub-0"
    leader = cluster.stream_leader(STREAM) if kind == "nats" else 0
    port = stack.port if kind == "mosquitto" else cluster.node(leader % 3 + 1).port
    device = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="pub-0", protocol=MQTTProtocolVersion.MQTTv311
    )
    device.tls_set(
        ca_certs=str(stack.pki.ca_cert_path),
        certfile=str(bundle / "cert.pem"),
        keyfile=str(bundle / "key.pem"),
    )
    device.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]  # seconds; floats work
    device.connect("127.0.0.1", port, keepalive=5)
    device.loop_start()
    try:
        time.sleep(1.0)  # the worker's session and the device settled
        before = worker.rows()
        killed = time.monotonic()
        if kind == "mosquitto":
            stack.mosquitto.send_signal(signal.SIGKILL)
            stack.mosquitto.wait()
            stack.mosquitto = subprocess.Popen(
                cast(list[str], stack.mosquitto.args),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        else:
            cluster.kill_9(leader)
        i = 0
        while worker.rows() <= before:
            ts = int(time.time() * 1000)
            device.publish("fl/bench/pub-0/telemetry", f'{{"ts":{ts},"metrics":{{"r":{i}}}}}', 1)
            i += 1
            time.sleep(0.05)
            if time.monotonic() - killed > 120:
                raise SystemExit(f"{kind}: nothing committed 120 s after the kill")
        took = time.monotonic() - killed
    finally:
        device.disconnect()
        device.loop_stop()
        worker.stop()
        if kind == "nats":
            cluster.start(leader)
            cluster.wait_for_leaders((STREAM,))
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="per throughput round")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA pairs of rounds")
    parser.add_argument("--home", type=Path, default=Path("/tmp/fl-bench-nats"))  # noqa: S108
    parser.add_argument(
        "--without-fieldline", action="store_true", help="delete the fl.> stream FIELDLINE first"
    )
    args = parser.parse_args()
    args.home.mkdir(parents=True, exist_ok=True)
    prepare_pki(args.home)
    stack = start_stack(args.home)
    cluster = start_nats(stack)
    if args.without_fieldline:
        drop_fieldline(cluster)
    rates: dict[str, list[float]] = {"mosquitto": [], "nats": []}
    recoveries: dict[str, list[float]] = {"mosquitto": [], "nats": []}
    try:
        for r in range(args.rounds):
            order = ("mosquitto", "nats") if r % 2 == 0 else ("nats", "mosquitto")
            for kind in (*order, *reversed(order)):
                rate = throughput(stack, cluster, kind, args.messages)
                rates[kind].append(rate)
                print(f"round {r + 1} {kind:9} {rate:8,.0f} msg/s end to end", flush=True)
            for kind in order:
                took = recovery(stack, cluster, kind)
                recoveries[kind].append(took)
                print(f"round {r + 1} {kind:9} recovered in {took:.2f} s after kill -9", flush=True)
    finally:
        cluster.stop()
        stop_stack(stack)
    print(f"\n{'broker':12}{'QoS 1 msg/s (median)':>24}{'recovery s (median)':>22}")
    for kind in ("mosquitto", "nats"):
        label = "mosquitto" if kind == "mosquitto" else "nats x3"
        print(
            f"{label:12}{statistics.median(rates[kind]):>24,.0f}"
            f"{statistics.median(recoveries[kind]):>22.2f}"
        )


if __name__ == "__main__":
    main()
