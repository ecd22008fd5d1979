"""The everyday commands as a user runs them, against a broker, an ingest worker, TimescaleDB
and a simulated machine: `devices list`, `tail`, `query` and `cmd send --wait`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.fleet import Fleet, FleetConfig
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.ingest import fetchval, start_worker, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


async def test_devices_tail_query_and_a_command_with_its_answer(
    broker_factory: object, timescale_dsn: str, tmp_path: Path
) -> None:
    broker: BrokerUnderTest = broker_factory("fieldline")  # type: ignore[operator]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FIELDLINE_HOME": str(broker.pki.pki.root.parent),
        "FIELDLINE_DATABASE_URL": timescale_dsn,
        "FIELDLINE_BROKER__HOST": broker.host,
        "FIELDLINE_BROKER__PORT": str(broker.port),
        "FIELDLINE_OPERATOR": "ops-1",
    }

    async def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "fieldline", *argv],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    worker = start_worker(broker, timescale_dsn, tmp_path / "worker")
    config = FleetConfig(
        tenant="acme", ids=("dev-1",), kind="machine", interval_s=0.2, host=broker.host,
        port=broker.port, seed=3,
    )  # fmt: skip
    fleet = Fleet(config, {"dev-1": broker.pki.device.directory}, tmp_path / "sim")
    await fleet.start(timeout=20)
    runner = asyncio.create_task(fleet.run())
    try:

        async def stored() -> bool:
            try:
                return (
                    int(
                        await fetchval(
                            timescale_dsn, "SELECT count(*) FROM tenant_acme.numeric_values"
                        )
                    )
                    > 20
                )
            except Exception:  # the tenant's schema appears with the first message
                return False

        await wait_for(stored, 30, "the machine's rows")

        listed = await cli("devices", "list", "acme", "--json")
        assert listed.returncode == 0, listed.stderr
        devices = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [d["id"] for d in devices] == ["dev-1"]
        assert devices[0]["status"] == "online"
        assert "machine_temperature" in devices[0]["metrics"]

        tailed = await cli("tail", "acme", "dev-1", "--count", "3", "--seconds", "20")
        assert tailed.returncode == 0, tailed.stderr
        lines = [json.loads(line) for line in tailed.stdout.splitlines()]
        assert len(lines) == 3
        assert all(x["device"] == "dev-1" and "machine_temperature" in x["metrics"] for x in lines)

        sent = await cli("cmd", "send", "acme", "dev-1", "reset", "--wait", "--timeout", "20")
        assert sent.returncode == 0, sent.stderr
        answer = json.loads(sent.stdout.splitlines()[-1])
        assert answer["status"] == "ok"

        async def recorded() -> bool:
            status = await fetchval(
                timescale_dsn, "SELECT status FROM tenant_acme.commands WHERE id = $1::uuid",
                answer["id"],
            )  # fmt: skip
            return bool(status == "ok")

        await wait_for(recorded, 20, "the command's row with the device's answer")
        name = await fetchval(
            timescale_dsn, "SELECT name FROM tenant_acme.commands WHERE id = $1::uuid", answer["id"]
        )
        assert name == "reset", "recorded when sent, not only when answered"

        bad = await cli(
            "cmd", "send", "acme", "dev-1", "set-interval", "--args", '{"interval_s": 0}', "--wait"
        )
        assert bad.returncode == 1
        assert json.loads(bad.stdout.splitlines()[-1])["status"] == "error"

        queried = await cli(
            "query", "acme", "dev-1", "machine_temperature", "--since", "1h", "--bucket", "1s",
            "--format", "json",
        )  # fmt: skip
        assert queried.returncode == 0, queried.stderr
        buckets = [json.loads(line) for line in queried.stdout.splitlines()]
        assert buckets
        assert sum(b["count"] for b in buckets) > 20
        assert all(b["min"] <= b["avg"] <= b["max"] for b in buckets)
        as_csv = await cli("query", "acme", "dev-1", "machine_temperature", "--format", "csv")
        assert as_csv.stdout.splitlines()[0] == "start,avg,min,max,count"

        unknown = await cli("query", "acme", "dev-1", "rpm")
        assert unknown.returncode == 2
        assert "machine_temperature" in unknown.stderr, "the error lists the metrics there are"
        badtime = await cli("query", "acme", "dev-1", "machine_temperature", "--since", "soon")
        assert badtime.returncode == 2
        assert "duration" in badtime.stderr
    finally:
        fleet.request_stop()
        await runner
        await fleet.stop()
        worker.stop()
