"""Events told at most once a minute per key, with how many were held back in between: the
agent's way to report a repeated refusal (a bad value, a LAN device over budget) upstream
without one event per message."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

TELL_EVERY_S = 60.0  # one event per key this often, not one per occurrence
MAX_KEYS = 1024  # keys remembered for that; the oldest go first


class EventThrottle:
    """`due(key)`: the number held back since the key was last told, if it may be told now;
    None if it was told less than TELL_EVERY_S ago (then it is counted)."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._told: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()

    def due(self, key: Hashable) -> int | None:
        """How many were held back since the last time `key` was told, or None (hold it)."""
        now = self._monotonic()
        last = self._told.get(key)
        if last is not None and now - last[0] < TELL_EVERY_S:
            self._told[key] = (last[0], last[1] + 1)  # counted, told with the next event
            return None
        self._told.pop(key, None)
        self._told[key] = (now, 0)
        while len(self._told) > MAX_KEYS:
            self._told.popitem(last=False)
        return 0 if last is None else last[1]
