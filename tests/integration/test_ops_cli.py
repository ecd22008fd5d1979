"""The everyday commands as a user runs them, against a broker, an ingest worker, TimescaleDB
and a simulated machine: `devices list`, `tail`, `query` and `cmd send --wait`."""

from __future__ import annotations

import asyncio
import json
import os
import re
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

        # a device the tenant never had: named as such, in one line, and nothing recorded
        no_such = (
            "error: no such device dev-7 in tenant acme (`fieldline devices list acme` lists "
            "the devices it has heard from)"
        )
        nowhere = await cli("query", "acme", "dev-7", "temperature")
        assert nowhere.returncode == 2
        assert nowhere.stderr.splitlines() == [no_such], "it said: has no metric (it has: none)"
        refused = await cli("cmd", "send", "acme", "dev-7", "reset", "--wait", "--timeout", "20")
        assert refused.returncode == 2
        assert refused.stderr.splitlines() == [no_such]
        assert refused.stdout == "", "nothing sent"
        assert await fetchval(
            timescale_dsn, "SELECT count(*) FROM tenant_acme.commands WHERE device_id = 'dev-7'"
        ) == 0, "no command stored for it"  # fmt: skip

        await offline_device_gets_the_command_when_back(broker, env, timescale_dsn, tmp_path)
    finally:
        fleet.request_stop()
        await runner
        await fleet.stop()
        worker.stop()


async def offline_device_gets_the_command_when_back(
    broker: BrokerUnderTest, env: dict[str, str], dsn: str, tmp_path: Path
) -> None:
    """`cmd send --wait` to a known device that is offline says so at once, then waits: its
    persistent session at the broker holds the command, and the device runs it when back."""
    config = FleetConfig(
        tenant="acme", ids=("dev-2",), kind="machine", interval_s=0.2, host=broker.host,
        port=broker.port, seed=4,
    )  # fmt: skip
    dirs = {"dev-2": broker.pki.device2.directory}
    fleet = Fleet(config, dirs, tmp_path / "sim-2")
    await fleet.start(timeout=20)

    async def status(wanted: str) -> bool:
        got = await fetchval(dsn, "SELECT status FROM tenant_acme.devices WHERE id = 'dev-2'")
        return bool(got == wanted)

    await wait_for(lambda: status("online"), 30, "dev-2 online")
    await fleet.stop()  # its offline status, then it disconnects: the session stays
    await wait_for(lambda: status("offline"), 30, "dev-2 offline")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fieldline", "cmd", "send", "acme", "dev-2", "reset", "--wait",
        "--timeout", "60", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    back: Fleet | None = None
    try:
        assert proc.stderr is not None
        first = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        assert re.fullmatch(
            r"warning: dev-2 is offline \(last heard \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, "
            r"\d+[smhd] ago\): the broker queues the command for its session and delivers it "
            r"when it reconnects; after 60 s \(--ttl\) the device answers expired\n",
            first,
        ), first
        assert proc.returncode is None, "it still waits for the answer"
        assert proc.stdout is not None
        sent = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert sent.startswith("sent reset "), "published (and acknowledged) while it is away"
        back = Fleet(config, dirs, tmp_path / "sim-2")
        await back.start(timeout=20)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, (out, err)
        answer = json.loads(out.decode().splitlines()[-1])
        assert answer["status"] == "ok", "delivered when it came back, and run"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if back is not None:
            await back.stop()
