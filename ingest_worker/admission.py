"""What one device may make the worker store: a time window, a metric budget, a dead-letter budget.

The schema checks one message at a time; these limits look across a device's messages, so
that one device with a valid certificate cannot create thousands of chunks (timestamps
spread over decades), thousands of metrics, or gigabytes of dead letters. What they refuse
becomes a dead letter with its reason, counted per reason; what they count but do not store
(dead letters past a device's budget) is counted only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta

# reasons of the worker's own admission limits (the `reason` of dead_letters)
TOO_OLD = "too_old"
METRIC_LIMIT = "metric_limit"
METRIC_RATE = "metric_rate"
CONFLICTING_VALUE = "conflicting_value"


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """Per-device limits enforced before anything reaches the tables (settings `ingest.*`)."""

    # samples older than this (or than the tenant's retention, if shorter) are refused: a
    # backfill after a week offline is normal, one from 2000 is an attack or a broken clock
    max_backfill: timedelta = timedelta(days=7)
    # distinct metric names a device may have in the metrics table
    max_metrics_per_device: int = 1000
    # metric names a device may create per minute (a token bucket with this burst): by default
    # a device may declare its whole set at once; raise the cap for gateways, not this
    new_metrics_per_minute: int = 1000
    # how much of a refused payload a dead letter keeps (its size and sha256 are kept too)
    dead_letter_payload_bytes: int = 4096
    # dead letters stored per device per minute (a token bucket); the excess is counted only
    dead_letters_per_device_per_minute: int = 60

    def __post_init__(self) -> None:
        for name in (
            "max_metrics_per_device",
            "new_metrics_per_minute",
            "dead_letters_per_device_per_minute",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"AdmissionLimits.{name} must be at least 1")
        if self.dead_letter_payload_bytes < 0:
            raise ValueError("AdmissionLimits.dead_letter_payload_bytes must not be negative")
        if self.max_backfill <= timedelta(0):
            raise ValueError("AdmissionLimits.max_backfill must be positive")


class TokenBuckets:
    """One token bucket per key, refilled at `per_minute` up to `per_minute`; bounded in keys.

    The least recently used keys are forgotten past `max_keys` (a forgotten key starts full
    again, which only ever errs towards admitting), so a flood of new device ids cannot grow
    the worker's memory.
    """

    def __init__(self, per_minute: int, max_keys: int = 100_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(per_minute)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, wanted: int, now: float) -> int:
        """Take up to `wanted` tokens for `key` at monotonic time `now`; how many were granted."""
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        granted = min(wanted, int(tokens))
        self._buckets[key] = (tokens - granted, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return granted

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True, slots=True)
class BoundedPayload:
    """What a dead letter keeps of a payload: a prefix, the full size and the full sha256."""

    prefix: bytes
    size: int
    sha256: bytes


def bound_payload(payload: bytes, keep: int) -> BoundedPayload:
    """The first `keep` bytes of `payload`, with its size and digest (to match it elsewhere)."""
    return BoundedPayload(payload[:keep], len(payload), hashlib.sha256(payload).digest())


def earliest_allowed(max_backfill: timedelta, retention_days: int | None) -> timedelta:
    """How far back from its receive time a sample may be: the shorter of the two windows."""
    if retention_days is None:
        return max_backfill
    return min(max_backfill, timedelta(days=retention_days))
