"""The paho receive path (paho-mqtt driven on the worker's event loop) under backpressure and
across a restart, on both brokers, into a real TimescaleDB: every message exactly once."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from ingest_worker.service import IngestWorker
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.ingest import burst, count, wait_for, worker_config

pytestmark = pytest.mark.integration

TABLE = "tenant_acme.numeric_values"


def _telemetry(first: int, n: int, t0: int) -> list[tuple[str, bytes]]:
    return [
        ("fl/acme/dev-1/telemetry", json.dumps({"ts": t0 + i, "metrics": {"x": i}}).encode())
        for i in range(first, first + n)
    ]


def _pauses(worker: IngestWorker) -> float:
    return sum(
        sample.value
        for metric in worker.metrics.registry.collect()
        if metric.name == "fieldline_ingest_receive_pauses"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


async def test_paho_on_the_loop_pauses_resumes_and_resumes_its_session(
    broker: BrokerUnderTest, timescale_dsn: str
) -> None:
    t0 = int(time.time() * 1000) - 600_000
    config = worker_config(broker, timescale_dsn, client="paho", queue_max=40)
    async with IngestWorker(config) as worker:
        await worker.wait_connected(15)
        # a queue of 40 messages against 2,000 sent at once: reading pauses and resumes
        await asyncio.to_thread(burst, broker, broker.pki.device, _telemetry(0, 2000, t0))
        await wait_for(lambda: _rows_are(timescale_dsn, 2000), 30, "2,000 rows")
        assert _pauses(worker) > 0
        # no network thread: paho runs on the worker's event loop
        assert not [t for t in threading.enumerate() if t.name.startswith("paho")]
    # queued by the broker for the worker's session while it is away
    await asyncio.to_thread(burst, broker, broker.pki.device, _telemetry(2000, 300, t0))
    async with IngestWorker(config) as worker:
        await worker.wait_connected(15)
        await wait_for(lambda: _rows_are(timescale_dsn, 2300), 30, "the 300 queued rows")

        async def settled() -> bool:  # all 300 received, none pending: nothing more to write
            return worker.metrics.received >= 300 and not worker.pipeline.pending

        await wait_for(settled, 10, "every queued message settled")
    assert await count(timescale_dsn, TABLE) == 2300


async def _rows_are(dsn: str, n: int) -> bool:
    return await count(dsn, TABLE) >= n
