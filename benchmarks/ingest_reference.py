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

`--dedup` chooses where duplicates are caught (benchmarks.ingest_dedup compares them):

- `row` (the default, as above): every row goes through `ON CONFLICT DO NOTHING` on the
  values table's unique (metric_id, time);
- `message`: per batch, in one transaction, the messages' keys (device, boot, seq of the first
  sample, ts of the first sample; a message without seq is keyed by its ts alone) go into a
  small unique-keyed table with `INSERT ... ON CONFLICT DO NOTHING RETURNING`, and only the new
  messages' values are written, with COPY (`copy_records_to_table`);
- `sample`: the same with one key per sample, which is what survives an edge outbox that
  re-batches what it resends (a backlog of 100 samples has 100 keys);
- `none`: COPY of every row, no dedup (the not-idempotent ceiling: a redelivery fails it).

The values table keeps its unique (metric_id, time) in every mode. So a COPY that meets a
(metric, time) already stored (the same reading under another key) fails with a
unique violation, and its whole transaction rolls back: `message` and `sample` then write
that batch again the row way (keys, then `INSERT ... ON CONFLICT DO NOTHING`) and count it
in `fallbacks`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
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
SCHEMA = "refbench"
FILTER = "fl/+/+/telemetry"
SESSION_EXPIRY = 7 * 24 * 3600
NO_BOOT = -1  # the key's boot when a message has none (the column is NOT NULL)
NO_SEQ = -1  # the key's seq when a sample has none
COPY_COLUMNS = ("time", "metric_id", "value")  # received: the column's default, false


async def prepare(dsn: str, schema: str = SCHEMA) -> None:
    """The worker's numeric_values shape: a hypertable with UNIQUE (metric_id, time); and the
    message keys, a hypertable on the first sample's ts, so that old keys go by drop_chunks."""
    conn = await asyncpg.connect(dsn)
    try:
        # the worker's migrations create it; without a worker run before, this does
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.numeric_values (time timestamptz NOT NULL, "
            "metric_id integer NOT NULL, value double precision NOT NULL, received boolean NOT "
            "NULL DEFAULT false, UNIQUE (metric_id, time))"
        )
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.names (device text NOT NULL, name text NOT "
            "NULL, id integer NOT NULL, PRIMARY KEY (device, name))"
        )
        # the key holds its partitioning column (a unique index on a hypertable must): the
        # same message resent has the same ts, so it still meets its key
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.message_keys (device_id integer NOT NULL, "
            "boot bigint NOT NULL, seq bigint NOT NULL, time timestamptz NOT NULL, "
            "PRIMARY KEY (device_id, boot, seq, time))"
        )
        # the keys need no index on time of their own (TimescaleDB's default): drop_chunks
        # finds old ones by chunk
        for table, time_index in (("numeric_values", "TRUE"), ("message_keys", "FALSE")):
            await conn.execute(
                f"SELECT create_hypertable('{schema}.{table}', by_range('time', "
                f"INTERVAL '1 day'), if_not_exists => TRUE, create_default_indexes => {time_index})"
            )
    finally:
        await conn.close()


class Reference:
    """The receive path fills batches; asyncio writers insert them, then acknowledge."""

    def __init__(self, args: argparse.Namespace, loop: asyncio.AbstractEventLoop) -> None:
        self.args, self.loop = args, loop
        self.queue: asyncio.Queue[tuple[list[Any], ...]] = asyncio.Queue()
        self.ids: dict[tuple[str, str], int] = {}
        self.devices: dict[str, int] = {}
        self.schema = schema = args.schema
        # the schema is an identifier (checked by the argument parser); values are bound
        self.insert_sql = (
            f"INSERT INTO {schema}.numeric_values (time, metric_id, value, received) "  # noqa: S608
            "SELECT t, m, v, false FROM unnest($1::timestamptz[], $2::int[], $3::float8[]) "
            "AS u(t, m, v) ON CONFLICT DO NOTHING"
        )
        self.keys_sql = (
            f"INSERT INTO {schema}.message_keys (device_id, boot, seq, time) "  # noqa: S608
            "SELECT * FROM unnest($1::int[], $2::bigint[], $3::bigint[], $4::timestamptz[]) "
            "ON CONFLICT DO NOTHING RETURNING device_id, boot, seq, time"
        )
        self._new()
        self.lock = threading.Lock()  # paho's network thread fills what the loop seals
        self.committed = 0
        self.rows = 0
        self.inserted = 0  # rows the database took: 0 for a backlog of duplicates
        self.new_keys = 0
        self.fallbacks = 0
        self.connected_at = 0.0
        self.done = asyncio.Event()
        self.subscriber: Subscriber | None = None
        bundle = Path(args.pki) / "issued" / args.client_id
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=args.client_id,
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
        # --dedup message|sample: one key per message (or sample) and the row where it ends
        self.key_devices: list[int] = []
        self.key_boots: list[int] = []
        self.key_seqs: list[int] = []
        self.key_times: list[datetime] = []
        self.key_ends: list[int] = []
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
        dedup = self.args.dedup
        keyed = dedup in ("message", "sample")
        if keyed:
            device_id = self.devices.setdefault(device, len(self.devices) + 1)
            boot = body.get("boot")
            if boot is None:
                boot = NO_BOOT
        first = True
        for sample in body.get("samples") or (body,):
            when = datetime.fromtimestamp(sample["ts"] / 1000, UTC)
            if keyed and (first or dedup == "sample"):
                if not first:  # the previous sample's key ends here
                    self.key_ends.append(len(self.times))
                seq = sample.get("seq")
                self.key_devices.append(device_id)
                self.key_boots.append(boot)
                # without seq, the key's ts alone tells a message (a seq is never negative)
                self.key_seqs.append(NO_SEQ if seq is None else seq)
                self.key_times.append(when)
                first = False
            for name, value in sample["metrics"].items():
                key = (device, name)
                mid = ids.get(key)
                if mid is None:
                    mid = ids[key] = len(ids) + 1
                self.times.append(when)
                self.metric_ids.append(mid)
                self.values.append(float(value))
        if keyed:
            self.key_ends.append(len(self.times))
        self.handles.append(handle)
        if len(self.times) >= self.args.batch:
            self._seal()

    def _seal(self) -> None:
        batch = (
            self.times, self.metric_ids, self.values, self.handles,
            self.key_devices, self.key_boots, self.key_seqs, self.key_times, self.key_ends,
        )  # fmt: skip
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
                times, ids, values, handles, *keys = await self.queue.get()
                if self.args.dedup == "row":
                    async with conn.transaction():
                        # not `+= await`: that reads the total before the other writer adds
                        inserted = await self._insert(conn, times, ids, values)
                    self.inserted += inserted
                elif self.args.dedup == "none":
                    async with conn.transaction():
                        await conn.copy_records_to_table(
                            "numeric_values", schema_name=self.schema,
                            records=zip(times, ids, values, strict=True), columns=COPY_COLUMNS,
                        )  # fmt: skip
                    self.inserted += len(times)
                else:
                    await self._keyed(conn, times, ids, values, keys)
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

    async def _insert(
        self, conn: asyncpg.Connection, times: list[Any], ids: list[Any], values: list[Any]
    ) -> int:
        """The row way: rows the database did not have, of these; returns how many."""
        status = await conn.execute(self.insert_sql, times, ids, values)
        return int(status.rsplit(" ", 1)[-1])

    async def _keyed(
        self,
        conn: asyncpg.Connection,
        times: list[Any],
        ids: list[Any],
        values: list[Any],
        keys: list[list[Any]],
    ) -> None:
        """--dedup message|sample: the new keys, then COPY of their rows, in one transaction.

        A key still uncommitted in another transaction (the other writer, another worker)
        makes this INSERT wait for that one's outcome: exactly one of the two copies wins."""
        try:
            async with conn.transaction():
                new, rows = await self._new_rows(conn, times, ids, values, keys)
                if rows:
                    await conn.copy_records_to_table(
                        "numeric_values", schema_name=self.schema, records=rows,
                        columns=COPY_COLUMNS,
                    )  # fmt: skip
            inserted = len(rows)
        except asyncpg.UniqueViolationError:
            # a reading stored under another key (a resend re-batched, another value for a
            # stored time): the COPY refused the batch; the row way takes it
            self.fallbacks += 1
            async with conn.transaction():
                new, rows = await self._new_rows(conn, times, ids, values, keys)
                inserted = 0
                if rows:
                    columns = [list(c) for c in zip(*rows, strict=True)]
                    inserted = await self._insert(conn, *columns)
        self.new_keys += new
        self.inserted += inserted

    async def _new_rows(
        self,
        conn: asyncpg.Connection,
        times: list[Any],
        ids: list[Any],
        values: list[Any],
        keys: list[list[Any]],
    ) -> tuple[int, list[tuple[Any, ...]]]:
        """Insert the batch's keys: how many were new, and their rows."""
        devices, boots, seqs, key_times, ends = keys
        new = await conn.fetch(self.keys_sql, devices, boots, seqs, key_times)
        if not new:
            return 0, []
        if len(new) == len(ends):  # all new (the common case): every row, as it came
            return len(new), list(zip(times, ids, values, strict=True))
        fresh = {tuple(r) for r in new}
        rows: list[tuple[Any, ...]] = []
        start = 0
        for key, end in zip(zip(devices, boots, seqs, key_times, strict=True), ends, strict=True):
            if key in fresh:
                fresh.discard(key)  # a key twice in one batch: its first copy only
                rows.extend(zip(times[start:end], ids[start:end], values[start:end], strict=True))
            start = end
        return len(new), rows

    async def _connect(self, clean_start: bool = False) -> None:
        if self.args.client == "paho":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY
            props.ReceiveMaximum = self.args.receive_maximum
            self.client.connect("127.0.0.1", self.args.port, clean_start=False, properties=props)
            self.client.loop_start()
            return
        bundle = Path(self.args.pki) / "issued" / self.args.client_id
        context = ssl.create_default_context(cafile=self.args.cafile)
        context.load_cert_chain(bundle / "cert.pem", bundle / "key.pem")
        self.subscriber = await open_subscriber(
            "127.0.0.1", self.args.port, context, self._on_lean, server_hostname="localhost"
        )
        await self.subscriber.handshake(
            self.args.client_id, clean_start=clean_start, session_expiry=SESSION_EXPIRY,
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

    async def _names(self, save: bool = False) -> None:
        """Load (or save) the metric and device ids, so that a later run (a redelivery of the
        same backlog) gives the same readings the same ids; a device's id is under name ''."""
        conn = await asyncpg.connect(self.args.dsn)
        try:
            table = f"{self.schema}.names"
            if not save:
                for device, name, id_ in await conn.fetch(f"SELECT * FROM {table}"):  # noqa: S608
                    if name:
                        self.ids[device, name] = id_
                    else:
                        self.devices[device] = id_
                return
            named = [*((d, n, i) for (d, n), i in self.ids.items()),
                     *((d, "", i) for d, i in self.devices.items())]  # fmt: skip
            await conn.execute(
                f"INSERT INTO {table} SELECT * FROM unnest($1::text[], $2::text[], "  # noqa: S608
                "$3::int[]) ON CONFLICT DO NOTHING",
                *([list(c) for c in zip(*named, strict=True)] if named else [[], [], []]),
            )
        finally:
            await conn.close()

    async def run(self) -> dict[str, Any]:
        await self._names()
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
        await self._names(save=True)
        return {
            "connected_at": self.connected_at,
            "finished_at": finished,
            "messages": self.committed,
            "rows": self.rows,
            "inserted": self.inserted,
            "new_keys": self.new_keys,
            "fallbacks": self.fallbacks,
        }


async def amain(args: argparse.Namespace) -> None:
    await prepare(args.dsn, args.schema)
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


def _identifier(text: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", text):
        raise argparse.ArgumentTypeError(f"not a plain SQL identifier: {text!r}")
    return text


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
    parser.add_argument("--client-id", default=CLIENT_ID, help="its MQTT session (and identity)")
    parser.add_argument("--schema", type=_identifier, default=SCHEMA, help="its tables' schema")
    parser.add_argument(
        "--dedup",
        choices=("row", "message", "sample", "none"),
        default="row",
        help="per row (ON CONFLICT on the values), per message or per sample (a key table, "
        "then COPY of the new ones' values), or none (COPY, not idempotent)",
    )
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("REF_TIMEOUT", 900)))
    parser.add_argument(
        "--prepare-only", action="store_true", help="start a new, empty session, and exit"
    )
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
