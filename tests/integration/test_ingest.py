"""The ingest worker against real brokers and a real PostgreSQL + TimescaleDB.

What a device published must be in the database exactly once: known messages become exactly
the expected rows; bad input becomes dead letters while good traffic flows; presence follows
status messages, Wills and silence.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest

from ingest_worker.sequence import SeqWindow
from ingest_worker.service import IngestWorker
from tests.clients import Paho, raw
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.ingest import burst, count, fetch, fetchval, wait_for, worker_config

pytestmark = pytest.mark.integration


WINDOW = timedelta(seconds=0.5)  # the seq reorder window of the gap test


def now_ms() -> int:
    return int(time.time() * 1000)


def j(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


@pytest.mark.parametrize("client", ["lean", "paho"])
async def test_known_messages_become_exactly_the_expected_rows(
    broker: BrokerUnderTest, timescale_dsn: str, client: str
) -> None:
    pki = broker.pki
    t0 = now_ms() - 60_000
    command = str(uuid.uuid4())
    dev1 = [
        ("fl/acme/dev-1/status", j({"state": "online", "boot": 3, "fw": "1.2.0"})),
        (
            "fl/acme/dev-1/telemetry",
            j(
                {
                    "ts": t0,
                    "seq": 1,
                    "boot": 3,
                    "metrics": {
                        "temperature": {"v": 21.5, "u": "degC"},
                        "running": True,
                        "mode": "auto",
                    },
                }
            ),
        ),
        (
            "fl/acme/dev-1/telemetry",
            j(
                {
                    "samples": [
                        {
                            "ts": t0 + 1000 * i,
                            "seq": 1 + i,
                            "metrics": {"temperature": 20.0 + i, "running": False},
                        }
                        for i in range(1, 4)
                    ]
                }
            ),
        ),
        (
            "fl/acme/dev-1/events",
            j({"ts": t0, "kind": "door", "severity": "warning", "message": "open"}),
        ),
        ("fl/acme/dev-1/cmd-res", j({"id": command, "status": "ok", "detail": "reset done"})),
    ]
    dev2 = [("fl/acme/dev-2/telemetry", j({"metrics": {"humidity": 45.1}}))]  # no ts: stamped
    dev9 = [
        (
            "fl/globex/dev-9/telemetry",
            j({"ts": t0, "metrics": {"pressure": {"v": 1.2, "u": "bar"}}}),
        )
    ]

    async with IngestWorker(worker_config(broker, timescale_dsn, client=client)) as worker:
        await worker.wait_connected(15)
        await asyncio.to_thread(burst, broker, pki.device, dev1)
        await asyncio.to_thread(burst, broker, pki.device2, dev2)
        await asyncio.to_thread(burst, broker, pki.device_other_tenant, dev9)

        async def all_there() -> bool:
            acme = await count(timescale_dsn, "tenant_acme.numeric_values")
            globex = await count(timescale_dsn, "tenant_globex.numeric_values")
            return acme == 9 and globex == 1

        await wait_for(all_there, 15, "the rows of every message")
        # every message received and none pending: an extra row would be written by now
        sent = len(dev1) + len(dev2) + len(dev9)
        await wait_for(lambda: _received(worker, sent), 10, "every message settled")
        assert await all_there()

    q = timescale_dsn
    metrics = await fetch(
        q, "SELECT device_id, name, unit, kind FROM tenant_acme.metrics ORDER BY 1, 2"
    )
    assert [tuple(r) for r in metrics] == [
        ("dev-1", "mode", None, "text"),
        ("dev-1", "running", None, "bool"),
        ("dev-1", "temperature", "degC", "numeric"),
        ("dev-2", "humidity", None, "numeric"),
    ]
    values = await fetch(
        q,
        """
        SELECT m.name, v.value, v.received, (extract(epoch FROM v.time) * 1000)::bigint AS ms
        FROM tenant_acme.numeric_values v JOIN tenant_acme.metrics m ON m.id = v.metric_id
        WHERE m.device_id = 'dev-1' ORDER BY m.name, v.time""",
    )
    assert [(r["name"], r["value"], r["received"], r["ms"] - t0) for r in values] == [
        ("running", 1.0, False, 0),
        ("running", 0.0, False, 1000),
        ("running", 0.0, False, 2000),
        ("running", 0.0, False, 3000),
        ("temperature", 21.5, False, 0),
        ("temperature", 21.0, False, 1000),
        ("temperature", 22.0, False, 2000),
        ("temperature", 23.0, False, 3000),
    ]
    assert await fetch(q, "SELECT value FROM tenant_acme.text_values") == [("auto",)]
    stamped = await fetch(
        q,
        "SELECT value, received FROM tenant_acme.numeric_values v "
        "JOIN tenant_acme.metrics m ON m.id = v.metric_id WHERE m.device_id = 'dev-2'",
    )
    assert [tuple(r) for r in stamped] == [(45.1, True)]
    devices = await fetch(
        q, "SELECT id, status, fw, boot, seq, seq_gaps FROM tenant_acme.devices ORDER BY id"
    )
    assert [tuple(r) for r in devices] == [
        ("dev-1", "online", "1.2.0", 3, 4, 0),
        ("dev-2", "online", None, None, None, 0),
    ]
    events = await fetch(
        q, "SELECT device_id, kind, severity, body FROM tenant_acme.events ORDER BY device_id, kind"
    )
    assert [(e["device_id"], e["kind"], e["severity"], json.loads(e["body"])) for e in events] == [
        ("dev-1", "door", "warning", {"message": "open"}),
        ("dev-1", "presence", "info", {"from": "unknown", "to": "online", "cause": "status"}),
        ("dev-2", "presence", "info", {"from": "unknown", "to": "online", "cause": "traffic"}),
    ]
    commands = await fetch(
        q, "SELECT id::text, device_id, status, result FROM tenant_acme.commands"
    )
    assert [(c[0], c[1], c[2], json.loads(c[3])) for c in commands] == [
        (command, "dev-1", "ok", {"status": "ok", "detail": "reset done"})
    ]
    globex = await fetch(
        q,
        "SELECT m.name, m.unit, v.value FROM tenant_globex.numeric_values v "
        "JOIN tenant_globex.metrics m ON m.id = v.metric_id",
    )
    assert [tuple(r) for r in globex] == [("pressure", "bar", 1.2)]
    owners = await fetch(q, "SELECT device_id, tenant_id FROM fieldline.device_owners ORDER BY 1")
    assert [tuple(r) for r in owners] == [("dev-1", "acme"), ("dev-2", "acme"), ("dev-9", "globex")]
    assert await fetchval(q, "SELECT count(*) FROM fieldline.dead_letters") == 0


def _bad_inputs() -> list[tuple[str, str, bytes, str]]:
    """(publisher, topic, payload, expected dead-letter reason)."""
    t = now_ms()
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    return [
        ("device", "fl/acme/dev-1/telemetry", b'\xff\xfe{"metrics":{}}', "not_utf8"),
        ("device", "fl/acme/dev-1/telemetry", b"[1, 2, 3]", "not_object"),
        ("device", "fl/acme/dev-1/telemetry", b"hello", "bad_json"),
        ("device", "fl/acme/dev-1/telemetry", b"", "empty"),
        ("device", "fl/acme/dev-1/telemetry", b'{"metrics": {"t": 1e999}}', "invalid"),
        (
            "device",
            "fl/acme/dev-1/telemetry",
            b'{"metrics": {"t": 123456789012345678901234567890}}',
            "invalid",
        ),
        ("device", "fl/acme/dev-1/telemetry", b'{"metrics": {"t": NaN}}', "invalid"),
        ("device", "fl/acme/dev-1/telemetry", b'{"metrics": {"t": -Infinity}}', "invalid"),
        (
            "device",
            "fl/acme/dev-1/telemetry",
            b'{"metrics": {"t": "' + b"x" * 1_000_000 + b'"}}',
            "too_large",
        ),
        ("device", "fl/acme/dev-1/events", j({"kind": "deep", "data": deep}), "too_deep"),
        (
            "device",
            "fl/acme/dev-1/telemetry",
            j({"metrics": {"t": 1}, "colour": "red"}),
            "unknown_field",
        ),
        (
            "device",
            "fl/acme/dev-1/telemetry",
            j({"ts": t + 86_400_000, "metrics": {"t": 1}}),
            "future_timestamp",
        ),
        (
            "device",
            "fl/acme/dev-1/telemetry",
            j({"ts": 1_700_000_000, "metrics": {"t": 1}}),
            "bad_timestamp",
        ),
        (
            "device",
            "fl/acme/dev-1/telemetry",
            j({"metrics": {f"m{i}": i for i in range(300)}}),
            "too_many_metrics",
        ),
        ("device", "fl/acme/dev-1/telemetry", j({"metrics": "21.5"}), "invalid"),
        (
            "device",
            "fl/acme/dev-1/telemetry",
            j({"samples": [{"ts": t - 10_000 + i, "metrics": {"t": i}} for i in range(1001)]}),
            "too_many_samples",
        ),
        ("device", "fl/acme/dev-1/telemetry", j({"metrics": {"t": {"x": 1}}}), "invalid"),
        ("device", "fl/acme/dev-1/status", j({"state": "sleeping"}), "invalid"),
        ("device", "fl/acme/dev-1/cmd-res", j({"id": "not-a-uuid", "status": "ok"}), "invalid"),
        (
            "device",
            "fl/acme/dev-1/telemetry",
            j({"ts": t, "metrics": {"good": "now text"}}),
            "metric_kind_changed",
        ),
        ("admin", "fl/Acme/dev-1/telemetry", j({"metrics": {"t": 1}}), "bad_topic"),
        ("admin", "fl/acme/dev 1/telemetry", j({"metrics": {"t": 1}}), "bad_topic"),
        ("admin", "fl/globex/dev-1/telemetry", j({"ts": t, "metrics": {"t": 1}}), "wrong_tenant"),
    ]


async def test_bad_input_is_dead_lettered_while_good_traffic_flows(
    broker: BrokerUnderTest, timescale_dsn: str
) -> None:
    pki = broker.pki
    cases = _bad_inputs()
    assert len(cases) >= 15
    assert len({c[3] for c in cases}) >= 14  # and they fail for different reasons
    base = now_ms() - 120_000
    async with IngestWorker(worker_config(broker, timescale_dsn)) as worker:
        await worker.wait_connected(15)
        # the device is known (and owns dev-1 in acme) before the bad input starts
        good = [("fl/acme/dev-1/telemetry", j({"ts": base, "seq": 0, "metrics": {"good": 0}}))]
        await asyncio.to_thread(burst, broker, pki.device, good)
        await wait_for(
            lambda: _count(timescale_dsn, "tenant_acme.numeric_values", 1), 10, "the first row"
        )
        for i, (who, topic, payload, _reason) in enumerate(cases, start=1):
            bundle = pki.admin if who == "admin" else pki.device
            good = [
                ("fl/acme/dev-1/telemetry", j({"ts": base + i, "seq": i, "metrics": {"good": i}}))
            ]
            await asyncio.to_thread(burst, broker, bundle, [(topic, payload)])
            await asyncio.to_thread(burst, broker, pki.device, good)
        n = len(cases) + 1
        await wait_for(
            lambda: _count(timescale_dsn, "tenant_acme.numeric_values", n), 20, "good rows"
        )
        await wait_for(
            lambda: _count(timescale_dsn, "fieldline.dead_letters", len(cases)), 20, "dead letters"
        )
        assert worker.metrics.received >= 2 * len(cases) + 1

    rows = await fetch(
        timescale_dsn,
        "SELECT topic, payload, payload_size, payload_sha256, reason, error "
        "FROM fieldline.dead_letters ORDER BY time",
    )
    assert [(r["topic"], r["reason"]) for r in rows] == [(c[1], c[3]) for c in cases]
    for row, case in zip(rows, cases, strict=True):
        # a bounded prefix for a look later, and what identifies the whole
        assert bytes(row["payload"]) == case[2][:4096]
        assert row["payload_size"] == len(case[2])
        assert bytes(row["payload_sha256"]) == hashlib.sha256(case[2]).digest()
        assert row["error"]  # and the reason in words
    values = await fetch(
        timescale_dsn, "SELECT value FROM tenant_acme.numeric_values ORDER BY time"
    )
    assert [r["value"] for r in values] == [float(i) for i in range(len(cases) + 1)]


async def _count(dsn: str, table: str, expected: int) -> bool:
    return await count(dsn, table) >= expected


async def test_presence_follows_status_will_and_silence(
    broker: BrokerUnderTest, timescale_dsn: str
) -> None:
    pki = broker.pki
    config = worker_config(broker, timescale_dsn, offline_after_s=1.5)
    async with IngestWorker(config) as worker:
        await worker.wait_connected(15)
        # dev-1 says it is online, then drops dead: its Will says offline
        device = await asyncio.to_thread(raw, broker, pki.device)
        _present, rc = await asyncio.to_thread(
            device.connect, "dev-1", will=("fl/acme/dev-1/status", j({"state": "offline"}), 1, True)
        )
        assert rc == 0
        await asyncio.to_thread(
            device.publish, "fl/acme/dev-1/status", j({"state": "online"}), 1, True
        )
        await wait_for(lambda: _status(timescale_dsn, "dev-1", "online"), 10, "dev-1 online")
        device.close()
        await wait_for(lambda: _status(timescale_dsn, "dev-1", "offline"), 10, "dev-1's Will")
        # dev-2 only sends telemetry, then goes silent: offline after offline_after_s
        await asyncio.to_thread(
            burst, broker, pki.device2, [("fl/acme/dev-2/telemetry", j({"metrics": {"t": 1}}))]
        )
        await wait_for(lambda: _status(timescale_dsn, "dev-2", "online"), 10, "dev-2 online")
        started = time.monotonic()
        await wait_for(lambda: _status(timescale_dsn, "dev-2", "offline"), 10, "dev-2 timing out")
        assert time.monotonic() - started >= 1.0
        del worker
    events = await fetch(
        timescale_dsn,
        "SELECT device_id, body FROM tenant_acme.events WHERE kind = 'presence' ORDER BY time",
    )
    transitions = [
        (e["device_id"], json.loads(e["body"])["to"], json.loads(e["body"])["cause"])
        for e in events
    ]
    assert ("dev-1", "offline", "status") in transitions
    assert ("dev-2", "offline", "timeout") in transitions


async def _status(dsn: str, device: str, status: str) -> bool:
    if not await count(dsn, "tenant_acme.devices"):
        return False
    found = await fetchval(dsn, "SELECT status FROM tenant_acme.devices WHERE id = $1", device)
    return bool(found == status)


async def test_redelivered_messages_write_nothing_twice(
    broker: BrokerUnderTest, timescale_dsn: str
) -> None:
    """The same messages twice (a redelivery after a crash before the PUBACK): no new rows."""
    pki = broker.pki
    t0 = now_ms() - 10_000
    batch = [
        ("fl/acme/dev-1/telemetry", j({"ts": t0 + i, "metrics": {"a": i, "b": "x"}}))
        for i in range(200)
    ]
    async with IngestWorker(worker_config(broker, timescale_dsn)) as worker:
        await worker.wait_connected(15)
        await asyncio.to_thread(burst, broker, pki.device, batch)
        await wait_for(
            lambda: _count(timescale_dsn, "tenant_acme.numeric_values", 200), 10, "200 rows"
        )
        await asyncio.to_thread(burst, broker, pki.device, batch)
        await wait_for(lambda: _received(worker, 400), 10, "the second copy")  # and settled
    assert await fetchval(timescale_dsn, "SELECT count(*) FROM tenant_acme.numeric_values") == 200
    assert await fetchval(timescale_dsn, "SELECT count(*) FROM tenant_acme.text_values") == 200


async def _received(worker: IngestWorker, n: int) -> bool:
    return worker.metrics.received >= n and not worker.pipeline.pending


async def test_paho_devices_end_to_end(broker: BrokerUnderTest, timescale_dsn: str) -> None:
    """A device on paho-mqtt (the library a gateway would use) publishing telemetry at QoS 1."""
    async with IngestWorker(worker_config(broker, timescale_dsn)) as worker:
        await worker.wait_connected(15)

        def publish() -> None:
            device = Paho(broker, broker.pki.device)
            assert device.connect()
            for i in range(50):
                device.publish(
                    "fl/acme/dev-1/telemetry", j({"ts": now_ms() - 1000 + i, "metrics": {"v": i}})
                )
            device.close()

        await asyncio.to_thread(publish)
        await wait_for(
            lambda: _count(timescale_dsn, "tenant_acme.numeric_values", 50), 10, "50 rows"
        )


async def test_seq_gaps_are_counted_once_and_a_new_boot_starts_afresh(
    broker: BrokerUnderTest, timescale_dsn: str
) -> None:
    """Through the broker with two writers and small batches (so a device's batches commit
    out of order): a reordering counts nothing, a real skip counts exactly once it is older
    than the reorder window, a redelivery nothing, a new boot starts afresh."""
    pki = broker.pki
    t0 = now_ms() - 60_000

    def msg(i: int, seq: int, boot: int, device: str = "dev-1") -> tuple[str, bytes]:
        return (
            f"fl/acme/{device}/telemetry",
            j({"ts": t0 + i, "seq": seq, "boot": boot, "metrics": {"v": i}}),
        )

    def gaps() -> float:
        value = worker.metrics.registry.get_sample_value("fieldline_ingest_seq_gaps_total")
        return value or 0.0

    async def counted(n: int) -> bool:
        return gaps() == n

    async def hole_aged() -> bool:
        aged = (
            "SELECT now() - seq_hole_at > interval '0.5 s' FROM tenant_acme.devices WHERE id = $1"
        )
        return bool(await fetchval(timescale_dsn, aged, "dev-1"))

    # dev-2: 600 messages in order, batches of 20 rows on two writers: never a gap
    steady = [msg(1000 + s, s, 1, "dev-2") for s in range(1, 601)]
    # dev-1, boot 1: 1, 2, 5 (3 and 4 lost); then 9 (6, 7, 8 lost); boot 2 restarts at 1
    first = [msg(0, 1, 1), msg(1, 2, 1), msg(2, 5, 1)]
    config = worker_config(
        broker, timescale_dsn, writers=2, batch_max_rows=20, sequence=SeqWindow(wait=WINDOW)
    )
    async with IngestWorker(config) as worker:
        await worker.wait_connected(15)
        await asyncio.gather(
            asyncio.to_thread(burst, broker, pki.device, first),
            asyncio.to_thread(burst, broker, pki.device2, steady),
        )
        await wait_for(lambda: _count(timescale_dsn, "tenant_acme.numeric_values", 603), 20, "rows")
        # device rows (and the gap count) are written after the values' commit, before the acks
        await wait_for(hole_aged, 10, "the hole of dev-1 to pass the window")
        assert gaps() == 0  # within the window, and until the device's next batch: nothing
        await asyncio.to_thread(burst, broker, pki.device, [msg(3, 9, 1)])  # counts 3, 4
        await wait_for(lambda: _count(timescale_dsn, "tenant_acme.numeric_values", 604), 10, "9")
        await wait_for(lambda: counted(2), 10, "3 and 4 counted")
        await wait_for(hole_aged, 10, "the hole 6..8 to pass the window")
        # 10 counts 6, 7, 8 (alone: a boot 2 committing first would make it a straggler)
        await asyncio.to_thread(burst, broker, pki.device, [msg(4, 10, 1)])
        await wait_for(lambda: _count(timescale_dsn, "tenant_acme.numeric_values", 605), 10, "10")
        second = [msg(5, 1, 2), msg(6, 2, 2)]
        await asyncio.to_thread(burst, broker, pki.device, second)
        await wait_for(lambda: _count(timescale_dsn, "tenant_acme.numeric_values", 607), 10, "rows")
        # the same messages again (a redelivery): nothing counted twice
        await asyncio.to_thread(burst, broker, pki.device, first + second)
        await wait_for(lambda: _received(worker, 612), 10, "the redelivery")  # and settled
        await wait_for(lambda: counted(5), 10, "6, 7 and 8 counted, and nothing twice")
    rows = await fetch(timescale_dsn, "SELECT id, boot, seq, seq_gaps FROM tenant_acme.devices")
    assert sorted(tuple(r) for r in rows) == [("dev-1", 2, 2, 5), ("dev-2", 1, 600, 0)]
