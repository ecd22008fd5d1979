"""The idempotent ceiling: a minimal hand-written ingest worker, for `benchmarks.ingest --ceiling`.

    python -m benchmarks.ingest_reference --port P --pki DIR --dsn DSN --messages N

What someone choosing an ingest path would write in an afternoon: a paho-mqtt 2 subscriber
(MQTT 5, mutual TLS, persistent session, the worker's Receive Maximum) whose network thread
parses each payload with `json.loads` into three column lists (or, `--client lean`, the
same on the worker's own asyncio MQTT client, `ingest_worker.mqtt`), and `--connections` asyncpg
connections, each writing a batch of `--batch` rows with `INSERT ... SELECT FROM unnest(...)
ON CONFLICT DO NOTHING` in a transaction and then acknowledging its messages (at least once,
idempotent, like the worker). Metric ids come from a dict; no device rows, no validation, no
dead letters, no limits. It exits after `--messages` messages are committed and prints one
JSON line: the CLOCK_MONOTONIC times of its CONNACK and of its last commit, and what it wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest_worker.mqtt import Delivery, Subscriber, open_subscriber

CLIENT_ID = "bench-ref"
TABLE = "refbench.numeric_values"
FILTER = "fl/+/+/telemetry"
SESSION_EXPIRY = 7 * 24 * 3600


async def prepare(dsn: str) -> None:
    """The worker's numeric_values shape: a hypertable with UNIQUE (metric_id, time)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE SCHEMA IF NOT EXISTS refbench")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (time timestamptz NOT NULL, metric_id integer "
            "NOT NULL, value double precision NOT NULL, received boolean NOT NULL DEFAULT false, "
            "UNIQUE (metric_id, time))"
        )
        await conn.execute(
            f"SELECT create_hypertable('{TABLE}', by_range('time', INTERVAL '1 day'), "
            "if_not_exists => TRUE)"
        )
    finally:
        await conn.close()


class Reference:
    """The receive path fills batches; asyncio writers insert them, then acknowledge."""

    def __init__(self, args: argparse.Namespace, loop: asyncio.AbstractEventLoop) -> None:
        self.args, self.loop = args, loop
        self.queue: asyncio.Queue[tuple[list[Any], ...]] = asyncio.Queue()
        self.ids: dict[tuple[str, str], int] = {}
        self._new()
        self.lock = threading.Lock()  # paho's network thread fills what the loop seals
        self.committed = 0
        self.rows = 0
        self.connected_at = 0.0
        self.done = asyncio.Event()
        self.subscriber: Subscriber | None = None
        bundle = Path(args.pki) / "issued" / CLIENT_ID
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=CLIENT_ID,
            protocol=MQTTProtocolVersion.MQTTv5, manual_ack=True,
        )  # fmt: skip
        self.client.tls_set(args.cafile, str(bundle / "cert.pem"), str(bundle / "key.pem"))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_paho

    def _new(self) -> None:
        self.times: list[datetime] = []
        self.metric_ids: list[int] = []
        self.values: list[float] = []
        self.handles: list[Any] = []
        self.batch_started = 0.0

    def _on_connect(self, client: mqtt.Client, *_a: Any) -> None:
        self.connected_at = time.monotonic()
        client.subscribe(FILTER, 1)

    def _on_paho(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self._add(msg.topic, msg.payload, msg.mid)

    def _on_lean(self, delivery: Delivery) -> None:
        self._add(delivery.topic, delivery.payload, delivery)

    def _add(self, topic: str, payload: bytes | bytearray, handle: Any) -> None:
        device = topic.split("/")[2]
        body = json.loads(payload)
        if not self.handles:
            self.batch_started = time.monotonic()
        ids = self.ids
        for sample in body.get("samples") or (body,):
            when = datetime.fromtimestamp(sample["ts"] / 1000, UTC)
            for name, value in sample["metrics"].items():
                key = (device, name)
                mid = ids.get(key)
                if mid is None:
                    mid = ids[key] = len(ids) + 1
                self.times.append(when)
                self.metric_ids.append(mid)
                self.values.append(float(value))
        self.handles.append(handle)
        if len(self.times) >= self.args.batch:
            self._seal()

    def _seal(self) -> None:
        batch = (self.times, self.metric_ids, self.values, self.handles)
        self._new()
        self.loop.call_soon_threadsafe(self.queue.put_nowait, batch)

    async def _flusher(self) -> None:
        """The tail: a batch not full after 5 ms goes as it is (the worker's batch_max_wait)."""
        while not self.done.is_set():
            await asyncio.sleep(0.005)
            with self.lock:
                if self.handles and time.monotonic() - self.batch_started >= 0.005:
                    self._seal()

    async def _writer(self) -> None:
        conn = await asyncpg.connect(self.args.dsn)
        try:
            while True:
                times, ids, values, handles = await self.queue.get()
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO refbench.numeric_values (time, metric_id, value, received) "
                        "SELECT t, m, v, false FROM unnest($1::timestamptz[], $2::int[], "
                        "$3::float8[]) AS u(t, m, v) ON CONFLICT DO NOTHING",
                        times, ids, values,
                    )  # fmt: skip
                for handle in handles:
                    if self.subscriber is not None:
                        self.subscriber.ack(handle)
                    else:
                        self.client.ack(handle, 1)
                self.committed += len(handles)
                self.rows += len(times)
                if self.committed >= self.args.messages:
                    self.done.set()
        finally:
            await conn.close()

    async def _connect(self, clean_start: bool = False) -> None:
        if self.args.client == "paho":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY
            props.ReceiveMaximum = self.args.receive_maximum
            self.client.connect("127.0.0.1", self.args.port, clean_start=False, properties=props)
            self.client.loop_start()
            return
        bundle = Path(self.args.pki) / "issued" / CLIENT_ID
        context = ssl.create_default_context(cafile=self.args.cafile)
        context.load_cert_chain(bundle / "cert.pem", bundle / "key.pem")
        self.subscriber = await open_subscriber(
            "127.0.0.1", self.args.port, context, self._on_lean, server_hostname="localhost"
        )
        await self.subscriber.handshake(
            CLIENT_ID, clean_start=clean_start, session_expiry=SESSION_EXPIRY,
            receive_maximum=self.args.receive_maximum,
        )  # fmt: skip
        self.connected_at = time.monotonic()
        await self.subscriber.subscribe([FILTER], qos=1)

    async def _disconnect(self) -> None:
        if self.subscriber is not None:
            await self.subscriber.close()
        else:
            self.client.disconnect()
            self.client.loop_stop()

    async def run(self) -> dict[str, Any]:
        tasks = [asyncio.create_task(self._writer()) for _ in range(self.args.connections)]
        tasks.append(asyncio.create_task(self._flusher()))
        await self._connect()
        try:
            waiter = asyncio.create_task(self.done.wait())
            await asyncio.wait([waiter, *tasks], timeout=self.args.timeout,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            finished = time.monotonic()
            for task in tasks:
                if task.done():
                    task.result()  # a writer failed: its exception, not a hang
            if not self.done.is_set():
                raise SystemExit(f"{self.committed} of {self.args.messages} messages committed")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._disconnect()
        return {
            "connected_at": self.connected_at,
            "finished_at": finished,
            "messages": self.committed,
            "rows": self.rows,
        }


async def amain(args: argparse.Namespace) -> None:
    await prepare(args.dsn)
    if args.prepare_only:
        # a new session (what the broker queued for the old one is dropped), kept after the
        # disconnect, so that the broker queues for this client id from now on
        args.client = "lean"
        ref = Reference(args, asyncio.get_running_loop())
        await ref._connect(clean_start=True)
        await ref._disconnect()
        return
    result = await Reference(args, asyncio.get_running_loop()).run()
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pki", required=True, help="the benchmark's PKI directory")
    parser.add_argument("--cafile", required=True, help="the CA certificate")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--messages", type=int, default=0)
    parser.add_argument("--batch", type=int, default=20_000, help="rows per INSERT")
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument(
        "--client",
        choices=("paho", "lean"),
        default="paho",
        help="paho-mqtt in its own thread, or the worker's own asyncio MQTT client (the "
        "database path's ceiling with the worker's receive cost)",
    )
    parser.add_argument("--receive-maximum", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("REF_TIMEOUT", 900)))
    parser.add_argument(
        "--prepare-only", action="store_true", help="start a new, empty session, and exit"
    )
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
