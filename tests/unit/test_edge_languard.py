"""The per-device budgets of a LAN listener (edge_agent/languard.py), on fake clocks."""

from __future__ import annotations

from typing import Any

from core.settings import EdgeSettings, IngestSettings
from edge_agent import languard, throttle
from edge_agent.languard import LanGuard, LanLimits

NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def guard(limits: LanLimits, clock: Clock) -> tuple[LanGuard, list[Any], dict[Any, int]]:
    told: list[Any] = []
    counts: dict[Any, int] = {}

    def count(what: str, reason: str, n: int) -> None:
        counts[(what, reason)] = counts.get((what, reason), 0) + n

    g = LanGuard(
        "lan", limits, lambda d, m, data: told.append((d, m, data)), count,
        clock=lambda: NOW, monotonic=clock,
    )  # fmt: skip
    return g, told, counts


def test_defaults_are_the_settings() -> None:
    assert LanLimits() == LanLimits.from_settings(EdgeSettings(), IngestSettings())


def test_bytes_budget_refuses_then_refills() -> None:
    clock = Clock()
    g, told, counts = guard(LanLimits(bytes_per_s=100, burst_s=2), clock)
    assert g.admit_bytes("d", 150)  # 200 in the bucket
    assert g.admit_bytes("d", 150)  # one message may go into debt
    assert not g.admit_bytes("d", 1)
    assert counts == {("messages", "bytes"): 1}
    assert told[0][2]["reason"] == "bytes"
    assert g.admit_bytes("other", 1), "another device has its own budget"
    clock.t = 1.5  # -100 + 150
    assert g.admit_bytes("d", 1)


def test_readings_budget_counts_samples() -> None:
    clock = Clock()
    g, _, counts = guard(LanLimits(readings_per_s=1, burst_s=5), clock)
    assert g.admit_readings("d", 1000)  # a backlog message fits whole...
    assert not g.admit_readings("d", 1)  # ...and the device waits for its debt to refill
    clock.t = 990
    assert not g.admit_readings("d", 1)
    clock.t = 1000
    assert g.admit_readings("d", 1)
    assert counts == {("messages", "rate"): 2}


def test_name_budgets_per_device_and_per_listener() -> None:
    g, _, counts = guard(LanLimits(metrics_per_device=3, metrics_per_listener=4), Clock())
    assert g.metrics("a", {"x": 1, "y": 2, "z": 3, "w": 4}) == {"a.x": 1, "a.y": 2, "a.z": 3}
    assert g.metrics("a", {"x": 5, "w": 6}) == {"a.x": 5}, "known names still go on"
    assert g.metrics("b", {"p": 1, "q": 2}) == {"b.p": 1}
    assert g.names == 4
    assert counts == {("metrics", "metric_limit"): 3}


def test_a_name_too_long_upstream_is_dropped_alone() -> None:
    g, told, counts = guard(LanLimits(), Clock())
    assert g.metrics("dev", {"x" * 60: 1, "ok": 2}) == {"dev.ok": 2}
    assert counts == {("metrics", "name"): 1}
    assert "invalid" in told[0][1]


def test_samples_older_than_ingest_keeps_are_dropped() -> None:
    g, _, counts = guard(LanLimits(max_age_s=3600), Clock())
    assert not g.too_old("d", int((NOW - 3000) * 1000))
    assert g.too_old("d", int((NOW - 4000) * 1000))
    assert counts == {("samples", "too_old"): 1}


def test_told_once_a_minute_with_the_suppressed_count() -> None:
    clock = Clock()
    g, told, _ = guard(LanLimits(), clock)
    for _ in range(5):
        g.refuse("d", "invalid", "bad")
    assert len(told) == 1
    clock.t = throttle.TELL_EVERY_S
    g.refuse("d", "invalid", "bad")
    assert [t[2]["suppressed"] for t in told] == [0, 4]


def test_idle_budgets_are_forgotten_when_the_table_is_full(monkeypatch: Any) -> None:
    monkeypatch.setattr(languard, "MAX_BUCKETS", 3)
    clock = Clock()
    g, _, _ = guard(LanLimits(readings_per_s=1, burst_s=1), clock)
    for d in "abc":
        assert g.admit_readings(d, 1)
    clock.t = 5  # all three full again
    assert g.admit_readings("d", 1)
    assert not g.admit_readings("d", 1)
    assert len(g._buckets) == 1
