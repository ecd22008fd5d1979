"""fieldline's embedded broker: amqtt 0.12.1 with certificate identity, ACLs and its defects closed.

`FieldlineBroker` keeps amqtt's listeners, packet codec, reader loop and plugin manager, and
replaces what DESIGN.md lists as broken: the CONNECT path (authenticate first, from this
connection's certificate, before any existing session is touched; answer MQTT 5 with CONNACK
0x01; never leak a connection slot), keepalive (1.5 x, then the Will), the Will and retained
messages going through the ACL, outgoing delivery (an outbox per session that survives
reconnects, min(publish, subscription) QoS, retain only on retained messages), and
subscription matching (an index instead of a scan of every filter).

Memory is bounded in bytes as well as messages: each outbox by its own limits (a connected
client whose queue reaches them is cut off as a slow consumer), all of them together by the
`MemoryBudget` (publishers are not read while it is spent; offline sessions keep at most half
of it; when it stays spent, the largest client that has stopped reading is cut off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from asyncio import sslproto
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action as AmqttAction
from amqtt.contexts import ListenerType
from amqtt.errors import AMQTTError
from amqtt.events import BrokerEvents
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import Subscription, UnSubscription
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from broker import wire
from broker.budget import MemoryBudget
from broker.connection import Ended, FieldlineHandler, FramedReader, Incoming, Link
from broker.errors import BrokerError, ProtocolError, TlsSetupError, UnsupportedProtocolError
from broker.identity import AUTH_REFUSAL, SERIAL, last_denial, principal_of
from broker.index import SubscriptionIndex
from broker.metrics import BrokerMetrics
from broker.outbox import QUEUE_BYTES, Message, Outbox
from broker.plugins import Refusal
from broker.retained import RetainedTopics
from broker.revocation import RevocationList
from broker.tls import ReloadableTls
from certs import Role
from schemas.errors import InvalidFilterError
from schemas.topics import SHARE_PREFIX, validate_filter

log = logging.getLogger("broker")

SUBACK_FAILURE = 0x80
TLS_READ_BUFFER = 32 * 1024
_QOS_MAX = 2
# A CONNECT carries at most a client id, a Will and credentials, each with a 16-bit length.
_MAX_CONNECT_BYTES = 4 * 65_537 + 16
# how often the bytes in sockets are summed and a spent budget looks for a client to cut off
MEMORY_SWEEP_S = 1.0
# a client whose socket has not drained for this long, while the budget is spent, may be cut
STUCK_S = 5.0


@dataclass(frozen=True)
class BrokerOptions:
    """How the embedded broker listens and what it holds per client."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path | None
    bind: str = "127.0.0.1"
    port: int = 8883
    max_connections: int = 20_000
    # filters one client may hold: each costs index memory, and an offline session keeps them
    max_subscriptions: int = 100
    connect_timeout_s: float = 10.0
    max_packet_bytes: int = 2 * 1024 * 1024
    max_inflight: int = 100
    max_queued: int = 10_000
    # An ingest worker holds PUBACKs until its batch commits and must not lose what arrives
    # while it restarts, so `service` principals get a wider window and a deeper queue.
    service_max_inflight: int = 10_000
    service_max_queued: int = 200_000
    # the same limits in bytes (topic + payload + 120 per message); a connected client whose
    # queue reaches max_queued_bytes is cut off, as it is not reading
    max_inflight_bytes: int = 4 * 1024 * 1024
    max_queued_bytes: int = 16 * 1024 * 1024
    service_max_inflight_bytes: int = 64 * 1024 * 1024
    service_max_queued_bytes: int = 256 * 1024 * 1024
    # all sessions together; publishers are not read beyond it
    memory_budget_bytes: int = 1024 * 1024 * 1024
    session_expiry_s: int = 7 * 24 * 3600
    keepalive_factor: float = 1.5
    crl_refresh_s: float = 5.0
    # further amqtt plugins (dotted path -> config); ours are always loaded and all must allow
    extra_plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # every PUBLISH the policy allowed, (topic, payload), for an embedding process: the edge
    # agent's LAN listener takes its devices' messages this way instead of subscribing
    tap: Callable[[str, bytes], None] | None = None

    def __post_init__(self) -> None:
        half = self.memory_budget_bytes // 2
        for role, inflight, queued in (
            ("", self.max_inflight_bytes, self.max_queued_bytes),
            ("service_", self.service_max_inflight_bytes, self.service_max_queued_bytes),
        ):
            if inflight + queued > half:
                raise BrokerError(
                    f"broker.{role}max_inflight_bytes + broker.{role}max_queued_bytes "
                    f"({inflight + queued}) must be at most half of broker.memory_budget_bytes "
                    f"({self.memory_budget_bytes}), so that no one session can take the budget"
                )

    def amqtt_config(self) -> dict[str, Any]:
        """amqtt's configuration, with an explicit plugins section so no default plugin loads."""
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        auth: dict[str, Any] = {"ca_file": str(self.ca_file)}
        if self.crl_file is not None:
            auth["crl_file"] = str(self.crl_file)
        return {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"{host}:{self.port}",
                    "max_connections": -1,  # enforced here, without amqtt's leaky semaphore
                    "ssl": True,
                    "cafile": str(self.ca_file),
                    "certfile": str(self.cert_file),
                    "keyfile": str(self.key_file),
                }
            },
            "plugins": {
                "broker.plugins.CertificateAuthPlugin": auth,
                "broker.plugins.PolicyTopicPlugin": {},
                **{path: dict(config) for path, config in self.extra_plugins.items()},
            },
            "session_expiry_interval": self.session_expiry_s,
        }


class FieldlineSession(Session):
    """amqtt's session plus its outbox and the handler of its live connection (None offline)."""

    def __init__(self, outbox: Outbox) -> None:
        super().__init__()
        self.outbox = outbox
        self.handler: FieldlineHandler | None = None
        self.qos2_received: set[int] = set()

    @classmethod
    def from_connect(cls, connect: wire.Connect, link: Link, outbox: Outbox) -> FieldlineSession:
        session = cls(outbox)
        session.client_id = connect.client_id
        session.clean_session = connect.clean_session
        session.keep_alive = connect.keepalive
        if connect.will is not None:
            session.will_flag = True
            session.will_topic = connect.will.topic
            session.will_message = connect.will.payload
            session.will_qos = connect.will.qos
            session.will_retain = connect.will.retain
        session.username = connect.username
        session.ssl_object = link.get_ssl_info()
        session.remote_address, session.remote_port = link.get_peer_info() or ("?", 0)
        return session

    def clear_queues(self) -> None:
        # the incoming queue belongs to the connection, which drains it to its end marker;
        # emptying it from here (amqtt does on session delete) would leave that loop hanging
        while not self.retained_messages.empty():
            self.retained_messages.get_nowait()
        self.outbox.clear()  # the session is deleted (or expired): its bytes leave the budget

    def resume_from(self, fresh: FieldlineSession) -> None:
        """A persistent session taken up by a new, authenticated connection: its identity wins."""
        for name in (
            "will_flag", "will_topic", "will_message", "will_qos", "will_retain",
            "keep_alive", "username", "password", "ssl_object", "remote_address", "remote_port",
        ):  # fmt: skip
            setattr(self, name, getattr(fresh, name))
        self.attributes.update(fresh.attributes)


class FieldlineBroker(Broker):
    """The embedded broker. Use as `async with FieldlineBroker(options):` or start()/shutdown()."""

    def __init__(self, options: BrokerOptions, metrics: BrokerMetrics | None = None) -> None:
        self.options = options
        self.metrics = metrics or BrokerMetrics()
        self._revocations = (
            RevocationList(options.crl_file, options.ca_file) if options.crl_file else None
        )
        self._tls = ReloadableTls(
            options.ca_file, options.cert_file, options.key_file, options.crl_file
        )
        super().__init__(options.amqtt_config())
        self._index: SubscriptionIndex[str] = SubscriptionIndex()
        self._retained_topics = RetainedTopics()
        self._topic_plugins = [
            p for p in self.plugins_manager.plugins if isinstance(p, BaseTopicPlugin)
        ]
        self._open_connections = 0
        self._closing = False
        self._maintenance: asyncio.Task[None] | None = None
        self._memory_watch: asyncio.Task[None] | None = None
        self.budget = MemoryBudget(options.memory_budget_bytes)
        self._offline_drops = 0
        self._update_crl_metrics()
        self.metrics.watch_budget(self.budget)
        self.metrics.sessions.set_function(lambda: len(self._sessions))
        self.metrics.subscriptions.set_function(lambda: len(self._index))
        self.metrics.retained.set_function(lambda: len(self._retained_topics))

    async def __aenter__(self) -> FieldlineBroker:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.shutdown()

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        _trim_tls_buffers()
        try:
            await super().start()
        except BrokerError:
            raise
        except AMQTTError as exc:
            raise BrokerError(f"cannot start the broker: {exc}") from exc
        self._maintenance = asyncio.create_task(self._maintain())
        self._memory_watch = asyncio.create_task(self._watch_memory())
        log.info("event=broker_started bind=%s port=%s", self.options.bind, self.port)

    async def shutdown(self) -> None:
        """Stop accepting, close every connection (no Wills: the broker is going), stop."""
        self._closing = True
        for task in (self._maintenance, self._memory_watch):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for server in self._servers.values():
            if server.instance is not None:
                server.instance.close()
        await super().shutdown()
        log.info("event=broker_stopped")

    @property
    def port(self) -> int:
        """The bound port (useful when the options asked for port 0)."""
        server = self._servers.get("default")
        if server is None or server.instance is None:
            return self.options.port
        return int(server.instance.sockets[0].getsockname()[1])

    def _create_ssl_context(self, listener: Any) -> Any:
        return self._tls.listener_context

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: Any,
    ) -> Any:
        if listener_type != ListenerType.TCP:
            raise BrokerError(f"listener {listener_name}: only TCP (with TLS) is supported")
        return await asyncio.start_server(
            partial(self.stream_connected, listener_name=listener_name),
            address,
            port,
            reuse_address=True,
            ssl=ssl_context,
            ssl_handshake_timeout=self.options.connect_timeout_s,
        )

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.options.crl_refresh_s)
            try:
                self.refresh_crl()
            except Exception:  # the broker must outlive a bad CRL file
                log.exception("event=crl_refresh_failed")

    async def _watch_memory(self) -> None:
        while True:
            await asyncio.sleep(MEMORY_SWEEP_S)
            try:
                self.sweep_memory()
            except Exception:  # the broker must outlive a bug here
                log.exception("event=memory_sweep_failed")

    def sweep_memory(self) -> str | None:
        """Sum the bytes waiting in sockets; if the budget is spent, cut off the client holding
        the most among those that have not read for STUCK_S (its id, or None)."""
        now = asyncio.get_running_loop().time()
        in_sockets = 0
        stuck: list[tuple[int, FieldlineSession]] = []
        for session, _handler in self._sessions.values():
            handler = getattr(session, "handler", None)
            if handler is None:
                continue
            link = handler.link
            held = link.buffered()
            in_sockets += held
            if link.stuck_since is not None and now - link.stuck_since >= STUCK_S:
                stuck.append((held + session.outbox.held_bytes, session))
        self.budget.sampled_sockets(in_sockets)
        if not self.budget.full or not stuck:
            return None
        _held, victim = max(stuck, key=lambda pair: pair[0])
        self._cut_off(victim, "memory-budget")
        return str(victim.client_id)

    def _cut_off(self, session: FieldlineSession, reason: str) -> None:
        """Disconnect a client that does not read; its persistent session keeps what fits."""
        handler = session.handler
        if handler is None or handler.close_reason is not None:
            return
        outbox = session.outbox
        log.warning(
            "event=cut_off client=%s reason=%s queued=%d queued_bytes=%d inflight_bytes=%d "
            "budget_used=%d",
            session.client_id, reason, len(outbox.queue), outbox.queued_bytes,
            outbox.inflight_bytes, self.budget.used,
        )  # fmt: skip
        handler.close(reason)

    def _trim_offline(self, session: FieldlineSession) -> None:
        """A session just went offline: offline sessions together keep half the budget."""
        excess = self.budget.offline - self.budget.offline_limit
        if excess <= 0:
            return
        dropped = session.outbox.trim(excess)
        if dropped:
            self.metrics.dropped.labels("offline-budget").inc(dropped)
            log.warning(
                "event=offline_trimmed client=%s dropped=%d offline_bytes=%d",
                session.client_id, dropped, self.budget.offline,
            )  # fmt: skip

    def refresh_crl(self) -> int:
        """Re-read the CRL if it changed: new handshakes use it, revoked clients are dropped."""
        if self._revocations is None or not self._revocations.refresh():
            return 0
        try:
            self._tls.reload()
        except TlsSetupError as exc:
            log.error("event=tls_reload_failed error=%s", exc)
        self._update_crl_metrics()
        revoked = self._revocations.serials
        dropped = 0
        for session, _handler in list(self._sessions.values()):
            handler = getattr(session, "handler", None)
            if handler is not None and session.attributes.get(SERIAL) in revoked:
                handler.close("revoked")
                dropped += 1
        log.info("event=crl_reloaded revoked=%d disconnected=%d", len(revoked), dropped)
        return dropped

    def _update_crl_metrics(self) -> None:
        if self._revocations is None:
            return
        snap = self._revocations.snapshot
        self.metrics.revoked.set(len(snap.serials))
        if snap.next_update is not None:
            self.metrics.crl_next_update.set(snap.next_update.timestamp())

    # -- connections ------------------------------------------------------------------------
    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        if self._closing:
            writer.close()
            return
        if 0 < self.options.max_connections <= self._open_connections:
            self.metrics.connects.labels("over-capacity").inc()
            log.warning(
                "event=connect_refused reason=over-capacity open=%d", self._open_connections
            )
            writer.transport.abort()
            return
        self._open_connections += 1
        try:
            await self._serve(listener_name, reader, writer)
        except Exception:  # one connection's failure must never reach the listener
            log.exception("event=connection_failed")
        finally:
            self._open_connections -= 1
            if not writer.is_closing():
                writer.close()

    async def _serve(
        self, listener_name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        try:
            connect = await asyncio.wait_for(
                wire.read_connect(reader, _MAX_CONNECT_BYTES), self.options.connect_timeout_s
            )
        except UnsupportedProtocolError as exc:
            writer.write(wire.connack(False, wire.UNACCEPTABLE_PROTOCOL))
            await _drain_quietly(writer)
            self._refused("unsupported-protocol", peer, None, str(exc))
            return
        except ProtocolError as exc:
            self._refused("protocol-error", peer, None, str(exc))
            writer.transport.abort()
            return
        except TimeoutError:
            # abort, not close: a TLS close waits up to 30 s for the client's close_notify,
            # and a client that never sent CONNECT will not send that either
            self._refused("connect-timeout", peer, None, "no CONNECT in time")
            writer.transport.abort()
            return
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self._refused("aborted", peer, None, type(exc).__name__)
            writer.transport.abort()
            return

        link = Link(writer, self.metrics)
        outbox = Outbox(self.options.max_inflight, self.options.max_queued, budget=self.budget)
        fresh = FieldlineSession.from_connect(connect, link, outbox)
        if not await self._authenticate(fresh, self.listeners_config[listener_name]):
            refusal = fresh.attributes.get(AUTH_REFUSAL) or Refusal(
                "refused", wire.NOT_AUTHORIZED, "refused by an auth plugin"
            )
            writer.write(wire.connack(False, refusal.return_code))
            await _drain_quietly(writer)
            self._refused(refusal.rule, peer, connect.client_id, refusal.detail)
            return

        session, present = await self._take_session(fresh)
        self._size_outbox(session)
        handler = FieldlineHandler(self.plugins_manager, link, session.qos2_received, self.budget)
        # a float: amqtt's reader waits this long for the next packet (MQTT-3.1.2-24)
        session.keep_alive = connect.keepalive * self.options.keepalive_factor
        handler.attach(session, FramedReader(reader, self.options.max_packet_bytes, handler), link)
        session.handler = handler
        assert session.client_id is not None
        self._sessions[session.client_id] = (session, handler)
        session.transitions.connect()
        link.write(wire.connack(present, wire.ACCEPTED))
        self.metrics.connects.labels("accepted").inc()
        self.metrics.connected.inc()
        log.info(
            "event=connected client=%s principal=%s peer=%s clean=%s present=%s keepalive=%d",
            session.client_id, principal_of(session), _peer(peer), session.clean_session,
            present, connect.keepalive,
        )  # fmt: skip
        link.outbox = session.outbox
        session.outbox.attach(link)
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=session.client_id, client_session=session
        )
        await handler.start()
        if present:
            for topic_filter, qos in self._index.filters_of(session.client_id).items():
                await self._send_retained(session, topic_filter, qos)
        await self._work_loop(session, handler)

    def _size_outbox(self, session: FieldlineSession) -> None:
        principal = principal_of(session)
        service = principal is not None and principal.role is Role.SERVICE
        o = self.options
        outbox = session.outbox
        if service:
            outbox.max_inflight, outbox.max_queued = o.service_max_inflight, o.service_max_queued
            outbox.max_inflight_bytes = o.service_max_inflight_bytes
            outbox.max_queued_bytes = o.service_max_queued_bytes
        else:
            outbox.max_inflight, outbox.max_queued = o.max_inflight, o.max_queued
            outbox.max_inflight_bytes = o.max_inflight_bytes
            outbox.max_queued_bytes = o.max_queued_bytes

    async def _work_loop(self, session: FieldlineSession, handler: FieldlineHandler) -> None:
        """This connection's PUBLISHes, SUBSCRIBEs and UNSUBSCRIBEs, in arrival order, to its end.

        Replaces amqtt's message loop, which waits on four futures and makes a task per message.
        """
        while True:
            item = await handler.next_work()
            if isinstance(item, Ended):
                await self._disconnected(session, handler, item.packet)
                return
            try:
                if isinstance(item, Subscription):
                    await self._subscribe(session, handler, item)
                elif isinstance(item, UnSubscription):
                    await self._unsubscribe(session, handler, item)
                elif not await self._incoming(session, item):
                    handler.close("protocol-error")
            except Exception:  # one bad packet must not end the connection's loop
                log.exception("event=work_failed client=%s", session.client_id)

    def _refused(self, rule: str, peer: Any, client_id: str | None, detail: str) -> None:
        self.metrics.connects.labels(rule).inc()
        log.info(
            "event=connect_refused reason=%s client=%s peer=%s detail=%r",
            rule, client_id, _peer(peer), detail,
        )  # fmt: skip

    async def _take_session(self, fresh: FieldlineSession) -> tuple[FieldlineSession, bool]:
        """The authenticated connection takes over its client id: resume or start a session."""
        assert fresh.client_id is not None
        existing = self._sessions.get(fresh.client_id)
        if existing is None:
            return fresh, False
        old = existing[0]
        if not isinstance(old, FieldlineSession):
            await self._delete_session(fresh.client_id)
            return fresh, False
        if old.handler is not None:
            handler, old.handler = old.handler, None
            old.outbox.detach(persistent=not old.clean_session)
            self._trim_offline(old)
            handler.close_reason = "taken-over"
            await self._stop_handler(handler)
            old.transitions.disconnect()
            self.metrics.connected.dec()
            self.metrics.disconnects.labels("taken-over").inc()
            log.info("event=taken_over client=%s", fresh.client_id)
        if fresh.clean_session or old.clean_session:
            await self._delete_session(fresh.client_id)
            return fresh, False
        before = principal_of(old)
        old.resume_from(fresh)
        if principal_of(old) != before:
            # a re-issued certificate (another tenant or role) for this id: what was queued
            # under the old principal must pass the new one's RECEIVE check to be delivered
            await self._recheck_outbox(old)
        return old, True

    async def _recheck_outbox(self, session: FieldlineSession) -> None:
        outbox = session.outbox
        topics = {m.topic for m in outbox.queue} | {m.topic for m in outbox.inflight.values()}
        allowed = {
            t for t in topics
            if await self._topic_filtering(session, t.decode(), AmqttAction.RECEIVE)
        }  # fmt: skip
        dropped = outbox.keep(lambda m: m.topic in allowed)
        if dropped:
            self.metrics.dropped.labels("not-receivable").inc(dropped)
            log.info("event=outbox_rechecked client=%s dropped=%d", session.client_id, dropped)

    async def _disconnected(
        self, session: FieldlineSession, handler: FieldlineHandler, packet: DisconnectPacket | None
    ) -> None:
        await self._stop_handler(handler)
        if session.handler is not handler:
            return  # superseded by a newer connection with the same client id
        session.handler = None
        session.outbox.detach(persistent=not session.clean_session)
        self._trim_offline(session)
        session.transitions.disconnect()
        self.metrics.connected.dec()
        graceful = isinstance(packet, DisconnectPacket)
        reason = "graceful" if graceful else handler.close_reason or "network"
        self.metrics.disconnects.labels(reason).inc()
        log.info("event=disconnected client=%s reason=%s", session.client_id, reason)
        if not graceful and session.will_flag and not self._closing:
            await self._publish_will(session)
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_DISCONNECTED, client_id=session.client_id, client_session=session
        )
        if session.clean_session and session.client_id is not None:
            current = self._sessions.get(session.client_id)
            if current is not None and current[0] is session:
                await self._delete_session(session.client_id)

    async def _publish_will(self, session: FieldlineSession) -> None:
        topic, payload = session.will_topic, session.will_message
        if not topic or payload is None:
            return
        retain = bool(session.will_retain)
        # checked again now, not only at CONNECT: the policy (or certificate) may have changed
        if not await self._topic_filtering(session, topic, AmqttAction.PUBLISH, retain=retain):
            return
        log.info("event=will client=%s topic=%s", session.client_id, topic)
        await self._route(topic, bytes(payload), session.will_qos or 0)
        if retain:
            await self.retain_message(session, topic, payload, session.will_qos)

    # -- messages in ------------------------------------------------------------------------
    async def _incoming(self, client_session: FieldlineSession, message: Incoming) -> bool:
        """A PUBLISH from a client: checked, routed, retained; False for a protocol violation."""
        self.metrics.received += 1
        topic = message.topic
        if not topic or "#" in topic or "+" in topic or topic.startswith("$"):
            # MQTT-4.7.3-1, MQTT-3.3.2-2: a malformed topic name is a protocol violation
            log.info(
                "event=protocol_error client=%s detail=bad topic name", client_session.client_id
            )
            return False
        retain = message.retain
        if not await self._topic_filtering(
            client_session, topic, AmqttAction.PUBLISH, retain=retain
        ):
            return True
        if self.options.tap is not None:
            self.options.tap(topic, bytes(message.data))
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_BROADCAST, client_id=client_session.client_id, message=message
        )
        await self._route(topic, message.data, message.qos)
        if retain:
            await self.retain_message(client_session, topic, message.data, message.qos)
        return True

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        # amqtt's broadcast queue scans every filter; internal messages take the index too
        if topic is not None and data is not None:
            await self._route(topic, bytes(data), _QOS_MAX if force_qos is None else force_qos)

    async def _route(self, topic: str, payload: bytes, qos: int) -> None:
        """Deliver to every matching subscriber allowed to RECEIVE it, at min(publish, sub) QoS."""
        targets = self._index.match(topic)
        if not targets:
            return
        encoded = topic.encode()
        sessions = self._sessions
        for client_id, sub_qos in targets.items():
            entry = sessions.get(client_id)
            if entry is None:
                continue
            session = entry[0]
            if not isinstance(session, FieldlineSession):
                continue
            if not await self._topic_filtering(session, topic, AmqttAction.RECEIVE):
                continue
            self._deliver(session, Message(encoded, payload, min(qos, sub_qos), False))

    def _deliver(self, session: FieldlineSession, message: Message) -> None:
        outbox = session.outbox
        if not outbox.attached:
            if message.qos == 0:
                self.metrics.dropped.labels("offline-qos0").inc()
                return
            if not self.budget.offline_room(message.size):
                self.metrics.dropped.labels("offline-budget").inc()
                self._offline_drops += 1
                if _worth_logging(self._offline_drops):
                    log.warning(
                        "event=offline_budget_full client=%s offline_bytes=%d dropped=%d",
                        session.client_id, self.budget.offline, self._offline_drops,
                    )  # fmt: skip
                return
        refused = outbox.put(message)
        if refused is None:
            return
        self.metrics.dropped.labels(refused).inc()
        if refused == QUEUE_BYTES and session.handler is not None:
            self._cut_off(session, "slow-consumer")
        elif _worth_logging(outbox.dropped):
            log.warning(
                "event=queue_full client=%s reason=%s queued=%d queued_bytes=%d dropped=%d",
                session.client_id, refused, len(outbox.queue), outbox.queued_bytes,
                outbox.dropped,
            )  # fmt: skip

    # -- access control ---------------------------------------------------------------------
    async def _topic_filtering(
        self, session: Session, topic: str, action: Any, *, retain: bool = False
    ) -> bool:
        """All topic plugins must allow (deny when none is loaded); denials are counted."""
        allowed = bool(self._topic_plugins)
        for plugin in self._topic_plugins:
            try:
                if retain:
                    result = await plugin.topic_filtering(
                        session=session, topic=topic, action=action, retain=True
                    )
                else:
                    result = await plugin.topic_filtering(
                        session=session, topic=topic, action=action
                    )
            except Exception:
                log.exception("event=topic_plugin_failed plugin=%s", type(plugin).__name__)
                result = False
            if not result:
                allowed = False
                break
        if not allowed:
            denial = last_denial(session)
            rule = denial.rule if denial is not None else "plugin"
            self.metrics.denials.labels(str(action), rule).inc()
            level = logging.DEBUG if action == AmqttAction.RECEIVE else logging.INFO
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "event=denied client=%s action=%s topic=%r retain=%s reason=%r",
                    session.client_id, action, topic, retain,
                    denial.reason if denial is not None else rule,
                )  # fmt: skip
        return allowed

    # -- subscriptions ----------------------------------------------------------------------
    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter, qos = subscription
        try:
            validate_filter(topic_filter)
        except InvalidFilterError:
            self.metrics.denials.labels("subscribe", "malformed").inc()
            return SUBACK_FAILURE
        if not await self._topic_filtering(session, topic_filter, AmqttAction.SUBSCRIBE):
            return SUBACK_FAILURE
        if topic_filter.startswith(SHARE_PREFIX):
            # amqtt has no shared subscriptions; refusing beats a filter that never matches
            self.metrics.denials.labels("subscribe", "shared-unsupported").inc()
            log.info(
                "event=denied client=%s action=subscribe topic=%r reason=%r",
                session.client_id, topic_filter,
                "shared subscriptions need Mosquitto (see README, Security model)",
            )  # fmt: skip
            return SUBACK_FAILURE
        granted = min(qos, _QOS_MAX)
        assert session.client_id is not None
        held = self._index.count_of(session.client_id)
        if held >= self.options.max_subscriptions and not self._index.has(
            topic_filter, session.client_id
        ):
            self.metrics.denials.labels("subscribe", "too-many-subscriptions").inc()
            log.info(
                "event=denied client=%s action=subscribe topic=%r reason=%r",
                session.client_id, topic_filter,
                f"holds {held} subscriptions, broker.max_subscriptions is "
                f"{self.options.max_subscriptions}",
            )  # fmt: skip
            return SUBACK_FAILURE
        self._index.add(topic_filter, session.client_id, granted)
        return granted

    async def _subscribe(
        self, client_session: FieldlineSession, handler: FieldlineHandler, request: Subscription
    ) -> None:
        codes = [await self.add_subscription(sub, client_session) for sub in request.topics]
        await handler.mqtt_acknowledge_subscription(request.packet_id, codes)
        for (topic_filter, _qos), code in zip(request.topics, codes, strict=True):
            if code == SUBACK_FAILURE:
                continue
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_SUBSCRIBED,
                client_id=client_session.client_id,
                topic=topic_filter,
                qos=code,
            )
            await self._send_retained(client_session, topic_filter, code)

    async def _unsubscribe(
        self, client_session: FieldlineSession, handler: FieldlineHandler, request: UnSubscription
    ) -> None:
        for topic_filter in request.topics:
            self._del_subscription(topic_filter, client_session)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_UNSUBSCRIBED,
                client_id=client_session.client_id,
                topic=topic_filter,
            )
        await handler.mqtt_acknowledge_unsubscription(request.packet_id)

    async def _send_retained(self, session: FieldlineSession, topic_filter: str, qos: int) -> None:
        """The retained messages a filter matches, each checked for RECEIVE, flagged retain."""
        for topic in list(self._retained_topics.matching(topic_filter)):
            retained = self._retained_messages.get(topic)
            if retained is None or not retained.data:
                continue
            if not await self._topic_filtering(session, topic, AmqttAction.RECEIVE):
                continue
            message = Message(
                topic.encode(), bytes(retained.data), min(retained.qos or 0, qos), True
            )
            self._deliver(session, message)

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        return int(
            session.client_id is not None and self._index.remove(a_filter, session.client_id)
        )

    async def _del_all_subscriptions(self, session: Session) -> None:
        if session.client_id is not None:
            self._index.remove_all(session.client_id)

    @property
    def subscriptions(self) -> dict[str, list[tuple[Session, int]]]:
        """amqtt's view (filter -> [(session, qos)]), built from the index on demand."""
        view: dict[str, list[tuple[Session, int]]] = {}
        for client_id in self._index.subscribers():
            entry = self._sessions.get(client_id)
            if entry is None:
                continue
            for topic_filter, qos in self._index.filters_of(client_id).items():
                view.setdefault(topic_filter, []).append((entry[0], qos))
        return view

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        await super().retain_message(source_session, topic_name, data, qos)
        if topic_name is None:
            return
        if topic_name in self._retained_messages:
            self._retained_topics.add(topic_name)
        else:
            self._retained_topics.discard(topic_name)

    def connected_clients(self) -> Iterable[str]:
        """Client ids with a live connection."""
        for client_id, (session, _handler) in self._sessions.items():
            if getattr(session, "handler", None) is not None:
                yield client_id


def _worth_logging(count: int) -> bool:
    """Log the 1st, 10th, 100th and every 1000th of a repeated event."""
    return count in (1, 10, 100) or count % 1000 == 0


def _trim_tls_buffers() -> None:
    """asyncio gives every TLS connection a 256 KiB read buffer it never fills: a TLS record
    carries at most 16 KiB. Thousands of idle devices would cost GiBs; 32 KiB is plenty."""
    if sslproto.SSLProtocol.max_size > TLS_READ_BUFFER:
        sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "?"


async def _drain_quietly(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        await asyncio.wait_for(writer.drain(), 2)
