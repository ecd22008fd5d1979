"""Storage: bytes per sample after compaction, reads compacted vs not, compaction throughput.

    python -m benchmarks.storage                      # 20 ARMA metrics x 31 days at 1/min
    python -m benchmarks.storage --metrics 100 --days 31 --uci-copies 200

A throwaway PostgreSQL + TimescaleDB cluster (core.pgcluster.EmbeddedPostgres) on this
machine; two tenants, loaded with COPY into `numeric_values` as the worker stores rows:

* `arma`: the simulator's shipped models (simulator/models/: temperature and humidity,
  fitted on the UCI occupancy data, quantised to their resolution), half the metrics each,
  one sample a minute;
* `uci`: the real UCI occupancy values the models were fitted on. Only the 16-minute
  subset (509 rows, 4 columns) shipped by the `river` package is on this machine; its
  values are replayed at one sample a minute (the cadence of the full UCI set) into
  --uci-copies metrics, each copy starting at another row. The 4 columns are temperature
  (2 decimals), humidity (3 decimals), light and CO2 (mostly 1-2 decimals).

For each tenant: the bytes of `numeric_values` (heap, TOAST, both indexes:
hypertable_size) per sample; compaction (`ingest_worker.compaction.compact_tenant`, all
rows older than 1 day) with its rows/s and CPU (this process and the PostgreSQL backend,
from /proc); VACUUM; the bytes of `numeric_packed` per sample; and the time to read one
metric over 1 day and over 30 days (median of --repeats), uncompacted (the plain table, and
through `numeric_series`) and compacted (through `numeric_series`), side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from core.pgcluster import EmbeddedPostgres
from ingest_worker.compaction import compact_tenant
from ingest_worker.migrate import add_tenant
from simulator.arma import default_model
from simulator.engine import Engine

STEP = timedelta(minutes=1)


def _uci_csv() -> Path:
    import river  # the dev extra; the data file the shipped models were fitted on

    return Path(river.__file__).parent / "drift" / "datasets" / "occupancy.csv"


def uci_columns() -> list[list[float]]:
    """The 4 value columns of the river copy of the UCI occupancy data, as read."""
    with _uci_csv().open() as f:
        rows = list(csv.DictReader(f))
    return [[float(r[c]) for r in rows] for c in ("V1", "V2", "V3", "V4")]


def arma_rows(metrics: int, samples: int, start: datetime) -> list[tuple[Any, ...]]:
    """`metrics` ARMA sensors (temperature and humidity alternately), time-major."""
    engine = Engine(seed=42)
    handles = []
    for i in range(metrics):
        handles.append(engine.add(default_model("temperature" if i % 2 else "humidity")))
    idx = np.array(handles)
    rows: list[tuple[Any, ...]] = []
    for t in range(samples):
        when = start + t * STEP
        values = engine.step()[idx]
        rows.extend((when, m + 1, float(v), False) for m, v in enumerate(values))
    return rows


def uci_rows(copies: int, samples: int, start: datetime) -> list[tuple[Any, ...]]:
    """`copies` metrics replaying the UCI columns at 1/min, each from another offset;
    time-major, as a worker stores them (every sensor's minute, then the next minute)."""
    cols = uci_columns()
    rows: list[tuple[Any, ...]] = []
    for t in range(samples):
        when = start + t * STEP
        for m in range(copies):
            rows.append((when, m + 1, cols[m % 4][((m // 4) * 7 + t) % len(cols[m % 4])], False))
    return rows


def _proc_cpu(pid: int) -> float:
    """utime + stime of a process, seconds (the backend runs on this machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _size(conn: asyncpg.Connection, table: str) -> int:
    # a hypertable's chunks with their indexes and TOAST; numeric_packed is a plain table
    size = await conn.fetchval("SELECT hypertable_size($1::regclass)", table)
    if size is None:
        size = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table)
    return int(size)


async def _read_ms(
    conns: dict[str, asyncpg.Connection],
    queries: dict[str, str],
    args: tuple[Any, ...],
    repeats: int,
) -> dict[str, float]:
    """Median ms of each query on each connection, all interleaved (the machine is shared:
    a burst of load then slows every variant alike), after one warm-up run each."""
    times: dict[str, list[float]] = {f"{q}_{c}": [] for q in queries for c in conns}
    for round_ in range(repeats + 1):
        for q, sql in queries.items():
            for c, conn in conns.items():
                started = time.perf_counter()
                await conn.fetch(sql, *args)
                if round_:
                    times[f"{q}_{c}"].append(time.perf_counter() - started)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


async def _load(conn: asyncpg.Connection, tenant: str, rows: list[tuple[Any, ...]]) -> float:
    await add_tenant(conn, tenant)
    started = time.perf_counter()
    await conn.copy_records_to_table(
        "numeric_values", schema_name=f"tenant_{tenant}", records=rows,
        columns=["time", "metric_id", "value", "received"],
    )  # fmt: skip
    load_s = time.perf_counter() - started
    await conn.execute(f"VACUUM ANALYZE tenant_{tenant}.numeric_values")
    return load_s


async def run_tenant(
    conn: asyncpg.Connection,
    planned: asyncpg.Connection,
    tenant: str,
    rows: list[tuple[Any, ...]],
    end: datetime,
    repeats: int,
) -> dict[str, Any]:
    """Load twice (one copy stays uncompacted), compact one, measure; the figures."""
    load_s = await _load(conn, tenant, rows)
    ref = f"tenant_{tenant}ref"
    await _load(conn, f"{tenant}ref", rows)
    schema = f"tenant_{tenant}"
    print(f"  {tenant}: loaded {len(rows):,} rows in {load_s:.1f} s (and a copy)", flush=True)
    n = len(rows)
    out: dict[str, Any] = {"tenant": tenant, "samples": n, "load_rows_per_s": n / load_s}
    out["hot_bytes_per_sample"] = await _size(conn, f"{schema}.numeric_values") / n
    queries = {
        "table": f"SELECT time, value FROM {ref}.numeric_values "  # noqa: S608
        "WHERE metric_id = $1 AND time >= $2 AND time < $3 ORDER BY time",
        "series_hot": f"SELECT time, value FROM {ref}.numeric_series($1, $2, $3) ORDER BY time",  # noqa: S608
        "series_packed": f"SELECT time, value FROM {schema}.numeric_series($1, $2, $3) "  # noqa: S608
        "ORDER BY time",
    }
    spans = {"1d": timedelta(days=1), "30d": timedelta(days=30)}
    # the metric read: 2 (humidity in arma, humidity in uci), a window ending 2 days ago (so
    # all of it is compacted afterwards), not aligned to UTC days
    ranges = {
        k: (2, end - timedelta(days=2) - span, end - timedelta(days=2)) for k, span in spans.items()
    }
    backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
    cpu0, bcpu0, wall0 = time.process_time(), _proc_cpu(backend), time.perf_counter()
    result = await compact_tenant(conn, tenant, timedelta(days=1), batch_rows=200_000)
    wall = time.perf_counter() - wall0
    out["compaction"] = {
        "rows": result.rows, "buckets": result.buckets, "seconds": wall,
        "rows_per_s": result.rows / wall, "client_cpu_s": time.process_time() - cpu0,
        "backend_cpu_s": _proc_cpu(backend) - bcpu0,
    }  # fmt: skip
    await conn.execute(f"VACUUM ANALYZE {schema}.numeric_values")
    await conn.execute(f"VACUUM ANALYZE {schema}.numeric_packed")
    packed = await conn.fetchrow(
        f"SELECT count(*) AS rows, sum(n) AS samples FROM {schema}.numeric_packed"  # noqa: S608
    )
    assert packed is not None
    out["packed_rows"] = int(packed["rows"])
    out["packed_samples"] = int(packed["samples"])
    out["packed_bytes_per_sample"] = await _size(conn, f"{schema}.numeric_packed") / int(
        packed["samples"]
    )
    hot_left = await _size(conn, f"{schema}.numeric_values")
    total_after = hot_left + await _size(conn, f"{schema}.numeric_packed")
    out["total_bytes_per_sample_after"] = total_after / n
    reads: dict[str, dict[str, float]] = {}
    # "planned": every read planned with its values, as psql and Grafana's queries are;
    # "cached": asyncpg's prepared statements, generic plans after 5 runs (fleet.series)
    conns = {"planned": planned, "cached": conn}
    for k, args in ranges.items():
        reads[k] = await _read_ms(conns, queries, args, repeats)
        expect = [tuple(r) for r in await conn.fetch(queries["table"], *args)]
        got = [tuple(r) for r in await conn.fetch(queries["series_packed"], *args)]
        reads[k]["equal"] = float(got == expect)
    out["reads_ms"] = reads
    await conn.execute(f"DROP SCHEMA {ref} CASCADE")
    return out


def show(r: dict[str, Any]) -> None:
    c = r["compaction"]
    print(
        f"\n== {r['tenant']}: {r['samples']:,} samples (COPY at {r['load_rows_per_s']:,.0f} rows/s)"
    )
    print(f"  hot table (heap + TOAST + indexes):  {r['hot_bytes_per_sample']:7.1f} B/sample")
    print(
        f"  packed table:                        {r['packed_bytes_per_sample']:7.2f} B/sample "
        f"({r['packed_rows']:,} rows, {r['packed_samples']:,} samples)"
    )
    print(
        f"  all numeric storage after:           {r['total_bytes_per_sample_after']:7.2f} B/sample"
    )
    print(
        f"  compaction: {c['rows']:,} rows in {c['seconds']:.1f} s = "
        f"{c['rows_per_s']:,.0f} rows/s; "
        f"CPU {c['client_cpu_s']:.2f} s client + {c['backend_cpu_s']:.2f} s PostgreSQL backend"
    )
    print(
        "  read one metric       table (hot)  numeric_series (hot)  numeric_series (packed)"
        "  packed/table"
    )
    for k, v in r["reads_ms"].items():
        same = "same rows" if v["equal"] else "ROWS DIFFER"
        for mode in ("planned", "cached"):
            t, h, p = (v[f"{q}_{mode}"] for q in ("table", "series_hot", "series_packed"))
            print(
                f"  {k:>4} {mode:<8}     {t:8.2f} ms   {h:12.2f} ms   {p:15.2f} ms   "
                f"{p / t:9.2f}x  ({same})"
            )


async def main_async(args: argparse.Namespace, scratch: Path) -> None:
    pg = EmbeddedPostgres(scratch / "pg", durable=False)
    await pg.start()
    try:
        conn = await asyncpg.connect(pg.dsn())
        planned = await asyncpg.connect(pg.dsn(), statement_cache_size=0)
        try:
            version = await conn.fetchval("SHOW server_version")
            ts = await conn.fetchval(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
            )
            print(f"PostgreSQL {version}, TimescaleDB {ts}")
            samples = args.days * 1440
            end = datetime(2024, 3, 1, tzinfo=UTC)
            start = end - samples * STEP
            # `end` in the past: everything but nothing is compacted by `older than 1 day`,
            # so shift the data to end now (the compactor reads now())
            now = datetime.now(UTC).replace(second=0, microsecond=0)
            start, end = start + (now - end), now
            began = time.perf_counter()
            rows = arma_rows(args.metrics, samples, start)
            print(f"ARMA data: {len(rows):,} rows made in {time.perf_counter() - began:.1f} s")
            show(await run_tenant(conn, planned, "arma", rows, end, args.repeats))
            del rows
            rows = uci_rows(args.uci_copies, samples, start)
            show(await run_tenant(conn, planned, "uci", rows, end, args.repeats))
        finally:
            await planned.close()
            await conn.close()
    finally:
        await pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--metrics", type=int, default=20, help="ARMA metrics (default 20)")
    parser.add_argument("--days", type=int, default=31, help="days at 1 sample/min (31)")
    parser.add_argument("--uci-copies", type=int, default=16, help="UCI metrics (16)")
    parser.add_argument("--repeats", type=int, default=15, help="reads timed per figure (15)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="fl-bench-storage-"))
    scratch.chmod(0o711)  # the server runs as `postgres`
    try:
        asyncio.run(main_async(args, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
