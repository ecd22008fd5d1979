"""`ntptime` for the firmware under CPython: the host clock is already right, so settime() only
checks the network and records the request; `BOARD.ntp_failures` makes requests time out."""

from __future__ import annotations

import errno
import time as _time

from tests.firmware_shims import board as _board

__all__ = ["host", "settime", "time", "timeout"]

host = "pool.ntp.org"
timeout = 1


def time() -> int:
    """Seconds since 1970 (rp2's epoch), as ntptime.time() returns them there."""
    board = _board.BOARD
    board.check_power()
    if not board.network_up():
        raise OSError(errno.EHOSTUNREACH, "no network")
    if board.ntp_failures > 0:
        board.ntp_failures -= 1
        board.record("ntp-timeout", host)
        board.sleep(min(timeout, 0.05))  # shortened: the tests need not wait the whole timeout
        raise OSError(errno.ETIMEDOUT, "ETIMEDOUT")
    return int(_time.time())


def settime() -> None:
    time()
    _board.BOARD.record("ntp", host)
