"""Logging for fieldline's services: one line per event, `key=value` after the logger name."""

from __future__ import annotations

import logging
import sys

# Third-party loggers that narrate every packet or state change at INFO.
_QUIET = ("amqtt", "transitions", "asyncio")


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
