"""The worker's receive path from a NATS JetStream cluster: one durable pull consumer, shared
by every worker, each message acknowledged after its rows commit.

Devices publish over MQTT to any node. For a QoS 1 PUBLISH nats-server (2.9, 2.10) hands the message
to ordinary subject interest (the FIELDLINE stream's `fl.>` capture, not waited for), then
stores it as `$MQTT.msgs.fl.acme.d1.telemetry` in its own stream `$MQTT_msgs` (replicated,
interest retention) and waits for that store; only then is the PUBACK sent. So the worker's
consumer is on `$MQTT_msgs` by default (`ingest.nats_stream`), filter `$MQTT.msgs.fl.>`: what a
device saw PUBACKed is there, whatever node dies. Interest retention stores a message only if
a consumer's filter matches when it arrives, hence `ensure_ingest_consumer`, run before any
device publishes (`fieldline ingest nats-ensure`, `fieldline up`, every worker at start).

The worker pulls batches, maps each subject back to its MQTT topic (so decoding, validation,
enrichment, dead letters and idempotent writes are the MQTT path's, unchanged) and
acknowledges when the pipeline says the rows are committed. What is not acknowledged within
`ack_wait` (a worker killed, a database down) JetStream delivers again, to any worker: the
writes are idempotent, so a redelivery is counted (`fieldline_ingest_redelivered_total`), never
a duplicate row. Messages on topics that are not the service's (commands to devices) are
acknowledged at once and counted (`fieldline_ingest_nats_skipped_total`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from core import natsconn
from core.retry import Backoff
from core.settings import IngestSettings, NatsSettings
from ingest_worker.metrics import IngestMetrics
from ingest_worker.receive import OnMessage
from schemas.topics import service_filters

log = logging.getLogger("ingest")

# nats-server's store of QoS 1 MQTT publishes (made at the account's first MQTT connection);
# a publish to `fl/a/b/c` is stored as `$MQTT.msgs.fl.a.b.c`
MQTT_STREAM = "$MQTT_msgs"
MQTT_PREFIX = "$MQTT.msgs."
# the `fl.>` stream `broker.nats.ensure_stream` creates (NATS-native publishers)
NATIVE_STREAM = "FIELDLINE"
STREAM = MQTT_STREAM
FILTERS = {MQTT_STREAM: f"{MQTT_PREFIX}fl.>", NATIVE_STREAM: "fl.>"}
# the topics the service ingests: fl/<tenant>/<device>/<kind> for these kinds
SERVICE_KINDS = frozenset(f.rsplit("/", 1)[1] for f in service_filters())
# how long one pull request waits for messages: also how soon a pause or a stop is noticed, and
# how soon a deleted consumer is (a pull on it just times out, as an empty one does)
FETCH_WAIT_S = 1.0
# the largest message nats-server delivers when the connection does not say (DEFAULT_MAX_PAYLOAD
# of broker/nats.py's rendered configs)
MAX_PAYLOAD = 2 * 1024 * 1024

_DEFAULTS = IngestSettings()
# how often the worker asks how many bytes the consumed stream holds (one STREAM.INFO request)
STORE_POLL_S = 10.0


def cluster_urls(nats_settings: NatsSettings) -> list[str]:
    """The client URLs of every node of the `nats` section's cluster (node K: port + K - 1)."""
    hosts = [h.strip() for h in nats_settings.host.split(",") if h.strip()]
    urls = []
    for k in range(nats_settings.nodes):
        host = hosts[k] if k < len(hosts) else hosts[-1]
        urls.append(f"tls://{host}:{nats_settings.client_port + k}")
    return urls


def cluster_mqtt(nats_settings: NatsSettings) -> list[tuple[str, int]]:
    """(host, MQTT port) of every node of the `nats` section's cluster (node K: port + K - 1)."""
    hosts = [h.strip() for h in nats_settings.host.split(",") if h.strip()]
    return [
        (hosts[k] if k < len(hosts) else hosts[-1], nats_settings.mqtt_port + k)
        for k in range(nats_settings.nodes)
    ]


def subject_to_topic(subject: str) -> str:
    """`fl.acme.d1.telemetry` or `$MQTT.msgs.fl.acme.d1.telemetry` -> `fl/acme/d1/telemetry`:
    NATS's MQTT mapping reversed (a level is a token; an empty MQTT level is the token `/`)."""
    subject = subject.removeprefix(MQTT_PREFIX)
    return "/".join("" if level == "/" else level for level in subject.split("."))


def is_service_topic(topic: str) -> bool:
    """A topic the ingest service subscribes to (`fl/+/+/telemetry`, status, events, cmd-res)."""
    levels = topic.split("/")
    return len(levels) == 4 and levels[0] == "fl" and levels[3] in SERVICE_KINDS


class NatsSetupError(Exception):
    """The stream to consume does not exist and could not be made to exist (one line)."""


def _server(nc: Client | None) -> str:
    url = nc.connected_url if nc is not None else None
    return url.netloc if url is not None else "-"


@dataclass(frozen=True)
class NatsTarget:
    """Where and as whom the worker pulls: the cluster, the stream and the shared consumer."""

    urls: tuple[str, ...]
    context: ssl.SSLContext | None  # None: plain TCP (a throwaway server in a unit test)
    name: str  # the worker's identity, shown in the server's connection list
    consumer: str = _DEFAULTS.nats_consumer
    stream: str = _DEFAULTS.nats_stream
    # MQTT listeners (host, port): one MQTT connection makes nats-server create $MQTT_msgs
    mqtt: tuple[tuple[str, int], ...] = ()
    max_ack_pending: int = _DEFAULTS.nats_max_ack_pending
    ack_wait_s: float = _DEFAULTS.nats_ack_wait_s
    fetch_batch: int = _DEFAULTS.nats_fetch_batch
    fetch_max_bytes: int = _DEFAULTS.nats_fetch_max_bytes
    connect_timeout: float = 10.0
    # what the stream may hold on a node before something gives (`store_budget`); 0: unknown
    store_budget_bytes: int = 0

    @property
    def filter_subject(self) -> str:
        return FILTERS[self.stream]

    def consumer_config(self) -> ConsumerConfig:
        """The durable pull consumer: every `fl.>` message of the stream, explicit acks,
        redelivered after ack_wait for as long as it takes (never dropped: a message the
        pipeline refuses becomes a dead letter and is acknowledged like any other)."""
        return ConsumerConfig(
            name=self.consumer,
            durable_name=self.consumer,
            filter_subject=self.filter_subject,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_deliver=-1,
            max_ack_pending=self.max_ack_pending,
        )


@dataclass(frozen=True)
class Ensured:
    """What `ensure_ingest_consumer` found or did."""

    stream: str
    made_by: str | None  # "host:port" of the MQTT connection that made nats-server create it
    consumer: str  # created, updated or unchanged
    leader: str | None  # the stream's leader (server_name), None on a single server
    replicas: int
    stranded: Stranded | None = None
    # other pull consumers of fl.> on $MQTT_msgs (None: they could not be listed)
    orphans: tuple[str, ...] | None = ()

    def describe(self, target: NatsTarget) -> str:
        """One line for logs and the CLI."""
        made = f"created by an MQTT connection to {self.made_by}" if self.made_by else "found"
        line = (
            f"stream {self.stream} {made} ({self.replicas} replicas, leader "
            f"{self.leader or '-'}); consumer {target.consumer} {self.consumer} (filter "
            f"{target.filter_subject}, ack_wait {target.ack_wait_s:g} s, max_ack_pending "
            f"{target.max_ack_pending})"
        )
        if self.stranded is not None:
            line = f"{line}; WARNING: {self.stranded}"
        if self.orphans:
            line = f"{line}; WARNING: {orphan_warning(self.orphans)}"
        return line


@dataclass(frozen=True)
class Stranded:
    """Messages an interest stream still holds below its only consumer's ack floor: acked or
    skipped by the consumer, so it will never deliver them, yet not deleted."""

    first: int
    last: int
    messages: int

    @property
    def below_floor(self) -> int:
        """At most this many lie below the floor (the stream's count, bounded by the span)."""
        return min(self.messages, self.last - self.first + 1)

    def __str__(self) -> str:
        return (
            f"{self.messages} message(s) of {MQTT_STREAM} at sequence {self.first}..{self.last} "
            "lie below the consumer's acknowledgement floor and will not be delivered "
            "(docs/broker.md: a consumer ahead of its stream)"
        )


@dataclass
class StrandedWatch:
    """Stranded messages seen by successive polls: told only when found twice in a row at the
    same first sequence (once, it may be a deletion still under way), warned once per place."""

    seen: Stranded | None = None
    told: int | None = None

    def update(self, now: Stranded | None) -> tuple[Stranded | None, bool]:
        """(what lasts, None if nothing does; True if it is new and worth a warning)."""
        before, self.seen = self.seen, now
        if now is None or before is None or now.first != before.first:
            return None, False
        warn = now.first != self.told
        self.told = now.first
        return now, warn


def stranded(
    first_seq: int, last_seq: int, messages: int, consumers: int, ack_floor: int
) -> Stranded | None:
    """The messages below the ack floor of an interest stream's single consumer, if any.

    With one consumer, interest retention deletes every message it acknowledged; one still
    there at or below the floor was never delivered (seen once on nats-server 2.9.10, on a
    cluster restarted from the state a killed run left)."""
    if consumers != 1 or messages == 0 or first_seq > ack_floor:
        return None
    return Stranded(first_seq, min(ack_floor, last_seq), messages)


def store_budget(stream: str, nats_settings: NatsSettings) -> int:
    """The bytes `stream` may hold per node before something gives: for $MQTT_msgs, the node's
    JetStream store (`nats.max_store_bytes`) less FIELDLINE's reservation
    (`nats.stream_max_bytes`), past which nats-server refuses MQTT (docs/broker.md); for
    FIELDLINE, its own `max_bytes`, past which its oldest messages are dropped."""
    if stream == MQTT_STREAM:
        return max(0, nats_settings.max_store_bytes - nats_settings.stream_max_bytes)
    return nats_settings.stream_max_bytes


def subjects_overlap(a: str, b: str) -> bool:
    """True if some subject matches both NATS filters `a` and `b` (`*` one token, `>` the rest;
    an empty filter matches everything)."""
    if not a or not b:
        return True
    ta, tb = a.split("."), b.split(".")
    for x, y in zip(ta, tb, strict=False):
        if x == ">" or y == ">":
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(ta) == len(tb)


def orphan_consumers(
    consumers: list[tuple[str, str, str | None]], own: str | None
) -> tuple[str, ...]:
    """The consumers of $MQTT_msgs, as (name, filter_subject, deliver_subject), that keep
    `fl.>` messages there for nobody: pull consumers (no deliver subject) whose filter overlaps
    `$MQTT.msgs.fl.>`, other than `own` (the worker's, when it consumes $MQTT_msgs).

    nats-server's own consumers for MQTT QoS 1 subscriptions (`<session hash>_<nuid>`, filter
    `$MQTT.msgs.<subject>`) are push consumers delivering to `$MQTT.sub.<nuid>`: left out."""
    wanted = FILTERS[MQTT_STREAM]
    return tuple(
        sorted(
            name
            for name, filter_subject, deliver in consumers
            if not deliver and name != own and subjects_overlap(filter_subject, wanted)
        )
    )


def orphan_warning(names: tuple[str, ...]) -> str:
    """The warning about consumers found by `orphan_consumers`."""
    return (
        f"consumer(s) {', '.join(names)} on {MQTT_STREAM} also want fl.> and nobody pulls from "
        f"them: interest retention keeps every message for them until the JetStream store is "
        f"full (a renamed ingest.nats_consumer, a switched ingest.nats_stream?); delete them "
        f"as the admin (`nats consumer rm {MQTT_STREAM} <name>`)"
    )


async def _orphans(nc: Client, target: NatsTarget) -> tuple[str, ...] | None:
    """`orphan_consumers` of $MQTT_msgs; None when the listing is refused or unanswered.

    The request is made by hand, not with nats-py's consumers_info, so that a permission the
    user lacks (`$JS.API.CONSUMER.LIST.$MQTT_msgs`) is seen at the next PONG, not after a
    timeout: nats-server answers a refused publish with -ERR, before the PONG."""
    subject = f"$JS.API.CONSUMER.LIST.{MQTT_STREAM}"
    before = nc.last_error
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    try:
        await nc.publish(subject, b'{"offset":0}', reply=inbox)
        await nc.flush(timeout=int(max(1, target.connect_timeout)))
        err = nc.last_error
        if err is not None and err is not before and subject.lower() in str(err).lower():
            return None
        reply = await sub.next_msg(timeout=target.connect_timeout)
    except (TimeoutError, nats.errors.Error):
        return None
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    try:
        body = json.loads(reply.data)
        found = [
            (
                str(c["name"]),
                str(c.get("config", {}).get("filter_subject") or ""),
                c.get("config", {}).get("deliver_subject") or None,
            )
            for c in body.get("consumers") or []
        ]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if "error" in body:
        return None
    own = target.consumer if target.stream == MQTT_STREAM else None
    return orphan_consumers(found, own)


def pull_size(batch: int, room: int, max_bytes: int, max_payload: int) -> int:
    """Messages to ask for in one pull: at most `batch`, `room` (under max_ack_pending) and as
    many messages of `max_payload` bytes (the server's largest) as fit in `max_bytes`; >= 1."""
    return max(1, min(batch, room, max_bytes // max(1, max_payload)))


def _same(have: ConsumerConfig, want: ConsumerConfig) -> bool:
    return (
        have.filter_subject == want.filter_subject
        and have.max_ack_pending == want.max_ack_pending
        and have.ack_wait is not None
        and want.ack_wait is not None
        and abs(have.ack_wait - want.ack_wait) < 1e-3
        and have.ack_policy == want.ack_policy
        and have.deliver_policy == want.deliver_policy
    )


async def ensure_ingest_consumer(nc: Client, target: NatsTarget) -> Ensured:
    """Make the worker's durable consumer exist on `target.stream` (idempotent); when
    $MQTT_msgs does not exist yet, connect once over MQTT so that nats-server creates it.

    Run it before devices publish: $MQTT_msgs keeps a message only if a consumer's filter
    matches when it arrives, and nats-server PUBACKs it all the same."""
    js = nc.jetstream(timeout=target.connect_timeout)
    made_by = None
    try:
        info = await js.stream_info(target.stream)
    except nats.js.errors.NotFoundError:
        if target.stream != MQTT_STREAM:
            raise NatsSetupError(
                f"stream {target.stream} does not exist: `fieldline broker nats-config` "
                "documents how it is created (or set ingest.nats_stream to $MQTT_msgs)"
            ) from None
        if target.context is None or not target.mqtt:
            raise NatsSetupError(
                f"stream {MQTT_STREAM} does not exist yet and no MQTT listener is known to "
                "create it (nats.host, nats.mqtt_port)"
            ) from None
        made_by = await asyncio.to_thread(
            open_mqtt_streams, target.mqtt, target.context, target.name, target.connect_timeout
        )
        info = await _stream_appears(js, target.stream, target.connect_timeout)
    want = target.consumer_config()
    try:
        have = await js.consumer_info(target.stream, target.consumer)
    except nats.js.errors.NotFoundError:
        change = "created"
    else:
        change = "unchanged" if _same(have.config, want) else "updated"
    if change != "unchanged":
        await js.add_consumer(target.stream, config=want)
    cluster = info.cluster
    orphans: tuple[str, ...] | None = ()
    if target.stream == MQTT_STREAM:
        orphans = await _orphans(nc, target)
    else:  # a worker switched from $MQTT_msgs may have left its consumer there
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.stream_info(MQTT_STREAM)
            orphans = await _orphans(nc, target)
    return Ensured(
        stream=target.stream,
        made_by=made_by,
        consumer=change,
        leader=cluster.leader if cluster is not None else None,
        replicas=info.config.num_replicas or 1,
        stranded=await _stranded(js, target) if target.stream == MQTT_STREAM else None,
        orphans=orphans,
    )


async def _stranded(js: JetStreamContext, target: NatsTarget) -> Stranded | None:
    # the consumer first, then the stream: a message acknowledged in between is gone from the
    # stream by then; asked twice, a second apart, so a deletion still under way is not told
    found = None
    for attempt in range(2):
        if attempt:
            await asyncio.sleep(1.0)
        consumer = await js.consumer_info(target.stream, target.consumer)
        state = (await js.stream_info(target.stream)).state
        floor = consumer.ack_floor.stream_seq if consumer.ack_floor is not None else 0
        found = stranded(
            state.first_seq, state.last_seq, state.messages, state.consumer_count, floor or 0
        )
        if found is None:
            return None
    return found


async def _stream_appears(js: JetStreamContext, stream: str, timeout: float) -> Any:
    """nats-server answers CONNECT once its MQTT streams exist; their info may lag a little."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            if time.monotonic() > deadline:
                raise NatsSetupError(
                    f"stream {stream} did not appear within {timeout:g} s of an MQTT connection"
                ) from None
            await asyncio.sleep(0.1)


def open_mqtt_streams(
    addresses: tuple[tuple[str, int], ...], context: ssl.SSLContext, name: str, timeout: float
) -> str:
    """Connect one MQTT client (clean session, the service's certificate) to the first node
    that answers and wait for its CONNACK: nats-server creates the account's MQTT streams,
    $MQTT_msgs among them, before it sends one. Returns "host:port"."""
    problems = []
    for host, port in addresses:
        problem = _mqtt_connect_once(host, port, context, f"{name}-ensure", timeout)
        if problem is None:
            return f"{host}:{port}"
        problems.append(f"{host}:{port}: {problem}")
    raise NatsSetupError(
        f"stream {MQTT_STREAM} does not exist and no MQTT listener made it: "
        + ("; ".join(problems) or "none configured")
    )


def _mqtt_connect_once(
    host: str, port: int, context: ssl.SSLContext, name: str, timeout: float
) -> str | None:
    """None once a CONNACK accepted the connection, else what went wrong."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    from paho.mqtt.reasoncodes import ReasonCode

    answered = threading.Event()
    codes: list[ReasonCode] = []

    def connected(_c: Any, _u: Any, _f: Any, code: ReasonCode, _p: Any) -> None:
        codes.append(code)
        answered.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{name}-{secrets.token_hex(3)}",
        clean_session=True,
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    client.tls_set_context(context)
    client.on_connect = connected
    try:
        client.connect(host, port, keepalive=max(5, int(timeout)))
    except (OSError, ssl.SSLError) as exc:
        return str(exc) or type(exc).__name__
    client.loop_start()
    try:
        if not answered.wait(timeout):
            return f"no CONNACK within {timeout:g} s"
        if codes[0].is_failure:
            return f"refused ({codes[0]})"
        return None
    finally:
        client.disconnect()
        client.loop_stop()
        client.reinitialise()  # closes loop_start()'s socket pair now (paho-mqtt#627)


class JetStreamReceiver:
    """The `Receiver` of the nats source: pull, hand over, acknowledge when told.

    nats-py keeps the connection up (every node's URL, reconnecting without limit); a pull
    that finds no message, or no server, simply ends and the next one starts. Acknowledgements
    name the stream sequence, so one made after a reconnect, or by another connection, counts.
    """

    def __init__(self, target: NatsTarget, metrics: IngestMetrics) -> None:
        self.target = target
        self.metrics = metrics
        self.ready = asyncio.Event()
        self.nc: Client | None = None
        self._stopping = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._room = asyncio.Event()  # set when an ack frees room under max_ack_pending
        self._acks: list[str] = []  # reply subjects to acknowledge, in commit order
        self._ack_ready = asyncio.Event()
        self.outstanding = 0  # handed to the pipeline, not acknowledged yet
        self.ensured: Ensured | None = None
        self._orphans_unchecked_told = False

    # -- connection ---------------------------------------------------------------------------
    async def _connect(self) -> JetStreamContext.PullSubscription:
        t = self.target

        async def disconnected() -> None:
            self.metrics.connected = 0
            if not self._stopping.is_set():
                log.warning("event=broker_lost source=nats detail='nats-py reconnects'")

        async def reconnected() -> None:
            self.metrics.connected = 1
            self.metrics.reconnects.inc()
            nc = self.nc
            log.info("event=reconnected source=nats server=%s", _server(nc))

        async def error(exc: Exception) -> None:
            if not self._stopping.is_set():
                log.warning("event=nats_error error=%r", str(exc) or type(exc).__name__)

        nc = await natsconn.connect(
            servers=list(t.urls),
            tls=t.context,
            name=t.name,
            connect_timeout=int(max(1, t.connect_timeout)),
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            ping_interval=5,
            max_outstanding_pings=2,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
        self.nc = nc
        try:
            js = nc.jetstream(timeout=t.connect_timeout)
            # create, or update to this worker's ack_wait / max_ack_pending
            self.ensured = await ensure_ingest_consumer(nc, t)
            if self.ensured.stranded is not None:
                log.warning("event=nats_stranded detail=%r", str(self.ensured.stranded))
            if self.ensured.orphans:
                self.metrics.nats_orphan_consumers.inc(len(self.ensured.orphans))
                log.warning(
                    "event=nats_orphan_consumer consumers=%s detail=%r",
                    ",".join(self.ensured.orphans), orphan_warning(self.ensured.orphans),
                )  # fmt: skip
            elif self.ensured.orphans is None and not self._orphans_unchecked_told:
                self._orphans_unchecked_told = True
                log.info(
                    "event=nats_orphan_check_skipped detail='may not list the consumers of "
                    "%s ($JS.API.CONSUMER.LIST.%s)'", MQTT_STREAM, MQTT_STREAM,
                )  # fmt: skip
            return await js.pull_subscribe_bind(durable=t.consumer, stream=t.stream)
        except BaseException:
            with contextlib.suppress(Exception):
                await nc.close()
            raise

    async def run(self, on_message: OnMessage) -> None:
        """Pull and hand over until stopped; connect (again) with backoff when needed."""
        backoff = Backoff(0.2, 10.0)
        acker = asyncio.get_running_loop().create_task(self._acker())
        watcher = asyncio.get_running_loop().create_task(self._watch_store())
        self.metrics.nats_store_budget = self.target.store_budget_bytes
        try:
            while not self._stopping.is_set():
                try:
                    sub = await self._connect()
                except (
                    OSError, TimeoutError, ssl.SSLError, nats.errors.Error, NatsSetupError
                ) as exc:  # fmt: skip
                    delay = backoff.next()
                    log.warning(
                        "event=broker_unreachable source=nats servers=%s error=%r retry_in=%.1fs",
                        ",".join(self.target.urls), str(exc) or type(exc).__name__, delay,
                    )  # fmt: skip
                    await self._sleep(delay)
                    continue
                backoff.reset()
                self.metrics.connected = 1
                self.metrics.reconnects.inc()
                nc = self.nc
                t = self.target
                log.info(
                    "event=connected source=nats server=%s stream=%s consumer=%s "
                    "filter=%s ack_wait=%gs max_ack_pending=%d ensured=%r",
                    _server(nc), t.stream, t.consumer, t.filter_subject, t.ack_wait_s,
                    t.max_ack_pending, self.ensured.describe(t) if self.ensured else "-",
                )  # fmt: skip
                self.ready.set()
                await self._pull(sub, on_message)
                self.metrics.connected = 0
                if nc is not None and not nc.is_closed and not self._stopping.is_set():
                    # the consumer or its stream is gone: a new connection runs the ensure
                    # step again (acks still owed are resent by nobody: JetStream redelivers)
                    with contextlib.suppress(Exception):
                        await nc.close()
        finally:
            for task in (acker, watcher):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _watch_store(self) -> None:
        """Every STORE_POLL_S, the bytes and messages the consumed stream holds (per replica),
        for `fieldline_ingest_nats_stream_bytes` and its alert: a full store is an outage of
        the tier (docs/broker.md), and nats-server has no metrics endpoint of its own."""
        watch = StrandedWatch()
        while True:
            nc = self.nc
            if nc is not None and nc.is_connected:
                try:
                    js = nc.jetstream(timeout=5)
                    state = (await js.stream_info(self.target.stream)).state
                    self.metrics.nats_stream_bytes = state.bytes
                    self.metrics.nats_stream_messages = state.messages
                    if self.target.stream == MQTT_STREAM:
                        consumer = await js.consumer_info(self.target.stream, self.target.consumer)
                        floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
                        now = stranded(
                            state.first_seq, state.last_seq, state.messages,
                            state.consumer_count, floor or 0,
                        )  # fmt: skip
                        lasting, warn = watch.update(now)
                        self.metrics.nats_stranded = lasting.below_floor if lasting else 0
                        if warn:
                            log.warning("event=nats_stranded detail=%r", str(lasting))
                except (TimeoutError, nats.errors.Error) as exc:
                    log.debug("event=stream_info_failed error=%r", str(exc))
            await asyncio.sleep(STORE_POLL_S)

    async def _pull(self, sub: JetStreamContext.PullSubscription, on_message: OnMessage) -> None:
        """Pull while the connection lives; returns when it is closed or the worker stops."""
        t = self.target
        backoff = Backoff(0.2, 5.0)
        while not self._stopping.is_set():
            if not self._resumed.is_set():
                await self._until(self._resumed)
                continue
            room = t.max_ack_pending - self.outstanding
            if room <= 0:
                self.metrics.ack_pending_full.inc()
                self._room.clear()
                await self._until(self._room)
                continue
            max_payload = (self.nc.max_payload if self.nc is not None else 0) or MAX_PAYLOAD
            size = pull_size(t.fetch_batch, room, t.fetch_max_bytes, max_payload)
            try:
                msgs = await sub.fetch(size, timeout=FETCH_WAIT_S)
            except TimeoutError:
                # nothing to deliver, no server answering just now, or no consumer any more
                # (a pull on a deleted consumer times out as an empty one does): asked
                if await self._consumer_lost(sub, "pull timed out"):
                    return
                continue
            except nats.errors.ConnectionClosedError:
                return
            except nats.errors.Error as exc:  # a consumer leader moving, a stream lost...
                if await self._consumer_lost(sub, str(exc) or type(exc).__name__):
                    return
                delay = backoff.next()
                log.warning("event=pull_failed error=%r retry_in=%.1fs", str(exc), delay)
                await self._sleep(delay)
                if self.nc is None or self.nc.is_closed:
                    return
                continue
            backoff.reset()
            if len(msgs) == size < min(t.fetch_batch, room):
                self.metrics.nats_pull_bounded.inc()  # more was there: the byte bound bit
            now = time.time()
            for msg in msgs:
                if msg.metadata.num_delivered > 1:
                    self.metrics.redelivered.inc()
                topic = subject_to_topic(msg.subject)
                if not is_service_topic(topic):
                    # a command to a device (stored for the device's own QoS 1 subscription):
                    # acknowledged, or interest retention would keep it for this consumer
                    self.metrics.nats_skipped.inc()
                    self._acks.append(msg.reply)
                    self._ack_ready.set()
                    continue
                self.outstanding += 1
                on_message(msg, topic, msg.data, now)
            self.metrics.nats_ack_pending = self.outstanding
            if msgs:
                self.metrics.nats_backlog = msgs[-1].metadata.num_pending

    async def _consumer_lost(self, sub: JetStreamContext.PullSubscription, why: str) -> bool:
        """After a pull that brought nothing: True (logged, counted) if the server says the
        consumer or its stream no longer exists. Any other answer, or none, is not a loss."""
        if self._stopping.is_set():
            return False
        try:
            # bounded: a stop or a pause is noticed within a pull and this question
            await asyncio.wait_for(sub.consumer_info(), 2 * FETCH_WAIT_S)
        except nats.js.errors.NotFoundError as exc:
            self.metrics.nats_consumer_lost.inc()
            log.warning(
                "event=consumer_lost stream=%s consumer=%s after=%r error=%r "
                "detail='connecting again to recreate it'",
                self.target.stream, self.target.consumer, why, exc.description or str(exc),
            )  # fmt: skip
            return True
        except (TimeoutError, nats.errors.Error):
            return False
        return False

    async def _until(self, event: asyncio.Event) -> None:
        """Wait for `event` or the stop, whichever comes first."""
        stopping = asyncio.ensure_future(self._stopping.wait())
        waiting = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({stopping, waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            waiting.cancel()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # -- acknowledgements ---------------------------------------------------------------------
    def ack(self, source: Any) -> None:
        """Acknowledge a committed message (called by the pipeline, in receive order)."""
        if isinstance(source, Msg) and source.reply:
            self._acks.append(source.reply)
            self._ack_ready.set()
            self.outstanding -= 1
            self.metrics.nats_ack_pending = self.outstanding
            self._room.set()

    async def _acker(self) -> None:
        while True:
            await self._ack_ready.wait()
            await self._send_acks()

    async def _send_acks(self) -> None:
        self._ack_ready.clear()
        replies, self._acks = self._acks, []
        nc = self.nc
        if nc is None or nc.is_closed:
            return  # JetStream delivers them again after ack_wait; the writes are idempotent
        for reply in replies:
            try:
                # an empty message to the reply subject is JetStream's +ACK; nats-py buffers it
                # while reconnecting
                await nc.publish(reply)
            except nats.errors.Error as exc:
                log.warning("event=ack_failed count=%d error=%r", len(replies), str(exc))
                return

    # -- flow control and stop ----------------------------------------------------------------
    def pause(self) -> None:
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    async def stop(self) -> None:
        """Pull no more, send the acknowledgements the drain produced, close the connection.
        What was pulled and not committed is delivered again after ack_wait."""
        self._stopping.set()
        await self._send_acks()
        nc = self.nc
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.flush(), 5)
            with contextlib.suppress(Exception):
                await nc.close()
