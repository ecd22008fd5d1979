"""What one device on the gateway's LAN may send: budgets per device, checked at the listener.

Everything a LAN device sends shares the agent's outbox, its upstream link and its upstream
identity (ingest limits metric names per device: the agent is one device there), and the
outbox merges everybody's samples into one backlog message that ingest refuses as a whole
for one bad sample. So one hostile or broken device could evict the others' readings,
spend the agent's metric-name budget upstream, or dead-letter everybody's backlog. Here each
device has a token bucket of readings and of payload bytes per second, a cap on the metric
names it may introduce (and the listener on all of them), and each sample and metric is
checked as it will travel upstream; what is refused is counted and told as a rate-limited
`lan_refused` event, never one log line per message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.settings import EdgeSettings, IngestSettings
from edge_agent.throttle import EventThrottle
from schemas.messages import metric_problem

MAX_BUCKETS = 4096  # devices with a budget in memory; idle (full) ones are forgotten first

_EDGE = EdgeSettings()


@dataclass(frozen=True)
class LanLimits:
    """Per-device budgets of a listener; the defaults are core.settings' (`edge.*`)."""

    readings_per_s: float = _EDGE.lan_readings_per_s
    bytes_per_s: float = _EDGE.lan_bytes_per_s
    burst_s: float = _EDGE.lan_burst_s
    metrics_per_device: int = _EDGE.lan_metrics_per_device
    metrics_per_listener: int = _EDGE.lan_metrics_per_listener
    max_age_s: float = IngestSettings().max_backfill_s

    @classmethod
    def from_settings(cls, edge: EdgeSettings, ingest: IngestSettings) -> LanLimits:
        """The limits of the configured settings."""
        return cls(
            readings_per_s=edge.lan_readings_per_s,
            bytes_per_s=edge.lan_bytes_per_s,
            burst_s=edge.lan_burst_s,
            metrics_per_device=edge.lan_metrics_per_device,
            metrics_per_listener=edge.lan_metrics_per_listener,
            max_age_s=ingest.max_backfill_s,
        )


Tell = Callable[[str, str, dict[str, Any]], None]
"""(device, message, data): a warning `lan_refused` event for the agent's `events` topic."""
Count = Callable[[str, str, int], None]
"""(what, reason, n): `messages` or `samples` or `metrics` refused for `reason`."""


class _Bucket:
    """Two token buckets (readings, bytes) that may go into debt by one message."""

    __slots__ = ("bytes", "readings", "stamp")

    def __init__(self, limits: LanLimits, now: float) -> None:
        self.readings = limits.readings_per_s * limits.burst_s
        self.bytes = limits.bytes_per_s * limits.burst_s
        self.stamp = now

    def refill(self, limits: LanLimits, now: float) -> None:
        elapsed = max(0.0, now - self.stamp)
        self.stamp = now
        self.readings = min(
            limits.readings_per_s * limits.burst_s,
            self.readings + elapsed * limits.readings_per_s,
        )
        self.bytes = min(
            limits.bytes_per_s * limits.burst_s, self.bytes + elapsed * limits.bytes_per_s
        )

    def full(self, limits: LanLimits) -> bool:
        return (
            self.readings >= limits.readings_per_s * limits.burst_s
            and self.bytes >= limits.bytes_per_s * limits.burst_s
        )


class LanGuard:
    """One listener's per-device budgets; the listener asks it about every message."""

    def __init__(
        self,
        listener: str,
        limits: LanLimits,
        tell: Tell,
        count: Count,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.listener = listener
        self.limits = limits
        self._tell_event = tell
        self._count = count
        self._clock = clock
        self._monotonic = monotonic
        self._buckets: dict[str, _Bucket] = {}
        self._names: dict[str, set[str]] = {}  # device -> metric names it has sent upstream
        self.names = 0  # all devices' names together
        self._told = EventThrottle(monotonic)  # one event per (device, reason) a minute

    # -- per message ---------------------------------------------------------------------
    def admit_bytes(self, device: str, size: int) -> bool:
        """Whether a payload of `size` bytes fits the device's byte budget (taken if so)."""
        bucket = self._bucket(device)
        if bucket.bytes <= 0:
            self.refuse(
                device, "bytes",
                f"{device} sends more than {self.limits.bytes_per_s:.0f} bytes/s "
                f"(edge.lan_bytes_per_s, bursts of {self.limits.burst_s:g} s); its messages "
                "are dropped until it slows down",
            )  # fmt: skip
            return False
        bucket.bytes -= size
        return True

    def admit_readings(self, device: str, readings: int) -> bool:
        """Whether `readings` samples fit the device's reading budget (taken if so)."""
        bucket = self._bucket(device)
        if bucket.readings <= 0:
            self.refuse(
                device, "rate",
                f"{device} sends more than {self.limits.readings_per_s:g} readings/s "
                f"(edge.lan_readings_per_s, bursts of {self.limits.burst_s:g} s); its messages "
                "are dropped until it slows down",
            )  # fmt: skip
            return False
        bucket.readings -= readings
        return True

    def refuse(self, device: str, reason: str, message: str) -> None:
        """Count one refused message and tell it (rate-limited)."""
        self._count("messages", reason, 1)
        self._tell(device, reason, message)

    # -- per sample and metric ---------------------------------------------------------------
    def too_old(self, device: str, ts_ms: int) -> bool:
        """True (counted, told) for a sample older than ingest would store."""
        age_s = self._clock() - ts_ms / 1000
        if age_s <= self.limits.max_age_s:
            return False
        self._count("samples", "too_old", 1)
        self._tell(
            device, "too_old",
            f"{device} sent a sample {age_s / 86400:.1f} days old (ingest stores at most "
            f"{self.limits.max_age_s / 86400:g}, ingest.max_backfill_s); it is dropped",
        )  # fmt: skip
        return True

    def metrics(self, device: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """The metrics that may go on: valid as named upstream, within the name budgets."""
        known = self._names.setdefault(device, set())
        kept: dict[str, Any] = {}
        for name, value in metrics.items():
            upstream = f"{self.listener}.{device}.{name}"
            if name not in known:
                problem = metric_problem(upstream, value)
                if problem is not None:
                    self._count("metrics", "name", 1)
                    self._tell(device, "name", f"{problem}; that metric is dropped")
                    continue
                if len(known) >= self.limits.metrics_per_device:
                    limit = self.limits.metrics_per_device
                    self._over(device, "edge.lan_metrics_per_device", limit, name)
                    continue
                if self.names >= self.limits.metrics_per_listener:
                    limit = self.limits.metrics_per_listener
                    self._over(device, "edge.lan_metrics_per_listener", limit, name)
                    continue
                known.add(name)
                self.names += 1
            kept[f"{device}.{name}"] = value
        return kept

    def _over(self, device: str, setting: str, limit: int, name: str) -> None:
        self._count("metrics", "metric_limit", 1)
        self._tell(
            device, "metric_limit",
            f"{device}: new metric {name!r} dropped: at most {limit} metric names ({setting}); "
            "the names it already has still go on",
        )  # fmt: skip

    # -- internals ---------------------------------------------------------------------------
    def _bucket(self, device: str) -> _Bucket:
        now = self._monotonic()
        bucket = self._buckets.get(device)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_idle(now)
            bucket = self._buckets[device] = _Bucket(self.limits, now)
        else:
            bucket.refill(self.limits, now)
        return bucket

    def _forget_idle(self, now: float) -> None:
        # a full bucket is what a new one would be: forgetting it changes nothing
        for device, bucket in list(self._buckets.items()):
            bucket.refill(self.limits, now)
            if bucket.full(self.limits):
                del self._buckets[device]

    def _tell(self, device: str, reason: str, message: str) -> None:
        since = self._told.due((device, reason))
        if since is None:
            return
        data = {"listener": self.listener, "device": device, "reason": reason, "suppressed": since}
        self._tell_event(device, message[:900], data)
