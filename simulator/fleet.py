"""Many simulated devices in one process: one connection each, one vectorised model engine.

The runner steps every ARMA sensor of the fleet at once (`simulator.sources.SensorBank`) and
lets each device publish when its own interval is due. Devices are spread over the interval,
so a thousand devices at 1 s make a steady 1,000 msg/s rather than a burst each second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from certs import Bundle, CertsError, Pki, Role, client_context
from device_runtime.intake import ReplayPolicy
from schemas import topics
from simulator.device import SimDevice
from simulator.errors import SimulatorError
from simulator.sources import SensorBank, make_source

log = logging.getLogger("fieldline.sim")

Kind = Literal["arma", "pico", "machine"]
KINDS: tuple[Kind, ...] = ("arma", "pico", "machine")


@dataclass(frozen=True)
class FleetConfig:
    """What to simulate and where to send it."""

    tenant: str
    devices: int = 1
    sensors: int = 2
    interval_s: float = 1.0
    kind: Kind = "arma"
    prefix: str = "sim"
    ids: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8883
    keepalive: int = 30
    seed: int | None = None
    connect_concurrency: int = 32
    replay: ReplayPolicy = field(default_factory=ReplayPolicy)  # per device: see ReplayPolicy


def device_ids(config: FleetConfig) -> list[str]:
    """The fleet's ids: the ones given, or `<prefix>-0001` ... numbered from 1."""
    if config.ids:
        ids = list(config.ids)
    else:
        width = max(4, len(str(config.devices)))
        ids = [f"{config.prefix}-{n:0{width}d}" for n in range(1, config.devices + 1)]
    for device_id in ids:
        topics.validate_id(device_id)
    return ids


def tls_context(bundle_dir: Path) -> ssl.SSLContext:
    """A device's TLS: verify the broker against the bundle's CA, present its own certificate."""
    try:
        return client_context(bundle_dir)
    except CertsError as exc:
        raise SimulatorError(
            f"{exc}: issue it with `fieldline certs issue ID --tenant T --role device` or "
            "point --certs at a directory of bundles named by device id"
        ) from exc


def bundle_dirs(
    ids: Sequence[str], tenant: str, *, pki: Pki | None, certs_dir: Path | None
) -> dict[str, Path]:
    """Where each device's bundle is: read from `certs_dir/<id>/`, or issued on demand."""
    if certs_dir is not None:
        return {device_id: certs_dir / device_id for device_id in ids}
    if pki is None or not pki.exists():
        raise SimulatorError(
            "no CA to issue device certificates from: run `fieldline certs init-ca` "
            "or give --certs DIR with a bundle per device id"
        )
    have = pki.bundles(ids)
    wrong = [i for i, b in have.items() if b.identity.tenant != tenant]
    if wrong:
        raise SimulatorError(
            f"{len(wrong)} device id(s) already belong to another tenant (e.g. {wrong[0]!r}); "
            "choose another --prefix"
        )
    missing = [i for i in ids if i not in have]
    if missing:
        log.info("event=issuing_certificates count=%d tenant=%s", len(missing), tenant)
        for bundle in pki.issue_many(missing, tenant=tenant, role=Role.DEVICE):
            have[bundle.identity.id] = bundle
    return {device_id: _dir(have[device_id]) for device_id in ids}


def _dir(bundle: Bundle) -> Path:
    return bundle.directory


def falling_behind(requested: float, achieved: float, unacknowledged: int, window: float) -> bool:
    """The fleet's verdict: below 95% of the requested rate over the last window, or more
    than two seconds' worth of messages waiting for PUBACK; none before 80% of a window."""
    if window < 0.8:
        return False  # a fleet that just started is not behind
    return achieved < 0.95 * requested or unacknowledged > 2 * requested


@dataclass
class FleetStats:
    """What the live view and the benchmark show."""

    devices: int = 0
    online: int = 0
    requested_rate: float = 0.0
    achieved_rate: float = 0.0
    published: int = 0
    unacknowledged: int = 0
    commands: int = 0
    refused: int = 0  # commands refused before they ran: retained, repeated, out of time
    behind: bool = False
    tick_ms: float = 0.0
    last_error: str = ""


@dataclass
class _Rate:
    window_s: float = 5.0
    points: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, now: float, total: int) -> float:
        self.points.append((now, total))
        while self.points and now - self.points[0][0] > self.window_s:
            self.points.popleft()
        first_t, first_n = self.points[0]
        return (total - first_n) / (now - first_t) if now > first_t else 0.0


class Fleet:
    """N device identities with their own certificates and connections; `run()` publishes."""

    def __init__(
        self,
        config: FleetConfig,
        bundles: dict[str, Path],
        state_dir: Path,
    ) -> None:
        if config.interval_s <= 0:
            raise SimulatorError("--interval must be more than 0 seconds")
        self.config = config
        self.bank = SensorBank(seed=config.seed)
        self.devices: list[SimDevice] = []
        for device_id, bundle_dir in bundles.items():
            source = make_source(
                config.kind, self.bank, config.sensors, interval_s=config.interval_s
            )
            device = SimDevice(
                config.tenant,
                device_id,
                source,
                tls_context(bundle_dir),
                config.host,
                config.port,
                interval_s=config.interval_s,
                state_dir=state_dir,
                keepalive=config.keepalive,
                on_interval=self._interval_changed,
                replay=config.replay,
            )
            self.devices.append(device)
        self.tick_s = config.interval_s
        self.stats = FleetStats(devices=len(self.devices))
        self._rate = _Rate()
        self._stop = asyncio.Event()
        self._updated = 0.0

    def _interval_changed(self, _device: SimDevice) -> None:
        # the models step as often as the fastest device publishes
        self.tick_s = min(d.interval_s for d in self.devices)

    async def start(self, timeout: float = 60.0) -> None:
        """Boot every device and wait until all are connected (LinkError names one that is not)."""
        gate = asyncio.Semaphore(self.config.connect_concurrency)

        async def boot(device: SimDevice) -> None:
            async with gate:
                await device.start()
                await device.wait_online(timeout)

        await asyncio.gather(*(boot(d) for d in self.devices))
        now = time.monotonic()
        n = len(self.devices)
        for i, device in enumerate(self.devices):
            device.next_due = now + device.interval_s * i / n  # spread over the interval

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, seconds: float | None = None) -> FleetStats:
        """Publish until `seconds` have passed or `request_stop()`; the final stats."""
        started = time.monotonic()
        next_model = started
        # the scheduler wakes often enough to keep every device on time without spinning
        resolution = min(0.05, self.config.interval_s / 10)
        while not self._stop.is_set():
            now = time.monotonic()
            if seconds is not None and now - started >= seconds:
                break
            if now >= next_model:
                t0 = time.perf_counter()
                self.bank.step()
                self.stats.tick_ms = (time.perf_counter() - t0) * 1000
                next_model += self.tick_s
                if next_model < now:  # the models fell behind: skip, do not burst
                    next_model = now + self.tick_s
            wall = time.time()
            for device in self.devices:
                if device.next_due <= now:
                    device.publish_telemetry(wall)
                    device.next_due += device.interval_s
                    if device.next_due < now - device.interval_s:
                        device.next_due = now + device.interval_s
            if now - self._updated >= 0.5:
                self._update(now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), resolution)
        self._update(time.monotonic())
        return self.stats

    def _update(self, now: float) -> None:
        self._updated = now
        stats = self.stats
        stats.online = sum(1 for d in self.devices if d.online)
        stats.published = sum(d.stats.published for d in self.devices)
        stats.unacknowledged = sum(d.link.unacknowledged() for d in self.devices)
        stats.commands = sum(d.stats.commands for d in self.devices)
        stats.refused = sum(sum(d.stats.refused.values()) for d in self.devices)
        stats.requested_rate = sum(1.0 / d.interval_s for d in self.devices)
        stats.achieved_rate = self._rate.add(now, stats.published)
        span = now - self._rate.points[0][0] if self._rate.points else 0.0
        stats.behind = falling_behind(
            stats.requested_rate, stats.achieved_rate, stats.unacknowledged,
            span / self._rate.window_s,
        )  # fmt: skip
        errors = [d.stats.last_error for d in self.devices if d.stats.last_error and not d.online]
        stats.last_error = errors[0] if errors else ""

    async def stop(self) -> None:
        """Offline status from every device, then disconnect."""
        await asyncio.gather(*(d.stop() for d in self.devices), return_exceptions=True)
