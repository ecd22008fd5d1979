"""The service log format, and the third-party noise it leaves out."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from core.logs import configure_logging


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
