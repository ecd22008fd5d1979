"""The edge agent against a real broker, a real ingest worker and TimescaleDB.

The agent is `dev-2` of the test PKI (a device certificate of tenant acme): it publishes on
its own topics only, as docs/design.md's ACL allows, and the worker writes what it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from edge_agent.agent import AgentOptions, EdgeAgent
from edge_agent.manifest import load_manifest
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.edge import (
    LAN_HOT_RULE,
    LAN_LISTENER,
    LAN_ROUTES,
    MACHINE_RESET,
    manifest_text,
    write_manifest,
)
from tests.fixtures.ingest import fetch, fetchval, start_worker, wait_for
from tests.fixtures.prereq import stop_process

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VALUES = "tenant_acme.numeric_values"


@asynccontextmanager
async def running_agent(
    path: Path, home: Path, pki_dir: Path | None = None
) -> AsyncIterator[EdgeAgent]:
    options = AgentOptions(home=home, manifest_path=path, pki_dir=pki_dir)
    agent = EdgeAgent(load_manifest(path), options)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


async def test_the_machine_reset_scenario_end_to_end(
    broker: BrokerUnderTest, timescale_dsn: str, tmp_path: Path
) -> None:
    """The machine heats, the rule fires, the machine cools, the alert is in `events`."""
    path = write_manifest(tmp_path, manifest_text(broker, *MACHINE_RESET))
    worker = start_worker(broker, timescale_dsn, tmp_path / "worker")
    try:
        async with running_agent(path, tmp_path / "home") as agent:

            async def alert() -> bool:
                sql = "SELECT count(*) FROM tenant_acme.events WHERE kind = 'overheat'"
                return bool(await _scalar(timescale_dsn, sql))

            await wait_for(alert, 60, "the overheat event in tenant_acme.events")
            assert agent.modules["machine"].resets >= 1

            # the event's time is its window's end; the reading that closed the window went
            # upstream before the reset, the ones after it must show the cold machine
            async def cooled() -> bool:
                sql = (
                    f"SELECT count(*) FROM {VALUES} v JOIN tenant_acme.metrics m "  # noqa: S608
                    "ON m.id = v.metric_id WHERE m.name = 'machine.machine_temperature' "
                    "AND v.value < 25 AND v.time > (SELECT min(time) FROM tenant_acme.events "
                    "WHERE kind = 'overheat')"
                )
                return await _scalar(timescale_dsn, sql) >= 3

            await wait_for(cooled, 30, "cold readings after the reset in the database")
            sample = agent.metrics.registry.get_sample_value
            assert (sample("fieldline_edge_rule_firings_total", {"rule": "overheat"}) or 0) >= 1
            routed = sample("fieldline_edge_messages_routed_total", {"route": "alertsToReset"})
            assert (routed or 0) >= 1
            assert (sample("fieldline_edge_published_total") or 0) > 10
            assert sample("fieldline_edge_reconnects_total") == 1
        rows = await fetch(
            timescale_dsn,
            "SELECT e.time, e.severity, e.body FROM tenant_acme.events e "
            "WHERE e.kind = 'overheat' ORDER BY e.time LIMIT 1",
        )
        body = rows[0]["body"]
        body = json.loads(body) if isinstance(body, str) else body
        assert rows[0]["severity"] == "warning"
        assert body["value"] > 35  # the event's data, flattened with its message by the worker
        assert body["rule"] == "overheat"
        fired_at = rows[0]["time"]
        temps = await fetch(
            timescale_dsn,
            f"SELECT v.time, v.value FROM {VALUES} v JOIN tenant_acme.metrics m "  # noqa: S608
            "ON m.id = v.metric_id WHERE m.name = 'machine.machine_temperature' ORDER BY v.time",
        )
        before = [r["value"] for r in temps if r["time"] <= fired_at]
        after = [r["value"] for r in temps if r["time"] > fired_at]
        assert before[-1] > 35
        assert min(after[:5]) < 25, "the machine was reset: it cooled to about 21 degC"
    finally:
        worker.stop()


async def _scalar(dsn: str, sql: str) -> int:
    """A count, 0 while the tenant's schema does not exist yet (made on first sight)."""
    try:
        return int(await fetchval(dsn, sql))
    except asyncpg.UndefinedTableError:
        return 0


async def _values(dsn: str) -> int:
    return await _scalar(dsn, f"SELECT count(*) FROM {VALUES}")  # noqa: S608


ARMA_100_HZ = (
    """
[[modules]]
name = "probe"
kind = "arma"
interval_s = 0.01
""",
    "",
    """
[[routes]]
name = "telemetryToCloud"
from = "probe"
to = "upstream"
""",
)


async def test_a_30_s_broker_outage_at_100_msg_s_loses_and_duplicates_nothing(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "mosquitto-data").mkdir()
    broker = broker_factory("mosquitto", persistence_dir=tmp_path / "mosquitto-data")
    path = write_manifest(tmp_path, manifest_text(broker, *ARMA_100_HZ))
    worker = start_worker(broker, timescale_dsn, tmp_path / "worker")
    try:
        async with running_agent(path, tmp_path / "home") as agent:
            await asyncio.sleep(3)
            assert await _values(timescale_dsn) > 100, "flowing before the outage"
            await asyncio.to_thread(broker.stop)
            down_at = agent.seq
            await asyncio.sleep(30)
            backlog = agent.outbox.depth()
            assert agent.seq - down_at > 2000, "the agent kept sampling at ~100 msg/s"
            assert backlog >= agent.seq - down_at - 200, "the outage's messages wait in the outbox"
            await asyncio.to_thread(broker.restart)
            await wait_for(lambda: _caught_up(agent), 120, "the backlog to drain")
            agent.modules["probe"].interval_s = 3600.0  # quiet, so the count can settle
            await wait_for(lambda: _drained(agent), 30, "the outbox to empty")
            produced = agent.seq
        expected = 2 * produced  # temperature and humidity in every message
        await wait_for(lambda: _at_least(timescale_dsn, expected), 60, f"{expected} rows")
        await asyncio.sleep(1.0)
        assert await _values(timescale_dsn) == expected
        distinct = await fetchval(
            timescale_dsn,
            f"SELECT count(DISTINCT (metric_id, time)) FROM {VALUES}",  # noqa: S608
        )
        assert distinct == expected
    finally:
        worker.stop()


async def _caught_up(agent: EdgeAgent) -> bool:
    return agent.outbox.depth() < 20  # live traffic keeps a message or two in flight


async def _drained(agent: EdgeAgent) -> bool:
    return agent.outbox.depth() == 0


async def _at_least(dsn: str, n: int) -> bool:
    return await _values(dsn) >= n


def _spawn(argv: list[str], env: dict[str, str], log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, stdout=log, stderr=log)


def _outbox_times(path: Path) -> set[int]:
    """Every telemetry `ts` in an outbox file, single messages and sample batches."""
    found: set[int] = set()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        table = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        for (name,) in table:
            columns = [c[1] for c in db.execute(f"PRAGMA table_info({name})")]
            if "payload" not in columns or "topic" not in columns:
                continue
            for topic, payload in db.execute(f"SELECT topic, payload FROM {name}"):  # noqa: S608
                if str(topic).endswith("/telemetry"):
                    body = json.loads(payload)
                    for sample in body.get("samples") or [body]:
                        found.add(int(sample["ts"]))
    finally:
        db.close()
    return found


async def test_kill_9_mid_backlog_loses_nothing_the_outbox_accepted(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str, tmp_path: Path
) -> None:
    broker = broker_factory("mosquitto")
    path = write_manifest(tmp_path, manifest_text(broker, *ARMA_100_HZ))
    home = tmp_path / "home"
    env = {**os.environ, "FIELDLINE_HOME": str(home), "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "fieldline", "edge", "run", "--manifest", str(path)]
    log_path = tmp_path / "agent.log"
    broker.stop()  # the agent starts offline: everything it samples piles up in the outbox
    with log_path.open("ab") as log:
        agent = _spawn(argv, env, log)
        outbox = home / "edge" / "dev-2" / "outbox.sqlite"
        try:
            # timed from the agent's own start line: interpreter start-up is slow on a busy machine
            async def started() -> bool:
                return "event=started" in log_path.read_text()

            await wait_for(started, 60, "the agent's start line in its log")
            await asyncio.sleep(6)  # ~600 messages at 100 msg/s
            assert agent.poll() is None, log_path.read_text()[-2000:]
            agent.kill()  # SIGKILL: no flush, no goodbye
            agent.wait(10)
            # the outbox is locked to its agent: read it once the agent is dead
            accepted = _outbox_times(outbox)
            assert len(accepted) >= 300, "a backlog of several seconds when the agent died"
        finally:
            stop_process(agent)
        broker.restart()
        worker = start_worker(broker, timescale_dsn, tmp_path / "worker")
        agent = _spawn(argv, env, log)
        stored_ms = f"SELECT DISTINCT (extract(epoch FROM time) * 1000)::bigint AS ms FROM {VALUES}"  # noqa: S608
        try:

            async def all_there() -> bool:
                if not await _values(timescale_dsn):
                    return False
                rows = await fetch(timescale_dsn, stored_ms)
                return accepted <= {int(r["ms"]) for r in rows}

            await wait_for(all_there, 90, f"all {len(accepted)} accepted messages in the database")
        finally:
            stop_process(agent)
            worker.stop()


@pytest.mark.parametrize(
    ("change", "names"),
    [
        (lambda t: t.replace('to = "machine"', 'to = "mixer"'), ["routes[3].to", "mixer"]),
        (lambda t: t.replace('from = "machine"\nto = "upstream"', 'from = "mill"\nto = "upstream"'),
         ["routes[0].from", "mill"]),
        (lambda t: t.replace("size_s = 1", "size_s = 0"), ["rules[0].window", "size_s"]),
        (lambda t: t.replace('kind = "machine"', 'kind = "blender"'), ["modules[0].kind"]),
    ],
    ids=["route-to-nowhere", "unknown-module", "window-of-zero", "unknown-kind"],
)  # fmt: skip
def test_manifest_errors_stop_the_agent_at_start_with_the_key_named(
    broker_factory: Callable[..., BrokerUnderTest],
    tmp_path: Path,
    change: Callable[[str], str],
    names: list[str],
) -> None:
    broker = broker_factory("fieldline")
    text = change(manifest_text(broker, *MACHINE_RESET))
    path = write_manifest(tmp_path, text)
    env = {**os.environ, "FIELDLINE_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    for command in ("check", "run"):
        done = subprocess.run(
            [sys.executable, "-m", "fieldline", "edge", command, "--manifest", str(path)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        for name in names:
            assert name in done.stderr, (name, done.stderr)
        assert "Traceback" not in done.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "fieldline", "edge", "check", "--manifest",
         str(write_manifest(tmp_path, manifest_text(broker, *MACHINE_RESET)))],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "4 route(s)" in ok.stdout


async def test_commands_from_the_cloud_reach_modules_and_rules(
    broker_factory: Callable[..., BrokerUnderTest], tmp_path: Path
) -> None:
    from tests.clients import Paho

    broker = broker_factory("fieldline")
    path = write_manifest(tmp_path, manifest_text(broker, *MACHINE_RESET))
    ops = Paho(broker, broker.pki.operator)
    assert ops.connect()
    assert ops.subscribe("fl/acme/dev-2/#") == [1]

    async def command(name: str, args: dict[str, object]) -> dict[str, object]:
        cid = str(uuid.uuid4())
        body = {"id": cid, "name": name, "args": args, "ts": int(time.time() * 1000)}
        ops.publish(f"fl/acme/dev-2/cmd/{name}", json.dumps(body).encode())

        async def answered() -> bool:
            return any(json.loads(m.payload).get("id") == cid for m in _results())

        await wait_for(answered, 15, f"the answer to {name}")
        return next(r for r in map(lambda m: json.loads(m.payload), _results()) if r["id"] == cid)

    def _results() -> list[Any]:
        return [m for m in ops.messages if m.topic == "fl/acme/dev-2/cmd-res"]

    try:
        async with running_agent(path, tmp_path / "home") as agent:

            async def born() -> bool:
                return any(m.topic == "fl/acme/dev-2/status" for m in ops.messages)

            await wait_for(born, 15, "the agent's birth (it has subscribed by then)")
            await asyncio.sleep(0.3)
            ok = await command("set-interval", {"module": "machine", "interval_s": 0.5})
            assert ok["status"] == "ok", ok
            assert agent.modules["machine"].interval_s == 0.5
            assert (await command("set-interval", {"interval_s": 0.2}))["status"] == "ok"
            wrong = await command("reset", {"module": "mixer"})
            assert wrong["status"] == "error"
            assert "machine" in str(wrong["detail"])
            assert (await command("launch", {}))["status"] == "rejected"
            # rules-reload: a broken file keeps the running rules, a good one replaces them
            path.write_text(path.read_text().replace("size_s = 1", "size_s = 0"))
            broken = await command("rules-reload", {})
            assert broken["status"] == "error"
            assert "size_s" in str(broken["detail"])
            assert agent.rules["overheat"].spec.window.size_s == 1
            path.write_text(path.read_text().replace("size_s = 0", "size_s = 2"))
            assert (await command("rules-reload", {}))["status"] == "ok"
            assert agent.rules["overheat"].spec.window.size_s == 2
            births = [
                json.loads(m.payload) for m in ops.messages if m.topic == "fl/acme/dev-2/status"
            ]
            assert births[0]["state"] == "online"
            assert births[0]["boot"] == agent.boot
    finally:
        ops.close()


async def test_lan_devices_reach_the_cloud_through_the_listener(
    broker: BrokerUnderTest, timescale_dsn: str, tmp_path: Path
) -> None:
    """dev-1 publishes to the gateway's LAN listener; its values arrive upstream under the
    agent's identity, and the listener enforces the same identity rules as any broker."""
    from types import SimpleNamespace

    from core.pgcluster import free_port
    from tests.clients import Paho

    lan_port = free_port()
    listener = LAN_LISTENER.format(port=lan_port)
    path = write_manifest(tmp_path, manifest_text(broker, listener, LAN_HOT_RULE, LAN_ROUTES))
    lan = SimpleNamespace(host="127.0.0.1", port=lan_port, pki=broker.pki)
    worker = start_worker(broker, timescale_dsn, tmp_path / "worker")
    device = intruder = None
    try:
        async with running_agent(path, tmp_path / "home", broker.pki.pki.root) as agent:
            # the listener runs on this event loop: clients connect from a thread
            device = Paho(lan, broker.pki.device)  # type: ignore[arg-type]
            assert await asyncio.to_thread(device.connect), device.connack_rc
            # timestamps of now, as a live device sends them: the agent closes windows on the
            # wall clock, so readings stamped seconds ago would arrive for closed windows (late)
            last = 0
            for i in range(50):
                last = max(int(time.time() * 1000), last + 1)
                body = {"ts": last, "seq": i + 1, "metrics": {"temperature": 20.0 + i}}
                await asyncio.to_thread(
                    device.publish, "fl/acme/dev-1/telemetry", json.dumps(body).encode()
                )
            with contextlib.suppress(RuntimeError):  # the listener may cut it off for this
                await asyncio.to_thread(
                    device.publish, "fl/acme/dev-2/telemetry", b'{"metrics": {"temperature": 99}}'
                )
            intruder = Paho(lan, broker.pki.device_other_tenant)  # type: ignore[arg-type]
            assert await asyncio.to_thread(intruder.connect)
            await asyncio.to_thread(
                intruder.publish, "fl/globex/dev-9/telemetry", b'{"metrics": {"temperature": 99}}'
            )

            async def forwarded() -> bool:
                sql = (
                    f"SELECT count(*) FROM {VALUES} v JOIN tenant_acme.metrics m "  # noqa: S608
                    "ON m.id = v.metric_id WHERE m.name = 'lan.dev-1.temperature'"
                )
                return await _scalar(timescale_dsn, sql) == 50

            await wait_for(forwarded, 30, "dev-1's 50 values under lan.dev-1.temperature")

            async def alerted() -> bool:
                sql = "SELECT count(*) FROM tenant_acme.events WHERE kind = 'hot'"
                return await _scalar(timescale_dsn, sql) >= 1

            await wait_for(alerted, 30, "the rule on a LAN device's metric to fire")
            assert agent.listeners[0].received == 50  # dev-1's own; dev-2's topic was refused
            assert agent.listeners[0].refused == 1  # globex's device: another tenant
            for client in (device, intruder):
                await asyncio.to_thread(client.close)
            device = intruder = None
        names = await fetch(timescale_dsn, "SELECT name FROM tenant_acme.metrics ORDER BY name")
        assert [r["name"] for r in names] == ["lan.dev-1.temperature"], "nothing else got through"
    finally:
        for client in (device, intruder):
            if client is not None:
                client.close()
        worker.stop()
