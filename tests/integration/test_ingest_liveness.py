"""The lean client notices a dead broker, and reconnects the right way, against real brokers.

A loopback proxy (in the test) sits between the worker and the broker: it goes silent without
closing anything (a half-open connection), or holds back the broker's first bytes (a slow
CONNACK). A retained `status` replayed by a broker never moves a device's `last_seen`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

import asyncpg
import pytest

import certs
from ingest_worker.mqtt import MQTT5
from ingest_worker.receive import LeanReceiver
from ingest_worker.service import IngestWorker, WorkerConfig
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.ingest import burst, fetch, fetchval, wait_for, worker_config

pytestmark = pytest.mark.integration

KEEPALIVE = 2  # seconds: the worker's keepalive in these tests
SLACK = 1.5  # seconds on top of 1.5 x keepalive: a reconnect's TLS handshake and CONNACK


class Proxy:
    """A loopback TCP proxy to the broker. `freeze()` makes every open connection silent both
    ways without closing it; connections made later are forwarded normally. With `tls`, it
    terminates TLS on both sides and `hold_s` delays the broker's first bytes (the CONNACK) on
    the first `hold_connections` connections."""

    def __init__(
        self,
        port: int,
        *,
        tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
        hold_s: float = 0.0,
        hold_connections: int = 0,
    ) -> None:
        self.upstream_port = port
        self.tls = tls
        self.hold_s = hold_s
        self.hold_connections = hold_connections
        self.connections = 0
        self.frozen: set[int] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        server_side = self.tls[0] if self.tls else None
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=server_side)
        self.port = self.server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self.frozen = set(range(self.connections))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        self._writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port,
                ssl=self.tls[1] if self.tls else None,
                server_hostname="127.0.0.1" if self.tls else None,
            )  # fmt: skip
        except OSError:
            writer.transport.abort()
            return
        self._writers.append(up_writer)
        hold = self.hold_s if index < self.hold_connections else 0.0
        pumps = [
            asyncio.create_task(self._pump(index, reader, up_writer, 0.0)),
            asyncio.create_task(self._pump(index, up_reader, writer, hold)),
        ]
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(
        self, index: int, src: asyncio.StreamReader, dst: asyncio.StreamWriter, hold: float
    ) -> None:
        try:
            while True:
                data = await src.read(65536)
                if hold:
                    await asyncio.sleep(hold)
                    hold = 0.0
                if index in self.frozen:
                    await asyncio.Event().wait()  # silent, and the sockets stay open
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            dst.transport.abort()


@contextlib.asynccontextmanager
async def proxy_to(broker: BrokerUnderTest, **options: Any) -> AsyncIterator[Proxy]:
    proxy = Proxy(broker.port, **options)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def via(config: WorkerConfig, proxy: Proxy, **target: Any) -> WorkerConfig:
    return replace(config, target=replace(config.target, port=proxy.port, **target))


def connects(worker: IngestWorker) -> float:
    value = worker.metrics.registry.get_sample_value("fieldline_ingest_broker_connects_total")
    return value or 0.0


def telemetry(ts_ms: int, value: float) -> tuple[str, bytes]:
    return "fl/acme/dev-1/telemetry", json.dumps({"ts": ts_ms, "metrics": {"t": value}}).encode()


def status(fw: str) -> tuple[str, bytes]:
    return "fl/acme/dev-1/status", json.dumps({"state": "online", "fw": fw}).encode()


async def rows_for(dsn: str, value: float) -> int:
    return int(
        await fetchval(
            dsn, "SELECT count(*) FROM tenant_acme.numeric_values WHERE value = $1", value
        )
        or 0
    )


async def fw_is(dsn: str, expected: str) -> bool:
    """dev-1's firmware is `expected` (False while the tenant has no tables yet)."""
    try:
        rows = await fetch(dsn, "SELECT fw FROM tenant_acme.devices WHERE id = 'dev-1'")
    except asyncpg.UndefinedTableError:
        return False
    return bool(rows) and rows[0]["fw"] == expected


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    async def as_async() -> bool:
        return check()

    await wait_for(as_async, timeout, what, every=0.02)


async def test_a_half_open_connection_is_noticed_within_a_keepalive_and_a_half(
    broker: BrokerUnderTest, timescale_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The proxy goes silent both ways, nothing closed: the worker must reconnect within
    1.5 x keepalive, keep delivering, and (its session being present) not subscribe again,
    so the retained status is not replayed over what the device said since."""
    caplog.set_level(logging.INFO, logger="ingest")
    pki = broker.pki
    t0 = int(time.time() * 1000) - 10_000
    await asyncio.to_thread(burst, broker, pki.device, [status("1.0")], retain=True)
    async with proxy_to(broker) as proxy:
        config = via(worker_config(broker, timescale_dsn), proxy, keepalive=KEEPALIVE)
        async with IngestWorker(config) as worker:
            await worker.wait_connected(15)

            await wait_for(
                lambda: fw_is(timescale_dsn, "1.0"), 15, "the retained status, on subscribing"
            )
            # a live (not retained) status since: the broker still retains fw 1.0
            await asyncio.to_thread(burst, broker, pki.device, [status("1.1"), telemetry(t0, 1)])

            async def first_there() -> bool:
                return await rows_for(timescale_dsn, 1) == 1

            await wait_for(first_there, 15, "the first reading")
            assert connects(worker) == 1

            before = proxy.connections  # two per attempt on the embedded broker: 5, then 3.1.1
            proxy.freeze()
            await until(
                lambda: connects(worker) == 2,
                1.5 * KEEPALIVE + SLACK,
                "a reconnect after the connection went silent",
            )
            assert proxy.connections > before  # through the proxy again, not the frozen one
            assert "nothing from the broker" in caplog.text
            assert "subscribe=kept" in caplog.text

            await asyncio.to_thread(burst, broker, pki.device, [telemetry(t0 + 1000, 2)])

            async def second_there() -> bool:
                return await rows_for(timescale_dsn, 2) == 1

            await wait_for(second_there, 15, "a reading sent after the reconnect")
            await until(lambda: not worker.pipeline.pending, 10, "everything received committed")
            assert await fw_is(
                timescale_dsn, "1.1"
            )  # the retained 1.0 was not delivered again on resume


async def test_a_slow_connack_is_retried_on_mqtt5(
    broker_factory: Callable[..., BrokerUnderTest],
    timescale_dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Against Mosquitto (MQTT 5), a CONNACK later than the connect timeout: the worker tries
    again and stays on MQTT 5 (before, it fell back to 3.1.1 for the life of the process)."""
    caplog.set_level(logging.INFO, logger="ingest")
    broker = broker_factory("mosquitto")
    pki = broker.pki
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    broker_side = certs.client_context(pki.service.directory)
    connect_timeout = 1.0
    async with proxy_to(
        broker, tls=(server_side, broker_side), hold_s=connect_timeout + 0.5, hold_connections=1
    ) as proxy:
        config = via(worker_config(broker, timescale_dsn), proxy, connect_timeout=connect_timeout)
        async with IngestWorker(config) as worker:
            await worker.wait_connected(15)
            assert proxy.connections == 2  # the first attempt timed out, the retry went through
            assert isinstance(worker.receiver, LeanReceiver)
            assert worker.receiver.version == MQTT5
    assert "no CONNACK within 1 s" in caplog.text
    connected = [r.getMessage() for r in caplog.records if "event=connected" in r.getMessage()]
    assert len(connected) == 1
    assert "mqtt=5 " in connected[0]


async def test_a_retained_status_does_not_move_last_seen(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str
) -> None:
    """A worker with a fresh session receives the device's retained status (retain flag set):
    what it says (the firmware) is recorded, but `last_seen` stays when the device was heard."""
    broker = broker_factory("mosquitto")
    pki = broker.pki
    # session expiry 0: the session ends with the connection, so the next worker's SUBSCRIBE
    # is new and Mosquitto sends it the retained messages
    config = worker_config(broker, timescale_dsn)
    config = replace(config, target=replace(config.target, session_expiry=0, protocol="5"))
    device = "SELECT fw, status, last_seen FROM tenant_acme.devices WHERE id = 'dev-1'"

    async with IngestWorker(config) as worker:
        await worker.wait_connected(15)
        await asyncio.to_thread(burst, broker, pki.device, [status("1.0")], retain=True)
        await wait_for(lambda: fw_is(timescale_dsn, "1.0"), 15, "the live status")
    heard: datetime = (await fetch(timescale_dsn, device))[0]["last_seen"]

    # said while no worker listens: only the broker's retained copy has it
    await asyncio.to_thread(burst, broker, pki.device, [status("2.0")], retain=True)
    async with IngestWorker(config) as worker:
        await worker.wait_connected(15)
        await wait_for(lambda: fw_is(timescale_dsn, "2.0"), 15, "the retained status")
    row = (await fetch(timescale_dsn, device))[0]
    assert row["last_seen"] == heard
    assert row["status"] == "online"
