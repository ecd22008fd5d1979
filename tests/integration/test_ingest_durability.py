"""Whatever crashes, every row exactly once: `fieldline ingest run` as a real process, killed,
its database stopped, its broker restarted, two of them sharing the load, stopped gently."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from certs import Role
from ingest_worker.maintenance import apply_retention
from ingest_worker.migrate import RetentionMode, add_tenant
from ingest_worker.service import IngestWorker
from tests.fixtures.brokers import KINDS, BrokerUnderTest
from tests.fixtures.ingest import (
    burst,
    count,
    fetchval,
    start_worker,
    wait_for,
    worker_config,
)
from tests.fixtures.postgres import PgServer, start_cluster, stop_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TABLE = "tenant_acme.numeric_values"


def stream(
    start: int, n: int, device: str = "dev-1", tenant: str = "acme"
) -> list[tuple[str, bytes]]:
    """n telemetry messages, one row each, every one with its own `ts` (so each row is unique)."""
    base = int(time.time() * 1000) - 3_600_000
    return [
        (
            f"fl/{tenant}/{device}/telemetry",
            json.dumps({"ts": base + i, "metrics": {"v": i}}).encode(),
        )
        for i in range(start, start + n)
    ]


async def exactly(dsn: str, n: int, timeout: float, table: str = TABLE) -> None:
    """Wait for n rows, then check none more arrive and all are distinct."""

    async def enough() -> bool:
        return await count(dsn, table) >= n

    await wait_for(enough, timeout, f"{n} rows in {table}", every=0.25)
    await asyncio.sleep(1.0)
    assert await count(dsn, table) == n
    distinct = await fetchval(dsn, f"SELECT count(DISTINCT (metric_id, time)) FROM {table}")  # noqa: S608
    assert distinct == n


@pytest.mark.parametrize("kind", KINDS)
async def test_kill_9_mid_stream_loses_and_duplicates_nothing(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str, tmp_path: Path, kind: str
) -> None:
    # the defaults must queue what arrives while the worker is dead (README: broker settings):
    # a device's queue (10,000) would not; the service's (200,000) must
    broker = broker_factory(kind)
    worker = start_worker(broker, timescale_dsn, tmp_path / "w1")
    messages = stream(0, 20_000)
    publisher = threading.Thread(target=burst, args=(broker, broker.pki.device, messages))
    publisher.start()
    try:
        await wait_for(lambda: _at_least(timescale_dsn, 3000), 60, "the first 3,000 rows")
        worker.kill()  # SIGKILL mid-stream: no drain, no acknowledgements flushed
        killed_at = await count(timescale_dsn, TABLE)
        assert killed_at < 20_000, "the stream had ended before the kill: nothing was tested"
    finally:
        publisher.join(120)
    worker = start_worker(broker, timescale_dsn, tmp_path / "w2")
    try:
        await exactly(timescale_dsn, 20_000, 120)
    finally:
        worker.stop()


async def _at_least(dsn: str, n: int) -> bool:
    return await count(dsn, TABLE) >= n


async def test_postgres_down_for_10_s_mid_stream(
    broker_factory: Callable[..., BrokerUnderTest], tmp_path: Path
) -> None:
    cluster, scratch = await asyncio.to_thread(start_cluster, "fl-test-pgdown-")
    try:
        dsn = cluster.dsn()
        broker = broker_factory("mosquitto")
        worker = start_worker(broker, dsn, tmp_path / "w")
        messages = stream(0, 6000)

        def pace() -> None:
            for i in range(
                0, len(messages), 200
            ):  # ~800 msg/s for ~8 s, on both sides of the outage
                burst(broker, broker.pki.device, messages[i : i + 200])
                time.sleep(0.25)

        publisher = threading.Thread(target=pace)
        publisher.start()
        await wait_for(lambda: _at_least(dsn, 500), 30, "rows before the outage")
        await cluster.stop()
        await asyncio.sleep(10)
        await cluster.start()
        publisher.join(120)
        await exactly(dsn, 6000, 90)
        assert worker.proc.poll() is None, "the worker recovered by itself, without a restart"
        assert "event=db_retry" in worker.log_text()
        assert worker.metrics()["fieldline_ingest_db_retries_total"] >= 1
        worker.stop()
    finally:
        await asyncio.to_thread(stop_cluster, cluster, scratch)


async def test_worker_memory_stays_bounded_with_the_database_down(
    broker_factory: Callable[..., BrokerUnderTest], tmp_path: Path
) -> None:
    """Publishing at full speed with PostgreSQL down, 1 in 40 messages a 300 kB payload: the
    worker stops reading at its byte bound (16 MiB here) instead of holding the broker's whole
    window (10,000 messages, ~75 MB), stays under 300 MB of RSS, stores everything once later."""
    bound = 16 * 1024 * 1024
    junk = b"x" * 300_000  # too large for a payload: a dead letter once the database is back
    cluster, scratch = await asyncio.to_thread(start_cluster, "fl-test-pgmem-")
    try:
        dsn = cluster.dsn()
        broker = broker_factory("mosquitto")
        env = {"FIELDLINE_INGEST__QUEUE_MAX_BYTES": str(bound)}
        worker = start_worker(broker, dsn, tmp_path / "w", env=env)
        burst(broker, broker.pki.device, stream(0, 10))
        await exactly(dsn, 10, 30)
        await cluster.stop()
        good = stream(10, 19_000)
        peak_rss, peak_held = 0.0, 0.0

        def pace() -> None:  # 19,500 messages, 150 MB: within Mosquitto's queue bytes
            for i in range(0, len(good), 195):
                mixed = good[i : i + 195] + [("fl/acme/dev-1/telemetry", junk)] * 5
                burst(broker, broker.pki.device, mixed)
                time.sleep(0.05)

        publisher = threading.Thread(target=pace)
        publisher.start()
        while publisher.is_alive():
            peak_rss = max(peak_rss, _rss_mib(worker.proc.pid))
            peak_held = max(peak_held, worker.metrics()["fieldline_ingest_queue_bytes"])
            await asyncio.sleep(0.25)
        publisher.join()
        peak_rss = max(peak_rss, _rss_mib(worker.proc.pid))
        await cluster.start()
        await exactly(dsn, 19_010, 120)
        assert peak_held <= bound + len(junk), f"held {peak_held / 2**20:.1f} MiB"
        assert peak_held >= bound / 2, "the attack never reached the bound: it tested nothing"
        assert peak_rss < 300, f"worker RSS reached {peak_rss:.0f} MiB"
        assert worker.metrics()['fieldline_ingest_receive_pauses_total{bound="bytes"}'] >= 1
        worker.stop()
    finally:
        await asyncio.to_thread(stop_cluster, cluster, scratch)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_broker_restart_with_persistence_loses_nothing(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "mosquitto-data").mkdir()
    broker = broker_factory("mosquitto", persistence_dir=tmp_path / "mosquitto-data")
    worker = start_worker(broker, timescale_dsn, tmp_path / "w1")
    assert worker.stop() == 0  # its session stays on the broker, with nobody reading it
    await asyncio.to_thread(burst, broker, broker.pki.device, stream(0, 3000))
    broker.restart()  # the queued 3,000 survive only in Mosquitto's persistence file
    worker = start_worker(broker, timescale_dsn, tmp_path / "w2")
    try:
        await exactly(timescale_dsn, 3000, 60)
        # and mid-stream: the broker goes away under a running worker, which reconnects
        await asyncio.to_thread(burst, broker, broker.pki.device, stream(3000, 2000))
        broker.restart()
        await asyncio.to_thread(burst, broker, broker.pki.device, stream(5000, 2000))
        await exactly(timescale_dsn, 7000, 60)
        assert worker.proc.poll() is None
    finally:
        worker.stop()


async def test_two_workers_share_the_load(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str, tmp_path: Path
) -> None:
    broker = broker_factory("mosquitto")
    pki = broker.pki
    pki.pki.issue("ingest-2", tenant="platform", role=Role.SERVICE, force=True)
    broker.apply_registry()
    workers = [
        start_worker(broker, timescale_dsn, tmp_path / "w1", "--share-group", "ingest"),
        start_worker(
            broker, timescale_dsn, tmp_path / "w2", "--share-group", "ingest",
            env={"FIELDLINE_INGEST__IDENTITY": "ingest-2"},
        ),
    ]  # fmt: skip
    try:
        await asyncio.gather(
            asyncio.to_thread(burst, broker, pki.device, stream(0, 2000, "dev-1")),
            asyncio.to_thread(burst, broker, pki.device2, stream(0, 2000, "dev-2")),
        )
        await exactly(timescale_dsn, 4000, 60)
        received = [w.metrics()["fieldline_ingest_messages_received_total"] for w in workers]
        assert all(r > 0 for r in received), f"one worker got nothing: {received}"
        assert sum(received) == 4000, received  # split, not copied
    finally:
        for worker in workers:
            worker.stop()


async def test_sigterm_commits_acknowledges_and_disconnects(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str, tmp_path: Path
) -> None:
    broker = broker_factory("mosquitto")
    worker = start_worker(broker, timescale_dsn, tmp_path / "w1")
    publisher = threading.Thread(target=burst, args=(broker, broker.pki.device, stream(0, 10_000)))
    publisher.start()
    await wait_for(lambda: _at_least(timescale_dsn, 1000), 60, "rows before SIGTERM")
    assert worker.stop() == 0
    committed = await count(timescale_dsn, TABLE)
    log = worker.log_text()
    assert "event=stopped drained=True" in log
    publisher.join(120)
    worker = start_worker(broker, timescale_dsn, tmp_path / "w2")
    try:
        await exactly(timescale_dsn, 10_000, 60)
        # what the first worker committed it had acknowledged: none of it came again
        assert worker.metrics()["fieldline_ingest_messages_received_total"] == 10_000 - committed
    finally:
        worker.stop()


async def test_retention_drops_old_chunks(pg_server: PgServer) -> None:
    dsn = await asyncio.to_thread(pg_server.new_database, "ret")
    conn = await asyncpg.connect(dsn)
    try:
        await add_tenant(conn, "acme", retention_days=7)
        await conn.execute("INSERT INTO tenant_acme.devices (id) VALUES ('dev-1')")
        metric = await conn.fetchval(
            "INSERT INTO tenant_acme.metrics (device_id, name, kind) "
            "VALUES ('dev-1', 't', 'numeric') RETURNING id"
        )
        await conn.execute(
            "INSERT INTO tenant_acme.numeric_values (time, metric_id, value) "
            "SELECT now() - make_interval(days => d), $1, d FROM generate_series(0, 30) AS d",
            metric,
        )
        dropped = await apply_retention(conn, RetentionMode.DROP_CHUNKS)
        assert dropped["acme"] > 0
        kept = await conn.fetch("SELECT value FROM tenant_acme.numeric_values ORDER BY value")
        # chunks are dropped whole: everything older than a chunk past 7 days is gone
        assert [r["value"] for r in kept][:7] == [float(d) for d in range(7)]
        assert max(r["value"] for r in kept) <= 8.0
    finally:
        await conn.close()


async def test_the_worker_applies_retention_on_its_schedule(
    broker: BrokerUnderTest, timescale_dsn: str
) -> None:
    conn = await asyncpg.connect(timescale_dsn)
    try:
        await add_tenant(conn, "acme", retention_days=2)
        await conn.execute("INSERT INTO tenant_acme.devices (id) VALUES ('dev-1')")
        metric = await conn.fetchval(
            "INSERT INTO tenant_acme.metrics (device_id, name, kind) "
            "VALUES ('dev-1', 't', 'numeric') RETURNING id"
        )
        await conn.execute(
            "INSERT INTO tenant_acme.numeric_values (time, metric_id, value) "
            "VALUES (now() - interval '30 days', $1, 1), (now(), $1, 2)",
            metric,
        )
    finally:
        await conn.close()
    config = worker_config(broker, timescale_dsn, retention_every_s=0.5, offline_after_s=2.0)
    async with IngestWorker(config) as worker:
        await wait_for(lambda: _values_left(timescale_dsn, 1), 15, "the old chunk dropped")
        # the run is counted once it has been through every tenant, a moment after the drop
        await wait_for(lambda: _retention_counted(worker), 15, "the retention run counted")


async def _retention_counted(worker: IngestWorker) -> bool:
    runs = worker.metrics.registry.get_sample_value(
        "fieldline_ingest_retention_runs_total", {"result": "ok"}
    )
    return (runs or 0) >= 1


async def _values_left(dsn: str, n: int) -> bool:
    return await count(dsn, TABLE) == n


def _check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fieldline", "ingest", "check", *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip


async def test_check_says_healthy_or_why_not(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str, tmp_path: Path
) -> None:
    broker = broker_factory("mosquitto")
    worker = start_worker(broker, timescale_dsn, tmp_path / "w")
    env = {**os.environ, **worker.env}
    healthy = await asyncio.to_thread(_check, env)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "healthy" in healthy.stdout
    worker.stop()
    down = await asyncio.to_thread(_check, env)
    assert down.returncode == 1
    assert "no worker answers" in down.stdout
