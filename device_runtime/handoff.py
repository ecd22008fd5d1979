"""The hand-off from a durable store (the edge agent's outbox) to the link.

Rows leave the store only when the broker's PUBACK for the message covering them arrives;
at most the link's in-flight window of messages is outstanding at once, so a slow broker
holds the backlog in the store, not in paho's memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from device_runtime.link import DeviceLink


class Pending(Protocol):
    """One message to publish and the store rows it covers."""

    @property
    def topic(self) -> str: ...

    @property
    def payload(self) -> bytes: ...

    @property
    def ids(self) -> tuple[int, ...]: ...


class Store(Protocol):
    """What the hand-off needs of a store: its backlog, and being told what left."""

    def backlog_batches(self, limit_messages: int, batch_samples: int) -> Sequence[Pending]:
        """Up to `limit_messages` messages covering rows not in flight, oldest first."""
        ...

    def mark_in_flight(self, ids: Iterable[int]) -> None:
        """These rows were published: skip them until acknowledged."""
        ...

    def ack(self, ids: Iterable[int]) -> int:
        """The broker acknowledged these rows: delete them."""
        ...


class Handoff:
    """Publishes a store's backlog on a link within its in-flight window; PUBACKs ack rows."""

    def __init__(self, link: DeviceLink, store: Store, *, batch_samples: int = 100) -> None:
        self.link = link
        self.store = store
        self.batch_samples = batch_samples
        self._inflight: dict[int, tuple[int, ...]] = {}  # paho message id -> store rows

    @property
    def in_flight(self) -> int:
        """Messages published and not acknowledged yet."""
        return len(self._inflight)

    def pump(self) -> int:
        """Publish what fits in the window (nothing while offline); how many messages."""
        room = self.link.inflight - len(self._inflight)
        if room <= 0 or not self.link.connected:
            return 0
        batches = self.store.backlog_batches(room, self.batch_samples)
        for batch in batches:
            info = self.link.publish(batch.topic, batch.payload)
            self.store.mark_in_flight(batch.ids)
            self._inflight[info.mid] = batch.ids
        return len(batches)

    def acked(self, mid: int) -> int:
        """The PUBACK of message `mid` arrived: ack its rows; how many rows it covered."""
        ids = self._inflight.pop(mid, None)
        if not ids:
            return 0
        self.store.ack(ids)
        return len(ids)
