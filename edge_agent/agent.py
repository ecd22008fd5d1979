"""The edge agent: modules -> routes -> rules and the durable outbox -> the cloud, and back.

Everything upstream goes into the SQLite outbox first and leaves it only when the broker's
PUBACK arrives, so a broker outage or a `kill -9` loses nothing the agent accepted. The
agent is one device identity (its certificate's CN) and publishes on its own topics only:
module metrics travel as `<module>.<metric>` in its telemetry, rule alerts as its events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from certs import CertsError, client_context
from core.logs import LogSuppressedCollector
from device_runtime.boot import BootCounter
from device_runtime.errors import CommandError, DeviceError, LinkError
from device_runtime.handoff import Handoff
from device_runtime.intake import CommandIntake, Refusal, ReplayPolicy
from device_runtime.link import DeviceLink
from edge_agent.errors import EdgeError
from edge_agent.field import FieldError, FieldModule
from edge_agent.languard import LanGuard, LanLimits
from edge_agent.listener import LanListener
from edge_agent.manifest import RULE_PREFIX, UPSTREAM, Manifest, ModuleSpec, load_manifest
from edge_agent.modules import sim_modules
from edge_agent.outbox import Outbox
from edge_agent.rules import Firing, Rule
from edge_agent.values import ValueGuard
from schemas import topics
from schemas.limits import MAX_DETAIL_LENGTH
from schemas.messages import CommandStatus

log = logging.getLogger("fieldline.edge")

FIELD_COMMANDS_DRAIN_S = 5.0  # how long stop() waits for field commands still running
# Field commands (cloud and rule) running at once per field module; beyond it a cloud command
# is `rejected: busy` and a rule's command is dropped, so a flood cannot pile up tasks.
MAX_FIELD_COMMANDS = 8
EMIT_ERROR_LOG_EVERY_S = 60.0  # a reading the outbox cannot take: one log line this often


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


class AgentMetrics:
    """The agent's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(LogSuppressedCollector())
        r = self.registry
        self.outbox_depth = Gauge(
            "fieldline_edge_outbox_depth", "Messages in the outbox", registry=r
        )
        self.outbox_age = Gauge(
            "fieldline_edge_outbox_oldest_age_seconds", "Age of the oldest outbox message",
            registry=r,
        )  # fmt: skip
        self.routed = Counter(
            "fieldline_edge_messages_routed", "Messages routed", ["route"], registry=r
        )
        self.firings = Counter("fieldline_edge_rule_firings", "Rule firings", ["rule"], registry=r)
        self.reconnects = Counter(
            "fieldline_edge_reconnects", "Connections to the broker", registry=r
        )
        self.published = Counter(
            "fieldline_edge_published", "Messages acknowledged by the broker", registry=r
        )
        self.dropped = Counter(
            "fieldline_edge_outbox_dropped", "Messages the full outbox dropped", registry=r
        )
        self.commands_refused = Counter(
            "fieldline_edge_commands_refused",
            "Commands refused before they ran: retained, duplicate, no_ts, future_ts, expired, "
            "busy (a field module already runs MAX_FIELD_COMMANDS)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.field_values_dropped = Counter(
            "fieldline_edge_field_values_dropped",
            "Field metrics dropped before the outbox because ingest would refuse them "
            "(reason: text, number, type, name), and source timestamps replaced (reason: ts)",
            ["module", "reason"], registry=r,
        )  # fmt: skip
        self.field_modules_ended = Counter(
            "fieldline_edge_field_modules_ended",
            "Field modules whose collecting task ended unexpectedly", ["module"], registry=r,
        )  # fmt: skip
        self.lan_refused = Counter(
            "fieldline_edge_lan_refused",
            "What a LAN listener refused from its devices, by what (messages, samples, metrics) "
            "and reason: tenant, invalid, rate, bytes (messages); too_old (samples); name, "
            "metric_limit (metrics)",
            ["listener", "what", "reason"], registry=r,
        )  # fmt: skip
        self.lan_metric_names = Gauge(
            "fieldline_edge_lan_metric_names",
            "Metric names a LAN listener's devices have introduced (edge.lan_metrics_per_listener)",
            ["listener"], registry=r,
        )  # fmt: skip


@dataclass
class AgentOptions:
    """Where the agent keeps its state and how it talks to its broker."""

    home: Path
    manifest_path: Path | None = None
    pki_dir: Path | None = None  # the CA a LAN listener trusts; default home/pki
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"
    commands: ReplayPolicy = field(default_factory=ReplayPolicy)  # replays refused by the intake
    lan: LanLimits = field(default_factory=LanLimits)  # what one LAN device may send


class EdgeAgent:
    """One gateway: `await start()`, runs until `await stop()` (which flushes what it can)."""

    def __init__(self, manifest: Manifest, options: AgentOptions) -> None:
        self.manifest = manifest
        self.options = options
        a = manifest.agent
        self.tenant, self.id = a.tenant, a.id
        self.state_dir = options.home / "edge" / a.id
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = AgentMetrics()
        self.modules = sim_modules(manifest.modules)  # imports the simulator only if any
        self.listeners = [
            LanListener(
                m, options.pki_dir or options.home / "pki", a.tenant, self._route,
                self._lan_guard(m.name), self.state_dir,
            )
            for m in manifest.modules
            if m.kind == "listener"
        ]  # fmt: skip
        self.fields: dict[str, FieldModule] = {
            m.name: _field_module(m, self) for m in manifest.modules if m.field
        }
        # a cloud command accepted for a field module, taken by _on_command to run as a task
        self._deferred: tuple[str, str, dict[str, Any]] | None = None
        self._field_tasks: set[asyncio.Task[None]] = set()
        self._running: dict[str, int] = {}  # field module -> commands (cloud and rule) running
        self._running_ids: set[str] = set()  # cloud command ids accepted and still running
        self._emit_failed_logged = 0.0
        self.guard = ValueGuard(
            lambda module, kind, message, data: self.put_event(
                module, "warning", kind, message, data
            ),
            lambda module, reason: self.metrics.field_values_dropped.labels(module, reason).inc(),
        )
        self.rules = {r.name: Rule(r) for r in manifest.rules}
        self.topics = topics.device_topics(self.tenant, self.id)
        try:
            tls = client_context(manifest.bundle_dir(options.home))
        except CertsError as exc:
            raise EdgeError(
                f"the agent's certificate: {exc}; "
                f"`fieldline certs issue {a.id} --tenant {a.tenant} --role device`"
            ) from exc
        self.outbox = Outbox(
            manifest.outbox_path(options.home), max_bytes=manifest.outbox.max_bytes
        )
        self.link = DeviceLink(
            a.id, manifest.broker.host, manifest.broker.port, tls,
            keepalive=manifest.broker.keepalive_s, on_message=self._on_command,
            on_ack=self._on_ack, on_disconnect=self._disconnected,
        )  # fmt: skip
        self.intake = CommandIntake(options.commands, on_refused=self._refused)
        self.boot = 0
        self.seq = 0
        self.handoff = Handoff(self.link, self.outbox, batch_samples=manifest.outbox.batch_samples)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._gauged = 0.0

    def _lan_guard(self, listener: str) -> LanGuard:
        refused = self.metrics.lan_refused
        names = self.metrics.lan_metric_names.labels(listener)

        def count(what: str, reason: str, n: int) -> None:
            refused.labels(listener, what, reason).inc(n)

        def tell(device: str, message: str, data: dict[str, Any]) -> None:
            self.put_event(listener, "warning", "lan_refused", message, data)

        guard = LanGuard(listener, self.options.lan, tell, count)
        names.set_function(lambda: guard.names)
        return guard

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Boot, open the outbox, start sampling, connecting and publishing."""
        self.boot = BootCounter(self.state_dir / "boot").next()
        if self.options.metrics_port is not None:
            start_http_server(
                self.options.metrics_port, self.options.metrics_bind, self.metrics.registry
            )
        for listener in self.listeners:
            await listener.start()
        for name, module in self.fields.items():
            await module.start(self._emitter(name), self._eventer(name))
            task = module.task
            if task is not None:
                task.add_done_callback(self._field_ended(name))
        self._tasks = [
            asyncio.create_task(self._sample_loop(), name="edge-sample"),
            asyncio.create_task(self._connect_loop(), name="edge-connect"),
            asyncio.create_task(self._publish_loop(), name="edge-publish"),
        ]
        log.info("event=started agent=%s boot=%d modules=%d", self.id, self.boot, len(self.modules))

    async def stop(self, flush_s: float = 10.0) -> None:
        """Stop sampling, publish what the outbox holds (up to flush_s), go offline."""
        self._tasks[0].cancel()
        for listener in self.listeners:
            await listener.stop()
        await self._stop_fields(min(flush_s, FIELD_COMMANDS_DRAIN_S))
        deadline = time.monotonic() + flush_s
        while self.outbox.depth() and self.link.connected and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.05)
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.link.connected:
            body = {"state": "offline", "ts": int(time.time() * 1000), "boot": self.boot}
            self.link.publish(self.topics[topics.Kind.STATUS], _dumps(body), retain=True)
            await self.link.drain(3.0)
        await self.link.close()
        self.outbox.close()
        log.info("event=stopped agent=%s left_in_outbox=%d", self.id, self._left)

    @property
    def _left(self) -> int:
        try:
            return self.outbox.depth()
        except Exception:  # closed already
            return -1

    # -- the cloud link -------------------------------------------------------------------
    async def _connect_loop(self) -> None:
        status = self.topics[topics.Kind.STATUS]
        await self.link.stay_connected(
            self._connected,
            will=lambda: (status, _dumps({"state": "offline", "boot": self.boot})),
            on_error=self._connect_failed,
        )

    def _connect_failed(self, error: LinkError, delay: float) -> None:
        log.warning("event=connect_failed error=%r retry_in=%.1fs", str(error), delay)

    def _connected(self) -> None:
        self.metrics.reconnects.inc()
        self.link.subscribe(topics.device_command_filter(self.tenant, self.id))
        birth = {"state": "online", "ts": int(time.time() * 1000), "boot": self.boot}
        if self.manifest.agent.fw:
            birth["fw"] = self.manifest.agent.fw
        self.link.publish(self.topics[topics.Kind.STATUS], _dumps(birth), retain=True)
        self._report_drops()
        self._wake.set()

    def _disconnected(self) -> None:
        # paho keeps what it sent on this session and resends it on reconnect; nothing to redo
        log.warning("event=disconnected agent=%s outbox=%d", self.id, self.outbox.depth())

    def _on_ack(self, mid: int) -> None:
        rows = self.handoff.acked(mid)
        if rows:
            self.metrics.published.inc(rows)
            self._wake.set()

    async def _publish_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self.handoff.pump()

    def _gauge(self) -> None:
        # two SQL queries: twice a second is enough for a gauge, not once per message
        now = time.monotonic()
        if now - self._gauged < 0.5:
            return
        self._gauged = now
        self.metrics.outbox_depth.set(self.outbox.depth())
        age = self.outbox.oldest_age_s(time.time())
        self.metrics.outbox_age.set(age or 0.0)

    def _report_drops(self) -> None:
        report = self.outbox.dropped()
        if report is not None:
            self.metrics.dropped.inc(report.messages)
            self.outbox.put_drop_event(self.topics[topics.Kind.EVENTS])

    # -- modules, routes, rules -----------------------------------------------------------
    async def _sample_loop(self) -> None:
        tick = min([0.05, *(m.interval_s / 4 for m in self.modules.values())])
        while True:
            now, wall = time.monotonic(), time.time()
            for module in self.modules.values():
                if module.due(now):
                    reading = module.sample(wall)
                    if reading is not None:
                        self._route(module.name, reading)
            for rule in self.rules.values():
                for firing in rule.advance(int(wall * 1000)):
                    self._fire(firing)
            self._gauge()
            await asyncio.sleep(tick)

    def _route(self, module: str, reading: dict[str, Any]) -> None:
        for route in self.manifest.routes_from(module):
            self.metrics.routed.labels(route.name).inc()
            if route.to == UPSTREAM:
                self.seq += 1
                metrics = {f"{module}.{k}": v for k, v in reading["metrics"].items()}
                body = {"ts": reading["ts"], "seq": self.seq, "boot": self.boot, "metrics": metrics}
                self.outbox.put(self.topics[topics.Kind.TELEMETRY], _dumps(body), kind="telemetry")
                self._wake.set()
            elif route.to.startswith(RULE_PREFIX):
                rule = self.rules[route.to.removeprefix(RULE_PREFIX)]
                if rule.spec.metric not in reading["metrics"]:
                    # only the rule's own metric moves its event time (the wall clock moves it
                    # too): a device or module with a clock ahead cannot make others' late
                    continue
                for firing in rule.feed_metrics(reading["ts"], reading["metrics"]):
                    self._fire(firing)

    def _fire(self, firing: Firing) -> None:
        self.metrics.firings.labels(firing.rule).inc()
        log.info("event=rule_fired rule=%s value=%.3f", firing.rule, firing.value)
        for route in self.manifest.routes_from(RULE_PREFIX + firing.rule):
            self.metrics.routed.labels(route.name).inc()
            if route.to == UPSTREAM:
                body = firing.event_body()
                self.outbox.put(self.topics[topics.Kind.EVENTS], _dumps(body), kind="event")
                self._wake.set()
            elif route.to in self.modules:  # the manifest allows commands to simulated ones
                name, args = firing.command_body()
                try:
                    self.modules[route.to].command(name, args)
                except CommandError as exc:
                    log.warning("event=rule_command_failed rule=%s error=%r", firing.rule, str(exc))
            elif route.to in self.fields:
                name, args = firing.command_body()
                self._rule_field_command(route.to, firing.rule, name, args)

    # -- field modules (edge_agent/field.py) ----------------------------------------------
    def _emitter(self, module: str) -> Callable[[dict[str, Any]], None]:
        def emit(reading: dict[str, Any]) -> None:
            # the Emit contract: never raises, so a module's loop never dies of the outbox
            try:
                clean = self.guard.clean(module, reading)
                if clean is not None:
                    self._route(module, clean)
            except Exception as exc:
                now = time.monotonic()
                if now - self._emit_failed_logged >= EMIT_ERROR_LOG_EVERY_S:
                    self._emit_failed_logged = now
                    log.error(
                        "event=field_reading_lost module=%s error=%r", module,
                        f"{type(exc).__name__}: {exc}",
                    )  # fmt: skip

        return emit

    def _field_ended(self, module: str) -> Callable[[asyncio.Task[None]], None]:
        def ended(task: asyncio.Task[None]) -> None:
            if task.cancelled() or self._stopping:
                return
            exc = task.exception()
            why = "returned" if exc is None else f"{type(exc).__name__}: {exc}"
            self.metrics.field_modules_ended.labels(module).inc()
            log.error("event=field_module_ended module=%s error=%r", module, why)
            with contextlib.suppress(Exception):  # an unusable outbox: the line above is all
                self.put_event(
                    module, "critical", "field_module_ended",
                    f"module {module} stopped collecting ({why}); restart the agent",
                    {"error": why[:200]},
                )  # fmt: skip

        return ended

    def _eventer(self, module: str) -> Callable[[str, str, str, dict[str, Any]], None]:
        def event(severity: str, kind: str, message: str, data: dict[str, Any]) -> None:
            self.put_event(module, severity, kind, message, data)

        return event

    def put_event(
        self, module: str, severity: str, kind: str, message: str, data: dict[str, Any]
    ) -> None:
        """Log a module's event (one line) and queue it for the agent's `events` topic."""
        level = logging.INFO if severity in ("debug", "info") else logging.WARNING
        log.log(level, "event=%s module=%s severity=%s message=%r", kind, module, severity, message)
        body = {
            "ts": int(time.time() * 1000),
            "kind": kind,
            "severity": severity,
            "message": message[:MAX_DETAIL_LENGTH],
            "data": {"module": module, **data},
        }
        self.outbox.put(self.topics[topics.Kind.EVENTS], _dumps(body), kind="event")
        self._wake.set()

    def _spawn(self, module: str, work: Coroutine[Any, Any, None], cid: str | None = None) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._field_tasks.add(task)
        self._running[module] = self._running.get(module, 0) + 1
        if cid is not None:
            self._running_ids.add(cid)

        def done(task: asyncio.Task[None]) -> None:
            self._field_tasks.discard(task)
            self._running[module] -= 1
            if cid is not None:
                self._running_ids.discard(cid)

        task.add_done_callback(done)

    def _busy(self, module: str) -> int | None:
        """How many commands the module runs when that is the limit, else None."""
        running = self._running.get(module, 0)
        return running if running >= MAX_FIELD_COMMANDS else None

    def _rule_field_command(self, module: str, rule: str, name: str, args: dict[str, Any]) -> None:
        busy = self._busy(module)
        if busy is not None:
            self.metrics.commands_refused.labels("busy").inc()
            log.warning(
                "event=rule_command_dropped rule=%s module=%s command=%s running=%d",
                rule, module, name, busy,
            )  # fmt: skip
            return
        self._spawn(module, self._rule_command(module, rule, name, args))

    async def _rule_command(self, module: str, rule: str, name: str, args: dict[str, Any]) -> None:
        try:
            detail = await self.fields[module].command(name, args)
        except FieldError as exc:
            why = exc.detail
        except Exception as exc:  # a bug in a module: one line and an event, not a traceback
            why = f"{type(exc).__name__}: {exc}"
        else:
            log.info("event=rule_command rule=%s module=%s detail=%r", rule, module, detail)
            return
        self.put_event(
            module, "error", "command_failed", f"rule {rule}: {name}: {why}",
            {"rule": rule, "command": name},
        )  # fmt: skip

    async def _field_command(self, cid: str, module: str, name: str, args: dict[str, Any]) -> None:
        """Run a cloud command on a field module; its one result goes on cmd-res when it ends."""
        try:
            detail = await self.fields[module].command(name, args)
            status: str = CommandStatus.OK
        except FieldError as exc:
            status, detail = exc.status, exc.detail
        except asyncio.CancelledError:
            self._answer(cid, CommandStatus.ERROR, "the agent stopped before the command finished")
            raise
        except Exception as exc:  # a bug must still answer the command, once
            log.exception("event=field_command_crashed module=%s command=%s", module, name)
            status, detail = CommandStatus.ERROR, f"{type(exc).__name__}: {exc}"
        self._answer(cid, status, detail)

    async def _stop_fields(self, drain_s: float) -> None:
        if self._field_tasks:
            await asyncio.wait(set(self._field_tasks), timeout=drain_s)
        for task in list(self._field_tasks):
            task.cancel()  # each still-running cloud command answers `error` as it unwinds
        await asyncio.gather(*self._field_tasks, return_exceptions=True)
        for module in self.fields.values():
            await module.stop()

    # -- cloud-to-device ------------------------------------------------------------------
    def _on_command(self, topic: str, payload: bytes, retained: bool) -> None:
        self._deferred = None
        cid, status, detail = self.handle_command(topic, payload, retained=retained)
        deferred, self._deferred = self._deferred, None
        if cid is None:
            log.warning("event=command_unanswerable detail=%r", detail)
            return
        if cid in self._running_ids:
            # a redelivery of a command still running: the platform keeps the first answer
            # per id, so only the real result, sent when the command ends, may answer it
            if status == CommandStatus.OK:  # the intake forgot the id: still never twice
                self._refused(Refusal.DUPLICATE)
            log.warning("event=command_duplicate_running id=%s (answered when it ends)", cid)
            return
        if deferred is not None and status == CommandStatus.OK:
            # accepted (the intake has its id, so a replay is refused); answered when it ends
            self._spawn(deferred[0], self._field_command(cid, *deferred), cid)
            return
        self._answer(cid, status, detail)

    def _answer(self, cid: str, status: str, detail: str) -> None:
        result = {
            "id": cid, "status": status, "detail": detail[:MAX_DETAIL_LENGTH],
            "ts": int(time.time() * 1000),
        }  # fmt: skip
        self.outbox.put(self.topics[topics.Kind.COMMAND_RESULT], _dumps(result), kind="cmd-res")
        self._wake.set()

    def handle_command(
        self, topic: str, payload: bytes, *, retained: bool = False
    ) -> tuple[str | None, str, str]:
        """(command id or None, result status, detail) for one command message; `retained` is
        the MQTT retain flag it was delivered with."""
        return self.intake.answer(topic, payload, retained, self._apply, (DeviceError, EdgeError))

    def _refused(self, reason: Refusal) -> None:
        self.metrics.commands_refused.labels(reason.value).inc()
        log.warning("event=command_refused agent=%s reason=%s", self.id, reason.value)

    def _apply(self, name: str, args: dict[str, Any]) -> str:
        if name == "rules-reload":
            return self.reload_rules()
        target = args.pop("module", None)
        names = [*self.modules, *self.fields]
        if target is None and len(names) == 1:
            target = names[0]
        if target in self.fields:
            try:
                self.fields[str(target)].check_command(name, args)
            except FieldError as exc:
                raise CommandError(exc.status, exc.detail) from None
            busy = self._busy(str(target))
            if busy is not None:
                self.metrics.commands_refused.labels("busy").inc()
                raise CommandError(
                    CommandStatus.REJECTED,
                    f"rejected: busy, {busy} commands running on {target} (at most "
                    f"{MAX_FIELD_COMMANDS}); send it again when they have finished",
                )
            self._deferred = (str(target), name, args)
            return "accepted"
        if target not in self.modules:
            have = ", ".join(sorted(names))
            raise CommandError(
                CommandStatus.ERROR, f"args.module must name one of this agent's modules: {have}"
            )
        return self.modules[str(target)].command(name, args)

    def reload_rules(self) -> str:
        """Re-read the rules from the manifest file; the old ones stay if it is invalid."""
        if self.options.manifest_path is None:
            raise EdgeError("this agent was not started from a manifest file: nothing to reload")
        fresh = load_manifest(self.options.manifest_path)
        if [m.name for m in fresh.modules] != [m.name for m in self.manifest.modules]:
            raise EdgeError("rules-reload reloads rules and routes; modules changed: restart")
        self.manifest = fresh
        self.rules = {r.name: Rule(r) for r in fresh.rules}
        return f"{len(self.rules)} rule(s), {len(fresh.routes)} route(s) loaded"


def _field_module(spec: ModuleSpec, agent: EdgeAgent) -> FieldModule:
    """The field module of a manifest entry; its bus library is imported only when used."""
    if spec.kind == "opcua":
        from edge_agent.opcua import OpcUaModule

        return OpcUaModule(
            spec, home=agent.options.home, state_dir=agent.state_dir,
            default_uri=f"urn:fieldline:edge:{agent.tenant}:{agent.id}",
        )  # fmt: skip
    if spec.kind == "modbus":
        from edge_agent.modbus import ModbusModule

        return ModbusModule(spec, registry=agent.metrics.registry)
    raise EdgeError(f"module {spec.name!r}: kind {spec.kind!r} is not a field module")
