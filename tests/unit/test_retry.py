"""core.retry.Backoff: doubling, capped, jittered, reset."""

from __future__ import annotations

import pytest

from core.retry import Backoff


def test_delays_double_up_to_the_cap_each_within_half_and_all_of_its_step() -> None:
    backoff = Backoff(0.1, 1.0)
    steps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for step in steps:
        assert step / 2 <= backoff.next() <= step
    backoff.reset()
    assert 0.05 <= backoff.next() <= 0.1


def test_jitter_spreads_the_delays() -> None:
    assert len({round(Backoff(1.0, 1.0).next(), 6) for _ in range(20)}) > 1


def test_a_nonsense_range_is_refused() -> None:
    with pytest.raises(ValueError, match="0 < first <= cap"):
        Backoff(2.0, 1.0)
