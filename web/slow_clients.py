"""A deadline for a request's headers: uvicorn itself waits for them forever, so a client that
connects and sends a byte now and then (slowloris) could hold connections, and their file
descriptors, as long as it liked. The body's deadline is in `middleware.BodyLimit`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def timed_h11(read_timeout_s: float, on_timeout: Callable[[], None]) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers have not all
    arrived `read_timeout_s` after it opened (or after the previous answer)."""

    class TimedH11(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None
        waiting_after: Any = None  # the request cycle the timer was armed after

        def arm(self) -> None:
            self.disarm()
            self.waiting_after = self.cycle
            self.header_timer = self.loop.call_later(read_timeout_s, self.too_slow)

        def disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def too_slow(self) -> None:
            self.header_timer = None
            if not self.transport.is_closing():
                on_timeout()
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.header_timer is not None and self.cycle is not self.waiting_after:
                self.disarm()  # a new request's headers are complete: the app has it now

        def on_response_complete(self) -> None:
            answered = self.cycle
            super().on_response_complete()
            if self.cycle is answered:  # no pipelined request started: wait for the next
                self.arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm()
            super().connection_lost(exc)

    return TimedH11
