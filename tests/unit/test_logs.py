"""The service log format, the third-party noise it leaves out, and its budget: each kind of
line bounded in rate, each line in length."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from core.logs import LogBudget, LogSuppressedCollector, configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield None
    root.handlers[:], level = saved
    root.setLevel(level)


def test_one_line_per_event_and_no_asyncio_tls_eof_noise(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("INFO")
    logging.getLogger("ingest").info("event=started source=nats")
    noisy = logging.getLogger("asyncio")
    noisy.warning("returning true from eof_received() has no effect when using ssl")
    noisy.warning("Task was destroyed but it is pending!")
    noisy.info("poll took 0.2 s")  # asyncio narrates at INFO: quiet below WARNING
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "INFO ingest event=started source=nats",
        "WARNING asyncio Task was destroyed but it is pending!",
    ]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(template: str, *args: object, name: str = "broker") -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, template, args, None)


def test_a_kind_of_line_is_bounded_in_rate_and_tells_what_it_held_back() -> None:
    clock = Clock()
    budget = LogBudget(burst=3, per_s=0.5, clock=clock)
    denied = "event=denied client=%s topic=%r"
    passed = [budget.filter(_record(denied, f"dev-{i}", "x")) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7  # the burst, then nothing until time passes
    assert budget.suppressed == 7
    # another kind of line, or the same template from another logger, has its own budget
    assert budget.filter(_record("event=connected client=%s", "dev-1"))
    assert budget.filter(_record(denied, "dev-1", "x", name="ingest"))
    clock.now = 1.0  # half a line's worth: still held
    assert not budget.filter(_record(denied, "dev-10", "x"))
    clock.now = 2.0
    told = _record(denied, "dev-11", "x")
    assert budget.filter(told)
    assert told.getMessage() == "event=denied client=dev-11 topic='x' suppressed=8"
    clock.now = 100.0  # refilled up to the burst, not beyond
    assert [budget.filter(_record(denied, "d", "x")) for _ in range(4)] == [True] * 3 + [False]
    assert budget.suppressed == 9


def test_the_kinds_kept_are_bounded() -> None:
    budget = LogBudget(burst=1, per_s=0.001, clock=Clock())
    for i in range(LogBudget.MAX_KINDS + 50):
        assert budget.filter(_record(f"event=made-up-{i}"))
    assert not budget.filter(_record(f"event=made-up-{LogBudget.MAX_KINDS + 49}"))
    assert budget.filter(_record("event=made-up-0"))  # forgotten, so it starts over


def test_a_long_line_is_cut(capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    configure_logging("INFO", line_chars=300)
    logging.getLogger("broker").info("event=denied client=%s", "x" * 5000)
    (line,) = capsys.readouterr().err.splitlines()
    assert len(line) < 360
    assert line.endswith("characters cut]")
    assert "x" * 200 in line


def test_the_services_log_within_the_budget_and_count_what_they_held_back(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("INFO", burst=5, per_s=0.01)
    log = logging.getLogger("broker")
    for i in range(50):
        log.info("event=connect_refused reason=%s peer=%s", "bad-cert", f"10.0.0.{i}")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5
    registry = CollectorRegistry()
    registry.register(LogSuppressedCollector())
    assert registry.get_sample_value("fieldline_log_lines_suppressed_total") == 45
    # every service's registry carries it
    from broker.metrics import BrokerMetrics
    from ingest_worker.metrics import IngestMetrics

    for metrics in (BrokerMetrics(), IngestMetrics()):
        assert metrics.registry.get_sample_value("fieldline_log_lines_suppressed_total") == 45
