"""Per-token bounds: a token bucket of requests, and a count of open live streams."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# keys (tokens, client addresses) kept at most: past it those idle long enough to have a
# full bucket are forgotten, then the oldest
MAX_KEYS = 10_000


@dataclass
class _Bucket:
    level: float
    at: float


class RateLimiter:
    """Token bucket per key: `burst` requests at once, then `rate_per_s` a second."""

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, key: str) -> bool:
        """Take one request from the key's bucket; False when it is empty."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_KEYS:
                self._forget_full(now)
            while len(self._buckets) >= MAX_KEYS:
                # still full (many keys, none idle): the oldest key starts over with a full
                # bucket, which errs towards admitting; memory stays bounded either way
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.level = min(self.burst, self._level(bucket, now))
        bucket.at = now
        if bucket.level < 1.0:
            return False
        bucket.level -= 1.0
        return True

    def holds(self, key: str) -> bool:
        """Whether the key's bucket holds a request now (nothing is taken)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return True
        return self._level(bucket, self.clock()) >= 1.0

    def retry_after(self, key: str) -> float:
        """Seconds until the key's bucket holds a request again."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        return max(0.0, (1.0 - self._level(bucket, self.clock())) / self.rate)

    def _level(self, bucket: _Bucket, now: float) -> float:
        """The bucket's level refilled up to `now` (not capped at the burst)."""
        return bucket.level + (now - bucket.at) * self.rate

    def __len__(self) -> int:
        return len(self._buckets)

    def _forget_full(self, now: float) -> None:
        for key, bucket in list(self._buckets.items()):
            if self._level(bucket, now) >= self.burst:
                del self._buckets[key]


class StreamSlots:
    """At most `per_key` open streams per key."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._open: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        """Take a slot; False when the key has `per_key` open already."""
        held = self._open.get(key, 0)
        if held >= self.per_key:
            return False
        self._open[key] = held + 1
        return True

    def release(self, key: str) -> None:
        """Give a slot back (when the stream ends, however it ends)."""
        held = self._open.get(key, 0) - 1
        if held <= 0:
            self._open.pop(key, None)
        else:
            self._open[key] = held

    def total(self) -> int:
        """Streams open over all keys."""
        return sum(self._open.values())
