"""Storage scales out by tenant (docs/design.md): a tenant routed to its own database has its
rows there, and only there; the everyday commands follow the same routing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.ingest import burst, fetchval, start_worker
from tests.fixtures.postgres import PgServer
from tests.fixtures.prereq import missing
from tests.integration.test_ingest_durability import stream

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _scalar(dsn: str, sql: str) -> int | None:
    """A count, or None when the table does not exist in that database."""

    async def run() -> int | None:
        exists = await fetchval(dsn, "SELECT to_regclass($1) IS NOT NULL", sql.split()[-1])
        if not exists:
            return None
        return int(await fetchval(dsn, sql))

    return asyncio.run(run())


def test_a_tenant_routed_to_its_own_database_lands_there_only(
    broker_factory: Callable[..., BrokerUnderTest], pg_server: PgServer, tmp_path: Path
) -> None:
    if not pg_server.timescaledb:
        missing("TimescaleDB is not installed for this PostgreSQL (make setup builds it)")
    main_dsn = pg_server.new_database("ts")
    globex_dsn = pg_server.new_database("ts")
    broker = broker_factory("fieldline")
    routes = json.dumps({"globex": globex_dsn})
    worker = start_worker(
        broker, main_dsn, tmp_path / "worker", env={"FIELDLINE_TENANT_DATABASES": routes}
    )
    try:
        burst(broker, broker.pki.device, stream(0, 100))
        burst(
            broker, broker.pki.device_other_tenant, stream(0, 50, device="dev-9", tenant="globex")
        )
        deadline = time.monotonic() + 30
        acme = "SELECT count(*) FROM tenant_acme.numeric_values"
        globex = "SELECT count(*) FROM tenant_globex.numeric_values"
        while (_scalar(main_dsn, acme), _scalar(globex_dsn, globex)) != (100, 50):
            assert time.monotonic() < deadline, (
                _scalar(main_dsn, acme),
                _scalar(globex_dsn, globex),
            )
            time.sleep(0.25)
        assert _scalar(main_dsn, globex) is None, "globex's rows must not reach the main database"
        assert _scalar(globex_dsn, acme) is None, "nor acme's the globex one"
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "FIELDLINE_DATABASE_URL": main_dsn,
            "FIELDLINE_TENANT_DATABASES": routes,
        }
        for tenant, device in (("globex", "dev-9"), ("acme", "dev-1")):
            listed = subprocess.run(
                [sys.executable, "-m", "fieldline", "devices", "list", tenant, "--json"],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert listed.returncode == 0, listed.stderr
            assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [device]
    finally:
        worker.stop()
