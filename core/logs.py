"""Logging for fieldline's services: one line per event, `key=value` after the logger name."""

from __future__ import annotations

import logging
import sys

# Third-party loggers that narrate every packet or state change at INFO.
_QUIET = ("amqtt", "transitions", "asyncio")

# asyncio warns each time a TLS stream it upgraded (nats-py's start_tls) sees the server's EOF;
# the connection is closed either way, so the line tells the operator nothing
_NOISE = ("returning true from eof_received() has no effect when using ssl",)


def _not_noise(record: logging.LogRecord) -> bool:
    return record.getMessage() not in _NOISE


def configure_logging(level: str = "INFO") -> None:
    """Send our records to stderr as `time level logger event=... key=value`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    asyncio_log = logging.getLogger("asyncio")
    if _not_noise not in asyncio_log.filters:
        asyncio_log.addFilter(_not_noise)
