"""Logging for fieldline's services: one line per event, `key=value` after the logger name;
each kind of line bounded in rate, each line in length (`LogBudget`)."""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from core.settings import Settings

# Third-party loggers that narrate every packet or state change at INFO.
_QUIET = ("amqtt", "transitions", "asyncio")

# asyncio warns each time a TLS stream it upgraded (nats-py's start_tls) sees the server's EOF;
# the connection is closed either way, so the line tells the operator nothing
_NOISE = ("returning true from eof_received() has no effect when using ssl",)

# the settings' defaults (core/settings.py is their one source)
BURST: int = Settings.model_fields["log_burst"].default
LINES_PER_S: float = Settings.model_fields["log_lines_per_s"].default
LINE_CHARS: int = Settings.model_fields["log_line_chars"].default


def _not_noise(record: logging.LogRecord) -> bool:
    return record.getMessage() not in _NOISE


@dataclass
class _Kind:
    tokens: float
    at: float
    held: int = 0


class LogBudget(logging.Filter):
    """Each kind of line (logger and message template: `event=denied ...` whatever its values)
    may be written `burst` times at once, then `per_s` times a second. What is held back is
    counted, and the next line of that kind ends with `suppressed=N`: one hostile device
    repeating a refused action cannot flood the log (each service's own rate limits decide how
    often it may try; this decides how often that is written)."""

    MAX_KINDS = 1000  # templates are code constants; a bound anyway (the oldest starts over)

    def __init__(
        self,
        burst: int = BURST,
        per_s: float = LINES_PER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.per_s = per_s
        self.clock = clock
        self.suppressed = 0  # every line held back since the start
        self._kinds: OrderedDict[tuple[str, str], _Kind] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        key = (record.name, str(record.msg))
        kind = self._kinds.get(key)
        if kind is None:
            if len(self._kinds) >= self.MAX_KINDS:
                self._kinds.popitem(last=False)
            kind = self._kinds[key] = _Kind(float(self.burst), now)
        else:
            self._kinds.move_to_end(key)
            kind.tokens = min(float(self.burst), kind.tokens + (now - kind.at) * self.per_s)
            kind.at = now
        if kind.tokens < 1.0:
            kind.held += 1
            self.suppressed += 1
            return False
        kind.tokens -= 1.0
        if kind.held:
            # the record is this handler's alone (our handler is the root's only one)
            record.msg = f"{record.msg} suppressed={kind.held}"
            kind.held = 0
        return True


class BoundedFormatter(logging.Formatter):
    """`time level logger message`, cut at `line_chars` characters (a traceback included):
    a value a client chose (a client id, a topic, an error text) cannot make a line huge."""

    def __init__(self, line_chars: int = LINE_CHARS) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")
        self.line_chars = line_chars

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if len(line) <= self.line_chars:
            return line
        return f"{line[: self.line_chars]} ...[{len(line) - self.line_chars} characters cut]"


_ACTIVE: LogBudget | None = None


class LogSuppressedCollector(Collector):
    """`fieldline_log_lines_suppressed_total` for a service's registry: lines the log budget held
    back in this process."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "fieldline_log_lines_suppressed",
            "Log lines held back by the log budget (log_burst, log_lines_per_s per kind of line); "
            "the next line of each kind says how many.",
            value=_ACTIVE.suppressed if _ACTIVE is not None else 0,
        )


def configure_logging(
    level: str = "INFO",
    *,
    burst: int = BURST,
    per_s: float = LINES_PER_S,
    line_chars: int = LINE_CHARS,
) -> None:
    """Send our records to stderr as `time level logger event=... key=value`, within the
    budget: `burst` lines of a kind at once, then `per_s` a second; lines cut at `line_chars`."""
    global _ACTIVE
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(BoundedFormatter(line_chars))
    _ACTIVE = LogBudget(burst, per_s)
    handler.addFilter(_ACTIVE)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    asyncio_log = logging.getLogger("asyncio")
    if _not_noise not in asyncio_log.filters:
        asyncio_log.addFilter(_not_noise)


def configure_service_logging(settings: Settings, level: str | None = None) -> None:
    """`configure_logging` with the settings' level (or `level`) and log budget."""
    configure_logging(
        level or settings.log_level,
        burst=settings.log_burst,
        per_s=settings.log_lines_per_s,
        line_chars=settings.log_line_chars,
    )
