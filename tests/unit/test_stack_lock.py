"""The data directory's lock: one `fieldline up` per FIELDLINE_HOME, released on exit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fieldline.lock import StackBusyError, StackLock


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with StackLock(home) as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"
        assert lock.path.stat().st_mode & 0o777 == 0o600
        with pytest.raises(StackBusyError, match=rf"pid {os.getpid()}\).*FIELDLINE_HOME="):
            StackLock(home).__enter__()
    with StackLock(home):  # released: the next stack may run
        pass
