"""A device's committed `seq` numbers, and the ones counted as lost: order-free gap counting.

Two writers (or two workers on a shared subscription) can commit a device's later batch
before its earlier one. So a hole in the committed sequence is not a loss yet: the devices
row keeps the contiguous high-water mark `seq` (every number up to it is committed or was
counted as lost) and a small bitmap of the numbers committed beyond it (`seq_ahead`, bit i =
seq + 1 + i). A hole becomes a counted gap only when it is older than `SeqWindow.wait` (by
the database's clock) or lies more than `SeqWindow.span` numbers behind the highest
committed one. Whatever order the same numbers commit in, the count is the same; a number
committed twice (a redelivery) sets a bit already set; a number counted as lost that
arrives after all (later than the window) moves nothing. The row is updated in the batch's
own transaction, so a crash loses neither the bitmap nor a count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from core.settings import IngestSettings

_DEFAULTS = IngestSettings()
DEFAULT_WAIT = timedelta(seconds=_DEFAULTS.seq_reorder_window_s)
DEFAULT_SPAN = _DEFAULTS.seq_reorder_span


@dataclass(frozen=True, slots=True)
class SeqWindow:
    """How long, and how far behind, a hole may stay open before it counts as loss."""

    wait: timedelta = DEFAULT_WAIT
    # bits of the bitmap at most: 65,536 numbers are 8 KiB in the row while a hole is open
    # (nothing when none is), more than all a default worker holds unacknowledged (20,000)
    span: int = DEFAULT_SPAN

    def __post_init__(self) -> None:
        if self.span < 1:
            raise ValueError("SeqWindow.span must be at least 1")
        if self.wait < timedelta(0):
            raise ValueError("SeqWindow.wait must not be negative")


@dataclass(frozen=True, slots=True)
class SeqTrack:
    """One device's sequence as its row stores it (columns boot, seq, seq_ahead, seq_hole_*)."""

    boot: int | None = None
    seq: int | None = None  # every number up to it is committed or counted as lost
    ahead: int = 0  # bit i: seq + 1 + i is committed (bit 0 is never set: it would be seq)
    hole_at: datetime | None = None  # when the holes below hole_mark were first seen open
    hole_mark: int | None = None

    @property
    def highest(self) -> int | None:
        """The highest number committed (or counted) in this boot."""
        return None if self.seq is None else self.seq + self.ahead.bit_length()

    def ahead_bytes(self) -> bytes | None:
        """The bitmap as stored (little-endian bytea; None when no hole is open)."""
        return self.ahead.to_bytes((self.ahead.bit_length() + 7) // 8, "little") or None

    @staticmethod
    def bitmap(stored: bytes | None) -> int:
        """The bitmap from its stored bytes."""
        return int.from_bytes(stored, "little") if stored else 0


def _fold(seq: int, ahead: int) -> tuple[int, int]:
    """Move the high-water mark over the numbers now contiguous with it."""
    run = (~ahead & (ahead + 1)).bit_length() - 1  # trailing one bits
    return seq + run, ahead >> run


def _close(seq: int, ahead: int, n: int) -> tuple[int, int, int]:
    """Count the holes among the next `n` numbers as lost; (seq, ahead, lost)."""
    lost = n - (ahead & ((1 << n) - 1)).bit_count()
    seq, ahead = _fold(seq + n, ahead >> n)
    return seq, ahead, lost


def advance(
    track: SeqTrack,
    boots: Iterable[int],
    sequences: Iterable[tuple[int | None, int, int]],
    now: datetime,
    window: SeqWindow,
) -> tuple[SeqTrack, int, int]:
    """The track after a batch, the numbers it counts as lost, and how many of those were
    counted early because the bitmap was full (`window.span`) rather than by age.

    `boots` are boot counters announced (statuses); `sequences` the (boot, first, last) of
    each message carrying a seq (a backlog covers first..last). A newer boot starts afresh
    (holes of the old boot still within the window are not counted: they cannot be told
    from a reordering); an older boot is a straggler and moves nothing.
    """
    boot, seq, ahead = track.boot, track.seq, track.ahead
    hole_at, mark = track.hole_at, track.hole_mark
    gaps = forced = 0
    for announced in boots:
        if boot is None or announced > boot:
            boot, seq, ahead, hole_at, mark = announced, None, 0, None, None
    for msg_boot, first, last in sequences:
        if msg_boot is not None and boot is not None and msg_boot < boot:
            continue
        if msg_boot is not None and (boot is None or msg_boot > boot):
            boot, seq, ahead, hole_at, mark = msg_boot, None, 0, None, None
        if seq is None:
            # counting starts at the first number committed in a boot (a lower one arriving
            # later is taken for a straggler, never for loss)
            seq = first - 1
        low = max(first, seq + 1)
        if last < low:
            continue  # a redelivery, or a straggler already counted as lost
        over = last - seq - window.span
        if over > 0:
            # a jump past the bitmap's bound: the oldest numbers below the new ones close
            # first, counted without building a bitmap as wide as the jump (a device's seq
            # leaping by 2**40 must cost what a small leap costs, not 128 GiB)
            n = min(over, low - seq - 1)
            if n > 0:
                lost = n - (ahead & ((1 << min(n, ahead.bit_length())) - 1)).bit_count()
                seq, ahead = _fold(seq + n, ahead >> n)
                gaps += lost
                forced += lost
                low = max(low, seq + 1)
                if last < low:
                    continue
        if low == seq + 1:
            # contiguous with the mark: moved over, not built (a backlog may span any range)
            seq, ahead = _fold(last, ahead >> (last - seq))
        else:
            seq, ahead = _fold(seq, ahead | ((1 << (last - low + 1)) - 1) << (low - seq - 1))
        over = ahead.bit_length() - window.span
        if over > 0:  # the bitmap's bound: the oldest holes are lost whatever their age
            seq, ahead, lost = _close(seq, ahead, over)
            gaps += lost
            forced += lost
    if seq is not None and ahead:
        if hole_at is None or mark is None:
            hole_at, mark = now, seq + ahead.bit_length()
        if now - hole_at >= window.wait:
            if mark > seq:  # the holes open since hole_at (later ones wait their turn)
                seq, ahead, lost = _close(seq, ahead, mark - seq)
                gaps += lost
            hole_at, mark = (now, seq + ahead.bit_length()) if ahead else (None, None)
    else:
        hole_at, mark = None, None
    return SeqTrack(boot, seq, ahead, hole_at, mark), gaps, forced
