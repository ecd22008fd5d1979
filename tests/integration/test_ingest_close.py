"""The lean client's close, against real brokers: every PUBACK written before the DISCONNECT is
read by the broker, even while the broker is still sending a backlog to a paused connection.

Closing our end first lost them all: a socket closed with unread bytes is reset by the kernel,
and the reset discarded the acks the broker had not read yet, so the broker sent everything
again (the CI flake of test_ingest_durability.py::test_sigterm_commits_acknowledges_...).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from ingest_worker.mqtt import MQTT5, MQTT311, Delivery, Subscriber, open_subscriber
from ingest_worker.service import client_context
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.ingest import burst

pytestmark = pytest.mark.integration

# enough that the broker is still sending when we close; the embedded broker queues at most
# 10,000 messages per session beyond those in flight (broker.max_queued)
TOTAL = {"mosquitto": 20_000, "fieldline": 9_000}
HELD = 2_000  # messages received before reading pauses
FILTER = "fl/+/+/telemetry"


def _messages(n: int) -> list[tuple[str, bytes]]:
    base = 1_700_000_000_000
    return [
        ("fl/acme/dev-1/telemetry", json.dumps({"ts": base + i, "metrics": {"v": i}}).encode())
        for i in range(n)
    ]


async def _session(broker: BrokerUnderTest, into: list[Delivery], total: int) -> Subscriber:
    """The worker's identity on its persistent session (MQTT 5 where the broker speaks it)."""
    version = MQTT5 if broker.kind == "mosquitto" else MQTT311
    context = client_context(broker.pki.pki.root, "ingest-1")
    subscriber = await open_subscriber(
        "127.0.0.1", broker.port, context, into.append, version=version
    )
    await subscriber.handshake(
        "ingest-1", clean_start=False, session_expiry=3600, receive_maximum=total
    )
    return subscriber


async def _until_quiet(deliveries: list[Delivery], quiet_s: float = 1.5) -> None:
    seen, since = -1, time.monotonic()
    while time.monotonic() - since < quiet_s:
        if len(deliveries) != seen:
            seen, since = len(deliveries), time.monotonic()
        await asyncio.sleep(0.1)


async def test_acks_written_before_close_reach_the_broker(broker: BrokerUnderTest) -> None:
    total = TOTAL[broker.kind]
    got: list[Delivery] = []
    first = await _session(broker, got, total)
    await first.subscribe([FILTER])
    publisher = threading.Thread(target=burst, args=(broker, broker.pki.device, _messages(total)))
    publisher.start()
    deadline = time.monotonic() + 60
    while len(got) < HELD:
        assert time.monotonic() < deadline, f"only {len(got)} messages in 60 s"
        await asyncio.sleep(0.01)
    # as the worker stops: reading paused mid-backlog, what it holds acknowledged, then closed
    first.pause()
    held = list(got)
    for delivery in held:
        assert first.ack(delivery)
    started = time.monotonic()
    await first.close()
    closing_s = time.monotonic() - started
    await asyncio.to_thread(publisher.join, 120)

    again: list[Delivery] = []
    second = await _session(broker, again, total)
    await _until_quiet(again)
    for delivery in again:
        second.ack(delivery)
    await second.close()
    # nothing acknowledged came again, and nothing else was lost
    assert len(again) == total - len(held), f"{len(held)} acknowledged before the close"
    assert {d.payload for d in again}.isdisjoint(d.payload for d in held)
    # the broker closed after our DISCONNECT: the close never waited for its timeout
    assert closing_s < 5.0
