"""MicroPython's tick and sleep functions for the firmware under CPython.

Ticks wrap at TICKS_PERIOD as on the board (and the board starts them 1.5 s before the wrap), so
firmware that subtracts ticks instead of using ticks_diff fails the tests. Sleeping checks the
board's power in small slices.
"""

from __future__ import annotations

import time as _time
from time import gmtime, localtime, mktime, time, time_ns

from tests.firmware_shims import board as _board

__all__ = [
    "gmtime",
    "localtime",
    "mktime",
    "sleep",
    "sleep_ms",
    "sleep_us",
    "ticks_add",
    "ticks_diff",
    "ticks_ms",
    "ticks_us",
    "time",
    "time_ns",
]

_PERIOD = _board.TICKS_PERIOD
_HALF = _PERIOD // 2


def ticks_ms() -> int:
    return (int(_time.monotonic() * 1000) + _board.BOARD.ticks_offset_ms) % _PERIOD


def ticks_us() -> int:
    return (int(_time.monotonic() * 1_000_000) + _board.BOARD.ticks_offset_ms * 1000) % _PERIOD


def ticks_add(ticks: int, delta: int) -> int:
    return (ticks + delta) % _PERIOD


def ticks_diff(ticks1: int, ticks2: int) -> int:
    """ticks1 - ticks2 as a signed value in [-PERIOD/2, PERIOD/2)."""
    return (ticks1 - ticks2 + _HALF) % _PERIOD - _HALF


def sleep_ms(ms: int) -> None:
    _board.BOARD.sleep(ms / 1000)


def sleep_us(us: int) -> None:
    _board.BOARD.sleep(us / 1_000_000)


def sleep(seconds: float) -> None:
    _board.BOARD.sleep(seconds)
