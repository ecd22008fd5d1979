"""The limits `fieldline broker mosquitto-config` renders, enforced by a real Mosquitto 2.0.

Each test starts Mosquitto from the rendered files with one limit made small enough to reach
in a test, and shows the limit biting; each fails when its directive is not rendered. What
Mosquitto cannot enforce (idle connections before CONNECT live ~90 s, retain per topic) is
measured by benchmarks/mosquitto_limits.py and documented in the README. The retain tests run
against both brokers: the embedded one refuses what Mosquitto keeps.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from broker.mosquitto import DEFAULT_MAX_KEEPALIVE
from tests.clients import Paho, raw
from tests.fixtures.brokers import BrokerUnderTest
from tests.mqtt_raw import tls_context

pytestmark = pytest.mark.integration

KIB = 1024


def _connected(client: Paho) -> Paho:
    assert client.connect(), f"{client.client_id} could not connect (CONNACK {client.connack_rc})"
    return client


def _wait(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _parked_session(broker: BrokerUnderTest) -> None:
    """The ingest service subscribes with a persistent session and goes away: Mosquitto queues."""
    service = raw(broker, broker.pki.service)
    assert service.connect("ingest-1", clean=False)[1] == 0
    assert service.subscribe(("fl/+/+/telemetry", 1)) == [1]
    service.disconnect()


# -- connections -----------------------------------------------------------------------------
def _fill(broker: BrokerUnderTest, most: int) -> list[socket.socket]:
    """Idle TCP connections until Mosquitto refuses one (accepts, then closes it at once)."""
    kept: list[socket.socket] = []
    for _ in range(most):
        sock = socket.create_connection((broker.host, broker.port), timeout=5)
        sock.settimeout(0.3)
        try:
            refused = sock.recv(1) == b""
        except TimeoutError:
            refused = False  # Mosquitto says nothing before TLS: an open slot
        except OSError:
            refused = True
        if refused:
            sock.close()
            break
        kept.append(sock)
    # a refusal that came after the 0.3 s wait shows up now, as the peer's FIN
    poller = select.poll()
    for sock in kept:
        poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    gone = {fd for fd, _events in poller.poll(100)}
    for sock in [s for s in kept if s.fileno() in gone]:
        kept.remove(sock)
        sock.close()
    return kept


def _handshake_completes(broker: BrokerUnderTest) -> bool:
    context = tls_context(broker.pki.pki.ca_cert_path, broker.pki.device)
    with socket.create_connection((broker.host, broker.port), timeout=5) as sock:
        try:
            with context.wrap_socket(sock, server_hostname="localhost"):
                return True
        except (ssl.SSLError, OSError):
            return False


def test_max_connections_counts_connections_that_never_start_tls(
    broker_factory: Callable[..., BrokerUnderTest],
) -> None:
    """max_connections counts sockets that never start TLS, so idle ones lock devices out;
    only a per-source limit in front of Mosquitto helps against that (README). And 2.0.11
    counts every closed connection twice (fixed in 2.0.12): each one that was accepted and
    closed raises the limit by one, so on a long-running broker it no longer bounds anything
    and LimitNOFILE is the real ceiling."""
    broker = broker_factory("mosquitto", max_connections=3)
    first = _fill(broker, 12)
    # 3, plus the one the fixture's readiness handshake opened and closed
    assert 3 <= len(first) < 12
    assert "max_connections exceeded" in broker.log_text()
    assert not _handshake_completes(broker)  # the slots are taken by sockets that said nothing
    for sock in first:
        sock.close()
    second = _fill(broker, 4 * len(first))
    try:
        assert len(second) >= 2 * len(first)  # the 2.0.11 miscount; update the README if not
    finally:
        for sock in second:
            sock.close()


def test_mqtt5_client_without_keepalive_is_given_max_keepalive(
    broker_factory: Callable[..., BrokerUnderTest],
) -> None:
    """An MQTT 5 client asking for no keepalive (never timed out) gets the rendered maximum.
    Mosquitto 2.0 leaves an MQTT 3.1.1 client's keepalive 0 alone (README)."""
    broker = broker_factory("mosquitto")
    pki = broker.pki
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.tls_set(str(pki.pki.ca_cert_path), str(pki.device.cert), str(pki.device.key))
    connack: list[object] = []
    client.on_connect = lambda _c, _u, _f, reason, properties: connack.append((reason, properties))
    client.connect(broker.host, broker.port, keepalive=0)
    client.loop_start()
    try:
        assert _wait(lambda: bool(connack))
        reason, properties = connack[0]  # type: ignore[misc]
        assert not reason.is_failure
        assert getattr(properties, "ServerKeepAlive", None) == DEFAULT_MAX_KEEPALIVE
    finally:
        client.disconnect()
        client.loop_stop()
        client.reinitialise()  # closes its socket pair now (paho#627)


# -- memory ----------------------------------------------------------------------------------
def test_memory_limit_disconnects_the_client_whose_message_does_not_fit(
    broker_factory: Callable[..., BrokerUnderTest],
) -> None:
    """A 1.5 MiB message (under max_packet_size) on a 1 MiB memory_limit: Mosquitto cannot
    allocate it, drops it and disconnects its publisher; everyone else carries on."""
    broker = broker_factory("mosquitto", memory_limit=1024 * KIB)
    pki = broker.pki
    ops = _connected(Paho(broker, pki.operator))
    ops.subscribe("fl/acme/#")
    device = raw(broker, pki.device)
    try:
        assert device.connect("dev-1")[1] == 0
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
            device.publish("fl/acme/dev-1/telemetry", b"x" * (1536 * KIB), qos=0)
        assert device.closed_by_broker(5)
        other = _connected(Paho(broker, pki.device2))
        other.publish("fl/acme/dev-2/telemetry", b"small")
        other.close()
        assert [m.payload for m in ops.wait_for(1)] == [b"small"]
        assert not ops.disconnected.is_set()
    finally:
        device.close()
        ops.close()


# -- queues ----------------------------------------------------------------------------------
def test_full_queue_bytes_drop_other_devices_messages_already_acknowledged(
    broker_factory: Callable[..., BrokerUnderTest],
) -> None:
    """max_queued_bytes bites per *subscriber*: one device fills the stopped ingest session's
    queue with big messages, and another device's message is PUBACKed and then dropped."""
    broker = broker_factory("mosquitto", max_queued_bytes=8 * KIB)
    pki = broker.pki
    _parked_session(broker)
    bystander = raw(broker, pki.device2)
    flooder = raw(broker, pki.device)
    try:
        assert bystander.connect("dev-2")[1] == 0
        assert flooder.connect("dev-1")[1] == 0
        bystander.publish("fl/acme/dev-2/telemetry", b"before", qos=1)
        for i in range(16):
            flooder.publish("fl/acme/dev-1/telemetry", bytes([65 + i]) * KIB, qos=1)
        bystander.publish("fl/acme/dev-2/telemetry", b"after", qos=1)  # PUBACKed
    finally:
        bystander.close()
        flooder.close()
    service = raw(broker, pki.service)
    try:
        assert service.connect("ingest-1", clean=False) == (True, 0)
        got = service.publishes(1.0)
        by_topic = [(m.topic, m.payload) for m in got if m.topic.endswith("dev-2/telemetry")]
        assert by_topic == [("fl/acme/dev-2/telemetry", b"before")]
        assert 4 <= len(got) - 1 <= 9  # about 8 KiB of dev-1's 16 KiB
    finally:
        service.close()
    assert "Outgoing messages are being dropped for client ingest-1" in broker.log_text()


def test_max_inflight_bytes_holds_back_a_message_but_does_not_bound_on_2_0_11(
    broker_factory: Callable[..., BrokerUnderTest],
) -> None:
    """A subscriber holding its PUBACKs: the message that would pass max_inflight_bytes waits
    in the queue until an ack. But Mosquitto 2.0.11 moves queued messages into flight on the
    next message without the byte check (fixed in 2.0.13), so in-flight bytes are bounded by
    the count window only (max_inflight_messages or Receive Maximum) x max_packet_size."""
    broker = broker_factory("mosquitto", max_inflight_bytes=3 * KIB)
    pki = broker.pki
    service = raw(broker, pki.service)
    device = raw(broker, pki.device)
    try:
        assert service.connect("ingest-1")[1] == 0
        assert service.subscribe(("fl/+/+/telemetry", 1)) == [1]
        assert device.connect("dev-1")[1] == 0
        for i in range(4):
            device.publish("fl/acme/dev-1/telemetry", bytes([65 + i]) * KIB, qos=1)
        held = service.publishes(0.5)
        assert [m.payload[0] for m in held] == [65, 66, 67]  # 0, 1, 2 KiB in flight < 3 KiB
        service.puback(held[0].packet_id)
        fourth = service.next_publish(5)
        assert fourth is not None
        assert fourth.payload[0] == 68  # released by the ack
        for i in range(4, 10):
            device.publish("fl/acme/dev-1/telemetry", bytes([65 + i]) * KIB, qos=1)
        more = service.publishes(0.5)
        # 2.0.11: each new message pushes the one queued before it into flight, unacknowledged
        # (8 KiB in flight on a 3 KiB limit); only the last one waits
        assert [m.payload[0] for m in more] == list(range(69, 74))
    finally:
        device.close()
        service.close()


# -- retain ----------------------------------------------------------------------------------
def test_operator_cannot_retain_a_command(broker: BrokerUnderTest) -> None:
    """docs/design.md: retain only on status. The embedded broker refuses a retained command
    outright; Mosquitto cannot refuse retain per topic, so it keeps the command and replays it,
    flagged retained, on every subscribe of the device (the device must refuse it: README)."""
    pki = broker.pki
    ops = _connected(Paho(broker, pki.operator))
    ops.publish("fl/acme/dev-1/cmd/reset", b'{"id":"r1","name":"reset"}', retain=True)
    ops.publish("fl/acme/dev-1/cmd/ping", b'{"id":"p1","name":"ping"}')  # a marker, not retained
    ops.close()
    for _ in range(2):  # every (re)subscribe
        device = raw(broker, pki.device)
        try:
            assert device.connect("dev-1")[1] == 0
            assert device.subscribe(("fl/acme/dev-1/cmd/#", 1)) == [1]
            got = [(m.topic, m.retain) for m in device.publishes(0.5)]
        finally:
            device.close()
        if broker.kind == "fieldline":
            assert got == []
        else:
            assert got == [("fl/acme/dev-1/cmd/reset", True)]


def test_retained_command_is_not_delivered_live_by_the_embedded_broker(
    broker: BrokerUnderTest,
) -> None:
    """Refused means refused: the embedded broker does not deliver a retained command to the
    connected device either; Mosquitto delivers it live (retain flag cleared, MQTT 3.1.1)."""
    pki = broker.pki
    device = raw(broker, pki.device)
    ops = _connected(Paho(broker, pki.operator))
    try:
        assert device.connect("dev-1")[1] == 0
        assert device.subscribe(("fl/acme/dev-1/cmd/#", 1)) == [1]
        ops.publish("fl/acme/dev-1/cmd/reset", b'{"id":"r2","name":"reset"}', retain=True)
        ops.publish("fl/acme/dev-1/cmd/ping", b'{"id":"p2","name":"ping"}')
        got = [(m.topic, m.retain) for m in device.publishes(0.5)]
        if broker.kind == "fieldline":
            assert got == [("fl/acme/dev-1/cmd/ping", False)]
        else:
            assert got == [("fl/acme/dev-1/cmd/reset", False), ("fl/acme/dev-1/cmd/ping", False)]
    finally:
        ops.close()
        device.close()


def test_device_cannot_retain_an_event(broker: BrokerUnderTest) -> None:
    """As test_retain_only_on_status for telemetry: the embedded broker refuses; Mosquitto
    keeps it and hands it to every later subscriber (the ingest worker included)."""
    pki = broker.pki
    device = _connected(Paho(broker, pki.device))
    device.publish("fl/acme/dev-1/events", b'{"kind":"door"}', retain=True)
    device.close()
    ops = raw(broker, pki.operator)
    try:
        assert ops.connect("ops-1")[1] == 0
        assert ops.subscribe(("fl/acme/+/events", 1)) == [1]
        got = [(m.topic, m.retain) for m in ops.publishes(0.5)]
    finally:
        ops.close()
    if broker.kind == "fieldline":
        assert got == []
    else:
        assert got == [("fl/acme/dev-1/events", True)]
