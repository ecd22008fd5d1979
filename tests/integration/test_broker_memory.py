"""The embedded broker's memory is bounded in bytes: one client cannot hurt the others (issue 12).

`fieldline broker run` runs as a process, so its RSS is read from /proc. A subscriber that
never reads is cut off at its byte limit while a publisher floods; when the global budget is
spent, a publisher is not read (TCP backpressure) instead of being acknowledged and dropped.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from broker import wire
from tests import metrics_text
from tests.clients import Paho, raw
from tests.fixtures.brokers import BrokerUnderTest
from tests.mqtt_raw import RawClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAYLOAD = b'{"metrics":{"blob":"' + b"x" * 2025 + b'"}}'  # 2 KB
RSS_LIMIT_MIB = 512
FLOOD_S = 60.0  # at most; the flood goes on for AFTER_CUT_S once the subscriber is cut off
AFTER_CUT_S = 10.0
# count limits out of the way: what is under test is that bytes bound the memory
MANY = "100000000"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def samples(broker: BrokerUnderTest) -> dict[str, float]:
    """The broker's metrics, by sample name with labels."""
    return metrics_text.samples(broker.metrics())


def by_reason(metrics: dict[str, float], name: str) -> dict[str, float]:
    return {
        re.sub(r'.*reason="([^"]*)".*', r"\1", k): v
        for k, v in metrics.items()
        if k.startswith(name + "{") and v
    }


class Flood(threading.Thread):
    """A device publishing 2 KB QoS 1 messages as fast as the broker acknowledges them
    (batches of 50, at most `window` unacknowledged)."""

    def __init__(self, client: RawClient, topic: str, window: int = 1000) -> None:
        super().__init__(daemon=True)
        self.client, self.topic, self.window = client, topic.encode(), window
        self.sent = 0
        self.acked = 0
        self.error: Exception | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        packet_id = 0
        try:
            while not self.stop.is_set():
                batch = bytearray()
                for _ in range(50):
                    packet_id = packet_id % 65535 + 1
                    batch += wire.publish(self.topic, PAYLOAD, 1, False, packet_id=packet_id)
                self.client.send(bytes(batch))
                self.sent += 50
                while self.sent - self.acked > self.window:
                    first, _body = self.client.read_packet(10)
                    self.acked += first >> 4 == 4
        except (OSError, ConnectionError) as exc:
            self.error = exc


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_subscriber_that_never_reads_is_cut_off_and_memory_stays_bounded(
    broker_factory: Callable[..., BrokerUnderTest],
) -> None:
    broker = broker_factory(
        "fieldline",
        env={
            "FIELDLINE_BROKER__MAX_QUEUED": MANY,
            "FIELDLINE_BROKER__SERVICE_MAX_QUEUED": MANY,
            "FIELDLINE_LOG_LEVEL": "INFO",
        },
    )
    pki = broker.pki
    stuck = raw(broker, pki.operator)
    assert stuck.connect("ops-1", clean=False) == (False, 0)
    assert stuck.subscribe(("fl/acme/#", 1)) == [1]
    # from here on the operator never reads its socket

    publisher = raw(broker, pki.device)
    assert publisher.connect("dev-1") == (False, 0)
    flood = Flood(publisher, "fl/acme/dev-1/telemetry")
    flood.start()
    peak = 0.0
    try:
        deadline = time.monotonic() + FLOOD_S
        while time.monotonic() < deadline:
            peak = max(peak, rss_mib(broker.proc.pid))
            assert peak < RSS_LIMIT_MIB, f"broker RSS {peak:.0f} MiB after {flood.acked} messages"
            assert flood.is_alive(), f"the publisher stopped: {flood.error!r}"
            cut = by_reason(samples(broker), "fieldline_broker_disconnects_total")
            if cut.get("slow-consumer") and deadline - time.monotonic() > AFTER_CUT_S:
                # cut off: flood on a while, the memory must stay bounded after it too
                deadline = time.monotonic() + AFTER_CUT_S
            time.sleep(0.5)
    finally:
        flood.stop.set()
        flood.join(15)
        publisher.close()
    metrics = samples(broker)
    assert flood.acked > 20_000, "the publisher was not flooding"
    assert by_reason(metrics, "fieldline_broker_disconnects_total").get("slow-consumer") == 1
    assert by_reason(metrics, "fieldline_broker_dropped_total").get("queue-bytes", 0) > 1000
    # its persistent session keeps at most its limits (16 MiB queued + 4 MiB in flight)
    assert metrics['fieldline_broker_held_bytes{pool="offline"}'] <= 20 * 1024 * 1024
    assert stuck.closed_by_broker(10), "the stuck subscriber was not disconnected"
    stuck.close()

    # the broker still serves: a fresh client connects and gets its message
    fresh = Paho(broker, pki.operator2)
    device = Paho(broker, pki.device2)
    try:
        assert fresh.connect()
        assert fresh.subscribe("fl/acme/dev-2/telemetry") == [1]
        assert device.connect()
        device.publish("fl/acme/dev-2/telemetry", b'{"metrics":{"t":1}}')
        assert [m.payload for m in fresh.wait_for(1, 10)] == [b'{"metrics":{"t":1}}']
    finally:
        fresh.close()
        device.close()
    print(f"peak broker RSS {peak:.0f} MiB, {flood.acked} messages acknowledged")


def test_a_publisher_is_throttled_not_dropped_when_the_budget_is_spent(
    broker_factory: Callable[..., BrokerUnderTest],
) -> None:
    # three subscribers holding their PUBACKs fill a 1 MiB budget before any of them reaches
    # its own limits (256 KiB queued + 256 KiB in flight each)
    broker = broker_factory(
        "fieldline",
        env={
            "FIELDLINE_BROKER__MEMORY_BUDGET_BYTES": str(1024 * 1024),
            "FIELDLINE_BROKER__MAX_QUEUED_BYTES": str(256 * 1024),
            "FIELDLINE_BROKER__MAX_INFLIGHT_BYTES": str(256 * 1024),
            "FIELDLINE_BROKER__SERVICE_MAX_QUEUED_BYTES": str(256 * 1024),
            "FIELDLINE_BROKER__SERVICE_MAX_INFLIGHT_BYTES": str(256 * 1024),
            "FIELDLINE_LOG_LEVEL": "INFO",
        },
    )
    pki = broker.pki
    subscribers: list[RawClient] = []
    for bundle in (pki.operator, pki.operator2, pki.admin):
        client = raw(broker, bundle)
        assert client.connect(bundle.identity.id)[1] == 0
        assert client.subscribe(("fl/acme/#", 1)) == [1]
        subscribers.append(client)
    publisher = raw(broker, pki.device)
    assert publisher.connect("dev-1") == (False, 0)
    publisher.sock.settimeout(1.0)  # a PUBACK later than this: the broker is not reading

    published = 0
    throttled = False
    while published < 3000:
        try:
            publisher.publish("fl/acme/dev-1/telemetry", b"%06d" % published + PAYLOAD[6:], 1)
        except TimeoutError:  # socket.timeout: no PUBACK, the broker stopped reading
            throttled = True
            break
        published += 1
    assert throttled, f"{published} messages acknowledged, the publisher was never slowed"
    assert 100 < published < 600  # about 1 MiB / 3 subscribers / 2.2 KB
    metrics = samples(broker)
    assert metrics["fieldline_broker_publishers_paused"] == 1
    assert metrics["fieldline_broker_backpressure_pauses_total"] >= 1
    assert by_reason(metrics, "fieldline_broker_dropped_total") == {}
    assert "slow-consumer" not in by_reason(metrics, "fieldline_broker_disconnects_total")

    # the subscribers catch up: the publisher is read again and nothing was lost
    expected = published + 1  # the one sent while throttled
    got: list[list[bytes]] = [[] for _ in subscribers]
    deadline = time.monotonic() + 20
    while any(len(g) < expected for g in got):
        assert time.monotonic() < deadline, f"delivered {[len(g) for g in got]} of {expected}"
        for client, seen in zip(subscribers, got, strict=True):
            message = client.next_publish(0.05)
            if message is not None:
                seen.append(message.payload[:6])
                client.puback(message.packet_id)
    first, body = publisher.read_packet(10)
    assert (first >> 4, body) == (4, expected.to_bytes(2, "big")), "the throttled PUBLISH"
    for seen in got:
        assert seen == [b"%06d" % i for i in range(expected)]
    wait_until(lambda: samples(broker)["fieldline_broker_publishers_paused"] == 0, 5, "resume")
    for client in (*subscribers, publisher):
        client.close()
