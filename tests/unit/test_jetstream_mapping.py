"""The nats source's pure parts: subjects back to topics, the cluster's URLs, the consumer."""

from __future__ import annotations

import pytest

from core.settings import IngestSettings, NatsSettings
from ingest_worker.jetstream import (
    NatsTarget,
    cluster_mqtt,
    cluster_urls,
    is_service_topic,
    stranded,
    subject_to_topic,
)


def test_subjects_map_back_to_the_topics_devices_published() -> None:
    assert subject_to_topic("fl.acme.d1.telemetry") == "fl/acme/d1/telemetry"
    assert subject_to_topic("fl.acme.d1.cmd-res") == "fl/acme/d1/cmd-res"
    # nats-server writes an empty MQTT level as the token "/": kept, so the topic is refused
    assert subject_to_topic("fl./.d1.telemetry") == "fl//d1/telemetry"


def test_mqtt_msgs_subjects_lose_their_prefix() -> None:
    # nats-server stores a QoS 1 publish to fl/acme/d1/telemetry as $MQTT.msgs.fl.acme.d1.telemetry
    assert subject_to_topic("$MQTT.msgs.fl.acme.d1.telemetry") == "fl/acme/d1/telemetry"
    assert subject_to_topic("$MQTT.msgs.fl.acme.d1.cmd.reset") == "fl/acme/d1/cmd/reset"


@pytest.mark.parametrize(
    ("topic", "wanted"),
    [
        ("fl/acme/d1/telemetry", True),
        ("fl/acme/d1/status", True),
        ("fl/acme/d1/events", True),
        ("fl/acme/d1/cmd-res", True),
        ("fl/acme/d1/cmd/reset", False),  # to the device: stored for its own subscription
        ("fl/acme/d1/cmd", False),
        ("fl/acme/telemetry", False),
        ("xx/acme/d1/telemetry", False),
    ],
)
def test_only_the_service_topics_are_ingested(topic: str, wanted: bool) -> None:
    assert is_service_topic(topic) is wanted


def test_cluster_urls_one_per_node() -> None:
    nats = NatsSettings(nodes=3, host="127.0.0.1", client_port=4222)
    assert cluster_urls(nats) == [
        "tls://127.0.0.1:4222",
        "tls://127.0.0.1:4223",
        "tls://127.0.0.1:4224",
    ]
    spread = NatsSettings(nodes=2, host="10.0.0.1, 10.0.0.2", client_port=4222)
    assert cluster_urls(spread) == ["tls://10.0.0.1:4222", "tls://10.0.0.2:4223"]


def test_cluster_mqtt_one_listener_per_node() -> None:
    nats = NatsSettings(nodes=2, host="10.0.0.1,10.0.0.2", mqtt_port=8883)
    assert cluster_mqtt(nats) == [("10.0.0.1", 8883), ("10.0.0.2", 8884)]


def test_the_consumer_is_filtered_to_fl_on_either_stream() -> None:
    default = NatsTarget(urls=("tls://x:1",), context=None, name="ingest-1")
    assert default.stream == IngestSettings().nats_stream == "$MQTT_msgs"
    assert default.consumer_config().filter_subject == "$MQTT.msgs.fl.>"
    native = NatsTarget(urls=("tls://x:1",), context=None, name="ingest-1", stream="FIELDLINE")
    assert native.consumer_config().filter_subject == "fl.>"


def test_messages_below_the_only_consumers_ack_floor_are_told_as_stranded() -> None:
    # what a benchmark cluster restarted from a killed run's state once showed: two messages
    # at 20002..20003 kept, the consumer's floor at 40001, nothing pending
    found = stranded(first_seq=20002, last_seq=40001, messages=2, consumers=1, ack_floor=40001)
    assert found is not None
    assert (found.first, found.last, found.messages) == (20002, 40001, 2)
    assert "20002..40001" in str(found)
    assert "will not be delivered" in str(found)


@pytest.mark.parametrize(
    ("first_seq", "messages", "consumers", "ack_floor"),
    [
        (101, 5, 1, 100),  # everything kept is above the floor: pending, will be delivered
        (1, 0, 1, 100),  # nothing kept
        (50, 5, 2, 100),  # another consumer (an MQTT QoS 1 subscription) may still want them
        (1, 5, 1, 0),  # a new consumer has acknowledged nothing
    ],
)
def test_nothing_is_stranded_when_the_stream_may_still_deliver(
    first_seq: int, messages: int, consumers: int, ack_floor: int
) -> None:
    assert stranded(first_seq, 200, messages, consumers, ack_floor) is None
