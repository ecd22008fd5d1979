"""A simulated device on the wire: birth and Will, telemetry with `seq` and `boot`, commands.

What it publishes comes from a `Source` (see `simulator.sources`); when it publishes is up to
its runner (`simulator.fleet`), so one device and ten thousand run the same code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from device_runtime.args import SetInterval
from device_runtime.boot import BootCounter
from device_runtime.errors import CommandError, LinkError
from device_runtime.intake import CommandIntake, ReplayPolicy, result_payload
from device_runtime.link import DeviceLink
from schemas import topics
from schemas.messages import CommandStatus
from simulator.commands import SensorAdd, SensorRemove, parse_args
from simulator.errors import SimulatorError

log = logging.getLogger("fieldline.sim")

FIRMWARE = "fieldline-sim 0.1.0"


class Source(Protocol):
    """Where a device's readings come from."""

    def metrics(self, now: float) -> dict[str, Any]:
        """The metrics of the next telemetry message (only sensors due at `now`)."""
        ...

    def reset(self) -> None:
        """The device was reset: models return to their initial state."""
        ...

    def add_sensor(self, spec: SensorAdd) -> None:
        """Start a sensor (`sensor-add`); CommandError when its id is taken."""
        ...

    def remove_sensor(self, sensor_id: str) -> None:
        """Stop a sensor (`sensor-remove`); CommandError when there is none of that id."""
        ...


def now_ms() -> int:
    return int(time.time() * 1000)


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


@dataclass
class DeviceStats:
    published: int = 0
    commands: int = 0
    connects: int = 0
    last_error: str = ""
    results: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)  # by reason, before they ran


class SimDevice:
    """One device identity with its own TLS connection; reconnects with backoff until stopped."""

    def __init__(
        self,
        tenant: str,
        device_id: str,
        source: Source,
        tls: ssl.SSLContext,
        host: str,
        port: int,
        *,
        interval_s: float,
        state_dir: Path,
        keepalive: int = 30,
        on_interval: Callable[[SimDevice], None] | None = None,
        replay: ReplayPolicy | None = None,
    ) -> None:
        self.tenant = topics.validate_id(tenant, "tenant id")
        self.device_id = topics.validate_id(device_id)
        self.source = source
        self.interval_s = interval_s
        self.boot_counter = BootCounter(state_dir / tenant / f"{device_id}.boot")
        self.boot = 0
        self.seq = 0
        self.stats = DeviceStats()
        # one per device and kept across reconnects and `reset`: ids answered lately
        self.intake = CommandIntake(replay)
        self.stats.refused = self.intake.refused
        self.next_due = 0.0
        self._on_interval = on_interval
        self._topics = topics.device_topics(tenant, device_id)
        self.link = DeviceLink(
            device_id,
            host,
            port,
            tls,
            keepalive=keepalive,
            on_message=self._on_message,
            on_disconnect=self._lost,
        )
        self._online = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def online(self) -> bool:
        return self.link.connected

    async def start(self) -> None:
        """Boot (increment the counter) and keep connected in the background."""
        self.boot = self.boot_counter.next()
        self.seq = 0
        self._task = asyncio.create_task(self._keep_connected(), name=f"sim-{self.device_id}")

    async def wait_online(self, timeout: float) -> None:
        """Until the first CONNACK; LinkError with the last reason if it does not come."""
        try:
            await asyncio.wait_for(self._online.wait(), timeout)
        except TimeoutError as exc:
            reason = self.stats.last_error or "no answer"
            raise LinkError(f"{self.device_id} did not come online: {reason}") from exc

    async def _keep_connected(self) -> None:
        await self.link.stay_connected(
            self._connected,
            # the Will carries this boot, so a death is told apart from the next life's
            will=lambda: (self._topics[topics.Kind.STATUS], self._status("offline", ts=False)),
            on_error=self._connect_failed,
        )

    def _connect_failed(self, error: LinkError, _delay: float) -> None:
        self.stats.last_error = str(error)
        log.warning("event=connect_failed device=%s error=%r", self.device_id, str(error))

    def _connected(self) -> None:
        self.stats.connects += 1
        self.link.subscribe(topics.device_command_filter(self.tenant, self.device_id))
        self._birth()
        self._online.set()

    def _lost(self) -> None:
        log.info("event=disconnected device=%s", self.device_id)

    def _status(self, state: str, *, ts: bool = True) -> bytes:
        body: dict[str, Any] = {"state": state, "boot": self.boot, "fw": FIRMWARE}
        if ts:
            body["ts"] = now_ms()
        return _dumps(body)

    def _birth(self) -> None:
        self.link.publish(self._topics[topics.Kind.STATUS], self._status("online"), retain=True)

    def publish_telemetry(self, now: float) -> bool:
        """One telemetry message with the source's due metrics; False when none were due."""
        metrics = self.source.metrics(now)
        if not metrics:
            return False
        self.seq += 1
        body = {"ts": now_ms(), "seq": self.seq, "boot": self.boot, "metrics": metrics}
        # published while offline too: paho keeps QoS 1 messages and sends them on reconnect
        self.link.publish(self._topics[topics.Kind.TELEMETRY], _dumps(body))
        self.stats.published += 1
        return True

    # -- commands ---------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        self.stats.commands += 1
        command_id, status, detail = self.handle_command(topic, payload, retained=retained)
        self.stats.results[status] = self.stats.results.get(status, 0) + 1
        if command_id is None:
            log.warning("event=command_unanswerable device=%s detail=%r", self.device_id, detail)
            return
        payload = result_payload(command_id, status, detail)
        self.link.publish(self._topics[topics.Kind.COMMAND_RESULT], payload)
        if status == CommandStatus.OK and topic.rsplit("/", 1)[-1] == "reset":
            self._reboot()

    def handle_command(
        self, topic: str, payload: bytes, *, retained: bool = False
    ) -> tuple[str | None, str, str]:
        """(command id or None, result status, detail) for one command message; `retained` is
        the MQTT retain flag it was delivered with."""
        return self.intake.answer(topic, payload, retained, self._apply, (SimulatorError,))

    def _apply(self, name: str, args: dict[str, Any]) -> str:
        parsed = parse_args(name, args)
        if name == "reset":
            return f"resetting: boot {self.boot} -> {self.boot + 1}, seq restarts"
        if isinstance(parsed, SetInterval):
            old, self.interval_s = self.interval_s, parsed.interval_s
            self.next_due = 0.0  # the new period starts now
            if self._on_interval is not None:
                self._on_interval(self)
            return f"interval {old:g} s -> {self.interval_s:g} s"
        if isinstance(parsed, SensorAdd):
            self.source.add_sensor(parsed)
            return f"sensor {parsed.id!r} ({parsed.type}) added"
        if isinstance(parsed, SensorRemove):
            self.source.remove_sensor(parsed.id)
            return f"sensor {parsed.id!r} removed"
        raise CommandError(CommandStatus.REJECTED, f"unknown command {name!r}")

    def _reboot(self) -> None:
        # what a real reset looks like upstream: a new boot, seq from 1, models from scratch
        self.source.reset()
        self.boot = self.boot_counter.next()
        self.seq = 0
        self._birth()

    async def stop(self) -> None:
        """Publish the offline status (a clean DISCONNECT does not fire the Will), then leave."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.link.connected:
            status = self._status("offline")
            self.link.publish(self._topics[topics.Kind.STATUS], status, retain=True)
            await self.link.drain(5.0)
        await self.link.close()
