"""Render a production Mosquitto config and ACL file from the embedded broker's own policy.

`write_mosquitto_files` writes into one directory everything Mosquitto reads: the config,
an ACL file with an explicit block per issued principal, and copies of the CA, the server
certificate and key, and the CRL (the PKI itself is 0700 and stays private). After
`fieldline certs issue` or `revoke`, render again and send SIGHUP: Mosquitto re-reads the
ACL file and the CRL.
"""

from __future__ import annotations

import math
import os
import pwd
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import BrokerError
from broker.files import write_atomic
from broker.policy import Policy, Principal
from certs import CertsError, Pki, Role
from core.settings import BrokerSettings

# Sized for at-least-once ingest (docs/design.md, Delivery): a worker holds PUBACKs until its batch
# commits, so the broker keeps messages in flight unacknowledged and queues behind them; past
# max_queued_messages Mosquitto drops QoS 1 messages. The window is max_inflight_messages for
# MQTT 3.1.1 clients; an MQTT 5 client's Receive Maximum replaces it (the worker asks for
# ingest.receive_maximum). The queue must hold what arrives while a worker is down for as
# long as you want to survive.
DEFAULT_MAX_INFLIGHT = 1000
DEFAULT_SESSION_EXPIRY = "7d"
DEFAULT_MAX_PACKET = 2 * 1024 * 1024  # as the embedded broker's max_packet_bytes
MIB = 1024 * 1024
# Byte limits besides the count limits (all per client session, except memory_limit): a queue
# of 200,000 backlog messages of 2 MiB each would be 400 GiB. The queue is per *subscriber*:
# once the ingest session's queue is full, Mosquitto drops (and has already PUBACKed) the
# messages of every device alike, so max_queued_bytes must hold the whole fleet's bytes for the
# longest worker outage to survive (docs/operations.md, Mosquitto in production).
# Both are sized for an outage (QueueSizing below) from core.settings' broker.mosquitto_outage_s,
# mosquitto_queue_rate and mosquitto_message_bytes: 1 h at 200 msg/s of 256 B by default.
# 10,000 in flight (the worker's Receive Maximum) x 1.6 KiB; a bigger backlog message still
# goes out alone. 2.0.11 applies it only to a message's first try at flight, not when the
# queue moves on (fixed in 2.0.13): there the count window is what bounds in-flight bytes.
DEFAULT_MAX_INFLIGHT_BYTES = 16 * MIB
# memory_limit caps Mosquitto's own heap, but 2.0.11 allocates a packet's declared length when
# its header arrives, before CONNECT: one certificate holder reserved the whole 1 GiB with 535
# TLS connections of 4 bytes each (benchmarks/mosquitto_limits.py), after which every client
# whose message needs memory is disconnected. So it is off unless asked for; the systemd
# unit's MemoryMax bounds the process instead (docs/operations.md, Mosquitto in production).
DEFAULT_MEMORY_LIMIT = 0
# the embedded broker's broker.max_connections; counts every TCP connection of the listener,
# including ones that have not finished TLS or sent CONNECT. 2.0.11 counts each closed
# connection twice (fixed in 2.0.12), so the limit drifts up; LimitNOFILE is what holds.
DEFAULT_MAX_CONNECTIONS = 20_000
# MQTT 5 clients asking for a longer keepalive, or none (0), are told to use this one; it is
# the largest keepalive fieldline's own clients accept (broker.keepalive_s <= 3600), which
# they do not renegotiate. Mosquitto 2.0 does not apply it to MQTT 3.1.1 clients.
DEFAULT_MAX_KEEPALIVE = 3600
# Mosquitto saves its persistence file only every autosave_interval and at shutdown: a kill -9
# (or the unit's MemoryMax) loses every change since the last save, messages it has already
# PUBACKed to devices included. Every 1 s (a save comes 1-2 s after the last) keeps that to
# ~2 s of traffic, queued or in flight, at no measurable throughput cost even with 200,000
# messages queued; with autosave_on_changes the interval counts changes instead, which bounds
# queued messages by number but not those sent straight to a connected worker, and at 200,000
# queued caps Mosquitto at ~4,000 msg/s (1000 changes) or ~700 (100): each save rewrites and
# fsyncs the whole database (benchmarks/mosquitto_durability.py). core.settings holds
# the defaults (broker.mosquitto_autosave_*).
_BROKER_FIELDS = BrokerSettings.model_fields
DEFAULT_AUTOSAVE_ON_CHANGES: bool = _BROKER_FIELDS["mosquitto_autosave_on_changes"].default
DEFAULT_AUTOSAVE_INTERVAL: int = _BROKER_FIELDS["mosquitto_autosave_interval"].default
DEFAULT_OUTAGE_S: float = _BROKER_FIELDS["mosquitto_outage_s"].default
DEFAULT_QUEUE_RATE: float = _BROKER_FIELDS["mosquitto_queue_rate"].default
DEFAULT_MESSAGE_BYTES: int = _BROKER_FIELDS["mosquitto_message_bytes"].default


# Mosquitto's resident memory per queued message beyond its payload: 576 B per message of 194
# payload bytes and 1,393 B at 1,000 (topic 24 B), i.e. ~380-390 B of its own, rounded up
# (Mosquitto 2.0.11, 200,000 and 100,000 messages queued for an offline persistent session,
# VmRSS before and after; docs/broker.md, Sizing the worker's queue)
QUEUED_OVERHEAD_BYTES = 400
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from `90`, `90s`, `30m`, `1h` or `2d`; BrokerError otherwise."""
    match = _DURATION_RE.match(text.strip().lower())
    if match is None or float(match.group(1)) <= 0:
        raise BrokerError(f"{text!r} is not a duration: write e.g. 90s, 30m, 1h or 2d")
    return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]


@dataclass(frozen=True)
class QueueSizing:
    """The worker's queue at the broker, sized to hold `outage_s` of traffic at `rate`."""

    outage_s: float
    rate: float  # messages/s the fleet publishes to the worker
    message_bytes: int  # average payload bytes

    def __post_init__(self) -> None:
        for name in ("outage_s", "rate", "message_bytes"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise BrokerError(f"the queue's {name} must be greater than 0 (got {value})")

    @property
    def messages(self) -> int:
        """max_queued_messages: the outage's messages."""
        return math.ceil(self.outage_s * self.rate)

    @property
    def bytes(self) -> int:
        """max_queued_bytes: their payload bytes (what Mosquitto counts)."""
        return self.messages * self.message_bytes

    @property
    def memory(self) -> int:
        """Mosquitto's memory with the queue full: payload plus its own ~400 B a message."""
        return self.messages * (self.message_bytes + QUEUED_OVERHEAD_BYTES)

    def describe(self) -> str:
        """One line for the operator: what was chosen and what it costs."""
        return (
            f"worker queue: {self.messages:,} messages / {_mib(self.bytes)} of payload "
            f"(a {_duration(self.outage_s)} outage at {self.rate:g} msg/s of "
            f"{self.message_bytes} B); Mosquitto memory when full: ~{_mib(self.memory)}; "
            f"beyond it messages are dropped (already PUBACKed to devices)"
        )


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


DEFAULT_QUEUE = QueueSizing(DEFAULT_OUTAGE_S, DEFAULT_QUEUE_RATE, DEFAULT_MESSAGE_BYTES)
DEFAULT_MAX_QUEUED = DEFAULT_QUEUE.messages
DEFAULT_MAX_QUEUED_BYTES = DEFAULT_QUEUE.bytes


@dataclass(frozen=True)
class MosquittoFiles:
    config: Path
    acl: Path
    ca: Path
    cert: Path
    key: Path
    crl: Path


@dataclass(frozen=True)
class MosquittoOptions:
    """What varies between deployments; the security settings do not."""

    bind: str = "0.0.0.0"  # noqa: S104 - a production broker listens for the plant network
    port: int = 8883
    persistence_dir: Path | None = None
    autosave_interval: int = DEFAULT_AUTOSAVE_INTERVAL  # changes, or seconds (on_changes off)
    autosave_on_changes: bool = DEFAULT_AUTOSAVE_ON_CHANGES
    max_inflight_messages: int = DEFAULT_MAX_INFLIGHT
    max_queued_messages: int = DEFAULT_MAX_QUEUED
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    memory_limit: int = DEFAULT_MEMORY_LIMIT  # 0: none
    max_packet_size: int = DEFAULT_MAX_PACKET
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # -1: none
    max_keepalive: int = DEFAULT_MAX_KEEPALIVE
    persistent_client_expiration: str = DEFAULT_SESSION_EXPIRY
    run_as: str | None = None  # the account mosquitto drops to when started as root
    log_dest: str = "stderr"
    extra: tuple[str, ...] = field(default=())


def principals_from_registry(pki: Pki) -> list[Principal]:
    """Every client principal with a certificate that is not revoked."""
    seen: dict[str, Principal] = {}
    for record in pki.records():
        if record.revoked_at is not None or record.role is Role.SERVER:
            continue
        seen[record.id] = Principal(record.id, record.tenant, record.role)
    return sorted(seen.values(), key=lambda p: (p.tenant, p.role.value, p.id))


def render_acl(principals: Iterable[Principal], policy: Policy | None = None) -> str:
    """Explicit `user` blocks, one per principal: no patterns, so nothing hinges on %c or %u."""
    policy = policy or Policy()
    lines = [
        "# fieldline ACL, rendered by `fieldline broker mosquitto-config`; do not edit.",
        "# Re-render after `fieldline certs issue/revoke`, then send SIGHUP to mosquitto.",
        "",
    ]
    for principal in principals:
        grants = policy.grants(principal)
        lines.append(f"# {principal}")
        lines.append(f"user {principal.id}")
        read = set(grants.subscribe)
        write = set(grants.publish)
        for topic in sorted(read & write):
            lines.append(f"topic readwrite {topic}")
        for topic in sorted(read - write):
            lines.append(f"topic read {topic}")
        for topic in sorted(write - read):
            lines.append(f"topic write {topic}")
        lines.append("")
    return "\n".join(lines)


def render_config(files: MosquittoFiles, options: MosquittoOptions | None = None) -> str:
    """mosquitto.conf: one mTLS listener, certificate identity, CRL, queues sized for ingest."""
    opts = options or MosquittoOptions()
    persistence = (
        [
            "persistence true",
            f"persistence_location {opts.persistence_dir}/",
            "# a kill -9 loses what was acknowledged since the last save (docs/operations.md)",
            f"autosave_on_changes {str(opts.autosave_on_changes).lower()}",
            f"autosave_interval {opts.autosave_interval}",
        ]
        if opts.persistence_dir
        else ["persistence false"]
    )
    lines = [
        "# fieldline broker, rendered by `fieldline broker mosquitto-config`; do not edit.",
        *([f"user {opts.run_as}"] if opts.run_as else []),
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {files.acl}",
        "",
        f"listener {opts.port} {opts.bind}",
        "protocol mqtt",
        f"max_connections {opts.max_connections}",
        f"cafile {files.ca}",
        f"certfile {files.cert}",
        f"keyfile {files.key}",
        f"crlfile {files.crl}",
        "tls_version tlsv1.2",
        "require_certificate true",
        # the certificate's CN is the username and, bound to it, the client id
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "",
        *persistence,
        f"persistent_client_expiration {opts.persistent_client_expiration}",
        f"max_inflight_messages {opts.max_inflight_messages}",
        f"max_queued_messages {opts.max_queued_messages}",
        f"max_queued_bytes {opts.max_queued_bytes}",
        f"max_inflight_bytes {opts.max_inflight_bytes}",
        f"memory_limit {opts.memory_limit}",
        f"max_packet_size {opts.max_packet_size}",
        f"max_keepalive {opts.max_keepalive}",
        # Mosquitto cannot refuse retain per topic (its ACL has no notion of it) and
        # `retain_available false` would disconnect every device publishing its retained
        # status: retain on telemetry, events and commands is kept (docs/operations.md,
        # Mosquitto in production)
        "retain_available true",
        "",
        f"log_dest {opts.log_dest}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        *opts.extra,
        "",
    ]
    return "\n".join(lines)


def write_mosquitto_files(
    pki: Pki,
    out_dir: Path,
    *,
    server_bundle_name: str = "broker",
    options: MosquittoOptions | None = None,
    policy: Policy | None = None,
) -> MosquittoFiles:
    """Write the config, the ACL and the TLS files into out_dir, readable by `run_as` only."""
    opts = options or MosquittoOptions()
    try:
        server = pki.server_bundle(server_bundle_name)
        principals = principals_from_registry(pki)
    except CertsError as exc:
        raise BrokerError(
            f"{exc}; Mosquitto needs the CA and a server certificate: `fieldline certs init-ca`, "
            f"then `fieldline certs server {server_bundle_name} --host ... --ip ...`"
        ) from exc
    owner = _account(opts.run_as)
    out_dir = out_dir.absolute()
    tls_dir = out_dir / "certs"
    tls_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    files = MosquittoFiles(
        config=out_dir / "mosquitto.conf",
        acl=out_dir / "fieldline.acl",
        ca=tls_dir / "ca.pem",
        cert=tls_dir / "server.pem",
        key=tls_dir / "server.key",
        crl=tls_dir / "crl.pem",
    )
    _copy(pki.ca_cert_path, files.ca, 0o644, owner)
    _copy(server.cert, files.cert, 0o644, owner)
    _copy(server.key, files.key, 0o600, owner)
    _copy(pki.crl_path, files.crl, 0o644, owner)
    _atomic_write(files.acl, render_acl(principals, policy), 0o640, owner)
    _atomic_write(files.config, render_config(files, opts), 0o640, owner)
    if owner is not None:
        os.chown(tls_dir, owner[0], owner[1])
    if opts.persistence_dir is not None:
        # Mosquitto runs without it and only fails, silently, when it saves at shutdown
        opts.persistence_dir.mkdir(parents=True, exist_ok=True)
        if owner is not None:
            os.chown(opts.persistence_dir, owner[0], owner[1])
    return files


def _account(name: str | None) -> tuple[int, int] | None:
    if name is None:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError as exc:
        raise BrokerError(f"--run-as {name}: no such account on this machine") from exc
    if os.geteuid() != 0 and entry.pw_uid != os.geteuid():
        raise BrokerError(f"--run-as {name}: only root can hand files to another account")
    return entry.pw_uid, entry.pw_gid


def _copy(source: Path, target: Path, mode: int, owner: tuple[int, int] | None) -> None:
    _write(target, source.read_bytes(), mode, owner)


def _atomic_write(path: Path, text: str, mode: int, owner: tuple[int, int] | None) -> None:
    _write(path, text.encode(), mode, owner)


def _write(target: Path, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    write_atomic(target, data, mode, owner)
