"""Waiting on a condition instead of a fixed sleep: one home for the polling loops tests use.

For "nothing more arrives", prefer a marker (see `tests.clients.Paho.marker`) to a quiet period.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, every: float = 0.05
) -> None:
    """Poll `condition` until it holds; fail saying `what` did not happen within `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every)


async def until(
    condition: Callable[[], bool], timeout: float, what: str, every: float = 0.02
) -> None:
    """`wait_until` for a coroutine: the event loop keeps running between polls."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(every)
