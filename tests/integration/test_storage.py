"""Migrations on a real PostgreSQL + TimescaleDB: hypertables, idempotence, tenant isolation."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingest_worker.errors import StorageError
from ingest_worker.migrate import (
    RetentionMode,
    Scope,
    add_tenant,
    list_tenants,
    load_migrations,
    migrate_all,
    migrate_shared,
    reader_role,
)
from tests.fixtures.postgres import start_cluster, stop_cluster

SHARED = load_migrations(Scope.SHARED)
TENANT = load_migrations(Scope.TENANT)

pytestmark = pytest.mark.integration


async def _schema_snapshot(conn: asyncpg.Connection) -> dict[str, Any]:
    """Everything a migration could change: columns, indexes, hypertables, recorded versions."""
    columns = await conn.fetch(
        "SELECT table_schema, table_name, column_name, data_type, column_default "
        "FROM information_schema.columns WHERE table_schema NOT IN "
        "('pg_catalog', 'information_schema') AND table_schema NOT LIKE '\\_timescaledb%' "
        "AND table_schema NOT LIKE 'timescaledb\\_%' "
        "ORDER BY 1, 2, 3"
    )
    indexes = await conn.fetch(
        "SELECT schemaname, indexname, indexdef FROM pg_indexes "
        "WHERE schemaname IN ('fieldline') OR schemaname LIKE 'tenant\\_%' ORDER BY 1, 2"
    )
    versions = await conn.fetch(
        "SELECT scope, version, checksum FROM fieldline.schema_migrations ORDER BY 1, 2"
    )
    return {
        "columns": [tuple(r) for r in columns],
        "indexes": [tuple(r) for r in indexes],
        "versions": [tuple(r) for r in versions],
        "hypertables": await _hypertables(conn),
    }


async def _hypertables(conn: asyncpg.Connection) -> set[str]:
    has_ts = await conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
    if not has_ts:
        return set()
    rows = await conn.fetch(
        "SELECT hypertable_schema || '.' || hypertable_name AS name "
        "FROM timescaledb_information.hypertables"
    )
    return {r["name"] for r in rows}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with(dsn: str, work: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await work(conn)
    finally:
        await conn.close()


def test_migrations_create_hypertables_and_time_bucket_works(timescale_dsn: str) -> None:
    async def work(conn: asyncpg.Connection) -> None:
        report = await add_tenant(conn, "acme")
        assert report.capabilities.timescaledb is not None
        assert "fieldline:0001_core" in report.applied
        assert "tenant:acme:0001_core" in report.applied
        assert await _hypertables(conn) == {
            "fieldline.dead_letters",
            "tenant_acme.numeric_values",
            "tenant_acme.text_values",
            "tenant_acme.events",
        }
        await conn.execute("INSERT INTO tenant_acme.devices (id) VALUES ('dev-1')")
        metric = await conn.fetchval(
            "INSERT INTO tenant_acme.metrics (device_id, name, unit, kind) "
            "VALUES ('dev-1', 'temperature', 'degC', 'numeric') RETURNING id"
        )
        base = datetime(2026, 11, 1, tzinfo=UTC)
        times = [base + timedelta(seconds=10 * i) for i in range(12)]
        await conn.execute(
            "INSERT INTO tenant_acme.numeric_values (time, metric_id, value) "
            "SELECT t, $2, v FROM unnest($1::timestamptz[], $3::float8[]) AS u(t, v)",
            times,
            metric,
            [float(i) for i in range(12)],
        )
        buckets = await conn.fetch(
            "SELECT time_bucket('1 minute', time) AS b, avg(value) AS a, count(*) AS n "
            "FROM tenant_acme.numeric_values GROUP BY b ORDER BY b"
        )
        assert [(r["n"], r["a"]) for r in buckets] == [(6, 2.5), (6, 8.5)]

    run(_with(timescale_dsn, work))


def test_running_migrations_twice_changes_nothing(timescale_dsn: str) -> None:
    async def work(conn: asyncpg.Connection) -> None:
        await add_tenant(conn, "acme")
        before = await _schema_snapshot(conn)
        again = await migrate_all(conn)
        assert again.applied == []
        assert "tenant:acme:0001_core" in again.skipped
        assert await _schema_snapshot(conn) == before
        # add_tenant on an existing tenant is also a no-op
        assert (await add_tenant(conn, "acme")).applied == []
        assert await _schema_snapshot(conn) == before

    run(_with(timescale_dsn, work))


def test_redelivered_rows_are_not_duplicated(timescale_dsn: str) -> None:
    """The unique (metric_id, time) key is what makes the ingest worker's redelivery safe."""

    async def work(conn: asyncpg.Connection) -> None:
        await add_tenant(conn, "acme")
        await conn.execute("INSERT INTO tenant_acme.devices (id) VALUES ('dev-1')")
        metric = await conn.fetchval(
            "INSERT INTO tenant_acme.metrics (device_id, name, kind) "
            "VALUES ('dev-1', 't', 'numeric') RETURNING id"
        )
        now = datetime.now(UTC)
        times = [now - timedelta(seconds=i) for i in range(100)]
        insert = (
            "INSERT INTO tenant_acme.numeric_values (time, metric_id, value) "
            "SELECT t, $2, v FROM unnest($1::timestamptz[], $3::float8[]) AS u(t, v) "
            "ON CONFLICT DO NOTHING"
        )
        values = [float(i) for i in range(100)]
        assert await conn.execute(insert, times, metric, values) == "INSERT 0 100"
        assert await conn.execute(insert, times, metric, values) == "INSERT 0 0"
        assert await conn.fetchval("SELECT count(*) FROM tenant_acme.numeric_values") == 100

    run(_with(timescale_dsn, work))


def test_tenant_schemas_are_isolated(timescale_dsn: str) -> None:
    async def work(conn: asyncpg.Connection) -> None:
        await add_tenant(conn, "acme")
        await add_tenant(conn, "globex", retention_days=30)
        await conn.execute("INSERT INTO tenant_acme.devices (id, fw) VALUES ('dev-1', '1.0')")
        assert await conn.fetchval("SELECT count(*) FROM tenant_globex.devices") == 0
        tenants = {t.id: t for t in await list_tenants(conn)}
        assert set(tenants) == {"acme", "globex"}
        assert tenants["globex"].retention_days == 30
        assert tenants["acme"].schema_name == "tenant_acme"

        # each tenant's read-only role sees its own schema and nothing else
        async def as_reader(sql: str) -> object:
            async with conn.transaction():
                await conn.execute(f'SET LOCAL ROLE "{reader_role("acme")}"')
                return await conn.fetchval(sql)

        assert await as_reader("SELECT fw FROM tenant_acme.devices") == "1.0"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await as_reader("SELECT count(*) FROM tenant_globex.devices")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await as_reader("INSERT INTO tenant_acme.devices (id) VALUES ('dev-2')")

    run(_with(timescale_dsn, work))


def test_apache_licence_is_detected_and_drop_chunks_works(timescale_dsn: str) -> None:
    async def work(conn: asyncpg.Connection) -> None:
        report = await add_tenant(conn, "acme")
        licence = await conn.fetchval("SHOW timescaledb.license")
        assert report.capabilities.license == licence
        expected = RetentionMode.POLICY if licence == "timescale" else RetentionMode.DROP_CHUNKS
        assert report.capabilities.retention is expected

        await conn.execute("INSERT INTO tenant_acme.devices (id) VALUES ('dev-1')")
        metric = await conn.fetchval(
            "INSERT INTO tenant_acme.metrics (device_id, name, kind) "
            "VALUES ('dev-1', 't', 'numeric') RETURNING id"
        )
        now = datetime.now(UTC)
        await conn.execute(
            "INSERT INTO tenant_acme.numeric_values VALUES ($1, $3, 1), ($2, $3, 2)",
            now - timedelta(days=40),
            now,
            metric,
        )
        dropped = await conn.fetch(
            "SELECT drop_chunks('tenant_acme.numeric_values', older_than => INTERVAL '30 days')"
        )
        assert len(dropped) == 1
        assert await conn.fetchval("SELECT count(*) FROM tenant_acme.numeric_values") == 1

    run(_with(timescale_dsn, work))


def test_concurrent_migrators_do_not_collide(timescale_dsn: str) -> None:
    async def one() -> None:
        conn = await asyncpg.connect(timescale_dsn)
        try:
            await add_tenant(conn, "acme")
        finally:
            await conn.close()

    async def both() -> None:
        await asyncio.gather(one(), one(), one())

    run(both())

    async def check(conn: asyncpg.Connection) -> None:
        rows = await conn.fetch("SELECT scope FROM fieldline.schema_migrations ORDER BY scope")
        expected = ["fieldline"] * len(SHARED) + ["tenant:acme"] * len(TENANT)
        assert [r["scope"] for r in rows] == expected  # each migration once, not three times

    run(_with(timescale_dsn, check))


@pytest.mark.parametrize(
    ("tenant", "fragment"),
    [("Acme", "tenant id"), ("a/b", "'/'"), ("", "empty"), ("x" * 65, "64")],
)
def test_bad_tenant_ids_are_refused(pg_dsn: str, tenant: str, fragment: str) -> None:
    async def work(conn: asyncpg.Connection) -> None:
        with pytest.raises(StorageError, match=None) as info:
            await add_tenant(conn, tenant)
        assert fragment in str(info.value)

    run(_with(pg_dsn, work))


def test_bad_chunk_interval_is_refused(pg_dsn: str) -> None:
    async def work(conn: asyncpg.Connection) -> None:
        with pytest.raises(StorageError, match="chunk interval"):
            await add_tenant(conn, "acme", chunk_interval="1 day; DROP TABLE x")

    run(_with(pg_dsn, work))


def test_without_timescaledb_tables_are_plain_with_a_warning() -> None:
    # the extension is installed but not preloaded: the server is plain PostgreSQL
    cluster, scratch = start_cluster(
        "fl-test-plainpg-", extra_settings={"shared_preload_libraries": "''"}
    )
    try:

        async def work(conn: asyncpg.Connection) -> None:
            report = await add_tenant(conn, "acme")
            assert report.capabilities.timescaledb is None
            assert report.capabilities.retention is RetentionMode.DELETE
            assert any("TimescaleDB is not available" in w for w in report.warnings)
            assert await _hypertables(conn) == set()
            await conn.execute("INSERT INTO tenant_acme.devices (id) VALUES ('dev-1')")
            assert await conn.fetchval("SELECT count(*) FROM tenant_acme.devices") == 1
            hyper = await conn.fetch(
                "SELECT hypertables FROM fieldline.schema_migrations ORDER BY scope"
            )
            assert [r["hypertables"] for r in hyper] == [False] * (len(SHARED) + len(TENANT))

        run(_with(cluster.dsn(), work))
    finally:
        stop_cluster(cluster, scratch)


def test_migrate_shared_reports_capabilities(timescale_dsn: str) -> None:
    async def work(conn: asyncpg.Connection) -> None:
        first = await migrate_shared(conn)
        second = await migrate_shared(conn)
        labels = [f"fieldline:{m.version:04d}_{m.name}" for m in SHARED]
        assert labels[0] == "fieldline:0001_core"
        assert first.applied == labels
        assert second.applied == []
        assert second.skipped == labels

    run(_with(timescale_dsn, work))


def _fieldline(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fieldline", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def test_cli_against_a_database_url(timescale_dsn: str, tmp_path: Path) -> None:
    env = {**os.environ, "FIELDLINE_DATABASE_URL": timescale_dsn, "FIELDLINE_HOME": str(tmp_path)}
    init = _fieldline(["db", "init"], env, tmp_path)
    assert init.returncode == 0, init.stderr
    assert "applied fieldline:0001_core" in init.stdout
    add = _fieldline(["db", "tenants", "add", "acme", "--retention-days", "90"], env, tmp_path)
    assert add.returncode == 0, add.stderr
    assert "tenant acme ready" in add.stdout
    again = _fieldline(["db", "init"], env, tmp_path)
    assert "up to date" in again.stdout
    listed = _fieldline(["db", "tenants", "list", "--json"], env, tmp_path)
    assert [(t["id"], t["retention_days"]) for t in json.loads(listed.stdout)] == [("acme", 90)]
    url = _fieldline(["db", "url"], env, tmp_path)
    assert "***" in url.stdout
    assert timescale_dsn.split("@")[0].split(":")[-1] not in url.stdout  # the password
    bad = _fieldline(["db", "tenants", "add", "Bad/Tenant"], env, tmp_path)
    assert bad.returncode == 2
    assert "tenant id" in bad.stderr
    assert "Traceback" not in bad.stderr


def _alive(pid: int) -> bool:
    # the postmaster is reparented to PID 1, which may not reap it here: a zombie is dead
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_cli_embedded_cluster_lifecycle() -> None:
    from tests.fixtures.postgres import _scratch_dir

    home = _scratch_dir("fl-test-home-")
    env = {k: v for k, v in os.environ.items() if k != "FIELDLINE_DATABASE_URL"}
    env["FIELDLINE_HOME"] = str(home / "home")
    try:
        not_running = _fieldline(["db", "init"], env, home)
        assert not_running.returncode == 2
        assert "fieldline db start" in not_running.stderr

        started = _fieldline(["db", "start"], env, home)
        assert started.returncode == 0, started.stderr
        assert "PostgreSQL running" in started.stdout
        assert (home / "home" / "pg" / "password").stat().st_mode & 0o777 == 0o600
        assert _fieldline(["db", "init"], env, home).returncode == 0
        assert _fieldline(["db", "tenants", "add", "acme"], env, home).returncode == 0
        status = _fieldline(["db", "status"], env, home)
        assert "TimescaleDB" in status.stdout
        assert "1 tenant(s): acme" in status.stdout
        pid_file = home / "home" / "pg" / "data" / "postmaster.pid"
        pid = int(pid_file.read_text().splitlines()[0])

        assert _fieldline(["db", "stop"], env, home).returncode == 0
        assert not pid_file.exists()
        assert not _alive(pid)

        # a second start reuses the same data
        assert _fieldline(["db", "start"], env, home).returncode == 0
        listed = _fieldline(["db", "tenants", "list", "--json"], env, home)
        assert [t["id"] for t in json.loads(listed.stdout)] == ["acme"]
    finally:
        _fieldline(["db", "stop"], env, home)
        import shutil

        shutil.rmtree(home, ignore_errors=True)
