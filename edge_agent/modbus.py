"""A module of kind `modbus`: a PLC or meter over Modbus TCP, polled every `interval_s`.

Each poll reads the module's points in as few requests as the plan allows (adjacent
addresses of one table share a read) and emits one reading. A poll that fails (no
connection, no answer within `timeout_s`, a Modbus exception response) emits no value for
the points it could not read, never a zero, and is reported as an event; the first failure
of an outage is reported at once, a lasting one every REPORT_EVERY_S, and the end of it
with the gap it left. The connection is re-made with core.retry.Backoff.
Commands `write-coil` and `write-register` (edge_agent/registers.py) write the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from core.retry import Backoff
from edge_agent.field import ERROR, REJECTED, Emit, EmitEvent, FieldError
from edge_agent.manifest import ModuleSpec
from edge_agent.registers import (
    WRITE_COIL,
    Layout,
    ReadRequest,
    RegisterError,
    Write,
    WriteArgsError,
    parse_write,
    plan_reads,
)

log = logging.getLogger("fieldline.edge")

REPORT_EVERY_S = 60.0  # a lasting failure is reported again this often, not at every poll
RECONNECT_CAP_S = 30.0
# Modbus exception codes (Modbus Application Protocol v1.1b3, section 7)
EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
CONNECTION = "connection"


class PollFailedError(Exception):
    """A read the device did not answer with values (one line, for events); `answered`
    when the device did answer (an exception response), so the connection works."""

    def __init__(self, text: str, *, answered: bool = False) -> None:
        super().__init__(text)
        self.answered = answered


class _Metrics:
    """Modbus counters, labelled by module, once per agent registry."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.polls = Counter(
            "fieldline_edge_modbus_polls", "Polls of a Modbus module, by outcome (ok, failed)",
            ["module", "outcome"], registry=r,
        )  # fmt: skip
        self.read_errors = Counter(
            "fieldline_edge_modbus_read_errors",
            "Reads that returned no values: timeout, connection, Modbus exception",
            ["module", "reason"], registry=r,
        )  # fmt: skip
        self.connects = Counter(
            "fieldline_edge_modbus_connects", "Connections made to the device", ["module"],
            registry=r,
        )  # fmt: skip
        self.overruns = Counter(
            "fieldline_edge_modbus_poll_overruns",
            "Polls that took longer than interval_s (the next one started late)",
            ["module"], registry=r,
        )  # fmt: skip
        self.writes = Counter(
            "fieldline_edge_modbus_writes", "Writes to the device, by outcome (ok, failed)",
            ["module", "outcome"], registry=r,
        )  # fmt: skip


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()


def _metrics(registry: CollectorRegistry | None) -> _Metrics:
    if registry is None:
        return _Metrics(CollectorRegistry())  # an unattached module: counters of its own
    if registry not in _METRICS:
        _METRICS[registry] = _Metrics(registry)
    return _METRICS[registry]


@dataclass
class _Outage:
    """A failure that lasts: when it began, how many polls it cost, when it was last told."""

    error: str
    since: float  # wall clock
    reported: float  # monotonic
    failed: int = 1


@dataclass
class PollResult:
    """One poll: the values read (by metric) and the failures (by read, one line each)."""

    values: dict[str, bool | int | float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    ok: set[str] = field(default_factory=set)  # reads (and values) that worked
    answered: bool = False  # the device answered at least one request


class ModbusModule:
    """A Modbus TCP device (edge_agent/field.py's FieldModule): start, poll, write, stop."""

    kind = "modbus"

    def __init__(self, spec: ModuleSpec, *, registry: CollectorRegistry | None = None) -> None:
        if spec.host is None:
            raise ValueError(f"module {spec.name!r}: a modbus module needs host")
        self.name = spec.name
        self.spec = spec
        self.host, self.port, self.unit = spec.host, spec.modbus_port, spec.unit_id
        self.points = list(spec.points)
        self.layouts: dict[str, Layout] = {p.metric: p.layout for p in self.points}
        self._index = {p.metric: i for i, p in enumerate(self.points)}
        self.plan: list[ReadRequest] = plan_reads(
            [p.layout.span for p in self.points], spec.max_gap
        )
        self.metrics = _metrics(registry)
        self.client: AsyncModbusTcpClient | None = None
        self.polls_ok = 0
        self.polls_failed = 0
        self._emit: Emit | None = None
        self._event: EmitEvent | None = None
        self._task: asyncio.Task[None] | None = None
        self._outages: dict[str, _Outage] = {}
        self._last_ts = 0

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The polling task while started, else None."""
        return self._task

    @property
    def where(self) -> str:
        """`host:port unit N`, for messages."""
        return f"{self.host}:{self.port} unit {self.unit}"

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, emit: Emit, event: EmitEvent) -> None:
        """Start polling in the background; a device that is down is retried, not raised."""
        self._emit, self._event = emit, event
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"modbus-{self.name}")

    async def stop(self) -> None:
        """Stop polling and close the connection; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._close()

    def _close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()

    async def _connect(self) -> bool:
        self._close()
        # no retries of its own and no reconnects of its own: this module decides both
        client = AsyncModbusTcpClient(
            self.host, port=self.port, timeout=self.spec.timeout_s, retries=0,
            reconnect_delay=0, name=f"modbus-{self.name}",
        )  # fmt: skip
        try:
            ok = await client.connect()
        except (OSError, ModbusException):
            ok = False
        if not ok:
            client.close()
            return False
        self.client = client
        self.metrics.connects.labels(self.name).inc()
        log.info("event=modbus_connected module=%s device=%s", self.name, self.where)
        return True

    async def _run(self) -> None:
        backoff = Backoff(min(1.0, self.spec.interval_s), RECONNECT_CAP_S)
        while True:
            try:
                await self._cycle(backoff)
            except Exception as exc:  # a buggy or hostile device must not end polling
                error = f"unexpected {type(exc).__name__}: {exc}"[:300]
                log.warning("event=modbus_error module=%s error=%r", self.name, error)
                with contextlib.suppress(Exception):
                    self._close()
                    self._account(PollResult(failures={CONNECTION: error}))  # rate-limited
                await asyncio.sleep(backoff.next())

    async def _cycle(self, backoff: Backoff) -> None:
        """Connect (with backoff) and poll every interval_s until something raises."""
        interval = self.spec.interval_s
        due = time.monotonic()
        while True:
            if self.client is None or not self.client.connected:
                if not await self._connect():
                    error = f"cannot connect to {self.where} (refused or unreachable)"
                    self._account(PollResult(failures={CONNECTION: error}))
                    await asyncio.sleep(backoff.next())
                    due = time.monotonic()
                    continue
                backoff.reset()
            result = await self.poll()
            if self.client is None or not self.client.connected:
                # the connection broke during the poll: nothing of it counts; reconnect
                lost = next(iter(result.failures.values()), "connection lost")
                self._account(PollResult(failures={CONNECTION: lost}))
                self._close()
                continue
            self._account(result)
            due += interval
            now = time.monotonic()
            if due < now:  # the poll ran over its interval: start the next one now
                self.metrics.overruns.labels(self.name).inc()
                due = now
            await asyncio.sleep(due - now)

    # -- polling --------------------------------------------------------------------------
    async def poll(self) -> PollResult:
        """Read every planned request once; what failed is in `failures`, never a value."""
        result = PollResult()
        for request in self.plan:
            key = _read_key(request)
            try:
                words = await self._read(request)
            except PollFailedError as exc:
                result.failures[key] = str(exc)
                result.answered |= exc.answered
                if self.client is None or not self.client.connected:
                    break  # the rest would fail the same way
                continue
            result.answered = True
            result.ok.add(key)
            for i in request.members:
                point = self.points[i]
                span = point.layout.span
                offset = span.address - request.address
                try:
                    value = point.layout.value(words[offset : offset + span.count])
                except RegisterError as exc:
                    result.failures[f"value {point.metric}"] = f"{point.metric}: {exc}"
                    continue
                if isinstance(value, float) and not math.isfinite(value):
                    result.failures[f"value {point.metric}"] = (
                        f"{point.metric} at {point.table} {point.address} holds {value!r}, "
                        "not a number"
                    )
                    continue
                result.ok.add(f"value {point.metric}")
                result.values[point.metric] = value
        if result.answered:
            result.ok.add(CONNECTION)  # the device answered: the connection works
        return result

    async def _read(self, request: ReadRequest) -> list[int] | list[bool]:
        client = self.client
        if client is None:
            raise PollFailedError(f"not connected to {self.where}")
        call = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }[request.table]
        try:
            response: ModbusPDU = await call(
                request.address, count=request.count, device_id=self.unit
            )
        except (TimeoutError, ModbusException, OSError) as exc:
            reason = (
                "timeout" if isinstance(exc, ModbusIOException | TimeoutError) else "connection"
            )
            self.metrics.read_errors.labels(self.name, reason).inc()
            text = f"no answer within {self.spec.timeout_s:g} s" if reason == "timeout" else "lost"
            raise PollFailedError(f"{_read_key(request)} from {self.where}: {text}") from None
        if response.isError():
            code = response.exception_code
            self.metrics.read_errors.labels(self.name, "exception").inc()
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            raise PollFailedError(
                f"{_read_key(request)} from {self.where}: Modbus exception {code} ({name})",
                answered=True,
            )
        if request.table in ("coil", "discrete"):
            bits = list(response.bits)
            if len(bits) < request.count:  # a byte_count of 0, or too few bytes
                raise PollFailedError(
                    f"{_read_key(request)}: {len(bits)} bits in the answer", answered=True
                )
            return bits[: request.count]
        registers = list(response.registers)
        if len(registers) < request.count:
            raise PollFailedError(
                f"{_read_key(request)}: {len(registers)} registers in the answer", answered=True
            )
        return registers[: request.count]

    def _account(self, result: PollResult) -> None:
        """Emit the poll's values, count it, and tell what failed or recovered."""
        wall = time.time()
        if result.values:
            self.polls_ok += 1
            self.metrics.polls.labels(self.name, "ok").inc()
            ts = max(int(wall * 1000), self._last_ts + 1)  # one row per metric and ms
            self._last_ts = ts
            metrics = {metric: self._shape(metric, v) for metric, v in result.values.items()}
            if self._emit is not None:
                self._emit({"ts": ts, "metrics": metrics})
        else:
            self.polls_failed += 1
            self.metrics.polls.labels(self.name, "failed").inc()
        self._recovered([k for k in self._outages if k in result.ok], wall)
        self._failed(result.failures, wall)

    def _shape(self, metric: str, value: bool | int | float) -> Any:
        point = self.points[self._index[metric]]
        if point.storage_kind == "bool":
            value = bool(value)
        elif isinstance(value, bool):
            value = int(value)
        return value if point.unit is None else {"v": value, "u": point.unit}

    @property
    def last_ts(self) -> int:
        """The timestamp (epoch ms) of the last reading emitted; 0 before the first."""
        return self._last_ts

    @property
    def outages(self) -> dict[str, str]:
        """What is failing now: read (or `connection`) -> the last error."""
        return {key: outage.error for key, outage in self._outages.items()}

    # -- events: one per poll at most; an outage is told when it begins, again every
    # REPORT_EVERY_S while it lasts, and when it ends, with the gap it left
    def _failed(self, failures: dict[str, str], wall: float) -> None:
        now = time.monotonic()
        tell: dict[str, str] = {}
        for key, error in failures.items():
            outage = self._outages.get(key)
            if outage is None:
                self._outages[key] = _Outage(error, wall, now)
                tell[key] = error
                continue
            outage.failed += 1
            outage.error = error
            if now - outage.reported >= REPORT_EVERY_S:
                outage.reported = now
                tell[key] = error
        if not tell:
            return
        since = min(self._outages[k].since for k in tell)
        lasting = f" for {wall - since:.0f} s" if wall - since >= 1 else ""
        self._tell(
            "warning", "modbus_poll_failed",
            f"{self.name}: no values{lasting}: " + "; ".join(tell.values()),
            {"device": self.where, "errors": tell, "from": int(since * 1000),
             "failed_polls": max(self._outages[k].failed for k in tell)},
        )  # fmt: skip

    def _recovered(self, keys: list[str], wall: float) -> None:
        if not keys:
            return
        ended = [self._outages.pop(key) for key in keys]
        since = min(o.since for o in ended)
        failed = max(o.failed for o in ended)
        self._tell(
            "info", "modbus_poll_resumed",
            f"{self.name}: {', '.join(keys)} answering again after {wall - since:.1f} s "
            f"({failed} failed polls)",
            {"device": self.where, "reads": keys, "gap_s": round(wall - since, 3),
             "failed_polls": failed, "from": int(since * 1000), "to": int(wall * 1000)},
        )  # fmt: skip

    def _tell(self, severity: str, kind: str, message: str, data: dict[str, Any]) -> None:
        if self._event is not None:
            self._event(severity, kind, message, data)
        else:
            log.warning("event=%s module=%s message=%r", kind, self.name, message)

    # -- commands -------------------------------------------------------------------------
    def check_command(self, name: str, args: dict[str, Any]) -> None:
        """`write-coil` / `write-register` with arguments that name a writable point."""
        self._parse(name, args)

    def _parse(self, name: str, args: dict[str, Any]) -> Write:
        try:
            return parse_write(name, dict(args), self.layouts)
        except WriteArgsError as exc:
            raise FieldError(f"{self.name}: {exc}", REJECTED) from None

    async def command(self, name: str, args: dict[str, Any]) -> str:
        """Write a coil or holding registers; the detail says what was written."""
        write = self._parse(name, args)
        client = self.client
        if client is None or not client.connected:
            self.metrics.writes.labels(self.name, "failed").inc()
            raise FieldError(f"{self.name}: not connected to {self.where}; nothing written", ERROR)
        try:
            if name == WRITE_COIL:
                response = await client.write_coil(
                    write.address, bool(write.bit), device_id=self.unit
                )
            elif len(write.registers) == 1:
                response = await client.write_register(
                    write.address, write.registers[0], device_id=self.unit
                )
            else:
                response = await client.write_registers(
                    write.address, list(write.registers), device_id=self.unit
                )
        except (TimeoutError, ModbusException, OSError):
            self.metrics.writes.labels(self.name, "failed").inc()
            raise FieldError(
                f"{self.name}: {write.text}: no answer from {self.where} within "
                f"{self.spec.timeout_s:g} s; the write may or may not have happened",
                ERROR,
            ) from None
        if response.isError():
            self.metrics.writes.labels(self.name, "failed").inc()
            code = response.exception_code
            name_ = EXCEPTION_NAMES.get(code, "unknown exception")
            raise FieldError(f"{self.name}: {write.text}: Modbus exception {code} ({name_})", ERROR)
        self.metrics.writes.labels(self.name, "ok").inc()
        log.info("event=modbus_written module=%s write=%r", self.name, write.text)
        return f"{self.name}: {write.text}"


def _read_key(request: ReadRequest) -> str:
    last = request.address + request.count - 1
    where = f"{request.address}" if last == request.address else f"{request.address}..{last}"
    return f"{request.table} {where}"
