"""The one way fieldline waits before trying again: doubling delays with jitter."""

from __future__ import annotations

import random


class Backoff:
    """Delays from `first` doubling up to `cap`; each is drawn from [half, all] of its step
    ("equal jitter"), so a fleet that lost its broker does not come back in lockstep."""

    def __init__(self, first: float, cap: float) -> None:
        if not 0 < first <= cap:
            raise ValueError("Backoff needs 0 < first <= cap")
        self.first = first
        self.cap = cap
        self._step = first

    def next(self) -> float:
        """The delay before the next try; the one after it is twice as long (up to cap)."""
        step = self._step
        self._step = min(step * 2, self.cap)
        return step * random.uniform(0.5, 1.0)  # noqa: S311 - spreading, not secrecy

    def reset(self) -> None:
        """A try succeeded: the next failure starts from `first` again."""
        self._step = self.first
