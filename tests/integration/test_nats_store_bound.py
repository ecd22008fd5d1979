"""A node's JetStream file store is bounded (`nats.max_store_bytes`, rendered as
`max_file_store`): with no worker reading, one device publishing QoS 1 without pause fills
`$MQTT_msgs` up to the bound and no further. Real 3-node cluster with an 8 MiB store.

What nats-server 2.9.10 did at the bound, and 2.10.27 does, is asserted as observed
(docs/broker.md, "The JetStream store bound"): the PUBLISH that does not fit is not PUBACKed
and the device keeps it; nothing PUBACKed is lost; but from then on every MQTT CONNECT is
refused on every node until the store is raised and the nodes restarted, after which
everything is delivered."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from broker.nats import MQTT_MSGS_STREAM, StreamLimits
from certs import Bundle
from tests.clients import Paho
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.nats import NatsCluster, run_async
from tests.fixtures.pki import TestPki

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIB = 1024 * 1024
STORE = 8 * MIB  # each node's max_file_store
STREAM_MAX = 1 * MIB  # FIELDLINE's max_bytes, reserved on each node
PAYLOAD = 1024  # bytes of each message: ~7,000 fill the store
INFLIGHT = 100
STALL_S = 8.0  # no PUBACK for this long with messages in flight: the store refuses
CAP = 3 * STORE // PAYLOAD  # a broker that PUBACKs past its bound stops the loop here
# Besides the stream data JetStream counts against max_file_store (<= STORE), a node's
# store_dir holds what it does not count: the raft log of each replicated stream, where every
# message is written once more until a snapshot compacts it (nats-server 2.9: at most every
# 2 min), here $MQTT_msgs's (<= its data, < STORE) and FIELDLINE's (it receives the same
# messages as NATS publishes: < STORE), and FIELDLINE blocks of messages it has already
# dropped, until compacted (< STORE). Measured: 26.5 MB per node for an 8 MiB store.
SLACK = 3 * STORE


@pytest.fixture(scope="module")
def small_cluster(nats_cluster_factory: Callable[..., NatsCluster]) -> NatsCluster:
    cluster = nats_cluster_factory(
        3, StreamLimits(max_bytes=STREAM_MAX, replicas=3), store_bytes=STORE
    )
    # the ingest consumer exists (interest retention keeps what it has not acked), no worker
    cluster.ensure_ingest_consumer()
    return cluster


class Flooder:
    """A device publishing QoS 1 as fast as PUBACKs allow; records which seqs were PUBACKed."""

    def __init__(self, bundle: Bundle, ca: Path, port: int) -> None:
        self.topic = f"fl/{bundle.identity.tenant}/{bundle.identity.id}/telemetry"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=bundle.identity.id,
            clean_session=False,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.client.tls_set(ca_certs=str(ca), certfile=str(bundle.cert), keyfile=str(bundle.key))
        self.client.max_inflight_messages_set(INFLIGHT)
        self.client.reconnect_delay_set(1, 2)
        self.port = port
        self.sent: dict[int, int] = {}  # mid -> seq
        self.acked: list[int] = []  # mids
        self.disconnects = 0
        self.connected = threading.Event()
        self.client.on_publish = lambda _c, _u, mid, _rc, _p: self.acked.append(mid)
        self.client.on_connect = lambda *_a: self.connected.set()
        self.client.on_disconnect = self._gone

    def _gone(self, *_a: Any) -> None:
        self.disconnects += 1
        self.connected.clear()

    def start(self) -> None:
        self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        assert self.connected.wait(10), "the device did not connect"

    def acked_seqs(self) -> set[int]:
        return {self.sent[mid] for mid in list(self.acked)}

    def flood(self) -> None:
        """Publish until PUBACKs stop for STALL_S with a full window (or CAP messages)."""
        last_ack, last_count = time.monotonic(), 0
        seq = 0
        while seq < CAP:
            if len(self.acked) != last_count:
                last_ack, last_count = time.monotonic(), len(self.acked)
            if seq - len(self.acked) < INFLIGHT:
                body = json.dumps({"seq": seq}).encode()
                info = self.client.publish(self.topic, body.ljust(PAYLOAD), qos=1)
                self.sent[info.mid] = seq
                seq += 1
                continue
            if time.monotonic() - last_ack > STALL_S:
                return
            time.sleep(0.01)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client.reinitialise()


def store_dir_bytes(path: Path) -> int:
    """Bytes on disk under path (allocated blocks: what fills a disk)."""
    total = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue  # a block compacted away while walking
    return total


def drain(cluster: NatsCluster, expected: int, timeout: float = 120.0) -> list[int]:
    """Every seq the ingest consumer delivers (as the worker: the service's certificate),
    acknowledged, until `expected` came or nothing more for 3 s."""
    import nats.errors

    async def go() -> list[int]:
        nc = await cluster.connect(cluster.pki.service, connect_timeout=2)
        try:
            js = nc.jetstream(timeout=5)
            sub = await js.pull_subscribe_bind("ingest", MQTT_MSGS_STREAM)
            seqs: list[int] = []
            deadline = time.monotonic() + timeout
            while len(seqs) < expected and time.monotonic() < deadline:
                try:
                    msgs = await sub.fetch(500, timeout=2)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue  # no consumer leader yet (elections after the store filled)
                for msg in msgs:
                    seqs.append(json.loads(msg.data)["seq"])
                    await msg.ack()
            return seqs
        finally:
            await nc.close()

    return run_async(go)


def stream_state(cluster: NatsCluster, name: str) -> tuple[int, int]:
    async def go() -> tuple[int, int]:
        nc = await cluster.connect(connect_timeout=2)
        try:
            info = await nc.jetstream(timeout=5).stream_info(name)
            return info.state.messages, info.state.bytes
        finally:
            await nc.close()

    return run_async(go)


# paho-mqtt 2 leaks the TLS socket of a reconnect whose handshake fails (its network thread
# retries while every node restarts: "Connection failed, retrying"), and the collector then
# warns in whatever runs; those sockets are this test's, so they are collected here, with
# that one warning silenced for this test only
@pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning")
def test_a_flooding_device_fills_the_store_to_its_bound_and_loses_nothing_acked(
    small_cluster: NatsCluster, test_pki: TestPki
) -> None:
    device = Flooder(test_pki.device, test_pki.pki.ca_cert_path, small_cluster.node(1).port)
    device.start()
    try:
        device.flood()
        acked = device.acked_seqs()
        sent = len(device.sent)
        # a NATS client is still answered (the operator's NATS tools, the worker)
        messages, stored = stream_state(small_cluster, MQTT_MSGS_STREAM)
        disk = [store_dir_bytes(small_cluster.files.store_dir(k)) for k in (1, 2, 3)]
        print(
            f"\nsent {sent}, PUBACKed {len(acked)}, device disconnects {device.disconnects}; "
            f"$MQTT_msgs {messages} msgs {stored} B ({stored / max(messages, 1):.0f} B/msg); "
            f"store_dir bytes per node {disk}"
        )
        assert sent < CAP, f"{sent} messages PUBACKed past an {STORE} B store"
        assert acked, "nothing PUBACKed"
        assert len(acked) < sent, "PUBACKs never stopped"
        # JetStream's own count stops within one message of the bound
        assert stored <= STORE, f"$MQTT_msgs holds {stored} B, bound {STORE}"
        for k, used in enumerate(disk, start=1):
            assert used <= STORE + SLACK, f"node {k}: {used} B on disk, bound {STORE}"

        # Found, asserted so that a fixed nats-server shows up as a failing test: past the
        # bound nats-server (2.9.10, 2.10.27) refuses every MQTT CONNECT on every node ("unable to
        # persist session", then "loading session record ...: JetStream system temporarily
        # unavailable"), clean sessions too; streams and consumers lose their leaders and do
        # not recover by themselves, nor after a restart with the same store
        operator = Paho(cast(BrokerUnderTest, small_cluster.node(2)), test_pki.operator)
        assert not operator.connect(timeout=3), "an MQTT client got in: update docs/broker.md"
        operator.close()

        # the way back (docs/broker.md): a bigger store, rendered, every node restarted
        bigger = dataclasses.replace(small_cluster.options, max_store_bytes=4 * STORE)
        # generous deadlines (conditions, not timings): under a full CI run the elections
        # after the restart took minutes where they take seconds alone
        small_cluster.restart_all(bigger, timeout=60)
        small_cluster.wait_for_leaders(timeout=90)
        got = drain(small_cluster, len(acked))
        lost = acked - set(got)
        print(f"consumer received {len(got)} ({len(set(got))} distinct), lost {len(lost)}")
        assert not lost, f"{len(lost)} PUBACKed messages lost, e.g. {sorted(lost)[:5]}"
        operator = Paho(cast(BrokerUnderTest, small_cluster.node(2)), test_pki.operator)
        assert operator.connect(), "MQTT still refused after the store was raised"
        operator.close()
        # the device connects again and sends what it held: now PUBACKed and delivered
        deadline = time.monotonic() + 90
        while len(set(device.acked)) < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(set(device.acked)) == sent, f"{len(set(device.acked))} of {sent} PUBACKed"
        # nats-server 2.10 lets the device back in and PUBACKs what it held while the first
        # drain still runs, so that drain may already have had some or all of the rest
        left = sent - len(set(got))
        rest = drain(small_cluster, left) if left else []
        assert set(got) | set(rest) == set(range(sent))
    finally:
        device.stop()
        gc.collect()
