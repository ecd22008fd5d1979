"""The embedded broker killed with SIGKILL: nothing it acknowledged is lost.

A real `fieldline broker run` process with its durable store, real devices over mutual TLS
counting their PUBACKs, the real ingest worker and TimescaleDB.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from certs import Role
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.ingest import burst, start_worker
from tests.integration.test_ingest_durability import TABLE, exactly, stream
from tests.mqtt_raw import RawClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICES = 20
PER_DEVICE = 1_000


async def _committed(broker: BrokerUnderTest) -> None:
    """Until the broker's store has nothing pending (its metric)."""
    for _ in range(100):
        if "fieldline_broker_store_pending_changes 0.0" in broker.metrics():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the broker's store never caught up")


def _client(broker: BrokerUnderTest, bundle: object) -> RawClient:
    return RawClient(broker.host, broker.port, broker.pki.pki.ca_cert_path, bundle, timeout=10)  # type: ignore[arg-type]


async def test_kill_9_with_a_held_queue_loses_nothing_acknowledged(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str, tmp_path: Path
) -> None:
    """20 devices x 1,000 QoS 1 messages, every PUBACK counted, queued for a stopped worker;
    kill -9; restart; the worker then stores exactly what was acknowledged."""
    broker = broker_factory("fieldline")
    worker = start_worker(broker, timescale_dsn, tmp_path / "w1")
    assert worker.stop() == 0  # its persistent session stays, nobody reading it
    pki = broker.pki.pki
    bundles = [
        pki.issue(f"kd-{i:02d}", tenant="acme", role=Role.DEVICE, force=True)
        for i in range(DEVICES)
    ]
    # burst() returns only once every one of its PUBACKs has arrived
    await asyncio.gather(
        *(
            asyncio.to_thread(burst, broker, b, stream(0, PER_DEVICE, device=b.identity.id))
            for b in bundles
        )
    )
    broker.kill_9()
    broker.restart()
    assert "event=store_recovered" in broker.log_text()
    worker = start_worker(broker, timescale_dsn, tmp_path / "w2")
    try:
        await exactly(timescale_dsn, DEVICES * PER_DEVICE, 120, TABLE)
    finally:
        worker.stop()


async def test_kill_9_keeps_retained_status_and_a_queued_command(
    broker_factory: Callable[..., BrokerUnderTest],
) -> None:
    broker = broker_factory("fieldline")
    pki = broker.pki

    def before() -> None:
        device = _client(broker, pki.device)
        assert device.connect("dev-1")[1] == 0
        device.publish("fl/acme/dev-1/status", b'{"state":"online"}', qos=1, retain=True)
        device.disconnect()
        offline = _client(broker, pki.device2)  # a persistent session, then away
        assert offline.connect("dev-2", clean=False)[1] == 0
        assert offline.subscribe(("fl/acme/dev-2/cmd/#", 1)) == [1]
        offline.disconnect()
        operator = _client(broker, pki.operator)
        assert operator.connect("ops-1")[1] == 0
        operator.publish("fl/acme/dev-2/cmd/reset", b'{"id":"c-1"}', qos=1)  # PUBACKed
        operator.disconnect()

    await asyncio.to_thread(before)
    broker.kill_9()
    broker.restart()

    def after() -> tuple[list[tuple[str, bytes, bool]], bool, list[tuple[str, bytes]]]:
        operator = _client(broker, pki.operator)
        assert operator.connect("ops-1")[1] == 0
        assert operator.subscribe(("fl/acme/+/status", 1)) == [1]
        retained = [(m.topic, m.payload, m.retain) for m in operator.publishes(1.0)]
        operator.close()
        device = _client(broker, pki.device2)
        present, code = device.connect("dev-2", clean=False)
        assert code == 0
        commands = [(m.topic, m.payload) for m in device.publishes(1.0)]
        device.close()
        return retained, present, commands

    retained, present, commands = await asyncio.to_thread(after)
    assert retained == [("fl/acme/dev-1/status", b'{"state":"online"}', True)]
    assert present
    assert commands == [("fl/acme/dev-2/cmd/reset", b'{"id":"c-1"}')]


async def test_a_message_acknowledged_by_its_subscriber_is_not_delivered_again(
    broker_factory: Callable[..., BrokerUnderTest],
) -> None:
    """After kill -9 a persistent subscriber gets what it had not acknowledged, and only that."""
    broker = broker_factory("fieldline")
    pki = broker.pki

    def before() -> None:
        sub = _client(broker, pki.operator)
        assert sub.connect("ops-1", clean=False)[1] == 0
        assert sub.subscribe(("fl/acme/dev-1/events", 1)) == [1]
        dev = _client(broker, pki.device)
        assert dev.connect("dev-1")[1] == 0
        for i in range(10):
            dev.publish("fl/acme/dev-1/events", f"e-{i}".encode(), qos=1)
        dev.disconnect()
        got = [sub.next_publish(5) for _ in range(10)]
        for message in got[:6]:  # acknowledges the first six only
            assert message is not None
            sub.puback(message.packet_id)
        # a PING round trip: the broker has read the six PUBACKs
        sub.send(b"\xc0\x00")
        while sub.read_packet(5)[0] >> 4 != 13:
            pass
        sub.close()

    await asyncio.to_thread(before)
    # the store commits what the PUBACKs removed in its next group, within milliseconds
    await _committed(broker)
    broker.kill_9()
    broker.restart()

    def after() -> list[bytes]:
        sub = _client(broker, pki.operator)
        try:
            assert sub.connect("ops-1", clean=False)[1] == 0
            return [m.payload for m in sub.publishes(1.0)]
        finally:
            sub.close()

    assert await asyncio.to_thread(after) == [f"e-{i}".encode() for i in range(6, 10)]
