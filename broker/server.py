"""fieldline's embedded broker: MQTT 3.1.1 over mutual TLS, certificate identity, ACLs, bounded
memory, and (with a store) nothing acknowledged lost when the process dies.

The engine is fieldline's own: the listener, the CONNECT path (authenticate first, from this
connection's certificate, before any existing session is touched; answer MQTT 5 with CONNACK
0x01; never leak a connection slot), the session registry and its expiry, keepalive (1.5 x,
then the Will), the Will and retained messages going through the ACL, outgoing delivery (an
outbox per session that survives reconnects, min(publish, subscription) QoS, retain only on
retained messages), and subscription matching (an index instead of a scan of every filter).
From amqtt it takes the plugin interface (`BaseAuthPlugin`, `BaseTopicPlugin`, `Action`),
so an amqtt plugin can add a check; docs/broker.md lists what is used, as the upgrade
checklist.

Memory is bounded in bytes as well as messages: each outbox by its own limits (a connected
client whose queue reaches them is cut off as a slow consumer), all of them together by the
`MemoryBudget` (publishers are not read while it is spent; offline sessions keep at most half
of it; when it stays spent, the largest client that has stopped reading is cut off).

With `store_file`, persistent sessions, their subscriptions and queued QoS 1/2 messages, and
retained messages are kept in a `BrokerStore`; a PUBACK, PUBREC, SUBACK or UNSUBACK is
written only once what its packet changed is committed, and a restart recovers it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from amqtt.contexts import Action as AmqttAction
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin

from broker import wire
from broker.budget import MemoryBudget
from broker.connection import (
    Connection,
    Ended,
    Incoming,
    Link,
    Released,
    Reply,
    SubscribeRequest,
    UnsubscribeRequest,
)
from broker.errors import BrokerError, ProtocolError, TlsSetupError, UnsupportedProtocolError
from broker.identity import AUTH_REFUSAL, PRINCIPAL, SERIAL, last_denial, principal_of
from broker.index import SubscriptionIndex
from broker.metrics import BrokerMetrics
from broker.outbox import QUEUE_BYTES, Message, Outbox
from broker.plugins import Refusal, load_plugins
from broker.policy import Principal, short_topic
from broker.retained import RetainedTopics
from broker.revocation import RevocationList
from broker.session import Session
from broker.store import BrokerStore, Recovered
from broker.tls import ReloadableTls
from broker.tlsserver import start_tls_server
from certs import Role
from core.settings import BrokerSettings
from schemas.errors import InvalidFilterError
from schemas.topics import SHARE_PREFIX, validate_filter

log = logging.getLogger("broker")

SUBACK_FAILURE = 0x80
_QOS_MAX = 2
# A CONNECT carries at most a client id, a Will and credentials, each with a 16-bit length.
_MAX_CONNECT_BYTES = 4 * 65_537 + 16
# how often the bytes in sockets are summed and a spent budget looks for a client to cut off
MEMORY_SWEEP_S = 1.0
# a client whose socket has not drained for this long, while the budget is spent, may be cut
STUCK_S = 5.0
# topic levels a PUBLISH or a filter may have (fieldline's own topics have 4 or 5): matching
# walks them, and a hostile depth must neither cost nor crash it
MAX_TOPIC_LEVELS = 32
TOO_DEEP = f"more than {MAX_TOPIC_LEVELS} topic levels"
# how long shutdown waits for connections to finish the work they had read
SHUTDOWN_DRAIN_S = 5.0


# the settings model is the one source of defaults
_DEFAULTS = BrokerSettings()


@dataclass(frozen=True)
class BrokerOptions:
    """How the embedded broker listens and what it holds per client."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path | None
    bind: str = _DEFAULTS.bind
    port: int = _DEFAULTS.port
    max_connections: int = _DEFAULTS.max_connections
    # filters one client may hold: each costs index memory, and an offline session keeps them
    max_subscriptions: int = _DEFAULTS.max_subscriptions
    connect_timeout_s: float = _DEFAULTS.connect_timeout_s
    # TLS handshakes in progress: they come before max_connections counts a connection
    max_pending_handshakes: int = _DEFAULTS.max_pending_handshakes
    max_packet_bytes: int = _DEFAULTS.max_packet_bytes
    max_inflight: int = _DEFAULTS.max_inflight
    max_queued: int = _DEFAULTS.max_queued
    # An ingest worker holds PUBACKs until its batch commits and must not lose what arrives
    # while it restarts, so `service` principals get a wider window and a deeper queue.
    service_max_inflight: int = _DEFAULTS.service_max_inflight
    service_max_queued: int = _DEFAULTS.service_max_queued
    # the same limits in bytes (topic + payload + 120 per message); a connected client whose
    # queue reaches max_queued_bytes is cut off, as it is not reading
    max_inflight_bytes: int = _DEFAULTS.max_inflight_bytes
    max_queued_bytes: int = _DEFAULTS.max_queued_bytes
    service_max_inflight_bytes: int = _DEFAULTS.service_max_inflight_bytes
    service_max_queued_bytes: int = _DEFAULTS.service_max_queued_bytes
    # all sessions together; publishers are not read beyond it
    memory_budget_bytes: int = _DEFAULTS.memory_budget_bytes
    session_expiry_s: int = _DEFAULTS.session_expiry_s
    keepalive_factor: float = 1.5
    crl_refresh_s: float = _DEFAULTS.crl_refresh_s
    # the durable store (None: sessions and retained messages live in memory only)
    store_file: Path | None = None
    store_sync: Literal["normal", "full"] = _DEFAULTS.store_sync
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

    def plugin_config(self) -> dict[str, dict[str, Any]]:
        """The plugins to load (dotted path -> config): ours, then any extra ones."""
        auth: dict[str, Any] = {"ca_file": str(self.ca_file)}
        if self.crl_file is not None:
            auth["crl_file"] = str(self.crl_file)
        return {
            "broker.plugins.CertificateAuthPlugin": auth,
            "broker.plugins.PolicyTopicPlugin": {},
            **{path: dict(config) for path, config in self.extra_plugins.items()},
        }


@dataclass(frozen=True)
class SessionState:
    """What the broker holds for one client id (for operators and tests)."""

    connected: bool
    queued: int
    subscriptions: dict[str, int]
    offline_since: float | None


@dataclass(frozen=True, slots=True)
class RetainedMessage:
    payload: bytes
    qos: int


class FieldlineBroker:
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
        self.plugins: list[BasePlugin[Any]] = load_plugins(options.plugin_config())
        self._auth_plugins = [p for p in self.plugins if isinstance(p, BaseAuthPlugin)]
        self._topic_plugins = [p for p in self.plugins if isinstance(p, BaseTopicPlugin)]
        self.store = (
            BrokerStore(options.store_file, options.store_sync)
            if options.store_file is not None
            else None
        )
        self._sessions: dict[str, Session] = {}
        self._index: SubscriptionIndex[str] = SubscriptionIndex()
        self._retained: dict[str, RetainedMessage] = {}
        self._retained_topics = RetainedTopics()
        self._server: asyncio.Server | None = None
        self._links: set[Link] = set()
        self._serving: set[asyncio.Task[Any]] = set()
        self._connecting: dict[str, _Gate] = {}
        self._open_connections = 0
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self.budget = MemoryBudget(options.memory_budget_bytes)
        self._offline_drops = 0
        self._update_crl_metrics()
        self.metrics.watch_budget(self.budget)
        if self.store is not None:
            self.metrics.watch_store(self.store)
        self.metrics.sessions.set_function(lambda: len(self._sessions))
        self.metrics.subscriptions.set_function(lambda: len(self._index))
        self.metrics.retained.set_function(lambda: len(self._retained))

    async def __aenter__(self) -> FieldlineBroker:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.shutdown()

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Recover what the store holds, then listen."""
        if self.store is not None:
            self._recover(await self.store.open())
        o = self.options
        try:
            # TLS per connection on a memory BIO: asyncio's TLS holds 256 KiB per socket
            self._server = await start_tls_server(
                self._accept,
                o.bind,
                o.port,
                lambda: self._tls.listener_context,
                handshake_timeout=o.connect_timeout_s,
                max_pending_handshakes=o.max_pending_handshakes,
                on_refused=lambda reason: self.metrics.connects.labels(reason).inc(),
            )
        except OSError as exc:
            if self.store is not None:
                await self.store.close()
            raise BrokerError(
                f"cannot listen on {o.bind}:{o.port}: {exc.strerror or exc}; "
                "stop what holds the port or set FIELDLINE_BROKER__PORT"
            ) from exc
        self._tasks = [
            asyncio.create_task(self._maintain(), name="broker-crl"),
            asyncio.create_task(self._watch_memory(), name="broker-memory"),
            asyncio.create_task(self._expire_sessions(), name="broker-expiry"),
        ]
        log.info("event=broker_started bind=%s port=%s", o.bind, self.port)

    async def shutdown(self) -> None:
        """Stop accepting; finish what connections had read; commit; close them (no Wills)."""
        if self._closing:
            return
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        connections = [s.connection for s in self._sessions.values() if s.connection is not None]
        await asyncio.gather(*(c.stop() for c in connections), return_exceptions=True)
        if self._serving:
            _done, late = await asyncio.wait(self._serving, timeout=SHUTDOWN_DRAIN_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self.store is not None:
            await self.store.close()  # its last commit writes the replies it held back
        await asyncio.gather(*(link.close() for link in list(self._links)), return_exceptions=True)
        self._links.clear()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        for plugin in self.plugins:
            with contextlib.suppress(Exception):
                await plugin.close()
        log.info("event=broker_stopped")

    @property
    def port(self) -> int:
        """The bound port (useful when the options asked for port 0)."""
        if self._server is None or not self._server.sockets:
            return self.options.port
        return int(self._server.sockets[0].getsockname()[1])

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

    async def _expire_sessions(self) -> None:
        expiry = self.options.session_expiry_s
        if expiry <= 0:
            return  # 0: offline sessions are kept until their client cleans them
        every = min(60.0, max(0.05, expiry / 10))
        while True:
            await asyncio.sleep(every)
            try:
                self.expire_sessions()
            except Exception:  # the broker must outlive a bug here
                log.exception("event=session_expiry_failed")

    def expire_sessions(self, now: float | None = None) -> int:
        """Delete persistent sessions offline for `session_expiry_s` or more; how many."""
        expiry = self.options.session_expiry_s
        if expiry <= 0:
            return 0
        now = time.time() if now is None else now
        expired = [
            session for session in self._sessions.values()
            if session.connection is None
            and session.offline_since is not None
            and now - session.offline_since >= expiry
        ]  # fmt: skip
        for session in expired:
            log.info(
                "event=session_expired client=%s offline_s=%.0f queued=%d",
                session.client_id, now - (session.offline_since or now), len(session.outbox),
            )  # fmt: skip
            self._drop_session(session.client_id)
        self.metrics.expired.inc(len(expired))
        return len(expired)

    def _recover(self, recovered: Recovered) -> None:
        """Sessions, subscriptions, retained and queued messages as the store kept them."""
        assert self.store is not None
        now = time.time()
        for stored in recovered.sessions:
            session = Session(stored.client_id, False, self._new_outbox())
            _restore_identity(session, stored.identity)
            session.outbox.journal = self.store.journal(stored.client_id)
            self._size_outbox(session)
            # connected when the broker died: offline since it came back
            session.offline_since = stored.offline_since or now
            if stored.offline_since is None:
                self.store.save_session(stored.client_id, stored.identity, now)
            self._sessions[stored.client_id] = session
        for client_id, topic_filter, qos in recovered.subscriptions:
            if client_id in self._sessions:
                self._index.add(topic_filter, client_id, qos)
        for client_id, packet_id in recovered.qos2_received:
            if client_id in self._sessions:
                self._sessions[client_id].qos2_received.add(packet_id)
        for topic, payload, qos in recovered.retained:
            self._retained[topic] = RetainedMessage(payload, qos)
            self._retained_topics.add(topic)
        dropped = 0
        for stored_message in recovered.messages:
            message = Message(
                stored_message.topic, stored_message.payload, stored_message.qos,
                stored_message.retain,
            )  # fmt: skip
            message.seq = stored_message.seq
            owner = self._sessions.get(stored_message.client_id)
            if (
                owner is None
                or not self.budget.offline_room(message.size)
                or owner.outbox.put(message) is not None
            ):
                dropped += 1  # limits lowered since it was stored, or an orphan row
                self.store.remove_message(message)
        if dropped:
            self.metrics.dropped.labels("offline-budget").inc(dropped)
        log.info(
            "event=store_recovered path=%s sessions=%d subscriptions=%d messages=%d "
            "retained=%d dropped=%d",
            self.store.path, len(recovered.sessions), len(recovered.subscriptions),
            len(recovered.messages) - dropped, len(recovered.retained), dropped,
        )  # fmt: skip

    def sweep_memory(self) -> str | None:
        """Sum the bytes waiting in sockets; if the budget is spent, cut off the client holding
        the most among those that have not read for STUCK_S (its id, or None)."""
        now = asyncio.get_running_loop().time()
        in_sockets = 0
        stuck: list[tuple[int, Session]] = []
        for session in self._sessions.values():
            connection = session.connection
            if connection is None:
                continue
            link = connection.link
            held = link.buffered()
            in_sockets += held
            if link.stuck_since is not None and now - link.stuck_since >= STUCK_S:
                stuck.append((held + session.outbox.held_bytes, session))
        self.budget.sampled_sockets(in_sockets)
        if not self.budget.full or not stuck:
            return None
        _held, victim = max(stuck, key=lambda pair: pair[0])
        self._cut_off(victim, "memory-budget")
        return victim.client_id

    def _cut_off(self, session: Session, reason: str) -> None:
        """Disconnect a client that does not read; its persistent session keeps what fits."""
        connection = session.connection
        if connection is None or connection.close_reason is not None:
            return
        outbox = session.outbox
        log.warning(
            "event=cut_off client=%s reason=%s queued=%d queued_bytes=%d inflight_bytes=%d "
            "budget_used=%d",
            session.client_id, reason, len(outbox.queue), outbox.queued_bytes,
            outbox.inflight_bytes, self.budget.used,
        )  # fmt: skip
        connection.close(reason)

    def _trim_offline(self, session: Session) -> None:
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
        for session in list(self._sessions.values()):
            if session.connection is not None and session.attributes.get(SERIAL) in revoked:
                session.connection.close("revoked")
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

    # -- sessions ---------------------------------------------------------------------------
    def session_state(self, client_id: str) -> SessionState | None:
        """What is held for `client_id`, or None when the broker has no session for it."""
        session = self._sessions.get(client_id)
        if session is None:
            return None
        return SessionState(
            connected=session.connection is not None,
            queued=len(session.outbox),
            subscriptions=dict(self._index.filters_of(client_id)),
            offline_since=session.offline_since,
        )

    def connected_clients(self) -> Iterable[str]:
        """Client ids with a live connection."""
        for client_id, session in self._sessions.items():
            if session.connection is not None:
                yield client_id

    def _new_outbox(self) -> Outbox:
        return Outbox(self.options.max_inflight, self.options.max_queued, budget=self.budget)

    def _drop_session(self, client_id: str) -> None:
        session = self._sessions.pop(client_id, None)
        if session is None:
            return
        self._index.remove_all(client_id)
        # each stored message goes by its key (an index on client_id would cost every insert)
        session.outbox.clear()
        session.outbox.journal = None
        if self.store is not None and session.persistent:
            self.store.delete_session(client_id)

    def _save_session(self, session: Session) -> None:
        if self.store is not None and session.persistent:
            self.store.save_session(session.client_id, _identity_of(session), session.offline_since)

    # -- connections ------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.transport.abort()
            return
        if 0 < self.options.max_connections <= self._open_connections:
            self.metrics.connects.labels("over-capacity").inc()
            log.warning(
                "event=connect_refused reason=over-capacity open=%d", self._open_connections
            )
            writer.transport.abort()
            return
        self._open_connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._serving.add(task)
        try:
            await self._serve(reader, writer)
        except Exception:  # one connection's failure must never reach the listener
            log.exception("event=connection_failed")
        finally:
            self._open_connections -= 1
            if task is not None:
                self._serving.discard(task)
            # at shutdown the broker closes connections itself, after the store's last commit
            if not self._closing and not writer.is_closing():
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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

        fresh = Session.from_connect(
            connect, self._new_outbox(), writer.get_extra_info("ssl_object"), _peer_pair(peer)
        )
        if self._closing:
            writer.transport.abort()
            return
        if not await self._authenticate(fresh):
            refusal = fresh.attributes.get(AUTH_REFUSAL) or Refusal(
                "refused", wire.NOT_AUTHORIZED, "refused by an auth plugin"
            )
            writer.write(wire.connack(False, refusal.return_code))
            await _drain_quietly(writer)
            self._refused(refusal.rule, peer, connect.client_id, refusal.detail)
            return

        link = Link(writer, self.metrics)
        self._links.add(link)
        try:
            await self._run_session(fresh, connect, link, reader, peer)
        finally:
            self._links.discard(link)

    async def _run_session(
        self,
        fresh: Session,
        connect: wire.Connect,
        link: Link,
        reader: asyncio.StreamReader,
        peer: Any,
    ) -> None:
        async with self._one_connect_at_a_time(fresh.client_id):
            connection, session, present = await self._register(fresh, connect, link, reader)
            if self.store is not None and self.store.busy:
                # what the takeover changed (a clean start deletes the old session) is
                # durable before the client is told whether a session is present
                await self._store_committed()
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
        connection.start()
        await self._work_loop(session, connection)

    async def _register(
        self, fresh: Session, connect: wire.Connect, link: Link, reader: asyncio.StreamReader
    ) -> tuple[Connection, Session, bool]:
        """Take over or start the client id's session and give it this connection."""
        session, present = await self._take_session(fresh)
        self._size_outbox(session)
        connection = Connection(
            reader,
            link,
            session.client_id,
            session.qos2_received,
            # MQTT-3.1.2-24: nothing from the client for 1.5 x its keepalive ends it
            keepalive_s=connect.keepalive * self.options.keepalive_factor,
            max_packet_bytes=self.options.max_packet_bytes,
            budget=self.budget,
            defer_replies=self.store is not None,
        )
        session.connection = connection
        session.offline_since = None
        self._sessions[session.client_id] = session
        self._save_session(session)
        return connection, session, present

    @contextlib.asynccontextmanager
    async def _one_connect_at_a_time(self, client_id: str) -> AsyncIterator[None]:
        """CONNECTs for one client id take over its session one after the other."""
        gate = self._connecting.get(client_id)
        if gate is None:
            gate = self._connecting[client_id] = _Gate()
        gate.users += 1
        try:
            async with gate.lock:
                yield
        finally:
            gate.users -= 1
            if not gate.users:
                del self._connecting[client_id]

    async def _store_committed(self) -> None:
        """Until everything recorded so far is committed."""
        assert self.store is not None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def committed() -> None:
            if not done.done():
                done.set_result(None)

        self.store.after_commit(committed)
        await done

    async def _authenticate(self, session: Session) -> bool:
        """Every auth plugin that decides must allow, and at least one must decide."""
        allowed = False
        for plugin in self._auth_plugins:
            try:
                result = await plugin.authenticate(session=_for_plugins(session))
            except Exception:
                log.exception("event=auth_plugin_failed plugin=%s", type(plugin).__name__)
                return False
            if result is False:
                return False
            allowed = allowed or result is True
        return allowed

    def _size_outbox(self, session: Session) -> None:
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

    async def _work_loop(self, session: Session, connection: Connection) -> None:
        """This connection's PUBLISHes, PUBRELs, SUBSCRIBEs and UNSUBSCRIBEs, in arrival
        order, to its end."""
        while True:
            item = await connection.next_work()
            if isinstance(item, Ended):
                await self._disconnected(session, connection, item.graceful)
                return
            try:
                if isinstance(item, Incoming):
                    if not await self._incoming(session, item):
                        connection.close("protocol-error")
                        continue
                    if item.qos == 2 and self.store is not None and session.persistent:
                        self.store.qos2_received(session.client_id, item.packet_id, True)
                    self._reply(connection, item.reply)
                elif isinstance(item, Released):
                    session.qos2_received.discard(item.packet_id)
                    if self.store is not None and session.persistent:
                        self.store.qos2_received(session.client_id, item.packet_id, False)
                    self._reply(connection, item.reply)
                elif isinstance(item, Reply):
                    self._reply(connection, item.reply)
                elif isinstance(item, SubscribeRequest):
                    await self._subscribe(session, connection, item)
                else:
                    self._unsubscribe(session, connection, item)
            except Exception:  # one bad packet must not end the connection's loop
                log.exception("event=work_failed client=%s", session.client_id)

    def _reply(self, connection: Connection, data: bytes) -> None:
        """Write an acknowledgement once everything recorded before it is durable; while
        too many wait, the connection is not read."""
        if not data:
            return
        if self.store is not None and self.store.busy:
            connection.hold_reply()
            self.store.after_commit(partial(connection.release_reply, data))
        else:
            connection.link.write(data)

    def _refused(self, rule: str, peer: Any, client_id: str | None, detail: str) -> None:
        self.metrics.connects.labels(rule).inc()
        log.info(
            "event=connect_refused reason=%s client=%s peer=%s detail=%r",
            rule, client_id, _peer(peer), detail,
        )  # fmt: skip

    async def _take_session(self, fresh: Session) -> tuple[Session, bool]:
        """The authenticated connection takes over its client id: resume or start a session."""
        client_id = fresh.client_id
        old = self._sessions.get(client_id)
        if old is not None and old.connection is not None:
            connection, old.connection = old.connection, None
            old.outbox.detach(persistent=old.persistent)
            self._trim_offline(old)
            connection.close("taken-over")
            await connection.stop()
            self.metrics.connected.dec()
            self.metrics.disconnects.labels("taken-over").inc()
            log.info("event=taken_over client=%s", client_id)
            if self._sessions.get(client_id) is not old:
                old = None  # deleted while its connection stopped: nothing to resume
        if old is None or fresh.clean_session or old.clean_session:
            if old is not None:
                self._drop_session(client_id)
            if self.store is not None and fresh.persistent:
                fresh.outbox.journal = self.store.journal(client_id)
            return fresh, False
        before = principal_of(old)
        old.resume_from(fresh)
        if principal_of(old) != before:
            # a re-issued certificate (another tenant or role) for this id: what was queued
            # under the old principal must pass the new one's RECEIVE check to be delivered
            await self._recheck_outbox(old)
        return old, True

    async def _recheck_outbox(self, session: Session) -> None:
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

    async def _disconnected(self, session: Session, connection: Connection, graceful: bool) -> None:
        await connection.stop()
        if session.connection is not connection:
            return  # superseded by a newer connection with the same client id
        session.connection = None
        session.outbox.detach(persistent=session.persistent)
        self._trim_offline(session)
        self.metrics.connected.dec()
        reason = "graceful" if graceful else connection.close_reason or "network"
        if self._closing and not graceful:
            reason = "shutdown"
        self.metrics.disconnects.labels(reason).inc()
        log.info("event=disconnected client=%s reason=%s", session.client_id, reason)
        if not graceful and session.will is not None and not self._closing:
            await self._publish_will(session)
        if session.clean_session:
            if self._sessions.get(session.client_id) is session:
                self._drop_session(session.client_id)
            return
        session.offline_since = time.time()
        self._save_session(session)

    async def _publish_will(self, session: Session) -> None:
        will = session.will
        if will is None or not will.topic:
            return
        # checked again now, not only at CONNECT: the policy (or certificate) may have changed
        if not await self._topic_filtering(
            session, will.topic, AmqttAction.PUBLISH, retain=will.retain
        ):
            return
        log.info("event=will client=%s topic=%s", session.client_id, will.topic)
        await self._route(will.topic, will.payload, will.qos)
        if will.retain:
            self._retain(will.topic, will.payload, will.qos)

    # -- messages in ------------------------------------------------------------------------
    async def _incoming(self, client_session: Session, message: Incoming) -> bool:
        """A PUBLISH from a client: checked, routed, retained; False for a protocol violation."""
        self.metrics.received += 1
        topic = message.topic
        if not topic or "#" in topic or "+" in topic:
            # MQTT-4.7.3-1, MQTT-3.3.2-2: a malformed topic name is a protocol violation
            log.info(
                "event=protocol_error client=%s detail=bad topic name", client_session.client_id
            )
            return False
        retain = message.retain
        if topic.startswith("$"):
            # reserved for the broker (MQTT 4.7.2): refused like any topic the ACL does not
            # grant, acknowledged and dropped, as Mosquitto does
            self._deny(client_session, "publish", "reserved", topic, "a $ topic is the broker's")
            return True
        if topic.count("/") >= MAX_TOPIC_LEVELS:
            self._deny(client_session, "publish", "too-deep", topic, TOO_DEEP)
            return True  # acknowledged and dropped, as a denied publish
        if not await self._topic_filtering(
            client_session, topic, AmqttAction.PUBLISH, retain=retain
        ):
            return True
        if self.options.tap is not None:
            self.options.tap(topic, bytes(message.data))
        await self._route(topic, message.data, message.qos)
        if retain:
            self._retain(topic, message.data, message.qos)
        return True

    async def _route(self, topic: str, payload: bytes, qos: int) -> None:
        """Deliver to every matching subscriber allowed to RECEIVE it, at min(publish, sub) QoS."""
        targets = self._index.match(topic)
        if not targets:
            return
        encoded = topic.encode()
        sessions = self._sessions
        for client_id, sub_qos in targets.items():
            session = sessions.get(client_id)
            if session is None:
                continue
            if not await self._topic_filtering(session, topic, AmqttAction.RECEIVE):
                continue
            self._deliver(session, Message(encoded, payload, min(qos, sub_qos), False))

    def _deliver(self, session: Session, message: Message) -> None:
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
        if refused == QUEUE_BYTES and session.connection is not None:
            self._cut_off(session, "slow-consumer")
        elif _worth_logging(outbox.dropped):
            log.warning(
                "event=queue_full client=%s reason=%s queued=%d queued_bytes=%d dropped=%d",
                session.client_id, refused, len(outbox.queue), outbox.queued_bytes,
                outbox.dropped,
            )  # fmt: skip

    def _retain(self, topic: str, payload: bytes, qos: int) -> None:
        """Keep the topic's last retained message; an empty payload clears it (MQTT-3.3.1-10)."""
        if payload:
            self._retained[topic] = RetainedMessage(bytes(payload), qos)
            self._retained_topics.add(topic)
            if self.store is not None:
                self.store.retain(topic, bytes(payload), qos)
        elif self._retained.pop(topic, None) is not None:
            self._retained_topics.discard(topic)
            if self.store is not None:
                self.store.unretain(topic)

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
                        session=_for_plugins(session), topic=topic, action=action, retain=True
                    )
                else:
                    result = await plugin.topic_filtering(
                        session=_for_plugins(session), topic=topic, action=action
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
            session.denials += 1
            # one client denied in a loop must not fill the disk: the 1st, 10th, 100th, ...
            if log.isEnabledFor(level) and _worth_logging(session.denials):
                log.log(
                    level,
                    "event=denied client=%s action=%s topic=%r retain=%s reason=%r count=%d",
                    session.client_id, action, short_topic(topic), retain,
                    denial.reason if denial is not None else rule, session.denials,
                )  # fmt: skip
        return allowed

    def _deny(self, session: Session, action: str, rule: str, topic: str, reason: str) -> None:
        """Count (and sparingly log) a refusal decided by the broker itself, not the ACL."""
        self.metrics.denials.labels(action, rule).inc()
        session.denials += 1
        if _worth_logging(session.denials):
            log.info(
                "event=denied client=%s action=%s topic=%r reason=%r count=%d",
                session.client_id, action, short_topic(topic), reason, session.denials,
            )  # fmt: skip

    # -- subscriptions ----------------------------------------------------------------------
    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """Check and add one filter; the granted QoS, or SUBACK_FAILURE."""
        topic_filter, qos = subscription
        try:
            validate_filter(topic_filter)
        except InvalidFilterError:
            self.metrics.denials.labels("subscribe", "malformed").inc()
            return SUBACK_FAILURE
        if topic_filter.count("/") >= MAX_TOPIC_LEVELS:
            self._deny(session, "subscribe", "too-deep", topic_filter, TOO_DEEP)
            return SUBACK_FAILURE
        if not await self._topic_filtering(session, topic_filter, AmqttAction.SUBSCRIBE):
            return SUBACK_FAILURE
        if topic_filter.startswith(SHARE_PREFIX):
            # no shared subscriptions here; refusing beats a filter that never matches
            self.metrics.denials.labels("subscribe", "shared-unsupported").inc()
            log.info(
                "event=denied client=%s action=subscribe topic=%r reason=%r",
                session.client_id, topic_filter,
                "shared subscriptions need Mosquitto (see docs/operations.md, Security model)",
            )  # fmt: skip
            return SUBACK_FAILURE
        granted = min(qos, _QOS_MAX)
        client_id = session.client_id
        held = self._index.count_of(client_id)
        if held >= self.options.max_subscriptions and not self._index.has(topic_filter, client_id):
            self.metrics.denials.labels("subscribe", "too-many-subscriptions").inc()
            log.info(
                "event=denied client=%s action=subscribe topic=%r reason=%r",
                client_id, topic_filter,
                f"holds {held} subscriptions, broker.max_subscriptions is "
                f"{self.options.max_subscriptions}",
            )  # fmt: skip
            return SUBACK_FAILURE
        self._index.add(topic_filter, client_id, granted)
        if self.store is not None and session.persistent:
            self.store.subscribe(client_id, topic_filter, granted)
        return granted

    async def _subscribe(
        self, session: Session, connection: Connection, request: SubscribeRequest
    ) -> None:
        codes = [await self.add_subscription(sub, session) for sub in request.topics]
        self._reply(connection, wire.suback(request.packet_id, codes))
        for (topic_filter, _qos), code in zip(request.topics, codes, strict=True):
            if code != SUBACK_FAILURE:
                await self._send_retained(session, topic_filter, code)

    def _unsubscribe(
        self, session: Session, connection: Connection, request: UnsubscribeRequest
    ) -> None:
        for topic_filter in request.topics:
            if self._index.remove(topic_filter, session.client_id) and (
                self.store is not None and session.persistent
            ):
                self.store.unsubscribe(session.client_id, topic_filter)
        self._reply(connection, wire.unsuback(request.packet_id))

    async def _send_retained(self, session: Session, topic_filter: str, qos: int) -> None:
        """The retained messages a filter matches, each checked for RECEIVE, flagged retain."""
        for topic in list(self._retained_topics.matching(topic_filter)):
            retained = self._retained.get(topic)
            if retained is None:
                continue
            if not await self._topic_filtering(session, topic, AmqttAction.RECEIVE):
                continue
            message = Message(topic.encode(), retained.payload, min(retained.qos, qos), True)
            self._deliver(session, message)


class _Gate:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


def _for_plugins(session: Session) -> Any:
    """Our Session offers the attributes amqtt's plugin interface reads (docs/broker.md)."""
    return session


def _identity_of(session: Session) -> str | None:
    principal = principal_of(session)
    if principal is None:
        return None
    serial = session.attributes.get(SERIAL)
    return json.dumps(
        {
            "id": principal.id,
            "tenant": principal.tenant,
            "role": principal.role.value,
            "serial": f"{serial:x}" if isinstance(serial, int) else None,
        }
    )


def _restore_identity(session: Session, identity: str | None) -> None:
    """The principal an offline session had: RECEIVE checks of what is routed to it use it."""
    if not identity:
        return
    try:
        data = json.loads(identity)
        session.attributes[PRINCIPAL] = Principal(data["id"], data["tenant"], Role(data["role"]))
        if data.get("serial"):
            session.attributes[SERIAL] = int(data["serial"], 16)
    except (ValueError, KeyError, TypeError):
        log.warning("event=store_bad_identity client=%s", session.client_id)


def _peer_pair(peer: Any) -> tuple[str, int] | None:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return None


def _worth_logging(count: int) -> bool:
    """Log the 1st, 10th, 100th and every 1000th of a repeated event."""
    return count in (1, 10, 100) or count % 1000 == 0


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "?"


async def _drain_quietly(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        await asyncio.wait_for(writer.drain(), 2)
