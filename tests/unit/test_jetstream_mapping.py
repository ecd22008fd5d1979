"""The nats source's pure parts: subjects back to topics, the cluster's URLs, the consumer."""

from __future__ import annotations

import pytest

from core.settings import IngestSettings, NatsSettings
from ingest_worker.jetstream import (
    Ensured,
    NatsTarget,
    Stranded,
    StrandedWatch,
    cluster_mqtt,
    cluster_urls,
    is_service_topic,
    orphan_consumers,
    pull_size,
    store_budget,
    stranded,
    subject_to_topic,
    subjects_overlap,
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


def test_the_store_budget_of_each_stream() -> None:
    nats = NatsSettings(max_store_bytes=3 * 2**30, stream_max_bytes=2**30)
    # $MQTT_msgs gets what FIELDLINE's reservation leaves of the node's store
    assert store_budget("$MQTT_msgs", nats) == 2 * 2**30
    # FIELDLINE drops its oldest past its own bound
    assert store_budget("FIELDLINE", nats) == 2**30
    defaults = NatsSettings()
    assert store_budget("$MQTT_msgs", defaults) == (
        defaults.max_store_bytes - defaults.stream_max_bytes
    )


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


# what nats-server 2.9.10 makes for an MQTT QoS 1 subscription to fl/acme/+/telemetry: a push
# consumer named <session hash>_<nuid>, delivering to $MQTT.sub.<nuid>
MQTT_SUB = ("Jb0JcgT5_9aTs4ZbgNhLvsZbsUYbs1K", "$MQTT.msgs.fl.acme.*.telemetry", "$MQTT.sub.x1")


def test_a_pull_consumer_of_fl_left_behind_on_mqtt_msgs_is_an_orphan() -> None:
    consumers = [
        ("ingest", "$MQTT.msgs.fl.>", None),  # the worker's own
        ("ingest-old", "$MQTT.msgs.fl.>", None),  # ingest.nats_consumer renamed
        ("everything", "", None),  # no filter: wants fl.> too
        ("acme-only", "$MQTT.msgs.fl.acme.>", None),
        MQTT_SUB,
        ("other", "$MQTT.msgs.plant.>", None),  # not fl.>: not the service's business
    ]
    assert orphan_consumers(consumers, own="ingest") == ("acme-only", "everything", "ingest-old")
    # a worker switched to FIELDLINE: its old consumer on $MQTT_msgs is an orphan too
    assert orphan_consumers(consumers, own=None)[:4] == (
        "acme-only", "everything", "ingest", "ingest-old",
    )  # fmt: skip
    assert orphan_consumers([("ingest", "$MQTT.msgs.fl.>", None), MQTT_SUB], "ingest") == ()


def test_an_orphan_is_one_warning_in_the_ensure_line() -> None:
    target = NatsTarget(urls=("tls://x:1",), context=None, name="ingest-1")
    ensured = Ensured("$MQTT_msgs", None, "unchanged", None, 3, orphans=("ingest-old",))
    line = ensured.describe(target)
    assert line.count("WARNING") == 1
    assert "ingest-old" in line
    assert "nats consumer rm" in line
    for quiet in ((), None):  # none found, or not allowed to list
        assert "WARNING" not in Ensured("$MQTT_msgs", None, "x", None, 3, orphans=quiet).describe(
            target
        )


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("$MQTT.msgs.fl.>", "$MQTT.msgs.fl.>", True),
        ("$MQTT.msgs.>", "$MQTT.msgs.fl.>", True),
        ("$MQTT.msgs.fl.acme.*.telemetry", "$MQTT.msgs.fl.>", True),
        ("$MQTT.msgs.*.acme.d1.telemetry", "$MQTT.msgs.fl.>", True),
        ("$MQTT.msgs.plant.>", "$MQTT.msgs.fl.>", False),
        ("$MQTT.msgs.fl", "$MQTT.msgs.fl.>", False),  # `>` needs one more token
        ("$MQTT.msgs.fl.a", "$MQTT.msgs.fl.b", False),
        ("", "$MQTT.msgs.fl.>", True),
    ],
)
def test_subject_filters_overlap_token_by_token(a: str, b: str, overlap: bool) -> None:
    assert subjects_overlap(a, b) is overlap
    assert subjects_overlap(b, a) is overlap


def test_one_pull_is_bounded_by_bytes_at_the_servers_largest_message() -> None:
    mib = 1024 * 1024
    default = IngestSettings()
    # 500 x 2 MiB would be ~1 GiB in one pull: 32 MiB / 2 MiB = 16 messages
    assert pull_size(default.nats_fetch_batch, 10_000, default.nats_fetch_max_bytes, 2 * mib) == 16
    assert pull_size(500, 10_000, 32 * mib, 1024) == 500  # small max_payload: the batch bounds
    assert pull_size(500, 7, 32 * mib, 1024) == 7  # max_ack_pending room bounds
    assert pull_size(500, 10_000, 64 * 1024, 8 * mib) == 1  # never 0


def test_stranded_messages_are_told_when_they_last_and_warned_once() -> None:
    watch = StrandedWatch()
    at_5 = Stranded(first=5, last=40, messages=3)
    assert watch.update(None) == (None, False)
    assert watch.update(at_5) == (None, False)  # once: maybe a deletion under way
    assert watch.update(Stranded(first=9, last=50, messages=2)) == (None, False)  # it moved
    assert watch.update(Stranded(first=9, last=60, messages=2)) == (
        Stranded(first=9, last=60, messages=2),
        True,
    )
    lasting, warn = watch.update(Stranded(first=9, last=70, messages=2))
    assert lasting is not None
    assert lasting.below_floor == 2
    assert not warn  # warned already
    assert watch.update(None) == (None, False)  # gone
    assert watch.update(at_5) == (None, False)
    assert watch.update(at_5) == (at_5, True)  # a new place is warned again
    assert Stranded(first=10, last=11, messages=50).below_floor == 2
