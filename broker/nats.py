"""Render a NATS JetStream cluster (fieldline's scale-out broker tier) from the same policy.

`write_nats_files` writes DIR/node-K.conf for K = 1..N plus DIR/certs/: copies of the fieldline
CA, the `broker` server certificate and key, and a cluster-only CA and route certificate. Each
node has an MQTT listener and a NATS client listener, both mutual TLS on the fieldline CA with
`verify_and_map`: a certificate logs in as the user named by its subject (`CN=dev-1,OU=device,
O=acme`), which has the publish/subscribe permissions `broker.policy.grants_for` gives its role,
as NATS subjects. Revoked identities have no user, so they are refused once the nodes reload.
nats-server (2.9, 2.10) reads no CRL and maps by subject only, so a revoked certificate whose id was
issued again (`certs issue ID --force`) maps to the new user. The NATS listener therefore pins
(`pinned_certs`) the public keys of the live client certificates. The MQTT listener cannot:
nats-server (2.9.10, 2.10.27, and its main branch of 2026) refuses a reload that changes its
pinned_certs, and with it the rest of the reload (docs/broker.md, "Re-issued ids").

MQTT topics map to NATS subjects by '/' -> '.', '+' -> '*', '#' -> '>'. nats-server 2.9 refuses
a topic holding '.' or ' ' (2.10 maps '.' to '//'); fieldline ids cannot hold either
(schemas.topics.ID_PATTERN), so the mapping is one-to-one on fieldline's topics.
`ensure_stream` creates the FIELDLINE stream (`fl.>`) that the ingest worker consumes.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import itertools
import json
import logging
import os
import re
import secrets
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import BrokerError
from broker.files import write_atomic
from broker.mosquitto import principals_from_registry
from broker.policy import Policy, Principal
from certs import CertsError, Pki, Role, serial_uri
from core.settings import NatsSettings, get_settings

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

STREAM_NAME = "FIELDLINE"
STREAM_SUBJECTS = ("fl.>",)
CLUSTER_NAME = "fieldline"
_log = logging.getLogger(__name__)
# as core.settings IngestSettings.nats_consumer: a name that is one subject token
_CONSUMER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# nats-server's store of QoS 1 MQTT publishes, written before the PUBACK (the ingest worker's
# default source, ingest_worker/jetstream.py); `fl/a/b/c` is stored as `$MQTT.msgs.fl.a.b.c`
MQTT_MSGS_STREAM = "$MQTT_msgs"
MQTT_MSGS_FILTER = "$MQTT.msgs.fl.>"
_NATS = NatsSettings.model_fields
DEFAULT_STREAM_MAX_BYTES: int = _NATS["stream_max_bytes"].default
DEFAULT_STREAM_MAX_AGE_S: float = _NATS["stream_max_age_s"].default
DEFAULT_DUPLICATE_WINDOW_S: float = _NATS["duplicate_window_s"].default
# as the embedded broker's max_packet_bytes and Mosquitto's max_packet_size (NATS: 1 MiB)
DEFAULT_MAX_PAYLOAD = 2 * 1024 * 1024
# MQTT sessions, QoS 1 messages and retained messages live in JetStream streams ($MQTT_*);
# beyond 3 replicas a write waits for more nodes and survives nothing more on one site
MAX_REPLICAS = 3
ROUTE_CERT_DAYS = 3650


class ConnectionType(StrEnum):
    """nats-server's allowed_connection_types: which listener a user may log in on."""

    STANDARD = "STANDARD"
    MQTT = "MQTT"


@dataclass(frozen=True)
class NatsOptions:
    """What varies between deployments; TLS, identity mapping and permissions do not."""

    nodes: int = _NATS["nodes"].default
    hosts: tuple[str, ...] = (_NATS["host"].default,)
    mqtt_port: int = _NATS["mqtt_port"].default
    client_port: int = _NATS["client_port"].default
    cluster_port: int = _NATS["cluster_port"].default
    monitor_port: int = 0  # node K serves /varz, /jsz on monitor_port + K - 1; 0: none
    max_payload: int = DEFAULT_MAX_PAYLOAD
    server_bundle_name: str = "broker"
    # the one durable consumer the service user may create, read and ack (settings
    # ingest.nats_consumer, read when the options are made)
    ingest_consumer: str = field(default_factory=lambda: get_settings().ingest.nats_consumer)
    # each node's JetStream stores (settings nats.max_store_bytes, nats.max_memory_store_bytes)
    # and the FIELDLINE stream's max_bytes they must hold (nats.stream_max_bytes)
    max_store_bytes: int = field(default_factory=lambda: get_settings().nats.max_store_bytes)
    max_memory_store_bytes: int = field(
        default_factory=lambda: get_settings().nats.max_memory_store_bytes
    )
    stream_max_bytes: int = field(default_factory=lambda: get_settings().nats.stream_max_bytes)

    def __post_init__(self) -> None:
        # JetStream reserves a stream's max_bytes on every node holding a replica (one replica
        # per node) and refuses to create a stream that does not fit; what is left over is all
        # $MQTT_msgs, the devices' unacknowledged QoS 1 messages, may use
        if self.max_store_bytes <= self.stream_max_bytes:
            raise BrokerError(
                f"nats.max_store_bytes {self.max_store_bytes} must exceed nats.stream_max_bytes "
                f"{self.stream_max_bytes}: each node keeps a FIELDLINE replica of that size "
                "(JetStream refuses the stream otherwise) and $MQTT_msgs needs the rest"
            )
        if self.max_store_bytes < 1 or self.max_memory_store_bytes < 1:
            raise BrokerError("nats.max_store_bytes and nats.max_memory_store_bytes must be > 0")
        if not _CONSUMER_NAME.match(self.ingest_consumer):
            raise BrokerError(
                f"ingest consumer {self.ingest_consumer!r}: 1-64 of A-Z a-z 0-9 _ - "
                "(ingest.nats_consumer)"
            )
        if self.nodes < 1:
            raise BrokerError(f"--nodes {self.nodes}: a cluster needs at least 1 node")
        if len(self.hosts) not in (1, self.nodes):
            raise BrokerError(
                f"--host lists {len(self.hosts)} addresses for {self.nodes} nodes: give one "
                "for all nodes or one per node"
            )
        ports = {"--mqtt-port": self.mqtt_port, "--client-port": self.client_port,
                 "--cluster-port": self.cluster_port}  # fmt: skip
        if self.monitor_port:
            ports["--monitor-port"] = self.monitor_port
        for flag, base in ports.items():
            if base < 1 or base + self.nodes - 1 > 65535:
                raise BrokerError(f"{flag} {base}: nodes 1..{self.nodes} need {base}..")
        ranges = sorted((base, base + self.nodes - 1, flag) for flag, base in ports.items())
        for (_, end, flag), (start, _, other) in itertools.pairwise(ranges):
            if start <= end:
                raise BrokerError(f"{flag} and {other} overlap for {self.nodes} nodes")

    @property
    def replicas(self) -> int:
        """Replicas of the FIELDLINE stream and of nats-server's own MQTT streams."""
        return min(MAX_REPLICAS, self.nodes)

    def host(self, k: int) -> str:
        """Node k's (1-based) listen address."""
        return self.hosts[0] if len(self.hosts) == 1 else self.hosts[k - 1]

    def port(self, base: int, k: int) -> int:
        return base + k - 1


@dataclass(frozen=True)
class NatsFiles:
    """Where the rendered cluster's files are."""

    out_dir: Path
    configs: tuple[Path, ...]
    ca: Path
    cert: Path
    key: Path
    route_ca: Path
    route_cert: Path
    route_key: Path

    def store_dir(self, k: int) -> Path:
        return self.out_dir / f"node-{k}"


@dataclass(frozen=True)
class StreamLimits:
    """The FIELDLINE stream's limits (core.settings NatsSettings)."""

    max_bytes: int = DEFAULT_STREAM_MAX_BYTES
    max_age_s: float = DEFAULT_STREAM_MAX_AGE_S
    duplicate_window_s: float = DEFAULT_DUPLICATE_WINDOW_S
    replicas: int = 1

    @classmethod
    def from_settings(cls, settings: NatsSettings, replicas: int) -> StreamLimits:
        return cls(
            settings.stream_max_bytes,
            settings.stream_max_age_s,
            settings.duplicate_window_s,
            replicas,
        )


# -- topics and subjects ---------------------------------------------------------------------
def topic_to_subject(topic: str) -> str:
    """An MQTT topic or filter as nats-server maps it: '/' -> '.', '+' -> '*', '#' -> '>'."""
    if "." in topic or " " in topic:
        raise ValueError(f"nats-server refuses MQTT topics holding '.' or ' ': {topic!r}")
    return ".".join({"+": "*", "#": ">"}.get(level, level) for level in topic.split("/"))


def subject_to_topic(subject: str) -> str:
    """The MQTT topic of a subject that `topic_to_subject` made from a topic name."""
    return subject.replace(".", "/")


def subjects_for_filter(topic_filter: str) -> tuple[str, ...]:
    """The subjects a filter covers: MQTT's `a/#` also matches `a`, NATS's `a.>` does not."""
    subject = topic_to_subject(topic_filter)
    if subject.endswith(".>"):
        return subject[:-2], subject
    return (subject,)


def nats_user(principal: Principal) -> str:
    """The user name nats-server's verify_and_map takes from a fieldline certificate."""
    return f"CN={principal.id},OU={principal.role.value},O={principal.tenant}"


# -- permissions -----------------------------------------------------------------------------
# Found by experiment against nats-server 2.9.10, the same on 2.10.27 (test_nats_tier.py): a QoS 1
# subscription is fed by a JetStream consumer that delivers to `$MQTT.sub.<nuid>` on the
# subscriber's own connection, and that subscription is checked against the user's permissions.
# Only MQTT-only users get it: a NATS client allowed it could SUB `$MQTT.sub.>` and read every
# session's QoS 1 deliveries, device commands included.
MQTT_INTERNAL_SUBSCRIBE = ("$MQTT.sub.>",)
# the pin rendered when no client certificate is live: the hash of no key's SPKI
NO_PIN = hashlib.sha256(b"fieldline: no live client certificate").hexdigest()


# the oldest nats-server the rendered configuration runs on (`reject_qos2_publish` and
# `downgrade_qos2_subscribe` are 2.10 keys; 2.9 refuses to start with them) and fieldline is
# tested with (docs/broker.md, "The nats-server version")
MIN_SERVER_VERSION = (2, 10, 0)
_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


def parse_server_version(text: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) from `nats-server --version` ("nats-server: v2.10.27")."""
    found = _VERSION_RE.search(text)
    if found is None:
        return None
    major, minor, patch = (int(x) for x in found.groups())
    return major, minor, patch


def check_server(binary: str) -> tuple[int, int, int]:
    """The version of the nats-server at `binary`; a BrokerError if it is older than
    MIN_SERVER_VERSION or does not say."""
    import subprocess

    try:
        done = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"{binary} --version failed: {exc}") from None
    version = parse_server_version(done.stdout + done.stderr)
    want = ".".join(map(str, MIN_SERVER_VERSION))
    if version is None:
        raise BrokerError(f"{binary} did not say its version; fieldline needs nats-server {want}+")
    if version < MIN_SERVER_VERSION:
        have = ".".join(map(str, version))
        raise BrokerError(
            f"{binary} is nats-server {have}; the rendered configuration needs {want} or later "
            "(`make setup` installs 2.10.27: deploy/setup/install-nats-server.sh)"
        )
    return version


def service_permissions(
    consumer: str, stream: str = STREAM_NAME
) -> dict[str, dict[str, list[str]]]:
    """What `fieldline ingest nats-ensure` and the ingest worker need: FIELDLINE's info, create
    and update; on FIELDLINE and on nats-server's $MQTT_msgs (the worker's default source,
    info only) the one durable consumer `consumer` (on $MQTT_msgs filtered to `fl.>`): create,
    info, pull, ack. Replies come on its inbox. No delete, no purge, no other consumer."""
    api = "$JS.API"
    mqtt = MQTT_MSGS_STREAM
    return {
        "publish": {
            "allow": [
                f"{api}.INFO",
                f"{api}.STREAM.INFO.{stream}",
                f"{api}.STREAM.CREATE.{stream}",
                f"{api}.STREAM.UPDATE.{stream}",
                # nats-py names the consumer, and its filter if any, in the subject
                f"{api}.CONSUMER.CREATE.{stream}.{consumer}",
                f"{api}.CONSUMER.CREATE.{stream}.{consumer}.>",
                f"{api}.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",
                f"{api}.CONSUMER.INFO.{stream}.{consumer}",
                f"{api}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
                f"$JS.ACK.{stream}.{consumer}.>",
                f"{api}.STREAM.INFO.{mqtt}",
                # names and filters only: the ensure step tells consumers left behind on it
                f"{api}.CONSUMER.LIST.{mqtt}",
                f"{api}.CONSUMER.CREATE.{mqtt}.{consumer}.{MQTT_MSGS_FILTER}",
                f"{api}.CONSUMER.INFO.{mqtt}.{consumer}",
                f"{api}.CONSUMER.MSG.NEXT.{mqtt}.{consumer}",
                f"$JS.ACK.{mqtt}.{consumer}.>",
            ]
        },
        "subscribe": {"allow": ["_INBOX.>"]},
    }


def user_entry(
    principal: Principal,
    policy: Policy,
    ingest_consumer: str | None = None,
    name: str | None = None,
) -> dict[str, object]:
    """One `authorization.users` entry: the policy's grants as subjects, on its listeners;
    `name` is what verify_and_map matches (default: the subject, `nats_user`)."""
    grants = policy.grants(principal)
    publish = sorted({s for f in grants.publish for s in subjects_for_filter(f)})
    subscribe = sorted({s for f in grants.subscribe for s in subjects_for_filter(f)})
    kinds = [ConnectionType.MQTT.value]
    permissions: dict[str, dict[str, list[str]]]
    if principal.role is Role.SERVICE:
        # the ingest worker reads its consumer over NATS; its MQTT grants stay for QoS 0
        # subscriptions (no `$MQTT.sub.>`: see MQTT_INTERNAL_SUBSCRIBE). Its one MQTT
        # connection, which makes nats-server create $MQTT_msgs, needs only CONNECT.
        kinds = [ConnectionType.STANDARD.value, ConnectionType.MQTT.value]
        consumer = ingest_consumer or get_settings().ingest.nats_consumer
        permissions = service_permissions(consumer)
        permissions["subscribe"]["allow"] += subscribe
    elif principal.role is Role.ADMIN:
        kinds = [ConnectionType.STANDARD.value, ConnectionType.MQTT.value]
        permissions = {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    else:
        # an empty allow list would mean "everything": deny all instead
        pub: dict[str, list[str]] = {"allow": publish} if publish else {"deny": [">"]}
        permissions = {
            "publish": pub,
            "subscribe": {"allow": [*subscribe, *MQTT_INTERNAL_SUBSCRIBE]},
        }
    return {
        "user": name or nats_user(principal),
        "permissions": permissions,
        "allowed_connection_types": kinds,
    }


def spki_sha256(cert: x509.Certificate) -> str:
    """A certificate's pin as nats-server's `pinned_certs` holds it: lower-case hex SHA-256 of
    its DER SubjectPublicKeyInfo (server/auth.go matchesPinnedCert)."""
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def live_client_pins(pki: Pki) -> list[str]:
    """The pins of every live (not revoked) client certificate in the registry, sorted.

    A re-issue writes the new bundle over the old one's directory, so the file read is the
    live record's only if its serial matches; one that does not (or is gone) is not pinned and
    so refused on the NATS listener, and logged."""
    return sorted({spki_sha256(cert) for cert in live_client_certificates(pki).values()})


def user_names(pki: Pki) -> dict[str, str]:
    """id -> the name verify_and_map matches for its live certificate: the certificate's own
    serial URI when it has one, so an older certificate of a re-issued id (same subject, other
    serial) names no user and is refused; the subject for certificates made before that URI."""
    names: dict[str, str] = {}
    for identity_id, cert in live_client_certificates(pki).items():
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            continue
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if serial_uri(cert.serial_number) in uris:
            names[identity_id] = serial_uri(cert.serial_number)
    return names


def live_client_certificates(pki: Pki) -> dict[str, x509.Certificate]:
    """id -> its live client certificate, as its bundle holds it (checked by serial)."""
    live: dict[str, x509.Certificate] = {}
    for record in pki.records():
        if record.revoked_at is not None or record.role is Role.SERVER:
            continue
        path = pki.root / record.directory / "cert.pem"
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            _log.warning(
                "%s: certificate unreadable, not pinned, refused on the NATS port: %s",
                record.id,
                exc,
            )
            continue
        if cert.serial_number != record.serial:
            _log.warning(
                "%s: %s holds serial %x, the registry %x: not pinned, refused on the NATS port",
                record.id, path, cert.serial_number, record.serial,
            )  # fmt: skip
            continue
        live[record.id] = cert
    return live


# -- rendering -------------------------------------------------------------------------------
def _value(value: object, indent: str) -> str:
    # strings always quoted (JSON escapes): NATS would read an unquoted `$X` as a variable
    if isinstance(value, Mapping):
        inner = indent + "  "
        body = "".join(f"{inner}{k}: {_value(v, inner)}\n" for k, v in value.items())
        return "{\n" + body + indent + "}"
    if isinstance(value, list | tuple):
        if not value or all(not isinstance(v, Mapping) for v in value):
            return "[" + ", ".join(_value(v, indent) for v in value) + "]"
        inner = indent + "  "
        return "[\n" + "".join(f"{inner}{_value(v, inner)}\n" for v in value) + indent + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))


def _tls(files: NatsFiles, **extra: object) -> dict[str, object]:
    return {"cert_file": files.cert, "key_file": files.key, "ca_file": files.ca,
            "timeout": 5, **extra}  # fmt: skip


def render_node(
    k: int,
    options: NatsOptions,
    files: NatsFiles,
    users: Sequence[Mapping[str, object]],
    route_password: str,
    pins: Sequence[str] = (),
) -> str:
    """node-K.conf: client and MQTT listeners (mutual TLS, verify_and_map, only the `pins`
    client keys), JetStream, routes."""
    host = options.host(k)
    # nats-server takes an empty pinned_certs as "no pinning": with no live certificate, pin
    # a key nobody has, so that a revoked certificate is still refused
    pinned = sorted(pins) or [NO_PIN]
    routes = [
        f"nats-route://route:{route_password}@{_url_host(options.host(j))}:"
        f"{options.port(options.cluster_port, j)}"
        for j in range(1, options.nodes + 1)
        if j != k
    ]
    conf: dict[str, object] = {
        "server_name": f"{CLUSTER_NAME}-{k}",
        "host": host,
        "port": options.port(options.client_port, k),
        "max_payload": options.max_payload,
        "tls": _tls(files, verify_and_map=True, pinned_certs=pinned),
        # bounded: a worker outage or one flooding device fills $MQTT_msgs up to here, then
        # devices get no PUBACK, instead of the node's disk filling (docs/broker.md)
        "jetstream": {
            "store_dir": files.store_dir(k),
            "max_file_store": options.max_store_bytes,
            "max_memory_store": options.max_memory_store_bytes,
        },
        "mqtt": {
            "host": host,
            "port": options.port(options.mqtt_port, k),
            # no pinned_certs here: nats-server (2.9 and 2.10) refuses a reload changing them on
            # the MQTT listener, and with it the user changes of a revoke
            "tls": _tls(files, verify_and_map=True),
            # no consumer_replicas: 2.10 ignores it and warns ("invalid use of field"); the
            # MQTT consumers take their stream's replicas
            "stream_replicas": options.replicas,
            # QoS 2 as fieldline has tested it on this tier: a QoS 2 PUBLISH refused, a QoS 2
            # subscription granted QoS 1 (nats-server 2.10 can do QoS 2 through two more
            # streams; fieldline's clients use QoS 1 and its ingest path is tested with it)
            "reject_qos2_publish": True,
            "downgrade_qos2_subscribe": True,
        },
        "authorization": {"users": list(users)},
    }
    if options.monitor_port:
        conf["http"] = f"{_url_host(host)}:{options.port(options.monitor_port, k)}"
    if options.nodes > 1:
        conf["cluster"] = {
            "name": CLUSTER_NAME,
            "host": host,
            "port": options.port(options.cluster_port, k),
            # nats-server always makes routes mutual TLS; fieldline's server certificates are
            # serverAuth only, so routes use a cluster-only CA and certificate (both usages),
            # and a password so that a node of another cluster on that CA cannot join
            "tls": {
                "cert_file": files.route_cert,
                "key_file": files.route_key,
                "ca_file": files.route_ca,
                "timeout": 5,
            },
            "authorization": {"user": "route", "password": route_password},
            "routes": routes,
        }
    header = (
        f"# fieldline NATS node {k} of {options.nodes}, rendered by `fieldline broker "
        "nats-config`; do not edit.\n# Re-render after `fieldline certs issue/revoke`, then "
        f"`nats-server --signal reload=<pid>` on every node.\n"
    )
    body = "".join(f"{key}: {_value(value, '')}\n" for key, value in conf.items())
    return header + body


def render_cluster(
    principals: Iterable[Principal],
    options: NatsOptions,
    files: NatsFiles,
    route_password: str,
    policy: Policy | None = None,
    pins: Sequence[str] = (),
    names: Mapping[str, str] | None = None,
) -> dict[Path, str]:
    """{DIR/node-K.conf: text} for K = 1..N, one user per principal (named by `names`, from
    `user_names`, else by subject), `pins` (live_client_pins) the only client keys let in."""
    policy = policy or Policy()
    names = names or {}
    users = [user_entry(p, policy, options.ingest_consumer, names.get(p.id)) for p in principals]
    return {
        files.configs[k - 1]: render_node(k, options, files, users, route_password, pins)
        for k in range(1, options.nodes + 1)
    }


def nats_files(out_dir: Path, nodes: int) -> NatsFiles:
    out_dir = out_dir.absolute()
    tls = out_dir / "certs"
    return NatsFiles(
        out_dir=out_dir,
        configs=tuple(out_dir / f"node-{k}.conf" for k in range(1, nodes + 1)),
        ca=tls / "ca.pem",
        cert=tls / "server.pem",
        key=tls / "server.key",
        route_ca=tls / "route-ca.pem",
        route_cert=tls / "route.pem",
        route_key=tls / "route.key",
    )


def write_nats_files(
    pki: Pki, out_dir: Path, options: NatsOptions | None = None, policy: Policy | None = None
) -> NatsFiles:
    """Render the cluster into out_dir (configs 0600: they hold the route password)."""
    opts = options or NatsOptions()
    try:
        server = pki.server_bundle(opts.server_bundle_name)
        principals = principals_from_registry(pki)
        pins = live_client_pins(pki)
        names = user_names(pki)
        ca_bytes = pki.ca_cert_path.read_bytes()
    except (CertsError, OSError) as exc:
        raise BrokerError(
            f"{exc}; NATS needs the CA and a server certificate: `fieldline certs init-ca`, "
            f"then `fieldline certs server {opts.server_bundle_name} --host ... --ip ...`"
        ) from exc
    files = nats_files(out_dir, opts.nodes)
    try:
        files.ca.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(files.ca.parent, 0o700)
        _write(files.ca, ca_bytes, 0o644)
        _write(files.cert, server.cert.read_bytes(), 0o644)
        _write(files.key, server.key.read_bytes(), 0o600)
        _ensure_route_certs(files, opts)
        password = _route_password(files.out_dir / "route.secret")
        for k in range(1, opts.nodes + 1):
            files.store_dir(k).mkdir(mode=0o700, exist_ok=True)
        rendered = render_cluster(principals, opts, files, password, policy, pins, names)
        for path, text in rendered.items():
            _write(path, text.encode(), 0o600)
    except OSError as exc:
        raise BrokerError(f"cannot write the NATS cluster into {out_dir}: {exc}") from exc
    return files


def _url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def _route_password(path: Path) -> str:
    # kept across re-renders: a reload must not split a running cluster
    if path.exists():
        return path.read_text().strip()
    password = secrets.token_urlsafe(32)
    _write(path, password.encode(), 0o600)
    return password


def _ensure_route_certs(files: NatsFiles, options: NatsOptions) -> None:
    """A cluster-only CA and one route certificate for every node (serverAuth + clientAuth)."""
    names = sorted({options.host(k) for k in range(1, options.nodes + 1)} | {"127.0.0.1"})
    if files.route_cert.exists() and files.route_key.exists() and files.route_ca.exists():
        cert = x509.load_pem_x509_certificate(files.route_cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(
            san.get_values_for_type(x509.DNSName)
        )
        if set(names) <= have and cert.not_valid_after_utc > datetime.now(UTC):
            return
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fieldline NATS route CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=ROUTE_CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san_names: list[x509.GeneralName] = []
    for name in names:
        try:
            san_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            san_names.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fieldline NATS route")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=ROUTE_CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(san_names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_bytes = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # the route CA's key is not kept: a new node means a new CA, rendered for all nodes
    _write(files.route_key, key_bytes, 0o600)
    _write(files.route_cert, cert.public_bytes(pem), 0o644)
    _write(files.route_ca, ca.public_bytes(pem), 0o644)


def _write(target: Path, data: bytes, mode: int) -> None:
    write_atomic(target, data, mode)


# -- the stream ------------------------------------------------------------------------------
class StreamChange(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


async def ensure_stream(
    nc: NatsClient, limits: StreamLimits, *, name: str = STREAM_NAME, timeout: float = 10.0
) -> StreamChange:
    """Create the FIELDLINE stream, or update it when its subjects or limits differ."""
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    js = nc.jetstream(timeout=timeout)
    wanted = StreamConfig(
        name=name,
        subjects=list(STREAM_SUBJECTS),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        num_replicas=limits.replicas,
        max_bytes=limits.max_bytes,
        max_age=limits.max_age_s,
        duplicate_window=limits.duplicate_window_s,
    )
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(wanted)
        return StreamChange.CREATED
    have = info.config
    same = (
        sorted(have.subjects or []) == sorted(STREAM_SUBJECTS)
        and have.num_replicas == limits.replicas
        and have.max_bytes == limits.max_bytes
        and _close(have.max_age, limits.max_age_s)
        and _close(have.duplicate_window, limits.duplicate_window_s)
        and have.storage == StorageType.FILE
    )
    if same:
        return StreamChange.UNCHANGED
    await js.update_stream(wanted)
    return StreamChange.UPDATED


def _close(have: float | None, want: float) -> bool:
    return have is not None and abs(have - want) < 1e-6


async def ensure_stream_when_ready(
    urls: Sequence[str], context: ssl.SSLContext, limits: StreamLimits, timeout: float = 60.0
) -> StreamChange:
    """`ensure_stream` once the cluster has elected a JetStream leader (nodes just started):
    retried until timeout, then one BrokerError with the last reason."""
    from core.natsconn import connect

    deadline = asyncio.get_running_loop().time() + timeout
    last = "no answer"

    async def quiet(exc: Exception) -> None:
        # nats-py logs every refused connect by default; here each is a retry, told once at
        # the end if they all fail
        nonlocal last
        last = repr(exc)

    while asyncio.get_running_loop().time() < deadline:
        try:
            nc = await connect(
                servers=list(urls),
                tls=context,
                connect_timeout=2,
                allow_reconnect=False,
                error_cb=quiet,
            )
        except Exception as exc:  # not listening yet: nats-py raises several kinds
            last = repr(exc)
            await asyncio.sleep(0.2)
            continue
        try:
            return await ensure_stream(nc, limits, timeout=2)
        except Exception as exc:  # no meta leader yet ("JetStream not enabled", timeouts)
            # str(): nats-py's APIError repr() drops the server's description
            last = f"{exc!r} {exc}"
        finally:
            await nc.close()
        await asyncio.sleep(0.2)
    raise BrokerError(
        f"the NATS cluster at {', '.join(urls)} did not answer in {timeout:.0f} s: {last}"
    )
