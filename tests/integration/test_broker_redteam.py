"""Red team of the durable embedded broker: one hostile device with a valid certificate, and an
operator whose machine crashes, against the promises of docs/broker.md.

Every test runs a real `fieldline broker run` process with its SQLite store. A slow or stuck
disk is simulated by another SQLite connection that holds the store's write lock
(`BEGIN IMMEDIATE`): the broker's commit then waits, fails with "database is locked" and
retries, exactly as on a stalled disk, and whatever the broker writes meanwhile was written
before the commit. Each test reproduced a defect of the first durable version (now fixed).
"""

from __future__ import annotations

import contextlib
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from broker import wire
from certs import Bundle
from tests.fixtures.brokers import BrokerUnderTest
from tests.metrics_text import samples
from tests.mqtt_raw import RawClient, connect_packet

pytestmark = pytest.mark.integration

PUBACK, PUBREC, SUBACK, UNSUBACK = 4, 5, 9, 11


Opener = Callable[..., RawClient]


@pytest.fixture
def client() -> Iterator[Opener]:
    """Open raw clients (broker, bundle, timeout); all are closed at teardown."""
    opened: list[RawClient] = []

    def open_client(broker: BrokerUnderTest, bundle: Bundle, timeout: float = 5) -> RawClient:
        raw = RawClient(broker.host, broker.port, broker.pki.pki.ca_cert_path, bundle, timeout)
        opened.append(raw)
        return raw

    yield open_client
    for raw in opened:
        raw.close()


def _metric(broker: BrokerUnderTest, name: str) -> float:
    found = samples(broker.metrics()).get(name)
    assert found is not None, f"no metric {name}"
    return found


def _wait_committed(broker: BrokerUnderTest) -> None:
    deadline = time.monotonic() + 10
    while _metric(broker, "fieldline_broker_store_pending_changes") != 0:
        assert time.monotonic() < deadline, "the store never caught up"
        time.sleep(0.05)


@contextlib.contextmanager
def _store_stalled(broker: BrokerUnderTest) -> Iterator[None]:
    """Hold the store's write lock: the broker's commits wait, as on a disk that does not answer."""
    db = sqlite3.connect(broker.workdir / "store.sqlite3", isolation_level=None, timeout=30)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


def _packet_types(client: RawClient, timeout: float, until: set[int] | None = None) -> list[int]:
    """The types of the packets that arrive within timeout (or until all of `until` came)."""
    types: list[int] = []
    deadline = time.monotonic() + timeout
    with contextlib.suppress(TimeoutError):
        while (left := deadline - time.monotonic()) > 0:
            types.append(client.read_packet(max(0.05, left))[0] >> 4)
            if until is not None and until <= set(types):
                break
    return types


def _rss_kib(broker: BrokerUnderTest) -> int:
    with open(f"/proc/{broker.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _ping(client: RawClient, timeout: float = 30) -> None:
    """A PINGREQ round trip: the broker has read everything sent before it."""
    client.send(b"\xc0\x00")
    while client.read_packet(timeout)[0] >> 4 != 13:
        pass


# -- promise 1: nothing is acknowledged before it is committed (holds) -----------------------
def test_every_acknowledgement_waits_for_a_stalled_store(
    broker_factory: Callable[..., BrokerUnderTest],
    client: Opener,
) -> None:
    """PUBACK, PUBREC, SUBACK and UNSUBACK of changes to persistent state are not written while
    the store cannot commit, and all of them are once it can."""
    broker = broker_factory("fieldline")
    pki = broker.pki
    ops = client(broker, pki.operator2)
    assert ops.connect("ops-2", clean=False)[1] == 0
    assert ops.subscribe(("fl/acme/dev-1/events", 2), ("fl/acme/dev-1/telemetry", 1)) == [2, 1]
    device = client(broker, pki.device)
    assert device.connect("dev-1")[1] == 0
    with _store_stalled(broker):
        body = struct.pack("!H", 100) + struct.pack("!H", 20) + b"fl/acme/dev-2/status\x01"
        ops.send(bytes((0x82,)) + wire.varint(len(body)) + body)
        body = struct.pack("!H", 101) + struct.pack("!H", 23) + b"fl/acme/dev-1/telemetry"
        ops.send(bytes((0xA2,)) + wire.varint(len(body)) + body)
        device.send(wire.publish(b"fl/acme/dev-1/events", b"q1", 1, False, packet_id=7))
        device.send(wire.publish(b"fl/acme/dev-1/events", b"q2", 2, False, packet_id=8))
        assert _packet_types(device, 1.0) == []
        seen = _packet_types(ops, 0.2)  # PUBLISHes of q1/q2 may come; the replies may not
        assert SUBACK not in seen
        assert UNSUBACK not in seen
    assert sorted(_packet_types(device, 10.0, until={PUBACK, PUBREC})) == [PUBACK, PUBREC]
    assert {SUBACK, UNSUBACK} <= set(seen + _packet_types(ops, 5.0, until={SUBACK, UNSUBACK}))


# -- promise 2: a deleted session stays deleted ----------------------------------------------
def test_a_clean_connect_is_not_undone_by_a_crash(
    broker_factory: Callable[..., BrokerUnderTest],
    client: Opener,
) -> None:
    broker = broker_factory("fieldline")
    pki = broker.pki
    device = client(broker, pki.device2)
    assert device.connect("dev-2", clean=False)[1] == 0
    assert device.subscribe(("fl/acme/dev-2/cmd/#", 1)) == [1]
    device.disconnect()
    operator = client(broker, pki.operator)
    assert operator.connect("ops-1")[1] == 0
    operator.publish("fl/acme/dev-2/cmd/reboot", b'{"id":"c-old"}', qos=1)
    operator.disconnect()
    device = client(broker, pki.device2)
    with _store_stalled(broker):
        device.send(connect_packet("dev-2", clean=True))
        # not told "no session" while the deletion can still be undone by a crash
        assert _packet_types(device, 1.0) == []
    # once it is committed: no session, everything discarded (MQTT-3.1.2-6)
    first, body = device.read_packet(10)
    assert (first, body[0] & 1, body[1]) == (wire.CONNACK, 0, 0)
    device.disconnect()
    broker.kill_9()
    broker.restart()
    device = client(broker, pki.device2)
    present, code = device.connect("dev-2", clean=False)
    stale = [m.payload for m in device.publishes(1.0)]
    device.close()
    assert code == 0
    assert (present, stale) == (False, [])


# -- promise 3: one device cannot make the broker hold without bound -------------------------
def test_held_acknowledgements_are_bounded_while_the_store_stalls(
    broker_factory: Callable[..., BrokerUnderTest],
    client: Opener,
) -> None:
    broker = broker_factory("fieldline")
    pki = broker.pki
    sent = 100_000
    burst = b"".join(
        wire.publish(b"fl/acme/dev-1/telemetry", b"x" * 20, 1, False, packet_id=i + 1)
        for i in range(10_000)
    )
    device = client(broker, pki.device, timeout=30)
    assert device.connect("dev-1")[1] == 0
    with _store_stalled(broker):
        other = client(broker, pki.device2)
        # one change waits to be committed (its CONNACK too, so it is not read)
        other.send(connect_packet("dev-2", clean=False))
        deadline = time.monotonic() + 10
        while _metric(broker, "fieldline_broker_store_pending_changes") < 1:
            assert time.monotonic() < deadline, "the CONNECT never reached the store"
            time.sleep(0.02)
        device.sock.settimeout(3)
        with contextlib.suppress(TimeoutError):
            for _ in range(sent // 10_000):
                device.sock.sendall(burst)  # a broker that stops reading makes this time out
        # until the broker has read all of it, or stopped reading for a second
        read, since = -1.0, time.monotonic()
        while time.monotonic() - since < 1.0:
            now = _metric(broker, "fieldline_broker_messages_received_total")
            if now != read:
                read, since = now, time.monotonic()
            if read >= sent:
                break
            time.sleep(0.1)
        written = _packet_types(device, 0.2)
    # no client can have more than 65,535 QoS 1 PUBLISHes unacknowledged: past that it reuses
    # packet ids it has no right to, and the broker need not read it
    assert PUBACK not in written
    assert read < 65_535, f"the broker read {read:.0f} PUBLISHes it had not acknowledged"


def _publish_denied(broker: BrokerUnderTest, client: Opener, n: int) -> None:
    """n QoS 0 PUBLISHes to distinct 60 kB topics of another device, all denied."""
    device = client(broker, broker.pki.device, timeout=30)
    assert device.connect("dev-1")[1] == 0
    _ping(device)
    pad = "x" * 60_000
    for i in range(n):
        device.send(wire.publish(f"fl/acme/dev-2/{i}/{pad}".encode(), b"", 0, False))
    _ping(device)


def test_denied_publishes_to_long_topics_do_not_grow_the_broker(
    broker_factory: Callable[..., BrokerUnderTest],
    client: Opener,
) -> None:
    broker = broker_factory("fieldline", {"FIELDLINE_LOG_LEVEL": "WARNING"})
    before = _rss_kib(broker)
    _publish_denied(broker, client, 1_000)
    grown_mib = (_rss_kib(broker) - before) / 1024
    assert grown_mib < 48, f"1,000 denied PUBLISHes grew the broker by {grown_mib:.0f} MiB"


def test_denied_publishes_do_not_flood_the_log(
    broker_factory: Callable[..., BrokerUnderTest],
    client: Opener,
) -> None:
    broker = broker_factory("fieldline", {"FIELDLINE_LOG_LEVEL": "INFO"})
    before = broker.log_file.stat().st_size
    _publish_denied(broker, client, 300)
    grown = broker.log_file.stat().st_size - before
    # 18 MB of attack; a bounded log keeps a few lines and counts the rest (metric denials)
    assert grown < 1_000_000, f"300 denied PUBLISHes wrote {grown / 1e6:.0f} MB of log"


# -- takeover: two CONNECTs for one client id at once ----------------------------------------
def test_simultaneous_connects_neither_leave_two_connections_nor_lose_acknowledged_messages(
    broker_factory: Callable[..., BrokerUnderTest],
    client: Opener,
) -> None:
    broker = broker_factory("fieldline")
    pki = broker.pki
    both_alive = False
    for _attempt in range(12):
        holder = client(broker, pki.device2)
        assert holder.connect("dev-2", clean=False)[1] == 0
        persistent, clean = client(broker, pki.device2), client(broker, pki.device2)
        # both TLS handshakes are done; the two CONNECTs arrive in the same instant
        persistent.send(connect_packet("dev-2", clean=False))
        clean.send(connect_packet("dev-2", clean=True))
        for c in (persistent, clean):
            with contextlib.suppress(OSError, ConnectionError):
                c.read_packet(2)
        alive = not persistent.closed_by_broker(0.3) and not clean.closed_by_broker(0.05)
        both_alive = both_alive or alive
        for c in (holder, persistent, clean):
            c.close()
        # resume whatever session the broker now holds for dev-2
        device = client(broker, pki.device2)
        present, code = device.connect("dev-2", clean=False)
        assert code == 0
        device.disconnect()
        if alive and present:
            break  # the persistent CONNECT resumed the session the clean one had deleted
    device = client(broker, pki.device2)
    assert device.connect("dev-2", clean=False)[1] == 0
    assert device.subscribe(("fl/acme/dev-2/cmd/#", 1)) == [1]
    device.disconnect()
    operator = client(broker, pki.operator)
    assert operator.connect("ops-1")[1] == 0
    operator.publish("fl/acme/dev-2/cmd/reboot", b'{"id":"c-1"}', qos=1)  # PUBACKed
    operator.disconnect()
    _wait_committed(broker)
    broker.kill_9()
    broker.restart()
    device = client(broker, pki.device2)
    assert device.connect("dev-2", clean=False)[1] == 0
    delivered = [m.payload for m in device.publishes(1.0)]
    device.close()
    assert delivered == [b'{"id":"c-1"}'], "an acknowledged command was lost by kill -9"
    assert not both_alive, "two connections for one client id (MQTT-3.1.4-2)"


# -- bad input: a deep filter -----------------------------------------------------------------
def test_a_deep_filter_does_not_break_routing(
    broker_factory: Callable[..., BrokerUnderTest],
    client: Opener,
) -> None:
    broker = broker_factory("fieldline")
    pki = broker.pki
    deep = "fl/acme/dev-1/cmd/" + "a/" * 1200
    device = client(broker, pki.device)
    assert device.connect("dev-1")[1] == 0
    # past broker's MAX_TOPIC_LEVELS (32) a filter is refused and a topic dropped, both counted
    assert device.subscribe((deep + "#", 1)) == [0x80]
    bystander = client(broker, pki.operator2)
    assert bystander.connect("ops-2")[1] == 0
    assert bystander.subscribe(("fl/acme/#", 1)) == [1]
    operator = client(broker, pki.operator, timeout=2)
    assert operator.connect("ops-1")[1] == 0
    acknowledged = True
    try:
        operator.publish(deep + "reboot", b"{}", qos=1)
    except TimeoutError:
        acknowledged = False
    got = len(bystander.publishes(0.5))
    assert "Traceback" not in broker.log_text()
    assert (acknowledged, got) == (True, 0)
    assert 'action="publish",reason="too-deep"' in broker.metrics()
    operator.publish("fl/acme/dev-1/cmd/reboot", b"{}", qos=1)  # routing still works
    assert len(bystander.publishes(0.5)) == 1
