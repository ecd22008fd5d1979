"""Module kind `opcua`: values from an OPC UA server (asyncua), and writes and method calls back.

One client session per module. After connecting, the manifest's nodes are resolved (NodeId or
browse path; unknown ones are reported once, as one event, and left out) and then either
subscribed to (data changes, at `sampling_interval_s`, delivered every
`publishing_interval_s`) or read every `interval_s` (mode = "poll"). A value with a Bad
status is an event, never a value. A lost connection is retried with core.retry.Backoff;
on reconnect the nodes are resolved and subscribed again and an `opcua_reconnected` event
says how long the gap was.

Security: mode None, or Sign / SignAndEncrypt with Basic256Sha256. The agent's application
certificate is generated on first use under <state dir>/opcua/ (key 0600), with the
application URI in its subjectAltName (OPC 10000-6 6.2.2); the server's certificate must be
`server_trust` (a file) or be in, or be issued by a CA in, `server_trust` (a directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.common.subscription import DataChangeNotif
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from asyncua.ua.uatypes import Double
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from core.retry import Backoff
from edge_agent.field import ERROR, REJECTED, Emit, EmitEvent, FieldError
from edge_agent.manifest import ModuleSpec
from edge_agent.opcua_spec import NODE_ID, CallArgs, NodeSpec, WriteArgs, parse_command

log = logging.getLogger("fieldline.edge.opcua")
# asyncua logs a traceback for every dropped connection; this module reports each problem as
# one event and one line instead. Setting the "asyncua" logger's level explicitly wins.
if logging.getLogger("asyncua").level == logging.NOTSET:
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)

CERT_DAYS = 730
RENEW_BEFORE = datetime.timedelta(days=30)
DISCONNECT_TIMEOUT_S = 2.0
# What the agent tells the server (OPC UA Hello) it accepts: asyncua's default is no limit.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_CHUNKS = MAX_MESSAGE_BYTES // 8192 + 1  # 8 KiB: the smallest receive buffer allowed
_CONNECTION_ERRORS = (OSError, TimeoutError, ConnectionError, UaError, ServiceError)


class _LostError(Exception):
    """The session went away while collecting; the message is why."""


class SetupError(Exception):
    """The module cannot connect as configured (security, trust); retrying alone will not help."""


# -- the agent's application certificate and the server's trust -------------------------------


def application_certificate(directory: Path, uri: str, name: str) -> tuple[Path, Path]:
    """(certificate .der, key .pem) for `uri`, generated when missing, expiring or for another
    URI; the key is written 0600."""
    cert_path, key_path = directory / f"{name}.der", directory / f"{name}.key.pem"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_der_x509_certificate(cert_path.read_bytes())
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        fresh = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > RENEW_BEFORE
        if fresh and uri in uris.get_values_for_type(x509.UniformResourceIdentifier):
            return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = cert_gen.generate_private_key()
    host = socket.gethostname()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, f"fieldline edge {name}", {"organizationName": "fieldline"},
        [x509.UniformResourceIdentifier(uri), x509.DNSName(host)],
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH], days=CERT_DAYS,
    )  # fmt: skip
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        file.write(cert_gen.dump_private_key_as_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    log.info("event=opcua_certificate_created path=%s uri=%s", cert_path, uri)
    return cert_path, key_path


def _load_cert(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def trusted_certificates(path: Path) -> list[x509.Certificate]:
    """The certificates `server_trust` names: one file, or every .der/.pem/.crt in a directory."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".der", ".pem", ".crt"))
    elif path.exists():
        files = [path]
    else:
        raise SetupError(f"server_trust {path}: no such file or directory")
    certs = []
    for file in files:
        try:
            certs.append(_load_cert(file))
        except ValueError:
            raise SetupError(f"server_trust {file}: not a PEM or DER certificate") from None
    if not certs:
        raise SetupError(f"server_trust {path}: no certificates (.der, .pem, .crt) in it")
    return certs


def _in_date(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _is_ca(cert: x509.Certificate) -> bool:
    """BasicConstraints ca=True, and keyCertSign when the certificate has a KeyUsage."""
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return True  # RFC 5280 4.2.1.3: without KeyUsage every use is allowed


def is_trusted(cert: x509.Certificate, trusted: Iterable[x509.Certificate]) -> bool:
    """The certificate is in date and one of `trusted`, or directly issued by one of them that
    is a CA (BasicConstraints ca, keyCertSign) and in date itself."""
    now = datetime.datetime.now(datetime.UTC)
    if not _in_date(cert, now):
        return False
    for anchor in trusted:
        if anchor == cert:
            return True
        if anchor.subject == cert.issuer and _is_ca(anchor) and _in_date(anchor, now):
            try:
                cert.verify_directly_issued_by(anchor)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return True
    return False


def server_certificate(chain: bytes) -> x509.Certificate:
    """The server's own certificate from an endpoint's ServerCertificate (one DER certificate
    or a chain, the server's first); SetupError when it is neither."""
    try:
        return x509.load_der_x509_certificate(chain)
    except ValueError:  # a chain: the server's own certificate comes first
        pass
    try:
        return x509.load_der_x509_certificate(chain[: 4 + int.from_bytes(chain[2:4], "big")])
    except ValueError:
        raise SetupError(
            f"the server's endpoint certificate ({len(chain)} bytes) is not a DER "
            "certificate: fix the server's certificate"
        ) from None


def describe(cert: x509.Certificate) -> str:
    """`CN=..., sha256 ab:cd:...` (the first 8 bytes), to name a certificate in a message."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else cert.subject.rfc4514_string()
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return f"CN={cn}, sha256 {':'.join(digest[i : i + 2] for i in range(0, 16, 2))}..."


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UaStatusCodeError):
        return f"{ua.StatusCode(exc.code).name}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _to_ms(stamp: datetime.datetime | None) -> int | None:
    """Epoch ms of an OPC UA timestamp; None when absent or DateTime 0 (asyncua: 1601)."""
    if stamp is None:
        return None
    if stamp.tzinfo is None:  # asyncua's timestamps are UTC, naive or not
        stamp = stamp.replace(tzinfo=datetime.UTC)
    ms = int(stamp.timestamp() * 1000)
    return ms if ms > 0 else None


def _same_count(asked: int, results: list[Any], service: str) -> None:
    """A server answering a different number of results than asked for is broken."""
    if len(results) != asked:
        raise _LostError(
            f"the server answered {service} for {asked} node(s) with {len(results)} result(s)"
        )


def convert(value: Any, kind: str) -> bool | float | str | None:
    """An OPC UA value as a metric of `kind`, or None when it cannot be one."""
    if value is None or isinstance(value, list | tuple | bytes | dict):
        return None
    if kind == "text":
        return value if isinstance(value, str) else str(value)
    if kind == "bool":
        return bool(value) if isinstance(value, bool | int) else None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        number = float(value)
        return number if number == number and abs(number) != float("inf") else None
    return None


def _variant(value: bool | int | float | str, vtype: ua.VariantType) -> ua.Variant:
    """`value` as the node's own type: servers refuse a Double written to an Int32."""
    names = vtype.name
    try:
        if names == "Boolean":
            return ua.Variant(bool(value), vtype)
        if names in ("Float", "Double"):
            return ua.Variant(float(value), vtype)
        if names in ("SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64"):
            if isinstance(value, float) and not value.is_integer():
                raise FieldError(f"{value!r} is not a whole number for a {names} node", REJECTED)
            return ua.Variant(int(value), vtype)
        if names in ("String", "LocalizedText"):
            return ua.Variant(str(value), vtype)
    except (TypeError, ValueError):
        raise FieldError(f"{value!r} cannot be written to a {names} node", REJECTED) from None
    return ua.Variant(value, vtype)


class _Handler:
    """asyncua's data-change callbacks, handed to the module."""

    def __init__(self, module: OpcUaModule) -> None:
        self.module = module

    def datachange_notification(self, node: Node, val: Any, data: DataChangeNotif) -> None:
        self.module.on_value(node.nodeid, data.monitored_item.Value)

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        self.module.lost(f"subscription status {status.Status.name}")


class OpcUaModule:
    """A field module (edge_agent/field.py) on one OPC UA server."""

    kind = "opcua"

    def __init__(self, spec: ModuleSpec, *, home: Path, state_dir: Path, default_uri: str) -> None:
        if spec.url is None:
            raise ValueError("an opcua module needs a url (the manifest checker requires it)")
        self.name = spec.name
        self.spec = spec
        self.url: str = spec.url
        self.uri = spec.application_uri or default_uri
        self.cert_dir = state_dir / "opcua"
        trust = spec.server_trust
        self.trust = None if trust is None else home / Path(trust).expanduser()
        self.client: Client | None = None
        self.nodes: dict[str, Node] = {}  # metric -> its resolved node
        self.specs = {n.metric: n for n in spec.nodes}
        self.by_id: dict[ua.NodeId, NodeSpec] = {}
        self.bad: set[str] = set()
        self.unusable: set[str] = set()
        self.connects = 0
        self.values = 0
        self.down_since: float | None = None
        self._said: str | None = None
        self._reported_unknown: frozenset[str] = frozenset()
        self._pending: dict[int, dict[str, Any]] = {}
        self._flush_scheduled = False
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._task: asyncio.Task[None] | None = None
        self._emit: Emit = lambda reading: None
        self._event: EmitEvent = lambda severity, kind, message, data: None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, emit: Emit, event: EmitEvent) -> None:
        """Connect and collect in the background (a down server is retried, not raised)."""
        self._emit, self._event = emit, event
        self._task = asyncio.create_task(self._run(), name=f"opcua-{self.name}")

    async def stop(self) -> None:
        """Stop collecting and close the session."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The collecting task while started, else None."""
        return self._task

    @property
    def connected(self) -> bool:
        """True while a session is up and its nodes are being collected."""
        return self.client is not None

    async def _run(self) -> None:
        backoff = Backoff(0.5, 30.0)
        while True:
            client: Client | None = None
            try:
                client = await self._connect()
                await self._resolve(client)
                self._up()
                backoff.reset()
                self.client = client
                if self.spec.mode == "poll":
                    await self._poll(client)
                else:
                    await self._subscribe(client)
                    await self._lost.wait()
                raise _LostError(self._lost_reason or "connection lost")
            except _LostError as exc:
                self._down(str(exc), "opcua_disconnected", "warning")
            except SetupError as exc:
                self._down(str(exc), "opcua_setup_error", "error")
            except _CONNECTION_ERRORS as exc:
                self._down(_reason(exc), "opcua_disconnected", "warning")
            except Exception as exc:  # a hostile or buggy server must not end collecting
                log.warning("event=opcua_error module=%s error=%r", self.name, _reason(exc))
                self._down(f"unexpected {_reason(exc)}", "opcua_error", "error")
            finally:
                self.client = None
                if client is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(client.disconnect(), DISCONNECT_TIMEOUT_S)
            await asyncio.sleep(backoff.next())

    def _up(self) -> None:
        self.connects += 1
        if self.down_since is not None and self.connects > 1:
            gap = time.time() - self.down_since
            self._event(
                "info", "opcua_reconnected",
                f"reconnected to {self.url} after {gap:.1f} s; no values were collected in between",
                {"gap_s": round(gap, 3), "from": int(self.down_since * 1000),
                 "to": int(time.time() * 1000), "url": self.url},
            )  # fmt: skip
        elif self._said is not None:
            self._event("info", "opcua_connected", f"connected to {self.url}", {"url": self.url})
        else:
            log.info("event=opcua_connected module=%s url=%s", self.name, self.url)
        self.down_since = None
        self._said = None

    def _down(self, reason: str, kind: str, severity: str) -> None:
        if self.down_since is None:
            self.down_since = time.time()
        # one event per outage (and per new setup problem), one debug line per retry
        if reason == self._said or (kind == "opcua_disconnected" and self._said is not None):
            log.debug("event=opcua_retry module=%s reason=%r", self.name, reason)
            return
        self._said = reason
        verb = "lost" if kind == "opcua_disconnected" and self.connects else "cannot connect to"
        self._event(
            severity, kind, f"{verb} {self.url}: {reason}; retrying with backoff",
            {"url": self.url, "reason": reason},
        )  # fmt: skip

    def lost(self, reason: str) -> None:
        """The session is gone (asyncua's watchdog or the subscription said so)."""
        self._lost_reason = reason
        self._lost.set()

    async def _on_connection_lost(self, exc: Exception) -> None:
        self.lost(_reason(exc))

    # -- connecting ----------------------------------------------------------------------------
    async def _connect(self) -> Client:
        self._lost.clear()
        self._lost_reason = ""
        client = Client(self.url, timeout=self.spec.timeout_s, watchdog_intervall=1.0)
        client.application_uri = self.uri
        client.name = client.description = f"fieldline edge {self.name}"
        client.connection_lost_callback = self._on_connection_lost
        client.max_messagesize = MAX_MESSAGE_BYTES  # public attributes (Client's docstring)
        client.max_chunkcount = MAX_CHUNKS
        mode = self.spec.security_mode
        if mode != "None":
            server_der = await self._trusted_server_certificate(mode)
            cert, key = application_certificate(self.cert_dir, self.uri, self.name)
            await client.set_security(
                SecurityPolicyBasic256Sha256, str(cert), str(key),
                server_certificate=server_der, mode=getattr(ua.MessageSecurityMode, mode),
            )  # fmt: skip
            client.certificate_validator = self._validate
        try:
            await client.connect()
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), DISCONNECT_TIMEOUT_S)
            raise
        return client

    async def _trusted_server_certificate(self, mode: str) -> bytes:
        """The DER certificate of the server's Basic256Sha256 endpoint in `mode`, if trusted."""
        assert self.trust is not None  # the manifest checker requires it for Sign modes
        trusted = trusted_certificates(self.trust)
        probe = Client(self.url, timeout=self.spec.timeout_s)
        endpoints = await probe.connect_and_get_server_endpoints()
        wanted = getattr(ua.MessageSecurityMode, mode)
        for endpoint in endpoints:
            if (
                endpoint.SecurityMode == wanted
                and endpoint.SecurityPolicyUri == SecurityPolicyBasic256Sha256.URI
            ):
                break
        else:
            offered = sorted(
                {
                    f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]}/{e.SecurityMode.name}"
                    for e in endpoints
                }
            )
            raise SetupError(
                f"the server offers no Basic256Sha256 endpoint with security_mode {mode!r}; "
                f"it offers {', '.join(offered)}: change security_mode or the server"
            )
        cert = server_certificate(endpoint.ServerCertificate or b"")
        if not is_trusted(cert, trusted):
            raise SetupError(
                f"the server's certificate ({describe(cert)}) is not trusted by server_trust "
                f"{self.trust}: if this is the right server, copy its certificate there"
            )
        return cert.public_bytes(serialization.Encoding.DER)

    async def _validate(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        # the session's certificate must still be a trusted one (asyncua also pins it)
        assert self.trust is not None
        if not is_trusted(cert, trusted_certificates(self.trust)):
            raise ServiceError(StatusCodes.BadCertificateUntrusted)

    async def _resolve(self, client: Client) -> None:
        """Find every configured node; the unknown ones are reported (once) and left out."""
        found: dict[str, Node] = {}
        unknown: list[str] = []
        objects = client.nodes.objects
        for spec in self.spec.nodes:
            try:
                if spec.node is not None:
                    found[spec.metric] = client.get_node(spec.node)
                else:
                    found[spec.metric] = await objects.get_child((spec.path or "").split("/"))
            except UaStatusCodeError as exc:
                unknown.append(f"{spec.ref} ({_reason(exc)})")
        if found:
            classes = await client.read_attributes(list(found.values()), AttributeIds.NodeClass)
            _same_count(len(found), classes, "Read")
            for (metric, _), value in zip(list(found.items()), classes, strict=True):
                status = value.StatusCode
                if status is not None and not status.is_good():
                    unknown.append(f"{self.specs[metric].ref} ({status.name})")
                    del found[metric]
        key = frozenset(unknown)
        if unknown and key != self._reported_unknown:
            self._event(
                "error", "opcua_unknown_nodes",
                f"{len(unknown)} node(s) not on {self.url}: {'; '.join(sorted(unknown))}; "
                "their metrics are not collected: fix the manifest's nodes",
                {"nodes": sorted(unknown)[:100], "url": self.url},
            )  # fmt: skip
        self._reported_unknown = key
        self.nodes = found
        self.by_id = {node.nodeid: self.specs[metric] for metric, node in found.items()}

    # -- collecting ----------------------------------------------------------------------
    async def _subscribe(self, client: Client) -> None:
        if not self.nodes:
            return
        sub = await client.create_subscription(
            self.spec.publishing_interval_s * 1000, _Handler(self)
        )
        nodes = list(self.nodes.values())
        handles = await sub.subscribe_data_change(
            nodes, sampling_interval=Double(self.spec.sampling_interval_s * 1000)
        )
        results = handles if isinstance(handles, list) else [handles]
        _same_count(len(nodes), results, "CreateMonitoredItems")
        refused = [
            f"{self.by_id[node.nodeid].ref} ({handle.name})"
            for node, handle in zip(nodes, results, strict=True)
            if isinstance(handle, ua.StatusCode)
        ]
        if refused:
            self._event(
                "error", "opcua_unknown_nodes",
                f"{len(refused)} node(s) cannot be monitored on {self.url}: {'; '.join(refused)}",
                {"nodes": refused[:100], "url": self.url},
            )  # fmt: skip

    async def _poll(self, client: Client) -> None:
        nodes = list(self.nodes.values())
        while not self._lost.is_set():
            started = time.monotonic()
            if nodes:
                values = await client.read_attributes(nodes)
                _same_count(len(nodes), values, "Read")
                for node, value in zip(nodes, values, strict=True):
                    self.on_value(node.nodeid, value)
                self._flush()
            wait = self.spec.interval_s - (time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), max(wait, 0.0))

    def on_value(self, node_id: ua.NodeId, value: ua.DataValue) -> None:
        """One value from the server: a metric, or an event when its status is Bad."""
        spec = self.by_id.get(node_id)
        if spec is None:
            return
        status = value.StatusCode
        if status is not None and status.is_bad():
            if spec.metric not in self.bad:
                self.bad.add(spec.metric)
                self._event(
                    "warning", "opcua_bad_status",
                    f"{spec.ref} ({spec.metric}) is {status.name}: no value until it is good again",
                    {"node": spec.ref, "metric": spec.metric, "status": status.name},
                )  # fmt: skip
            return
        if spec.metric in self.bad:
            self.bad.discard(spec.metric)
            self._event(
                "info", "opcua_good_status", f"{spec.ref} ({spec.metric}) has values again",
                {"node": spec.ref, "metric": spec.metric},
            )  # fmt: skip
        raw = value.Value.Value if value.Value is not None else None
        converted = convert(raw, spec.kind)
        if converted is None:
            if spec.metric not in self.unusable:
                self.unusable.add(spec.metric)
                self._event(
                    "warning", "opcua_bad_value",
                    f"{spec.ref} ({spec.metric}) gave {type(raw).__name__} {str(raw)[:80]!r}, "
                    f"not a {spec.kind} value; it is skipped",
                    {"node": spec.ref, "metric": spec.metric},
                )  # fmt: skip
            return
        self.unusable.discard(spec.metric)
        ts = _to_ms(value.SourceTimestamp) or _to_ms(value.ServerTimestamp)
        ts = ts or int(time.time() * 1000)
        metric: Any = {"v": converted, "u": spec.unit} if spec.unit else converted
        self._pending.setdefault(ts, {})[spec.metric] = metric
        self.values += 1
        if not self._flush_scheduled:
            # one reading per source timestamp per batch of notifications, not one per node
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for ts in sorted(pending):
            self._emit({"ts": ts, "metrics": pending[ts]})

    # -- commands ------------------------------------------------------------------------
    def check_command(self, name: str, args: dict[str, Any]) -> None:
        """Validate `write` / `call` arguments; FieldError (rejected) if they are wrong."""
        try:
            parse_command(name, args)
        except ValueError as exc:
            raise FieldError(f"{self.name}: {exc}", REJECTED) from None

    async def command(self, name: str, args: dict[str, Any]) -> str:
        """Write a node's value or call a method on the server; the result's one-line detail."""
        try:
            parsed = parse_command(name, args)
        except ValueError as exc:
            raise FieldError(f"{self.name}: {exc}", REJECTED) from None
        client = self.client
        if client is None:
            why = f" ({self._said})" if self._said else ""
            raise FieldError(f"{self.name}: not connected to {self.url}{why}")
        target = parsed.node if isinstance(parsed, WriteArgs) else parsed.object
        try:
            node = await self._node(client, target)
            if isinstance(parsed, WriteArgs):
                vtype = await node.read_data_type_as_variant_type()
                await node.write_value(_variant(parsed.value, vtype))
                return f"{self.name}: wrote {parsed.value!r} to {parsed.node}"
            return await self._call(node, parsed)
        except UaStatusCodeError as exc:
            raise FieldError(f"{self.name}: {name} {target}: {_reason(exc)}") from None
        except _CONNECTION_ERRORS as exc:
            raise FieldError(f"{self.name}: {name} {target}: {_reason(exc)}", ERROR) from None

    async def _call(self, obj: Node, parsed: CallArgs) -> str:
        method: ua.NodeId | ua.QualifiedName
        if NODE_ID.match(parsed.method):
            method = ua.NodeId.from_string(parsed.method)
        else:
            method = (await obj.get_child(parsed.method.split("/"))).nodeid
        result = await obj.call_method(method, *parsed.args)
        returned = "" if result is None else f": returned {result!r}"
        return f"{self.name}: called {parsed.method} on {parsed.object}{returned}"

    async def _node(self, client: Client, ref: str) -> Node:
        """A node by metric name, NodeId string or browse path from the Objects folder."""
        if ref in self.nodes:
            return self.nodes[ref]
        if NODE_ID.match(ref):
            return client.get_node(ref)
        steps = ref.split("/")
        if all(":" in step for step in steps):
            return await client.nodes.objects.get_child(steps)
        raise FieldError(
            f"{self.name}: {ref!r} is no metric of this module, NodeId or browse path", REJECTED
        )
