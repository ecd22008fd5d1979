"""The NATS cluster renderer: topics as subjects, one user per live identity, ports per node."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from broker.errors import BrokerError
from broker.nats import (
    MIN_SERVER_VERSION,
    MQTT_INTERNAL_SUBSCRIBE,
    NO_PIN,
    NatsOptions,
    check_server,
    live_client_pins,
    nats_files,
    nats_user,
    parse_server_version,
    render_cluster,
    subjects_for_filter,
    topic_to_subject,
    user_entry,
    write_nats_files,
)
from broker.policy import Policy, Principal
from certs import Bundle, Pki, Role, serial_uri
from core.settings import BrokerSettings, NatsSettings
from schemas.topics import validate_id
from tests.fixtures.prereq import require_binary

DEVICE = Principal("d1", "acme", Role.DEVICE)
OPERATOR = Principal("ops-1", "acme", Role.OPERATOR)
SERVICE = Principal("ingest-1", "platform", Role.SERVICE)


@pytest.mark.parametrize(
    ("topic", "subject"),
    [
        ("fl/acme/d1/telemetry", "fl.acme.d1.telemetry"),
        ("fl/acme/d1/cmd/reset", "fl.acme.d1.cmd.reset"),
        ("fl/+/+/cmd-res", "fl.*.*.cmd-res"),
        ("fl/acme/#", "fl.acme.>"),
        ("#", ">"),
    ],
)
def test_topics_map_as_nats_server_maps_them(topic: str, subject: str) -> None:
    assert topic_to_subject(topic) == subject


def test_a_dot_in_a_topic_cannot_be_mapped_and_ids_never_hold_one() -> None:
    with pytest.raises(ValueError, match="refuses MQTT topics"):
        topic_to_subject("fl/acme/d.1/telemetry")
    # the mapping is one-to-one on fieldline's topics because no id can hold '.' or ' '
    for bad in ("d.1", "d 1"):
        with pytest.raises(ValueError, match="device id"):
            validate_id(bad, "device id")


def test_a_multi_level_filter_also_covers_its_parent() -> None:
    assert subjects_for_filter("fl/acme/d1/cmd/#") == ("fl.acme.d1.cmd", "fl.acme.d1.cmd.>")
    assert subjects_for_filter("fl/+/+/status") == ("fl.*.*.status",)


def test_user_name_is_the_certificate_subject_as_nats_prints_it() -> None:
    assert nats_user(DEVICE) == "CN=d1,OU=device,O=acme"


def test_device_permissions_are_its_own_topics_only() -> None:
    entry = user_entry(DEVICE, Policy())
    perms = entry["permissions"]
    assert isinstance(perms, dict)
    assert perms["publish"]["allow"] == [
        "fl.acme.d1.cmd-res", "fl.acme.d1.events", "fl.acme.d1.status", "fl.acme.d1.telemetry",
    ]  # fmt: skip
    assert perms["subscribe"]["allow"] == [
        "fl.acme.d1.cmd", "fl.acme.d1.cmd.>", *MQTT_INTERNAL_SUBSCRIBE,
    ]  # fmt: skip
    assert entry["allowed_connection_types"] == ["MQTT"]


def test_a_role_without_publish_grants_is_denied_everything_not_allowed_everything() -> None:
    # an empty allow list means "no restriction" to nats-server
    auditor = Principal("a1", "acme", Role.SERVER)  # no grants at all
    perms = user_entry(auditor, Policy())["permissions"]
    assert isinstance(perms, dict)
    assert perms["publish"] == {"deny": [">"]}


def test_service_may_consume_the_stream_but_not_delete_it() -> None:
    entry = user_entry(SERVICE, Policy(), "ingest")
    perms = entry["permissions"]
    assert isinstance(perms, dict)
    allowed = perms["publish"]["allow"]
    assert "$JS.API.CONSUMER.MSG.NEXT.FIELDLINE.ingest" in allowed
    assert "$JS.ACK.FIELDLINE.ingest.>" in allowed
    assert not any("DELETE" in s or "PURGE" in s or s in (">", "fl.>") for s in allowed)
    assert entry["allowed_connection_types"] == ["STANDARD", "MQTT"]


@pytest.mark.parametrize(("nodes", "replicas"), [(1, 1), (2, 2), (3, 3), (5, 3)])
def test_replicas_are_min_of_3_and_nodes(nodes: int, replicas: int, tmp_path: Path) -> None:
    options = NatsOptions(nodes=nodes)
    assert options.replicas == replicas
    texts = render_cluster([DEVICE], options, nats_files(tmp_path, nodes), "pw")
    assert len(texts) == nodes
    for text in texts.values():
        assert f"stream_replicas: {replicas}" in text
        assert "consumer_replicas" not in text  # ignored by nats-server 2.10+, with a warning
        assert "reject_qos2_publish: true" in text
        assert "downgrade_qos2_subscribe: true" in text
        assert ("cluster: {" in text) == (nodes > 1)


def test_node_k_listens_on_each_port_plus_k_minus_1(tmp_path: Path) -> None:
    options = NatsOptions(nodes=3, mqtt_port=8883, client_port=4222, cluster_port=6222)
    files = nats_files(tmp_path, 3)
    texts = render_cluster([DEVICE], options, files, "pw")
    node3 = texts[tmp_path / "node-3.conf"]
    assert 'server_name: "fieldline-3"' in node3
    assert "port: 8885" in node3
    assert "port: 4224" in node3
    assert "port: 6224" in node3
    assert "nats-route://route:pw@127.0.0.1:6222" in node3
    assert "nats-route://route:pw@127.0.0.1:6223" in node3
    assert ":6224" not in node3.split("routes:")[1]  # not a route to itself
    assert f'store_dir: "{tmp_path}/node-3"' in node3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "at least 1 node"),
        ({"nodes": 3, "hosts": ("a", "b")}, "one per node"),
        ({"nodes": 3, "mqtt_port": 4222, "client_port": 4224}, "overlap"),
        ({"nodes": 3, "mqtt_port": 65534}, "--mqtt-port 65534"),
    ],
)
def test_bad_options_are_one_clear_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BrokerError, match=message):
        NatsOptions(**kwargs)  # type: ignore[arg-type]


def test_revoked_identities_have_no_user_and_keys_are_0600(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init_ca(name="test CA")
    pki.issue_server("broker", hosts=["localhost"], ips=["127.0.0.1"])
    dev_a = pki.issue("dev-a", tenant="acme", role=Role.DEVICE)
    dev_b = pki.issue("dev-b", tenant="acme", role=Role.DEVICE)
    pki.revoke("dev-b")
    files = write_nats_files(pki, tmp_path / "out", NatsOptions(nodes=2))
    text = files.configs[0].read_text()
    # named by the certificate's own serial URI, not by its subject (which a re-issue shares)
    assert f'user: "{serial_uri(dev_a.serial)}"' in text
    assert "CN=dev-a" not in text
    assert "dev-b" not in text
    assert f"{dev_b.serial:x}" not in text
    assert "broker" not in text.split("authorization")[1]  # the server certificate is no user
    for path in (files.key, files.route_key, *files.configs, tmp_path / "out/route.secret"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # a re-render keeps the route password and the route certificate (no split on reload)
    route_cert = files.route_cert.read_bytes()
    again = write_nats_files(pki, tmp_path / "out", NatsOptions(nodes=2))
    assert again.configs[0].read_text() == text
    assert files.route_cert.read_bytes() == route_cert


def test_no_server_certificate_is_one_clear_error(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init_ca(name="test CA")
    with pytest.raises(BrokerError, match="fieldline certs server broker"):
        write_nats_files(pki, tmp_path / "out")


def test_service_may_consume_mqtt_msgs_only_filtered_to_fl_and_never_change_it() -> None:
    perms = user_entry(SERVICE, Policy(), "ingest")["permissions"]
    assert isinstance(perms, dict)
    allowed = perms["publish"]["allow"]
    mqtt = [s for s in allowed if "$MQTT_msgs" in s]
    assert "$JS.API.CONSUMER.CREATE.$MQTT_msgs.ingest.$MQTT.msgs.fl.>" in mqtt
    assert "$JS.API.CONSUMER.MSG.NEXT.$MQTT_msgs.ingest" in mqtt
    assert "$JS.ACK.$MQTT_msgs.ingest.>" in mqtt
    # nats-server makes and owns that stream; an unfiltered consumer would see every account
    # message stored for MQTT sessions
    assert not any(op in s for s in mqtt for op in ("STREAM.CREATE", "UPDATE", "DELETE", "PURGE"))
    assert "$JS.API.CONSUMER.CREATE.$MQTT_msgs" not in allowed
    assert "$JS.API.CONSUMER.CREATE.$MQTT_msgs.>" not in allowed


def test_service_reads_and_acks_only_its_own_consumer_and_no_mqtt_delivery(
    tmp_path: Path,
) -> None:
    """`$MQTT.sub.>` would let a NATS SUB read every session's QoS 1 deliveries (commands
    included), `$JS.ACK.<stream>.>` ack them, `*` any consumer: none of them for the service."""
    options = NatsOptions(nodes=1, ingest_consumer="ingest-b")
    texts = render_cluster([SERVICE], options, nats_files(tmp_path, 1), "pw")
    text = texts[tmp_path / "node-1.conf"]
    perms = user_entry(SERVICE, Policy(), "ingest-b")["permissions"]
    assert isinstance(perms, dict)
    allowed, subscribe = perms["publish"]["allow"], perms["subscribe"]["allow"]
    assert "$MQTT.sub.>" not in subscribe
    assert not any(s.startswith("$MQTT") for s in subscribe)
    for stream in ("FIELDLINE", "$MQTT_msgs"):
        assert f"$JS.ACK.{stream}.ingest-b.>" in allowed
        assert f"$JS.API.CONSUMER.MSG.NEXT.{stream}.ingest-b" in allowed
        assert f"$JS.API.CONSUMER.INFO.{stream}.ingest-b" in allowed
        assert f"$JS.ACK.{stream}.>" not in allowed
    # listing names the consumers (the ensure step tells one left behind); it reads nothing
    assert "$JS.API.CONSUMER.LIST.$MQTT_msgs" in allowed
    acting = [
        s
        for s in allowed
        if (".CONSUMER." in s and ".CONSUMER.LIST." not in s) or s.startswith("$JS.ACK.")
    ]
    assert acting
    assert all(".ingest-b" in s for s in acting)
    assert not any(".*" in s for s in allowed)
    assert "$JS.ACK.$MQTT_msgs.ingest-b.>" in text


def test_a_consumer_name_that_is_not_one_subject_token_is_one_clear_error() -> None:
    with pytest.raises(BrokerError, match=r"ingest\.nats_consumer"):
        NatsOptions(ingest_consumer="a.>")


def _pin_of_key(bundle: Bundle) -> str:
    # from the private key the holder has, not from the certificate the renderer reads
    key = serialization.load_pem_private_key(bundle.key.read_bytes(), None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def test_pinned_keys_are_the_live_client_certificates_and_no_revoked_one(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init_ca(name="test CA")
    pki.issue_server("broker", hosts=["localhost"], ips=["127.0.0.1"])
    live = [
        pki.issue("dev-a", tenant="acme", role=Role.DEVICE),
        pki.issue("ops-1", tenant="acme", role=Role.OPERATOR),
        pki.issue("ingest-1", tenant="platform", role=Role.SERVICE),
        pki.issue("root", tenant="platform", role=Role.ADMIN),
    ]
    old = pki.issue("dev-b", tenant="acme", role=Role.DEVICE)
    old_pin = _pin_of_key(old)  # the bundle is overwritten by the re-issue below
    gone = pki.issue("dev-c", tenant="acme", role=Role.DEVICE)
    gone_pin = _pin_of_key(gone)
    pki.revoke("dev-c")
    new = pki.issue("dev-b", tenant="acme", role=Role.DEVICE, force=True)
    live.append(new)
    assert [r.revoked_at is not None for r in pki.records() if r.id == "dev-b"] == [True, False]
    pins = live_client_pins(pki)
    assert pins == sorted(_pin_of_key(b) for b in live)
    assert old_pin not in pins
    assert gone_pin not in pins
    assert _pin_of_key(pki.bundle("broker")) not in pins  # a server certificate is no client

    text = write_nats_files(pki, tmp_path / "out").configs[0].read_text()
    nats_tls, mqtt = text.split("mqtt: {")
    for pin in pins:
        assert pin in nats_tls
    assert old_pin not in text
    assert gone_pin not in text
    # nats-server refuses a reload that changes the MQTT listener's pins (see broker/nats.py)
    assert "pinned_certs" not in mqtt


def test_with_no_live_client_certificate_the_pin_is_one_nobody_has(tmp_path: Path) -> None:
    # nats-server reads an empty pinned_certs as "no pinning at all"
    text = render_cluster([], NatsOptions(nodes=1), nats_files(tmp_path, 1), "pw", pins=())
    assert f'pinned_certs: ["{NO_PIN}"]' in next(iter(text.values()))


def test_every_node_bounds_its_jetstream_stores(tmp_path: Path) -> None:
    options = NatsOptions(
        nodes=3, max_store_bytes=5 * 2**30, max_memory_store_bytes=2**28, stream_max_bytes=2**30
    )
    texts = render_cluster([DEVICE], options, nats_files(tmp_path, 3), "pw")
    for k, text in enumerate(texts.values(), start=1):
        jetstream = text.split("jetstream: {")[1].split("}")[0]
        assert f'store_dir: "{tmp_path}/node-{k}"' in jetstream
        assert f"max_file_store: {5 * 2**30}" in jetstream
        assert f"max_memory_store: {2**28}" in jetstream


def test_the_default_store_holds_fieldline_and_an_hour_of_worker_outage() -> None:
    nats, broker = NatsSettings(), BrokerSettings()
    outage = broker.mosquitto_outage_s * broker.mosquitto_queue_rate
    # ~93 B of subject, header and record per message in $MQTT_msgs (measured, see
    # tests/integration/test_nats_store_bound.py), 2x headroom
    needed = nats.stream_max_bytes + 2 * outage * (broker.mosquitto_message_bytes + 93)
    assert nats.max_store_bytes >= needed
    options = NatsOptions()
    assert options.max_store_bytes == nats.max_store_bytes
    assert options.max_memory_store_bytes == nats.max_memory_store_bytes


@pytest.mark.parametrize("store", [2**30, 2**30 - 1, 2**20])
def test_a_store_not_larger_than_the_fieldline_stream_is_one_clear_error(store: int) -> None:
    # JetStream reserves FIELDLINE's max_bytes on every node holding a replica and refuses
    # to create it when it does not fit; at equal size $MQTT_msgs would have no room at all
    with pytest.raises(BrokerError, match=r"nats\.max_store_bytes .* nats\.stream_max_bytes"):
        NatsOptions(nodes=3, max_store_bytes=store, stream_max_bytes=2**30)
    NatsOptions(nodes=3, max_store_bytes=2**30 + 1, stream_max_bytes=2**30)


def _binary(tmp_path: Path, says: str) -> str:
    """A stand-in executable that answers `--version` as nats-server would."""
    path = tmp_path / "nats-server"
    path.write_text(f"#!/bin/sh\necho '{says}'\n")
    path.chmod(0o755)
    return str(path)


def test_the_server_version_is_checked(tmp_path: Path) -> None:
    assert parse_server_version("nats-server: v2.10.27") == (2, 10, 27)
    assert parse_server_version("nats-server: 2.12.8") == (2, 12, 8)
    assert parse_server_version("something else") is None
    assert check_server(_binary(tmp_path, "nats-server: v2.10.27")) == (2, 10, 27)
    with pytest.raises(BrokerError, match=r"nats-server 2\.9\.10; the rendered configuration "
                       r"needs 2\.10\.0 or later \(`make setup` installs 2\.10\.27"):  # fmt: skip
        check_server(_binary(tmp_path, "nats-server: v2.9.10"))
    with pytest.raises(BrokerError, match="did not say its version"):
        check_server(_binary(tmp_path, "hello"))


def test_the_installed_server_is_recent_enough() -> None:
    """What `make setup` installed (deploy/setup/install-nats-server.sh) passes the check."""
    assert check_server(require_binary("nats-server")) >= MIN_SERVER_VERSION
