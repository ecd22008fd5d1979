"""The NATS JetStream tier: a 3-node cluster rendered by `fieldline broker nats-config`.

The attacks of tests/integration/test_broker_security.py that apply to a broker configured
only through users and permissions, run against real nats-server processes with real MQTT
clients over mutual TLS. One cluster is shared by the module; the test that kills a node
starts it again.
"""

from __future__ import annotations

import shutil
import ssl
import time
from pathlib import Path
from typing import cast

import nats.errors
import pytest

from certs import Bundle, Role, serial_uri
from core.natsconn import connect
from tests.clients import Paho, raw
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.nats import NatsCluster, NatsNode, run_async
from tests.mqtt_raw import RawClient
from tests.waits import until

pytestmark = pytest.mark.integration

REFUSED = 0x80


def _paho(node: NatsNode, bundle: Bundle | None, **kwargs: object) -> Paho:
    # Paho reads host, port and pki from a broker; a node has them
    return Paho(cast(BrokerUnderTest, node), bundle, **kwargs)  # type: ignore[arg-type]


def _connected(node: NatsNode, bundle: Bundle, **kwargs: object) -> Paho:
    client = _paho(node, bundle, **kwargs)
    assert client.connect(), f"{client.client_id} refused on node {node.k}: {client.connack_rc}"
    return client


def _raw(node: NatsNode, bundle: Bundle | None) -> RawClient:
    return raw(cast(BrokerUnderTest, node), bundle)


def test_cluster_starts_with_the_stream(nats_cluster: NatsCluster) -> None:
    assert nats_cluster.ensure_stream().value == "unchanged"
    assert len(set(nats_cluster.mqtt_ports)) == 3


def test_publish_on_node_1_reaches_subscribers_on_node_3(nats_cluster: NatsCluster) -> None:
    pki = nats_cluster.pki
    svc = _connected(nats_cluster.node(3), pki.service)
    ops = _connected(nats_cluster.node(3), pki.operator)
    dev = _connected(nats_cluster.node(1), pki.device)
    try:
        # the service reads over MQTT at QoS 0 only: a QoS 1 subscription needs `$MQTT.sub.>`,
        # which the service, a NATS user too, does not get (broker/nats.py)
        assert svc.subscribe("fl/+/+/telemetry", qos=0) == [0]
        assert ops.subscribe("fl/acme/+/telemetry") == [1]
        assert dev.subscribe("fl/acme/dev-1/cmd/#") == [1]
        dev.publish("fl/acme/dev-1/telemetry", b'{"metrics":{"t":1}}')
        for client, qos in ((ops, 1), (svc, 0)):
            got = client.wait_for(1)
            assert [(m.topic, m.payload, m.qos) for m in got] == [
                ("fl/acme/dev-1/telemetry", b'{"metrics":{"t":1}}', qos)
            ]
        # and a command from node 3 reaches the device on node 1
        ops.publish("fl/acme/dev-1/cmd/reset", b'{"id":"c1"}')
        assert [m.topic for m in dev.wait_for(1)] == ["fl/acme/dev-1/cmd/reset"]
    finally:
        for client in (svc, ops, dev):
            client.close()


FORBIDDEN_TOPICS = [
    "fl/acme/dev-2/telemetry",  # another device
    "fl/globex/dev-9/telemetry",  # another tenant
    "fl/acme/dev-2/cmd/reset",  # a command to another device
    "fl/acme/dev-1/cmd/reset",  # a command to itself (only operators send commands)
    "fl/acme/dev-1/other",  # not a topic of the grammar
    "$SYS/broker/forged",  # reserved
]
FORBIDDEN_FILTERS = [
    "fl/acme/dev-2/cmd/#",  # another device's commands
    "fl/globex/#",  # another tenant
    "fl/acme/+/telemetry",  # other devices' telemetry
    "#",
    "$MQTT/sub/#",  # the internal delivery subjects of QoS 1 subscriptions
    "$MQTT/+/#",
    "$JS/#",
]


def test_publish_to_a_forbidden_topic_is_never_delivered(nats_cluster: NatsCluster) -> None:
    """Acknowledged and dropped ("Publish Violation"), as Mosquitto does; never delivered on
    any node. The connection stays up."""
    pki = nats_cluster.pki
    watcher = _connected(nats_cluster.node(2), pki.admin)
    attacker = _connected(nats_cluster.node(1), pki.device)
    try:
        # not `#`: an admin's `#` also carries nats-server's own $JS and $MQTT traffic
        assert watcher.subscribe("fl/#") == [1]
        assert watcher.subscribe("$SYS/#") == [1]
        for topic in FORBIDDEN_TOPICS:
            attacker.publish(topic, topic.encode())  # waits for the PUBACK
        # a sentinel from the same connection: once it arrives, the forged ones would have too
        attacker.publish("fl/acme/dev-1/events", b"sentinel")
        got = watcher.wait_for(1)
        assert [m.payload for m in got] == [b"sentinel"], got
        assert attacker.client.is_connected()
    finally:
        attacker.close()
        watcher.close()
    log = nats_cluster.node(1).log_text()
    user = serial_uri(pki.device.serial)  # the user its certificate maps to (docs/broker.md)
    for topic in FORBIDDEN_TOPICS:
        subject = topic.replace("/", ".")
        # nats-server 2.9/2.10 name the user in the line; 2.12 names the client id before it
        assert (
            f'Publish Violation - User "{user}", Subject "{subject}"' in log
            or f'"dev-1" - Publish Violation - Subject "{subject}"' in log
        ), subject


def test_forbidden_subscriptions_are_refused_and_receive_nothing(
    nats_cluster: NatsCluster,
) -> None:
    pki = nats_cluster.pki
    attacker = _connected(nats_cluster.node(3), pki.device)
    victim = _connected(nats_cluster.node(2), pki.device2)
    ops = _connected(nats_cluster.node(1), pki.operator)
    try:
        for topic_filter in FORBIDDEN_FILTERS:
            assert attacker.subscribe(topic_filter) == [REFUSED], topic_filter
        assert attacker.subscribe("fl/acme/dev-1/cmd/#") == [1]
        assert victim.subscribe("fl/acme/dev-2/cmd/#") == [1]
        victim.publish("fl/acme/dev-2/telemetry", b"victim")
        ops.publish("fl/acme/dev-2/cmd/reset", b"for dev-2")
        ops.publish("fl/acme/dev-1/cmd/reset", b"for dev-1")  # the attacker's own, last
        assert [m.payload for m in victim.wait_for(1)] == [b"for dev-2"]
        assert [m.payload for m in attacker.wait_for(1)] == [b"for dev-1"]
        time.sleep(0.2)  # anything forged would have come before dev-1's own command
        assert [m.payload for m in attacker.messages] == [b"for dev-1"]
    finally:
        for client in (attacker, victim, ops):
            client.close()


def _refused(node: NatsNode, bundle: Bundle | None, tries: int = 3) -> bool:
    """True when the TLS handshake or CONNECT of `bundle` is refused on the node. A probe
    that only timed out (a loaded machine: a full CI run beside a flooding cluster) is no
    answer either way, and is tried again."""
    for _ in range(tries):
        try:
            client = _raw(node, bundle)
        except TimeoutError:
            continue
        except (ssl.SSLError, ConnectionError):
            return True
        try:
            # a fresh client id: taking over an id still being cleaned up elsewhere takes
            # seconds
            _present, rc = client.connect(f"probe-{time.monotonic_ns()}")
            return rc != 0
        except TimeoutError:
            continue
        except (ssl.SSLError, ConnectionError, AssertionError, OSError):
            return True  # closed, or answered with something other than CONNACK
        finally:
            client.close()
    raise AssertionError(f"node {node.k} answered none of {tries} probes in time")


def _accepted(node: NatsNode, bundle: Bundle, tries: int = 3) -> bool:
    """True when `bundle` gets in within `tries` probes: a node's first MQTT client makes it
    create its MQTT streams, and nats-server (2.9, 2.10) may refuse that client when the JetStream
    lookup behind it times out (4 s), a refusal that is not about the certificate."""
    for _ in range(tries):
        if not _refused(node, bundle):
            return True
        time.sleep(1.0)
    return False


@pytest.mark.parametrize("who", ["no certificate", "another CA", "expired", "revoked"])
def test_bad_certificates_are_refused(nats_cluster: NatsCluster, who: str) -> None:
    pki = nats_cluster.pki
    bundle = {
        "no certificate": None,
        "another CA": pki.wrong_ca,
        "expired": pki.expired,
        "revoked": pki.revoked,  # revoked before rendering: it has no user
    }[who]
    for node in nats_cluster.nodes:
        assert _refused(node, bundle), f"{who} was let in on node {node.k}"
    assert not _refused(nats_cluster.node(1), pki.device)  # the check itself can say no


def test_devices_and_operators_cannot_use_the_nats_port(nats_cluster: NatsCluster) -> None:
    """allowed_connection_types: a device certificate is MQTT only, the service's is not."""
    pki = nats_cluster.pki
    for bundle in (pki.device, pki.operator):
        with pytest.raises((nats.errors.NoServersError, nats.errors.Error, OSError)):
            run_async(lambda b=bundle: _nats_connect(nats_cluster, b))  # type: ignore[misc]
    assert run_async(lambda: _nats_connect(nats_cluster, pki.service)) is True


async def _nats_connect(cluster: NatsCluster, bundle: Bundle) -> bool:
    nc = await cluster.connect(bundle, connect_timeout=2, allow_reconnect=False)
    try:
        await nc.flush(timeout=2)
        return True
    finally:
        await nc.close()


def test_service_consumes_the_stream_with_its_own_certificate(nats_cluster: NatsCluster) -> None:
    """The ingest worker's certificate may pull from FIELDLINE and ack; it may not delete it."""
    pki = nats_cluster.pki
    consumer = nats_cluster.options.ingest_consumer
    dev = _connected(nats_cluster.node(1), pki.device)
    dev.publish("fl/acme/dev-1/telemetry", b'{"metrics":{"t":2}}')
    dev.close()

    async def pull() -> list[str]:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats_cluster.connect(pki.service, error_cb=on_error)
        try:
            js = nc.jetstream()
            # the one consumer it may use is the configured one (ingest.nats_consumer)
            sub = await js.pull_subscribe(
                "fl.acme.dev-1.telemetry", durable=consumer, stream="FIELDLINE"
            )
            msgs = await sub.fetch(100, timeout=2)
            for m in msgs:
                await m.ack()
            # a denied request gets no answer: nats-py times out, the server says why
            with pytest.raises(nats.errors.TimeoutError):
                await nc.jetstream(timeout=1).delete_stream("FIELDLINE")
            # the server's -ERR reaches error_cb as a task of its own: wait for it
            await until(
                lambda: any("stream.delete.fieldline" in e for e in errors),
                5,
                "the delete's permissions violation",
            )
            with pytest.raises(nats.errors.TimeoutError):
                await nc.jetstream(timeout=1).consumer_info("FIELDLINE", "other")
            await until(
                lambda: any("consumer.info.fieldline.other" in e for e in errors),
                5,
                "the consumer info's permissions violation",
            )
            # a plain SUB on the QoS 1 delivery subjects would read every MQTT session's
            # deliveries, device commands included
            await nc.subscribe("$MQTT.sub.>")
            await nc.flush(timeout=2)
            await until(
                lambda: any("subscription" in e and "$mqtt.sub.>" in e for e in errors),
                5,
                "the subscription's permissions violation",
            )
            return [m.subject for m in msgs]
        finally:
            await nc.close()

    subjects = run_async(pull)
    assert subjects
    assert set(subjects) == {"fl.acme.dev-1.telemetry"}


def test_client_id_of_another_device_takes_over_its_connection(nats_cluster: NatsCluster) -> None:
    """A departure from the embedded broker and Mosquitto, asserted so that a fix shows up:
    nats-server (2.9, 2.10) does not bind the MQTT client id to the certificate, so dev-1's
    certificate with client id dev-2 is accepted and closes dev-2's connection. It gains no
    topic of dev-2's (its permissions are dev-1's): see the forbidden-subscription tests."""
    pki = nats_cluster.pki
    victim = _connected(nats_cluster.node(1), pki.device2)
    attacker = _paho(nats_cluster.node(2), pki.device, client_id="dev-2")
    try:
        assert victim.subscribe("fl/acme/dev-2/cmd/#") == [1]
        assert attacker.connect()
        assert victim.disconnected.wait(5), "nats-server now keeps the victim connected"
        assert attacker.subscribe("fl/acme/dev-2/cmd/#") == [REFUSED]
    finally:
        attacker.close()
        victim.close()


def test_qos_2_publish_is_refused_and_a_qos_2_subscription_gets_qos_1(
    nats_cluster: NatsCluster,
) -> None:
    """The rendered `reject_qos2_publish` / `downgrade_qos2_subscribe`: QoS 2 stays what it was
    on nats-server 2.9 (refused), where fieldline's ingest path is tested with QoS 1 only."""
    pki = nats_cluster.pki
    device = _raw(nats_cluster.node(1), pki.device)
    try:
        assert device.connect("dev-1")[1] == 0
        assert device.subscribe(("fl/acme/dev-1/cmd/#", 2)) == [1]
        device.publish("fl/acme/dev-1/telemetry", b'{"metrics":{"a":1}}', qos=2)
        assert device.closed_by_broker(5), "a QoS 2 PUBLISH was accepted"
    finally:
        device.close()
    log = nats_cluster.node(1).log_text()
    assert "QoS=2 is disabled for PUBLISH messages" in log


def test_will_fires_on_a_dropped_connection_across_nodes(nats_cluster: NatsCluster) -> None:
    """MQTT 3.1.1: a connection that ends without DISCONNECT publishes the Will; the node the
    device was on publishes it and the cluster delivers it everywhere."""
    pki = nats_cluster.pki
    watcher = _connected(nats_cluster.node(1), pki.operator)
    device = _raw(nats_cluster.node(2), pki.device)
    try:
        assert watcher.subscribe("fl/acme/dev-1/status") == [1]
        will = ("fl/acme/dev-1/status", b'{"state":"offline"}', 1, False)
        assert device.connect("dev-1", will=will) == (False, 0)
        device.close()  # no DISCONNECT: an abnormal end
        got = watcher.wait_for(1)
        assert [(m.topic, m.payload) for m in got] == [will[:2]]
    finally:
        device.close()
        watcher.close()


def test_revoked_device_is_refused_after_render_and_reload(nats_cluster: NatsCluster) -> None:
    pki = nats_cluster.pki.pki
    bundle = pki.issue("dev-nats-rev", tenant="acme", role=Role.DEVICE)
    nats_cluster.reload()
    node = nats_cluster.node(2)
    before = _connected(node, bundle)
    try:
        pki.revoke("dev-nats-rev")
        started = time.monotonic()
        nats_cluster.reload()
        # the connection it already had is closed by the reload ("Authorization Violation")
        assert before.disconnected.wait(5), "a revoked device kept its connection"
        refused_after = time.monotonic() - started
        for late in nats_cluster.nodes:
            assert _refused(late, bundle), f"revoked device let in on node {late.k}"
        print(f"\nrevoked device disconnected {refused_after * 1000:.0f} ms after re-render+SIGHUP")
    finally:
        before.close()


def test_node_kill_moves_sessions_but_loses_the_will(nats_cluster: NatsCluster) -> None:
    """kill -9 of the node a device is on: its Will is in that node's memory only and is never
    published (MQTT asks for it "when the server closes the connection"; a dead server does
    not). Its persistent session lives in the replicated $MQTT_sess stream: the device
    reconnects to another node and gets the command sent while it was away."""
    pki = nats_cluster.pki
    watcher = _connected(nats_cluster.node(1), pki.admin)
    device = _paho(
        nats_cluster.node(2),
        pki.device,
        clean=False,
        will=("fl/acme/dev-1/status", b'{"state":"lost"}', 1, False),
    )
    try:
        assert watcher.subscribe("fl/acme/dev-1/#") == [1]
        assert device.connect()
        assert device.subscribe("fl/acme/dev-1/cmd/#") == [1]
        device.publish("fl/acme/dev-1/telemetry", b"before")
        assert [m.payload for m in watcher.wait_for(1)] == [b"before"]
        device.client.loop_stop()  # no automatic reconnect: the device moves by itself
        nats_cluster.kill_9(2)
        nats_cluster.wait_for_leaders()
        sender = _connected(nats_cluster.node(3), pki.operator)
        sender.publish("fl/acme/dev-1/cmd/reset", b'{"id":"while-away"}')
        sender.close()
        # the watcher sees the command; a Will would have come before it
        got = watcher.wait_for(2, timeout=10)
        assert [m.payload for m in got] == [b"before", b'{"id":"while-away"}'], got
        moved = _paho(nats_cluster.node(3), pki.device, clean=False)
        try:
            assert moved.connect(timeout=10)
            assert moved.session_present
            assert [m.payload for m in moved.wait_for(1, timeout=10)] == [b'{"id":"while-away"}']
        finally:
            moved.close()
        nats_cluster.start(2)
        assert [m.payload for m in watcher.messages] == [b"before", b'{"id":"while-away"}']
    finally:
        watcher.close()
        device.close()
        nats_cluster.start(2)


def _keep(bundle: Bundle, where: Path) -> Bundle:
    """A copy of a bundle as its holder keeps it: a re-issue overwrites the directory."""
    shutil.copytree(bundle.directory, where)
    return Bundle(bundle.identity, where, bundle.serial, bundle.not_after)


async def _nats_on(cluster: NatsCluster, k: int, bundle: Bundle) -> bool:
    """True if `bundle` logs in on node k's NATS port (flushed: nats-py's connect may return
    before it reads the close of a refused handshake)."""
    try:
        nc = await connect(
            servers=[cluster.client_urls[k - 1]], tls=cluster.tls_context(bundle),
            tls_hostname="localhost", connect_timeout=2, allow_reconnect=False,
            error_cb=_ignore,
        )  # fmt: skip
    except (nats.errors.Error, OSError):
        return False
    try:
        await nc.flush(timeout=2)
        return True
    except (nats.errors.Error, OSError):
        return False
    finally:
        await nc.close()


async def _ignore(_exc: Exception) -> None:
    """nats-py logs each refused connect by default; here a refusal is the expected answer."""


def test_a_revoked_certificate_of_a_reissued_id_is_refused_on_the_nats_port(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """nats-server maps a certificate to a user by subject only: after `certs issue ID
    --force` the old, revoked certificate names the new live user. The NATS listener pins the
    live certificates' keys, so the old one is refused there on every node."""
    pki = nats_cluster.pki.pki
    first = pki.issue("svc-rot", tenant="platform", role=Role.SERVICE)
    nats_cluster.reload()
    old = _keep(first, tmp_path / "old")
    assert run_async(lambda: _nats_on(nats_cluster, 1, old))  # the probe can say yes
    new = pki.issue("svc-rot", tenant="platform", role=Role.SERVICE, force=True)
    assert pki.is_revoked(old.serial)
    nats_cluster.reload()
    for node in nats_cluster.nodes:
        assert not run_async(lambda k=node.k: _nats_on(nats_cluster, k, old)), (  # type: ignore[misc]
            f"the revoked certificate of a re-issued id was let in on node {node.k}"
        )
        assert run_async(lambda k=node.k: _nats_on(nats_cluster, k, new))  # type: ignore[misc]


def test_a_revoked_certificate_of_a_reissued_id_is_refused_on_mqtt(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """The MQTT listener cannot reload pins (nats-server 2.9.10 and 2.10 refuse the reload), so
    users are named by the certificate's own serial URI: the old certificate names no user."""
    pki = nats_cluster.pki.pki
    first = pki.issue("dev-rot", tenant="acme", role=Role.DEVICE)
    nats_cluster.reload()
    old = _keep(first, tmp_path / "old")
    assert not _refused(nats_cluster.node(1), old)  # the probe can say yes
    new = pki.issue("dev-rot", tenant="acme", role=Role.DEVICE, force=True)
    nats_cluster.reload()
    for node in nats_cluster.nodes:
        assert _accepted(node, new), f"the new certificate refused on node {node.k}"
    for node in nats_cluster.nodes:
        assert _refused(node, old), f"the revoked certificate let in on node {node.k}"
