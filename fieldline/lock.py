"""One `fieldline up` per data directory: an exclusive lock on FIELDLINE_HOME/up.lock.

A second stack in the same folder would fight the first for its ports and, cleaning up
after its failed start, stop the first one's PostgreSQL. The lock is an flock(2), so the
kernel releases it when the holder exits, even by kill -9: a stale file never blocks.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from core.errors import FieldlineError

LOCK_NAME = "up.lock"


class StackBusyError(FieldlineError):
    """Another `fieldline up` holds this data directory."""


class StackLock:
    """Held while a local stack runs; `with StackLock(home):` refuses a second holder."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> StackLock:
        self.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StackBusyError(
                f"another `fieldline up` (pid {holder}) is running with FIELDLINE_HOME="
                f"{self.home.absolute()}: stop it first (Ctrl-C in its terminal, or "
                f"kill -TERM {holder}), or give this one another FIELDLINE_HOME"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays, harmless
            self._fd = None
