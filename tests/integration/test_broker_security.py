"""The attack suite: docs/design.md's ACL matrix and identity rules, against both brokers.

Every test runs twice, on the embedded broker (`fieldline broker run`) and on Mosquitto with
the config `fieldline broker mosquitto-config` renders, with real clients over real mutual
TLS. Each attack asserts what the attacker (and every bystander) received, not only a
return code. Where the brokers legitimately differ (Mosquitto grants a SUBACK and then
filters delivery; it binds the client id to the CN instead of refusing), the test says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
from collections.abc import Callable

import pytest

from broker import wire
from broker.policy import Action, Policy, Principal
from ingest_worker.mqtt import Delivery, open_subscriber
from ingest_worker.service import client_context
from tests.clients import MosquittoSub, Paho, mosquitto_pub, raw
from tests.fixtures.brokers import KINDS, BrokerUnderTest
from tests.mqtt_raw import connect_packet
from tests.waits import until, wait_until

pytestmark = pytest.mark.integration

REFUSED = 0x80
POLICY = Policy()


def _connected(client: Paho) -> Paho:
    assert client.connect(), f"{client.client_id} could not connect (CONNACK {client.connack_rc})"
    return client


# -- what is allowed works -------------------------------------------------------------------
def test_every_allowed_operation_of_the_matrix(broker: BrokerUnderTest) -> None:
    pki = broker.pki
    ops = _connected(Paho(broker, pki.operator))
    svc = _connected(Paho(broker, pki.service))
    admin = _connected(Paho(broker, pki.admin))
    dev = _connected(Paho(broker, pki.device))
    try:
        assert ops.subscribe("fl/acme/#") == [1]
        for kind in ("telemetry", "status", "events", "cmd-res"):
            assert svc.subscribe(f"fl/+/+/{kind}") == [1]
        assert admin.subscribe("#") == [1]
        assert dev.subscribe("fl/acme/dev-1/cmd/#") == [1]

        dev.publish("fl/acme/dev-1/telemetry", b'{"metrics":{"t":1}}')
        dev.publish("fl/acme/dev-1/status", b'{"state":"online"}', retain=True)
        dev.publish("fl/acme/dev-1/events", b'{"kind":"door"}')
        ops.publish("fl/acme/dev-1/cmd/reset", b'{"id":"c1","name":"reset"}')
        assert [m.topic for m in dev.wait_for(1)] == ["fl/acme/dev-1/cmd/reset"]
        dev.publish("fl/acme/dev-1/cmd-res", b'{"id":"c1","status":"ok"}')

        upstream = [f"fl/acme/dev-1/{k}" for k in ("telemetry", "status", "events", "cmd-res")]
        assert sorted(m.topic for m in svc.wait_for(4)) == sorted(upstream)
        everything = sorted([*upstream, "fl/acme/dev-1/cmd/reset"])
        assert sorted(m.topic for m in ops.wait_for(5)) == everything
        assert sorted(m.topic for m in admin.wait_for(5)) == everything
        assert not any(m.retain for m in ops.messages)  # live deliveries are not flagged
    finally:
        for client in (ops, svc, admin, dev):
            client.close()
    # the retained status reaches a later subscriber, flagged retained
    later = _connected(Paho(broker, pki.service))
    try:
        later.subscribe("fl/+/+/status")
        first = later.wait_for(1)[0]
        assert (first.topic, first.payload, first.retain) == (
            "fl/acme/dev-1/status", b'{"state":"online"}', True,
        )  # fmt: skip
    finally:
        later.close()


def test_mosquitto_clients_with_issued_bundles(broker: BrokerUnderTest) -> None:
    """The engineer's tools: mosquitto_sub as an operator, mosquitto_pub as the device."""
    sub = MosquittoSub(broker, broker.pki.operator, "fl/acme/#")
    for n in (1, 2):  # the second is the marker: a duplicate of the first would come before it
        message = f'{{"m":{n}}}'
        pub = mosquitto_pub(
            broker, broker.pki.device, "fl/acme/dev-1/telemetry", message, "-q", "1"
        )
        assert pub.returncode == 0, pub.stderr
    assert sub.lines(2) == [
        'fl/acme/dev-1/telemetry {"m":1}', 'fl/acme/dev-1/telemetry {"m":2}'
    ]  # fmt: skip


# -- who may connect -------------------------------------------------------------------------
@pytest.mark.parametrize("who", ["no certificate", "expired", "revoked", "wrong_ca"])
def test_bad_certificates_are_refused_and_learn_nothing(broker: BrokerUnderTest, who: str) -> None:
    pki = broker.pki
    bundle = None if who == "no certificate" else getattr(pki, who)
    watcher = _connected(Paho(broker, pki.admin))
    watcher.subscribe("fl/acme/#")
    victim = _connected(Paho(broker, pki.device))
    victim.subscribe("fl/acme/dev-1/cmd/#")
    try:
        attacker = Paho(broker, bundle, client_id="dev-1")
        assert not attacker.connect(timeout=3)
        # whatever the client library managed to send, nothing arrived anywhere
        attacker.client.publish("fl/acme/dev-1/telemetry", b"forged", qos=0)
        attacker.client.loop_stop()
        attacker.client.reinitialise()  # closes its socket pair now (paho#627)
        ops = _connected(Paho(broker, pki.operator))
        ops.publish("fl/acme/dev-1/cmd/reset", b"{}")
        ops.close()
        # the command is the watcher's marker: sent after the forged bytes, it comes after them
        assert [m.payload for m in watcher.until_marker(b"{}")] == []
        assert attacker.messages == []
        # the victim's session survived the attempt with its client id
        assert [m.topic for m in victim.wait_for(1)] == ["fl/acme/dev-1/cmd/reset"]
    finally:
        watcher.close()
        victim.close()


def test_client_id_other_than_the_certificate(broker: BrokerUnderTest) -> None:
    """dev-1's certificate asking for client id dev-2 never becomes dev-2."""
    pki = broker.pki
    victim = _connected(Paho(broker, pki.device2))
    victim.subscribe("fl/acme/dev-2/cmd/#")
    attacker = Paho(broker, pki.device, client_id="dev-2")
    try:
        if broker.kind == "fieldline":
            assert not attacker.connect()
            # CONNACK 2, identifier rejected (paho reports it as MQTT 5's reason code 133)
            assert attacker.connack_rc == 133
        else:
            # Mosquitto's use_username_as_clientid replaces the id with the CN: it is dev-1
            assert attacker.connect()
            assert attacker.subscribe("fl/acme/dev-2/cmd/#") == [1]  # granted, then filtered
            assert attacker.subscribe("fl/acme/dev-1/cmd/#") == [1]  # its own, for the marker
        ops = _connected(Paho(broker, pki.operator))
        ops.publish("fl/acme/dev-2/cmd/reset", b'{"id":"x"}')
        ops.publish("fl/acme/dev-1/cmd/marker", b"marker")
        ops.close()
        assert [m.topic for m in victim.wait_for(1)] == ["fl/acme/dev-2/cmd/reset"]
        if broker.kind == "mosquitto":
            assert attacker.until_marker(b"marker") == []
        assert attacker.messages == []
        assert not victim.disconnected.is_set()
    finally:
        attacker.close()
        victim.close()


# -- topics of others ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "topic",
    [
        "fl/acme/dev-2/telemetry",  # another device
        "fl/globex/dev-9/telemetry",  # another tenant
        "fl/acme/dev-2/cmd/reset",  # a command to another device
        "fl/acme/dev-1/cmd/reset",  # a command to itself (only operators send commands)
        "fl/acme/dev-1/other",  # not a topic of the grammar
        "$SYS/broker/forged",  # reserved for the broker
    ],
)
def test_publish_to_a_forbidden_topic_is_never_delivered(
    broker: BrokerUnderTest, topic: str
) -> None:
    pki = broker.pki
    admin = _connected(Paho(broker, pki.admin))
    admin.subscribe("#")
    dev2 = _connected(Paho(broker, pki.device2))
    dev2.subscribe("fl/acme/dev-2/cmd/#")
    try:
        result = mosquitto_pub(broker, pki.device, topic, "forged", "-q", "1")
        assert result.returncode == 0, result.stderr  # MQTT 3.1.1 has no way to say no
        # markers, sent once the forged message was acknowledged: it would come before them
        mosquitto_pub(broker, pki.device, "fl/acme/dev-1/telemetry", "marker", "-q", "1")
        mosquitto_pub(broker, pki.operator, "fl/acme/dev-2/cmd/marker", "marker2", "-q", "1")
        assert admin.until_marker(b"marker") == []
        assert dev2.until_marker(b"marker2") == []
    finally:
        admin.close()
        dev2.close()


def test_a_dollar_topic_is_the_brokers_even_for_an_admin(broker: BrokerUnderTest) -> None:
    """One rule on both brokers: a PUBLISH to a `$` topic is acknowledged and dropped (not a
    reason to close the connection), and the embedded broker counts it as a denial."""
    result = mosquitto_pub(broker, broker.pki.admin, "$SYS/broker/forged", "x", "-q", "1")
    assert result.returncode == 0, result.stderr  # PUBACKed, the connection not closed
    if broker.kind == "fieldline":
        assert 'action="publish",reason="reserved"' in broker.metrics()


@pytest.mark.parametrize(
    ("who", "topic_filter"),
    [
        ("device", "fl/acme/dev-2/cmd/#"),
        ("device", "#"),
        ("device", "$SYS/#"),
        ("device", "fl/+/+/cmd/#"),
        ("device", "fl/acme/#"),
        ("operator", "fl/globex/#"),
        ("operator", "#"),
        ("operator", "$SYS/#"),
        ("operator", "fl/+/+/telemetry"),
    ],
)
def test_forbidden_subscriptions_receive_nothing(
    broker: BrokerUnderTest, who: str, topic_filter: str
) -> None:
    pki = broker.pki
    bundle = getattr(pki, who)
    attacker = _connected(Paho(broker, bundle))
    try:
        codes = attacker.subscribe(topic_filter)
        if broker.kind == "fieldline":
            assert codes == [REFUSED]
        else:
            # Mosquitto's ACL file grants the SUBSCRIBE and filters every delivery (upstream 744)
            assert codes in ([1], [REFUSED])
        assert attacker.subscribe("fl/acme/dev-1/cmd/#") == [1]  # allowed: for the marker
        dev2 = _connected(Paho(broker, pki.device2))
        dev9 = _connected(Paho(broker, pki.device_other_tenant))
        ops2 = _connected(Paho(broker, pki.operator2))
        ops9 = _connected(Paho(broker, pki.operator_other))
        dev2.publish("fl/acme/dev-2/telemetry", b"t2")
        dev2.publish("fl/acme/dev-2/status", b"s2", retain=True)
        dev9.publish("fl/globex/dev-9/telemetry", b"t9")
        ops2.publish("fl/acme/dev-2/cmd/reset", b"c2")
        ops9.publish("fl/globex/dev-9/cmd/reset", b"c9")
        # The marker follows every publish above and the SUBSCRIBE: Mosquitto sends its retained
        # $SYS topics on SUBSCRIBE, so they too would come first.
        ops2.publish("fl/acme/dev-1/cmd/marker", b"marker")
        for client in (dev2, dev9, ops2, ops9):
            client.close()
        attacker.until_marker(b"marker")
        principal = Principal(bundle.identity.id, bundle.identity.tenant, bundle.identity.role)
        leaked = [
            m.topic
            for m in attacker.messages
            if not POLICY.allows(principal, Action.RECEIVE, m.topic)
        ]
        assert leaked == []
        if broker.kind == "fieldline" or who == "device":
            assert attacker.messages == []
    finally:
        attacker.close()


def test_operator_reads_its_tenant_only(broker: BrokerUnderTest) -> None:
    pki = broker.pki
    ops = _connected(Paho(broker, pki.operator))
    ops9 = _connected(Paho(broker, pki.operator_other))
    try:
        assert ops.subscribe("fl/acme/#") == [1]
        assert ops9.subscribe("fl/globex/#") == [1]
        dev9 = _connected(Paho(broker, pki.device_other_tenant))
        dev9.publish("fl/globex/dev-9/telemetry", b"globex data")
        dev9.close()
        assert [m.payload for m in ops9.wait_for(1)] == [b"globex data"]
        assert ops.marker("fl/acme/dev-1/cmd/marker") == []
        # nor can tenant A's operator command tenant B's devices
        ops.publish("fl/globex/dev-9/cmd/reset", b"{}")
        assert [m.payload for m in ops9.marker("fl/globex/dev-9/cmd/marker")] == [b"globex data"]
    finally:
        ops.close()
        ops9.close()


# -- the Will --------------------------------------------------------------------------------
def test_will_aimed_at_another_device_never_fires(broker: BrokerUnderTest) -> None:
    pki = broker.pki
    watcher = _connected(Paho(broker, pki.admin))
    watcher.subscribe("#")
    attacker = raw(broker, pki.device)
    try:
        _present, rc = attacker.connect(
            "dev-1", will=("fl/acme/dev-2/status", b'{"state":"offline"}', 1, True)
        )
        if broker.kind == "fieldline":
            assert rc == 5  # refused at CONNECT
        else:
            assert rc == 0  # Mosquitto checks the Will against the ACL when it sends it
        attacker.close()  # an abnormal end: a Will, if accepted, would fire now
        if broker.kind == "mosquitto":
            # nothing orders a marker after the broker noticing the closed socket: a quiet time
            time.sleep(1.0)
        assert watcher.messages == []
        late = _connected(Paho(broker, pki.operator))
        late.subscribe("fl/acme/#")
        # a retained Will on dev-2's status would have been sent on SUBSCRIBE, before this
        assert late.marker("fl/acme/dev-1/cmd/marker") == []
        late.close()
    finally:
        attacker.close()
        watcher.close()


def test_silent_client_will_reaches_subscribers_within_one_and_a_half_keepalive(
    broker: BrokerUnderTest,
) -> None:
    pki = broker.pki
    watcher = _connected(Paho(broker, pki.operator))
    watcher.subscribe("fl/acme/dev-1/status")
    device = raw(broker, pki.device)
    try:
        assert device.connect(
            "dev-1", keepalive=2, will=("fl/acme/dev-1/status", b'{"state":"offline"}', 1, True)
        ) == (False, 0)
        started = time.monotonic()
        # the device goes silent: no PINGREQ, the socket stays open
        got = watcher.wait_for(1, timeout=12)
        elapsed = time.monotonic() - started
        assert [(m.topic, m.payload) for m in got] == [
            ("fl/acme/dev-1/status", b'{"state":"offline"}')
        ]
        if broker.kind == "fieldline":
            assert 2.9 <= elapsed <= 3.6, f"the Will came after {elapsed:.1f} s, not 1.5 x 2 s"
        else:
            # Mosquitto 2.0 checks keepalives every 5 s: the Will comes up to that much later
            assert 2.9 <= elapsed <= 3 + 6.5, f"the Will came after {elapsed:.1f} s"
        assert device.closed_by_broker(2)
    finally:
        device.close()
        watcher.close()


# -- sessions --------------------------------------------------------------------------------
def test_persistent_session_cannot_be_taken_with_another_certificate(
    broker: BrokerUnderTest,
) -> None:
    pki = broker.pki
    victim = raw(broker, pki.device2)
    assert victim.connect("dev-2", clean=False)[1] == 0
    assert victim.subscribe(("fl/acme/dev-2/cmd/#", 1)) == [1]
    victim.disconnect()
    ops = _connected(Paho(broker, pki.operator))
    ops.publish("fl/acme/dev-2/cmd/reset", b'{"id":"queued"}')
    ops.close()

    for clean in (True, False):  # wipe the session, or take it over
        attacker = raw(broker, pki.device)  # dev-1's certificate, asking for dev-2's session
        try:
            present, rc = attacker.connect("dev-2", clean=clean)
            if broker.kind == "fieldline":
                assert rc == 2
            else:
                assert (present, rc) == (False, 0)  # bound to its CN: dev-1's own session
                assert attacker.subscribe(("fl/acme/dev-2/cmd/#", 1)) == [1]
            assert attacker.publishes(1.0) == []
        finally:
            attacker.close()
    # the victim's queued command is still there for the victim
    victim = raw(broker, pki.device2)
    try:
        assert victim.connect("dev-2", clean=False) == (True, 0)
        message = victim.next_publish(5)
        assert message is not None
        assert (message.topic, message.payload) == ("fl/acme/dev-2/cmd/reset", b'{"id":"queued"}')
    finally:
        victim.close()


def test_connect_with_the_victims_id_and_a_wrong_certificate(broker: BrokerUnderTest) -> None:
    """The victim keeps its connection, its subscriptions, and its commands."""
    pki = broker.pki
    victim = _connected(Paho(broker, pki.device2, clean=False))
    victim.subscribe("fl/acme/dev-2/cmd/#")
    try:
        for bundle in (pki.wrong_ca, pki.expired, pki.revoked, pki.device, pki.operator):
            attempt = None
            try:
                attempt = raw(broker, bundle)
                _present, rc = attempt.connect("dev-2", clean=True)
                if rc == 0:  # only Mosquitto lets these in, and then as their own CN
                    assert broker.kind == "mosquitto"
                    assert bundle in (pki.device, pki.operator)
            except (ConnectionError, ssl.SSLError, OSError):
                pass
            finally:
                if attempt is not None:
                    attempt.close()
        ops = _connected(Paho(broker, pki.operator))
        ops.publish("fl/acme/dev-2/cmd/reset", b'{"id":"after"}')
        ops.close()
        assert [m.payload for m in victim.wait_for(1)] == [b'{"id":"after"}']
        # a takeover would have closed the victim's connection before this command came
        assert not victim.disconnected.is_set()
    finally:
        victim.close()


# -- retained messages -----------------------------------------------------------------------
def test_retained_message_on_a_forbidden_topic_is_not_kept(broker: BrokerUnderTest) -> None:
    pki = broker.pki
    forged = mosquitto_pub(
        broker, pki.device, "fl/acme/dev-2/status", '{"state":"offline"}', "-r", "-q", "1"
    )
    assert forged.returncode == 0, forged.stderr
    mosquitto_pub(broker, pki.device, "fl/acme/dev-1/status", '{"state":"online"}', "-r", "-q", "1")
    ops = _connected(Paho(broker, pki.operator))
    try:
        ops.subscribe("fl/acme/#")
        got = ops.marker("fl/acme/dev-1/cmd/marker")  # after every retained message
        assert [(m.topic, m.retain) for m in got] == [("fl/acme/dev-1/status", True)], got
    finally:
        ops.close()


def test_reconnect_does_not_collect_other_clients_retained_messages(
    broker: BrokerUnderTest,
) -> None:
    pki = broker.pki
    ops = _connected(Paho(broker, pki.operator))  # a wide subscription exists on the broker
    ops.subscribe("fl/acme/#")
    for bundle in (pki.device2, pki.device_other_tenant):
        topic = f"fl/{bundle.identity.tenant}/{bundle.identity.id}/status"
        assert (
            mosquitto_pub(broker, bundle, topic, "secret-status", "-r", "-q", "1").returncode == 0
        )
    attacker = raw(broker, pki.device)
    try:
        assert attacker.connect("dev-1", clean=False)[1] == 0
        assert attacker.subscribe(("fl/acme/dev-1/cmd/#", 1)) == [1]
        attacker.close()
        attacker = raw(broker, pki.device)
        assert attacker.connect("dev-1", clean=False) == (True, 0)
        assert attacker.publishes(1.5) == []
    finally:
        attacker.close()
        ops.close()


def test_retain_only_on_status(broker: BrokerUnderTest) -> None:
    """Retain on a device's own telemetry: refused by the embedded broker; Mosquitto's ACL has
    no notion of retain, so there it is kept (a documented difference)."""
    pki = broker.pki
    assert (
        mosquitto_pub(
            broker, pki.device, "fl/acme/dev-1/telemetry", "t", "-r", "-q", "1"
        ).returncode
        == 0
    )
    ops = _connected(Paho(broker, pki.operator))
    try:
        ops.subscribe("fl/acme/#")
        kept = [(m.topic, m.retain) for m in ops.marker("fl/acme/dev-1/cmd/marker")]
        if broker.kind == "fieldline":
            assert kept == []
        else:
            assert kept == [("fl/acme/dev-1/telemetry", True)]
    finally:
        ops.close()


# -- MQTT 5 and the connection slots ---------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_aborted_mqtt5_connects_do_not_lock_devices_out(
    broker_factory: Callable[..., BrokerUnderTest], kind: str
) -> None:
    """Fifty MQTT 5 CONNECTs, half cut mid-packet, all dropped, on a 20-connection broker."""
    b = broker_factory(kind, env={"FIELDLINE_BROKER__MAX_CONNECTIONS": "20"}, max_connections=20)
    pki = b.pki
    v5 = connect_packet("dev-1", level=5)
    for i in range(50):
        client = raw(b, pki.device)
        client.send(v5 if i % 2 else v5[: len(v5) // 2])
        client.close()
    attempts: list[Paho] = []

    def a_device_connects() -> bool:  # once the broker has closed the aborted connections
        attempts.append(Paho(b, pki.device))
        return attempts[-1].connect(timeout=1)

    wait_until(a_device_connects, 10, "a device to connect after the aborted CONNECTs")
    for failed in attempts[:-1]:
        failed.close()
    dev = attempts[-1]
    ops = _connected(Paho(b, pki.operator))
    try:
        ops.subscribe("fl/acme/#")
        dev.publish("fl/acme/dev-1/telemetry", b"still here")
        assert [m.payload for m in ops.wait_for(1)] == [b"still here"]
    finally:
        dev.close()
        ops.close()


def test_mqtt5_connect_is_answered_with_unacceptable_protocol(
    broker_factory: Callable[..., BrokerUnderTest],
) -> None:
    b = broker_factory("fieldline")
    client = raw(b, b.pki.device)
    try:
        client.send(connect_packet("dev-1", level=5))
        first, body = client.read_packet(5)
        assert (first, body) == (0x20, b"\x00\x01")  # CONNACK, unacceptable protocol version
        assert client.closed_by_broker(3)
    finally:
        client.close()
    assert 'fieldline_broker_connects_total{result="unsupported-protocol"} 1.0' in b.metrics()


def test_a_flood_of_refused_connects_is_logged_within_the_budget(
    broker_factory: Callable[..., BrokerUnderTest],
) -> None:
    """One client refused 40 times in a row: the broker's log holds the budget's burst of
    those lines and counts the rest (docs/operations.md, Limits: logs)."""
    b = broker_factory(
        "fieldline", env={"FIELDLINE_LOG_BURST": "4", "FIELDLINE_LOG_LINES_PER_S": "0.001"}
    )
    for _ in range(40):
        client = raw(b, b.pki.device)
        try:
            client.send(connect_packet("dev-1", level=5))
            assert client.read_packet(5)[0] == 0x20
        finally:
            client.close()
    wait_until(
        lambda: (
            'fieldline_broker_connects_total{result="unsupported-protocol"} 40.0' in b.metrics()
        ),
        10,
        "the 40 refusals counted",
    )
    # (the same kind of line as any refused connect: the fixture's readiness probe's too)
    lines = [x for x in b.log_text().splitlines() if "event=connect_refused" in x]
    assert len(lines) == 4
    assert sum("reason=unsupported-protocol" in x for x in lines) >= 3
    (held,) = (
        float(x.split()[1])
        for x in b.metrics().splitlines()
        if x.startswith("fieldline_log_lines_suppressed_total ")
    )
    assert held >= 36


# -- delivery guarantees ---------------------------------------------------------------------
@pytest.mark.parametrize("qos", [1, 2])
def test_in_flight_command_is_redelivered_after_reconnect(
    broker: BrokerUnderTest, qos: int
) -> None:
    pki = broker.pki
    device = raw(broker, pki.device)
    assert device.connect("dev-1", clean=False)[1] == 0
    assert device.subscribe(("fl/acme/dev-1/cmd/#", qos)) == [qos]
    ops = _connected(Paho(broker, pki.operator))
    ops.publish("fl/acme/dev-1/cmd/reset", b'{"id":"c-1"}', qos=qos)
    ops.close()
    first = device.next_publish(5)
    assert first is not None
    assert (first.payload, first.qos, first.dup) == (b'{"id":"c-1"}', qos, False)
    device.close()  # crashed before acknowledging

    device = raw(broker, pki.device)
    try:
        assert device.connect("dev-1", clean=False) == (True, 0)
        again = device.next_publish(5)
        assert again is not None, "the unacknowledged command was lost"
        assert (again.payload, again.qos, again.dup, again.retain) == (
            b'{"id":"c-1"}',
            qos,
            True,
            False,
        )
        if qos == 1:
            device.puback(again.packet_id)
        else:
            device.send(b"\x50\x02" + struct.pack("!H", again.packet_id))  # PUBREC
            first_byte, body = device.read_packet(5)
            assert first_byte == 0x62  # PUBREL
            device.send(b"\x70\x02" + body)  # PUBCOMP
        assert device.publishes(1.0) == []
    finally:
        device.close()
    device = raw(broker, pki.device)
    try:
        assert device.connect("dev-1", clean=False) == (True, 0)
        assert device.publishes(1.0) == []  # acknowledged means gone
    finally:
        device.close()


def test_queued_messages_keep_their_qos_and_are_not_retained(broker: BrokerUnderTest) -> None:
    pki = broker.pki
    device = raw(broker, pki.device)
    assert device.connect("dev-1", clean=False)[1] == 0
    assert device.subscribe(("fl/acme/dev-1/cmd/#", 2)) == [2]
    device.disconnect()
    ops = _connected(Paho(broker, pki.operator))
    ops.publish("fl/acme/dev-1/cmd/set-interval", b'{"id":"q1"}', qos=1)
    ops.close()
    device = raw(broker, pki.device)
    try:
        assert device.connect("dev-1", clean=False) == (True, 0)
        message = device.next_publish(5)
        assert message is not None
        assert (message.payload, message.qos, message.retain) == (b'{"id":"q1"}', 1, False)
        device.puback(message.packet_id)
    finally:
        device.close()


@pytest.mark.parametrize(("sub_qos", "pub_qos"), [(0, 1), (2, 0), (2, 1), (1, 2)])
def test_delivery_qos_is_the_lower_of_publish_and_subscription(
    broker: BrokerUnderTest, sub_qos: int, pub_qos: int
) -> None:
    pki = broker.pki
    device = raw(broker, pki.device)
    ops = _connected(Paho(broker, pki.operator))
    try:
        assert device.connect("dev-1")[1] == 0
        assert device.subscribe(("fl/acme/dev-1/cmd/#", sub_qos)) == [sub_qos]
        ops.publish("fl/acme/dev-1/cmd/reset", b"command", qos=pub_qos)
        message = device.next_publish(5)
        assert message is not None
        assert (message.payload, message.qos) == (b"command", min(sub_qos, pub_qos))
    finally:
        ops.close()
        device.close()


def test_oversized_packet_closes_the_connection(broker: BrokerUnderTest) -> None:
    pki = broker.pki
    ops = _connected(Paho(broker, pki.operator))
    ops.subscribe("fl/acme/#")
    device = raw(broker, pki.device)
    try:
        assert device.connect("dev-1")[1] == 0
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
            device.publish("fl/acme/dev-1/telemetry", b"x" * (3 * 1024 * 1024), qos=0)
        assert device.closed_by_broker(5)
        assert ops.marker("fl/acme/dev-1/cmd/marker") == []
    finally:
        device.close()
        ops.close()


# -- revocation and re-issue -----------------------------------------------------------------
def test_revocation_takes_effect_without_restart(broker: BrokerUnderTest) -> None:
    pki = broker.pki
    name = f"dev-rev-{broker.kind}"
    bundle = pki.pki.issue(name, tenant="acme", role=pki.device.identity.role, force=True)
    broker.apply_registry()
    live = _connected(Paho(broker, bundle))
    live.subscribe(f"fl/acme/{name}/cmd/#")
    pki.pki.revoke(name)
    broker.apply_registry()
    if broker.kind == "fieldline":
        # the embedded broker drops live connections of revoked certificates
        assert live.disconnected.wait(3)
    live.close()
    again = Paho(broker, bundle)
    assert not again.connect(timeout=3)
    again.close()


def test_new_certificates_work_after_rendering_and_sighup(broker: BrokerUnderTest) -> None:
    pki = broker.pki
    name = f"dev-new-{broker.kind}"
    bundle = pki.pki.issue(name, tenant="acme", role=pki.device.identity.role, force=True)
    ops = _connected(Paho(broker, pki.operator))
    ops.subscribe("fl/acme/#")
    try:
        topic = f"fl/acme/{name}/telemetry"
        if broker.kind == "mosquitto":
            # not in the rendered ACL yet: denied until the files are rendered again
            assert mosquitto_pub(broker, bundle, topic, "before", "-q", "1").returncode == 0
            assert ops.marker("fl/acme/dev-1/cmd/marker") == []
        broker.apply_registry()
        assert mosquitto_pub(broker, bundle, topic, "after", "-q", "1").returncode == 0
        assert [m.payload for m in ops.wait_for(1)] == [b"after"]
    finally:
        ops.close()


def test_reissued_operator_resumes_its_session_without_the_old_tenant(
    broker: BrokerUnderTest,
) -> None:
    """Every delivery is checked again (RECEIVE): a persistent session subscribed under tenant
    acme gets nothing of acme once its id's certificate is re-issued for tenant globex."""
    pki = broker.pki
    name = f"ops-move-{broker.kind}"
    acme = pki.pki.issue(name, tenant="acme", role=pki.operator.identity.role, force=True)
    broker.apply_registry()
    client = raw(broker, acme)
    assert client.connect(name, clean=False)[1] == 0
    assert client.subscribe(("fl/acme/#", 1)) == [1]
    client.close()
    globex = pki.pki.issue(name, tenant="globex", role=pki.operator.identity.role, force=True)
    broker.apply_registry()
    assert (
        mosquitto_pub(
            broker, pki.device, "fl/acme/dev-1/status", "acme-status", "-r", "-q", "1"
        ).returncode
        == 0
    )
    client = raw(broker, globex)
    try:
        assert client.connect(name, clean=False) == (True, 0)
        mosquitto_pub(broker, pki.device, "fl/acme/dev-1/telemetry", "acme-live", "-q", "1")
        assert client.publishes(1.5) == []
    finally:
        client.close()


# -- operations ------------------------------------------------------------------------------
def test_metrics_count_connections_messages_and_denials(
    broker_factory: Callable[..., BrokerUnderTest],
) -> None:
    b = broker_factory("fieldline")
    pki = b.pki
    ops = _connected(Paho(b, pki.operator))
    ops.subscribe("fl/acme/#")
    ops.subscribe("fl/globex/#")  # denied: subscribe not-granted
    dev = _connected(Paho(b, pki.device))
    dev.publish("fl/acme/dev-1/telemetry", b"ok")
    dev.publish("fl/acme/dev-2/telemetry", b"no")  # denied: publish not-granted
    dev.publish("fl/acme/dev-1/events", b"no", retain=True)  # denied: retain
    ops.wait_for(1)
    text = b.metrics()
    dev.close()
    ops.close()
    assert "fieldline_broker_connected_clients 2.0" in text
    assert 'fieldline_broker_connects_total{result="accepted"} 2.0' in text
    assert "fieldline_broker_messages_received_total 3.0" in text
    assert "fieldline_broker_messages_sent_total 1.0" in text
    assert 'fieldline_broker_denials_total{action="subscribe",reason="not-granted"} 1.0' in text
    assert 'fieldline_broker_denials_total{action="publish",reason="not-granted"} 1.0' in text
    assert 'fieldline_broker_denials_total{action="publish",reason="retain"} 1.0' in text
    assert "fieldline_broker_subscriptions 1.0" in text


def test_graceful_stop(broker_factory: Callable[..., BrokerUnderTest]) -> None:
    b = broker_factory("fieldline")
    client = _connected(Paho(b, b.pki.device))
    b.stop()
    assert b.proc.returncode == 0, b.log_tail()
    assert client.disconnected.wait(5)
    assert "event=broker_stopped" in b.log_text()
    client.close()


# -- the stream itself -----------------------------------------------------------------------
def test_a_stream_arrives_complete_and_in_order(broker: BrokerUnderTest) -> None:
    """5,000 QoS 1 messages in bursts: every one arrives once, in the order sent."""
    pki = broker.pki
    ops = raw(broker, pki.operator)
    device = raw(broker, pki.device)
    try:
        assert ops.connect("ops-1")[1] == 0
        assert ops.subscribe(("fl/acme/+/telemetry", 1)) == [1]
        assert device.connect("dev-1")[1] == 0
        burst = b"".join(
            wire.publish(b"fl/acme/dev-1/telemetry", b"%d" % i, 1, False, packet_id=i % 65535 + 1)
            for i in range(5000)
        )
        device.send(burst)
        got: list[bytes] = []
        while len(got) < 5000:
            message = ops.next_publish(10)
            assert message is not None, f"only {len(got)} of 5000 arrived"
            got.append(message.payload)
            ops.puback(message.packet_id)
        assert got == [b"%d" % i for i in range(5000)]
        assert ops.publishes(0.5) == []
    finally:
        ops.close()
        device.close()


def test_qos2_publish_is_delivered_exactly_once(broker: BrokerUnderTest) -> None:
    pki = broker.pki
    ops = _connected(Paho(broker, pki.operator))
    ops.subscribe("fl/acme/#", qos=2)
    device = raw(broker, pki.device)
    try:
        assert device.connect("dev-1", clean=False)[1] == 0
        packet = wire.publish(b"fl/acme/dev-1/events", b"once", 2, False, packet_id=7)
        device.send(packet)
        first, body = device.read_packet(5)
        assert (first, body) == (0x50, b"\x00\x07")  # PUBREC
        device.close()  # gone before PUBREL: it will resend the PUBLISH with DUP
        device = raw(broker, pki.device)
        assert device.connect("dev-1", clean=False) == (True, 0)
        device.send(wire.publish(b"fl/acme/dev-1/events", b"once", 2, False, dup=True, packet_id=7))
        assert device.read_packet(5) == (0x50, b"\x00\x07")
        device.send(b"\x62\x02\x00\x07")  # PUBREL
        assert device.read_packet(5) == (0x70, b"\x00\x07")  # PUBCOMP
        got = ops.marker("fl/acme/dev-1/cmd/marker", qos=2)  # a second copy would come first
        assert [m.payload for m in got] == [b"once"]
    finally:
        device.close()
        ops.close()


# the unacknowledged window each broker grants a 3.1.1 client: (service, device)
WINDOWS = {"fieldline": (10_000, 100), "mosquitto": (1_000, 1_000)}


def test_a_service_holding_acks_gets_a_wider_window_than_a_device(
    broker: BrokerUnderTest,
) -> None:
    """An ingest worker acknowledges after its batch commits; the broker must keep sending."""
    service_window, device_window = WINDOWS[broker.kind]
    pki = broker.pki
    worker = raw(broker, pki.service)
    device = raw(broker, pki.device)
    sender = _connected(Paho(broker, pki.device2))
    ops = _connected(Paho(broker, pki.operator))
    try:
        assert worker.connect("ingest-1", clean=False)[1] == 0
        assert worker.subscribe(("fl/+/+/telemetry", 1)) == [1]
        assert device.connect("dev-1", clean=False)[1] == 0
        assert device.subscribe(("fl/acme/dev-1/cmd/#", 1)) == [1]
        for n in range(1_200):
            sender.publish("fl/acme/dev-2/telemetry", b'{"n":%d}' % n, qos=1)
        for n in range(150):
            ops.publish("fl/acme/dev-1/cmd/reset", b'{"id":"c%d"}' % n, qos=1)
        assert len(worker.publishes(1.5)) == min(1_200, service_window)
        assert len(device.publishes(1.5)) == min(150, device_window)
    finally:
        for client in (sender, ops):
            client.close()
        for held in (worker, device):
            held.close()


def test_mosquitto_takes_an_mqtt5_clients_receive_maximum_as_its_window(
    broker_factory: Callable[..., BrokerUnderTest],
) -> None:
    """The worker asks for 10,000 in flight; Mosquitto's max_inflight_messages (1,000) is only
    for 3.1.1 clients. If this changes, the README's broker sizing is wrong."""
    broker = broker_factory("mosquitto")
    pki = broker.pki
    got: list[Delivery] = []

    async def hold(n: int) -> int:
        context = client_context(pki.pki.root, "ingest-1")
        sub = await open_subscriber(broker.host, broker.port, context, got.append)
        await sub.handshake("ingest-1", clean_start=True, receive_maximum=5_000)
        assert await sub.subscribe(["fl/+/+/telemetry"]) == [1]
        sender = _connected(Paho(broker, pki.device2))
        try:
            await asyncio.to_thread(
                lambda: [
                    sender.publish("fl/acme/dev-2/telemetry", b'{"n":%d}' % i, qos=1)
                    for i in range(n)
                ]
            )
            await until(lambda: len(got) >= n, 10, f"{n} deliveries")
        finally:
            sender.close()
            await sub.close()
        return len(got)

    assert asyncio.run(hold(1_200)) == 1_200
