"""The admission module's pure parts: token buckets, bounded payloads, the time window."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest

from ingest_worker.admission import (
    AdmissionLimits,
    TokenBuckets,
    bound_payload,
    earliest_allowed,
)


def test_a_bucket_grants_its_burst_then_refills_at_its_rate() -> None:
    buckets = TokenBuckets(per_minute=60)
    assert buckets.take("a", 100, now=0.0) == 60  # the burst, not more
    assert buckets.take("a", 1, now=0.0) == 0
    assert buckets.take("a", 5, now=2.5) == 2  # one a second
    assert buckets.take("b", 10, now=2.5) == 10  # every key has its own
    assert buckets.take("a", 100, now=1000.0) == 60  # never above the burst


def test_buckets_forget_the_least_recently_used_keys_past_their_bound() -> None:
    buckets = TokenBuckets(per_minute=10, max_keys=3)
    for key in "abcd":
        buckets.take(key, 10, now=0.0)
    assert len(buckets) == 3
    assert buckets.take("a", 10, now=0.0) == 10  # forgotten: starts full (errs to admitting)
    assert buckets.take("d", 10, now=0.0) == 0  # remembered: still empty


def test_a_bounded_payload_keeps_a_prefix_the_size_and_the_digest() -> None:
    payload = b"x" * 10_000
    kept = bound_payload(payload, 100)
    assert kept.prefix == payload[:100]
    assert kept.size == 10_000
    assert kept.sha256 == hashlib.sha256(payload).digest()
    assert bound_payload(b"short", 100).prefix == b"short"


def test_the_window_is_the_shorter_of_backfill_and_retention() -> None:
    week = timedelta(days=7)
    assert earliest_allowed(week, None) == week
    assert earliest_allowed(week, 2) == timedelta(days=2)
    assert earliest_allowed(week, 30) == week


@pytest.mark.parametrize(
    "field",
    ["max_metrics_per_device", "new_metrics_per_minute", "dead_letters_per_device_per_minute"],
)
def test_limits_below_one_are_refused(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AdmissionLimits(**{field: 0})  # type: ignore[arg-type]
