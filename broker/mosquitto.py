"""Render a production Mosquitto config and ACL file from the embedded broker's own policy."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from broker.policy import Policy, Principal
from certs import Pki, Role

# Sized for at-least-once ingest (DESIGN.md, Delivery): the worker holds PUBACKs until its
# batch commits, so the broker must queue at least (workers x batch) messages per session
# and keep sessions of stopped workers; past max_queued_messages Mosquitto drops QoS 1.
DEFAULT_MAX_INFLIGHT = 1000
DEFAULT_MAX_QUEUED = 200_000
DEFAULT_MAX_QUEUED_BYTES = 256 * 1024 * 1024
DEFAULT_SESSION_EXPIRY = "7d"


@dataclass(frozen=True)
class MosquittoFiles:
    config: Path
    acl: Path


@dataclass(frozen=True)
class MosquittoOptions:
    """What varies between deployments; the security settings do not."""

    bind: str = "0.0.0.0"  # noqa: S104 - a production broker listens for the plant network
    port: int = 8883
    persistence_dir: Path | None = None
    max_inflight_messages: int = DEFAULT_MAX_INFLIGHT
    max_queued_messages: int = DEFAULT_MAX_QUEUED
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    persistent_client_expiration: str = DEFAULT_SESSION_EXPIRY
    log_dest: str = "stderr"


def principals_from_registry(pki: Pki) -> list[Principal]:
    """Every principal with a certificate that is still valid and not revoked."""
    seen: dict[str, Principal] = {}
    for record in pki.records():
        if record.revoked_at is not None or record.role is Role.SERVER:
            continue
        seen[record.id] = Principal(record.id, record.tenant, record.role)
    return sorted(seen.values(), key=lambda p: (p.tenant, p.role.value, p.id))


def render_acl(principals: Iterable[Principal], policy: Policy | None = None) -> str:
    """Explicit `user` blocks, one per principal: no patterns, so nothing hinges on %c."""
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


def render_config(
    pki: Pki,
    server_bundle_name: str,
    acl_file: Path,
    options: MosquittoOptions | None = None,
) -> str:
    """mosquitto.conf: one mTLS listener, certificate identity, CRL, queues sized for ingest."""
    opts = options or MosquittoOptions()
    server = pki.bundle(server_bundle_name)
    persistence = (
        [
            "persistence true",
            f"persistence_location {opts.persistence_dir}/",
            "autosave_interval 30",
        ]
        if opts.persistence_dir
        else ["persistence false"]
    )
    lines = [
        "# fieldline broker, rendered by `fieldline broker mosquitto-config`; do not edit.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {acl_file}",
        "",
        f"listener {opts.port} {opts.bind}",
        "protocol mqtt",
        f"cafile {pki.ca_cert_path}",
        f"certfile {server.cert}",
        f"keyfile {server.key}",
        f"crlfile {pki.crl_path}",
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
        "retain_available true",
        "",
        f"log_dest {opts.log_dest}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
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
    """Write mosquitto.conf and fieldline.acl into out_dir (atomically, readable by mosquitto)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    acl = out_dir / "fieldline.acl"
    conf = out_dir / "mosquitto.conf"
    _atomic_write(acl, render_acl(principals_from_registry(pki), policy))
    _atomic_write(conf, render_config(pki, server_bundle_name, acl.absolute(), options))
    return MosquittoFiles(conf, acl)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
