"""What the rendered Mosquitto keeps of a held queue through a kill -9, and through a restart.

Mosquitto saves its persistence file only periodically (and at shutdown), so a kill -9 loses
what it acknowledged since the last save. With `autosave_on_changes true` the window is a
number of changes, small enough here to assert on; benchmarks/mosquitto_durability.py
measures the window of every setting, the default (every second) included.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.clients import raw
from tests.fixtures.brokers import BrokerUnderTest

pytestmark = pytest.mark.integration

CHANGES = 20  # autosave_interval with autosave_on_changes: a queued message is one change
TOPIC = "fl/acme/dev-1/telemetry"


def _take_queue(broker: BrokerUnderTest) -> tuple[bool, list[int]]:
    """The ingest session comes back: (session present, the sequence numbers it is sent)."""
    service = raw(broker, broker.pki.service)
    try:
        present, rc = service.connect("ingest-1", clean=False)
        assert rc == 0
        got = []
        while (message := service.next_publish(1.0)) is not None:
            got.append(int(message.payload))
            service.puback(message.packet_id)
        service.disconnect()
    finally:
        service.close()
    return present, got


def _publish(broker: BrokerUnderTest, numbers: range) -> None:
    """dev-1 publishes each number at QoS 1 and waits for its PUBACK before the next."""
    device = raw(broker, broker.pki.device)
    try:
        assert device.connect("dev-1")[1] == 0
        for n in numbers:
            device.publish(TOPIC, b"%d" % n, qos=1)
        device.disconnect()
    finally:
        device.close()


def test_kill_9_loses_at_most_the_changes_since_the_last_save_and_a_restart_nothing(
    broker_factory: Callable[..., BrokerUnderTest], tmp_path: Path
) -> None:
    """The ingest session is offline, so Mosquitto queues the device's PUBACKed messages.
    kill -9 and a restart from the persistence file: only the newest, at most CHANGES, are
    gone (Mosquitto can never be loss-free under kill -9). A graceful restart loses nothing."""
    broker = broker_factory(
        "mosquitto",
        persistence_dir=tmp_path / "data",
        autosave_on_changes=True,
        autosave_interval=CHANGES,
    )
    service = raw(broker, broker.pki.service)
    try:
        assert service.connect("ingest-1", clean=False)[1] == 0
        assert service.subscribe(("fl/+/+/telemetry", 1)) == [1]
        service.disconnect()
    finally:
        service.close()

    sent = range(150)
    _publish(broker, sent)  # every one PUBACKed
    broker.proc.kill()
    broker.proc.wait()
    broker.restart()
    present, got = _take_queue(broker)
    assert present
    assert len(got) == len(set(got))
    lost = len(sent) - len(got)
    assert 0 <= lost <= CHANGES
    assert got == list(sent)[: len(got)]  # what is lost is the newest, after the last save

    more = range(1000, 1060)
    _publish(broker, more)
    broker.restart()  # SIGTERM: Mosquitto saves at shutdown
    assert _take_queue(broker) == (True, list(more))
