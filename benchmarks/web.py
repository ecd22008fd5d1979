"""The 24 h chart of a 1 Hz metric through the HTTP API vs fetching every raw row.

    python -m benchmarks.web                 # 86,400 rows, points=500, median of 15
    python -m benchmarks.web --repeats 30 --points 1000

A throwaway PostgreSQL + TimescaleDB cluster (core.pgcluster.EmbeddedPostgres) on this
machine, one tenant with one device and one numeric metric loaded with COPY: 86,400 rows,
one a second over the last 24 h. A real `web.server.WebServer` on a free loopback port.
Timed, each the median (and min/max) of --repeats after one warm-up:

* `api`: GET /api/v1/tenants/t/devices/d/metrics/temp?since=24h&points=N over HTTP with a
  viewer token (auth, the time_bucket query, JSON): what the console's chart waits for;
* `raw SQL`: SELECT time, value of the 86,400 rows over one asyncpg connection (no HTTP);
* `raw JSON`: the same rows as JSON, as an API without downsampling would have to send.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx

from core.pgcluster import EmbeddedPostgres
from core.settings import Settings
from ingest_worker.migrate import add_tenant, tenant_schema
from web.server import WebServer
from web.tokens import TokenRole, create_token


async def _time(work: Callable[[], Awaitable[object]], repeats: int) -> list[float]:
    await work()  # warm-up: caches, pool, plans
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        await work()
        out.append(time.perf_counter() - started)
    return out


def _line(label: str, times: list[float], extra: str) -> str:
    ms = [t * 1000 for t in times]
    return (f"{label:10} median {statistics.median(ms):8.1f} ms  min {min(ms):8.1f}  "
            f"max {max(ms):8.1f}  {extra}")  # fmt: skip


# no rate limit: the benchmark asks as fast as answers come
BENCH_WEB = {"port": 0, "rate_per_s": 1e6, "rate_burst": 1_000_000}


def _scratch() -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="fl-bench-web-"))
    scratch.chmod(0o711)  # the server may run as `postgres`
    return scratch


async def run(rows: int, points: int, repeats: int) -> None:
    scratch = _scratch()
    pg = EmbeddedPostgres(scratch / "pg", durable=False)
    await pg.start()
    try:
        conn = await asyncpg.connect(pg.dsn())
        await add_tenant(conn, "t")
        schema = tenant_schema("t")
        await conn.execute(f"INSERT INTO \"{schema}\".devices (id, status) VALUES ('d', 'online')")  # noqa: S608
        metric = await conn.fetchval(
            f'INSERT INTO "{schema}".metrics (device_id, name, kind) '  # noqa: S608
            "VALUES ('d', 'temp', 'numeric') RETURNING id"
        )
        now = datetime.now(UTC)
        records = [(now - timedelta(seconds=rows - i), metric, 20 + 5 * math.sin(i / 3600))
                   for i in range(rows)]  # fmt: skip
        await conn.copy_records_to_table("numeric_values", schema_name=schema, records=records,
                                         columns=["time", "metric_id", "value"])  # fmt: skip
        await conn.execute(f'ANALYZE "{schema}".numeric_values')
        _record, token = await create_token(conn, TokenRole.VIEWER, "t", "bench")
        settings = Settings(home=scratch / "home", database_url=pg.dsn(),
                            web=BENCH_WEB)  # fmt: skip
        server = WebServer(settings, host="127.0.0.1", port=0, dsn=pg.dsn())
        await server.start()
        try:
            url = f"{server.url}api/v1/tenants/t/devices/d/metrics/temp"
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(headers=headers, timeout=60) as client:
                sizes: list[int] = []

                async def api() -> None:
                    response = await client.get(url, params={"since": "24h", "points": points})
                    response.raise_for_status()
                    sizes.append(len(response.content))

                api_times = await _time(api, repeats)
                got = len((await client.get(url, params={"points": points})).json()["points"])
            raw_sql = f'SELECT time, value FROM "{schema}".numeric_values WHERE metric_id = $1 '  # noqa: S608
            raw_sql += "AND time > now() - interval '24 hours' ORDER BY time"
            raw_bytes: list[int] = []

            async def raw() -> None:
                await conn.fetch(raw_sql, metric)

            async def raw_json() -> None:
                fetched = await conn.fetch(raw_sql, metric)
                body = json.dumps([{"t": r["time"].isoformat(), "v": r["value"]} for r in fetched])
                raw_bytes.append(len(body))

            raw_times = await _time(raw, repeats)
            json_times = await _time(raw_json, repeats)
        finally:
            await server.stop()
            await conn.close()
        print(f"{rows:,} rows of one 1 Hz metric over 24 h; points={points}; {repeats} repeats")
        print(_line("api", api_times, f"{got} buckets, {sizes[-1]:,} bytes of JSON"))
        print(_line("raw SQL", raw_times, f"{rows:,} rows"))
        print(_line("raw JSON", json_times, f"{raw_bytes[-1]:,} bytes of JSON"))
    finally:
        await pg.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=86_400, help="1 Hz rows (86,400 = 24 h)")
    parser.add_argument("--points", type=int, default=500, help="points= of the API call")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of each")
    args = parser.parse_args()
    asyncio.run(run(args.rows, args.points, args.repeats))


if __name__ == "__main__":
    main()
