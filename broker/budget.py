"""The broker's memory budget: the bytes every session holds, counted against one limit.

Three pools make up what is held: `connected` (the outboxes of connected sessions and the
PUBLISHes read but not yet routed), `offline` (the outboxes of persistent sessions whose
client is away) and `socket` (bytes written to connections that their clients have not read
yet, sampled). A message going to three subscribers counts three times: an upper bound.

When the total reaches the limit, `room` is cleared and connections that publish stop being
read (TCP backpressure on the publisher) until the total falls to `low_water`. Offline
sessions together keep at most `offline_limit` (half the budget), so clients that went away
can never hold the room connected ones need to make progress.
"""

from __future__ import annotations

import asyncio

# what a Message or a routed PUBLISH costs beyond its topic and payload (object, deque slot)
MESSAGE_OVERHEAD = 120


class MemoryBudget:
    """Bytes held by all sessions, against `limit`; `room` is set while there is room."""

    def __init__(self, limit: int, offline_share: float = 0.5) -> None:
        if limit < 1:
            raise ValueError("the memory budget must be positive")
        self.limit = limit
        self.low_water = limit - max(limit // 10, 1)
        self.offline_limit = int(limit * offline_share)
        self.connected = 0
        self.offline = 0
        self.socket = 0
        self.room = asyncio.Event()
        self.room.set()
        self.paused = 0  # connections not read now because of the budget
        self.pauses = 0  # times a connection was paused

    @property
    def used(self) -> int:
        return self.connected + self.offline + self.socket

    @property
    def full(self) -> bool:
        return not self.room.is_set()

    def charge(self, n: int, offline: bool = False) -> None:
        """`n` more bytes held, by a connected session or (offline=True) an offline one."""
        if offline:
            self.offline += n
        else:
            self.connected += n
        if self.connected + self.offline + self.socket >= self.limit:
            self.room.clear()

    def release(self, n: int, offline: bool = False) -> None:
        """`n` bytes no longer held."""
        if offline:
            self.offline -= n
        else:
            self.connected -= n
        self._check()

    def move(self, n: int, offline: bool) -> None:
        """A session's `n` bytes change pool: its client went away (offline=True) or came back."""
        if offline:
            self.connected -= n
            self.offline += n
        else:
            self.offline -= n
            self.connected += n

    def sampled_sockets(self, n: int) -> None:
        """The bytes waiting in connections' write buffers, as last summed."""
        self.socket = n
        if self.used >= self.limit:
            self.room.clear()
        else:
            self._check()

    def offline_room(self, n: int) -> bool:
        """Whether offline sessions may hold `n` more bytes."""
        return self.offline + n <= self.offline_limit

    def _check(self) -> None:
        if not self.room.is_set() and self.connected + self.offline + self.socket <= self.low_water:
            self.room.set()
