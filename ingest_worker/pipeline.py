"""Between the receiver and the writers: decode, batch per tenant, acknowledge in order.

Every received message waits in `pending`, in receive order, until its batch commits; then
the longest committed prefix is acknowledged, so PUBACKs leave in the order the PUBLISHes
came (MQTT 4.6) and never before the rows are in the database. When `pending` reaches
`queue_max` messages, `queue_max_rows` rows (a backlog message may carry hundreds) or
`queue_max_bytes` payload bytes (a message may be megabytes) the receiver stops reading (the
broker's window fills and it stops sending), so memory is bounded whatever the publishers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ingest_worker.decode import Decoded, decode_message
from ingest_worker.metrics import IngestMetrics
from schemas.limits import Limits


@dataclass
class OpenBatch:
    items: list[Decoded] = field(default_factory=list)
    rows: int = 0
    started: float = 0.0


class Pipeline:
    """Decoded messages on their way to the writers, and their acknowledgements on the way back."""

    def __init__(
        self,
        *,
        limits: Limits,
        max_rows: int,
        max_wait_s: float,
        queue_max: int,
        queue_max_rows: int = 200_000,
        queue_max_bytes: int = 64 * 1024 * 1024,
        ack: Callable[[Any], None],
        pause: Callable[[], None],
        resume: Callable[[], None],
        metrics: IngestMetrics,
    ) -> None:
        self.limits = limits
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.queue_max = queue_max
        self.queue_max_rows = queue_max_rows
        self.queue_max_bytes = queue_max_bytes
        self.pending_rows = 0
        self.pending_bytes = 0
        # payload bytes of each pending message, counted as received (dead letters shrink
        # theirs later), so what is released is exactly what was counted
        self._sizes: deque[int] = deque()
        self._ack, self._pause, self._resume = ack, pause, resume
        self.metrics = metrics
        self.pending: deque[Decoded] = deque()
        self.open: dict[str | None, OpenBatch] = {}
        self.sealed: deque[tuple[str | None, list[Decoded]]] = deque()
        self.paused = False
        self.stopping = False
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()

    # -- in -----------------------------------------------------------------------------------
    def accept(self, source: Any, topic: str, payload: bytes, received_at: float) -> None:
        """A message from the receiver (on the event loop's thread)."""
        item = decode_message(source, topic, payload, received_at, self.limits)
        self.metrics.received += 1
        self.pending.append(item)
        item.weight = item.rows
        self.pending_rows += item.weight
        self._sizes.append(len(payload))
        self.pending_bytes += len(payload)
        self._drained.clear()
        if item.ignored:
            item.done = True
        else:
            # refused at decode: to the tenant-less batch, which holds dead letters only
            key = None if item.dead else item.tenant
            batch = self.open.get(key)
            if batch is None:
                batch = self.open[key] = OpenBatch(started=time.monotonic())
            batch.items.append(item)
            batch.rows += item.rows
            if batch.rows >= self.max_rows:
                # sealed: the next messages start a new batch, which another writer can take
                # while this one is written (a full batch never grows past max_rows)
                del self.open[key]
                self.sealed.append((key, batch.items))
                self._wake.set()
        if not self.paused and (
            len(self.pending) >= self.queue_max
            or self.pending_rows >= self.queue_max_rows
            or self.pending_bytes >= self.queue_max_bytes
        ):
            self.paused = True
            self.metrics.pauses.labels(self._full()).inc()
            self._pause()
        self.release()

    def _full(self) -> str:
        """Which bound the pending messages have reached (called once one has)."""
        if len(self.pending) >= self.queue_max:
            return "messages"
        if self.pending_rows >= self.queue_max_rows:
            return "rows"
        return "bytes"

    # -- to the writers -----------------------------------------------------------------------
    def ready(self) -> tuple[str | None, list[Decoded]] | None:
        """The batch a free writer should take now: a sealed (full) one, else the oldest open
        one once it is `max_wait_s` old (or at once when stopping). Writers that are busy
        let batches grow, so batches are small under light load and full under heavy load."""
        if self.sealed:
            return self.sealed.popleft()
        if not self.open:
            return None
        now = time.monotonic()
        for key, batch in self.open.items():
            if self.stopping or now - batch.started >= self.max_wait_s:
                del self.open[key]
                return key, batch.items
        return None

    async def next_batch(self) -> tuple[str | None, list[Decoded]] | None:
        """Wait for a batch to write; None when stopping and nothing is left."""
        while True:
            got = self.ready()
            if got is not None:
                self.metrics.batch_rows.observe(sum(i.rows for i in got[1]))
                return got
            if self.stopping and not self.open and not self.sealed:
                return None
            self._wake.clear()
            # a full batch wakes us at once; otherwise look again when it may be due
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.max_wait_s)

    # -- back -------------------------------------------------------------------------------
    def committed(self, items: list[Decoded]) -> None:
        for item in items:
            item.done = True
        self.release()

    def release(self) -> None:
        """Acknowledge the committed prefix of `pending`, in receive order."""
        pending = self.pending
        while pending and pending[0].done:
            item = pending.popleft()
            self.pending_rows -= item.weight
            self.pending_bytes -= self._sizes.popleft()
            self._ack(item.source)
        self.metrics.pending = len(pending)
        self.metrics.pending_bytes = self.pending_bytes
        if (
            self.paused
            and len(pending) <= self.queue_max // 2
            and self.pending_rows <= self.queue_max_rows // 2
            and self.pending_bytes <= self.queue_max_bytes // 2
        ):
            self.paused = False
            self._resume()
        if not pending:
            self._drained.set()

    async def drain(self, timeout: float) -> bool:
        """Stop batching by time: write everything, wait until it is all acknowledged."""
        self.stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def wake(self) -> None:
        self._wake.set()
