"""Order-free `seq` gap counting (ingest_worker/sequence.py): a reordering is never loss."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest_worker.sequence import SeqTrack, SeqWindow, advance

T0 = datetime(2026, 11, 24, tzinfo=UTC)
WINDOW = SeqWindow(wait=timedelta(seconds=60), span=4096)
LATER = T0 + timedelta(seconds=61)


def run(
    track: SeqTrack,
    batches: list[list[tuple[int | None, int, int]]],
    at: datetime = T0,
    window: SeqWindow = WINDOW,
) -> tuple[SeqTrack, int]:
    total = 0
    for batch in batches:
        track, lost, _forced = advance(track, [], batch, at, window)
        total += lost
    return track, total


def msgs(*seqs: int, boot: int | None = 1) -> list[tuple[int | None, int, int]]:
    return [(boot, s, s) for s in seqs]


def test_a_reordering_is_no_loss_and_a_real_hole_counts_once_after_the_window() -> None:
    stored = SeqTrack(1, 2)
    # a later batch commits first: 3, 4 are a hole, not yet a loss
    track, lost = run(stored, [msgs(5, 6)])
    assert (lost, track.seq, track.highest, track.hole_mark) == (0, 2, 6, 6)
    # the earlier batch commits: the hole closes, nothing was ever counted
    track, lost = run(track, [msgs(3, 4)])
    assert (lost, track.seq, track.ahead, track.hole_at) == (0, 6, 0, None)
    # 7, 8 never come: counted once the window has passed, at the device's next batch
    track, lost = run(track, [msgs(9)])
    assert lost == 0
    track, lost = run(track, [msgs(10)], at=LATER)
    assert (lost, track.seq, track.ahead) == (2, 10, 0)
    # a straggler after the window moves nothing, and neither does a redelivery
    track, lost = run(track, [msgs(7, 8, 9, 10)], at=LATER)
    assert (lost, track.seq) == (0, 10)


def test_holes_opened_after_the_timer_started_wait_their_own_window() -> None:
    track, _ = run(SeqTrack(1, 0), [msgs(2)])  # 1 missing, timer at T0, mark 2
    track, lost = run(track, [msgs(5)], at=T0 + timedelta(seconds=30))  # 3, 4 missing
    assert lost == 0
    track, lost = run(track, [msgs(6)], at=LATER)  # 1 is old enough; 3, 4 are not
    assert (lost, track.seq, track.hole_mark) == (1, 2, 6)
    track, lost = run(track, [msgs(7)], at=LATER + timedelta(seconds=61))
    assert (lost, track.seq, track.ahead) == (2, 7, 0)


@pytest.mark.parametrize(
    ("stored", "batch", "boots", "expected"),
    [
        (SeqTrack(1, 9), msgs(2, 1, boot=2), (), (2, 2, 0)),  # a restart: counting afresh
        (SeqTrack(2, 2), msgs(5), (), (2, 2, 0)),  # a straggler from an older boot
        (SeqTrack(1, 9), [(None, 12, 20)], (), (1, 9, 0)),  # no boot: same boot; a backlog
        (SeqTrack(1, 9), [], (3,), (3, None, 0)),  # a status birth with a new boot
        (SeqTrack(1, 9), msgs(10), (1,), (1, 10, 0)),  # the same boot announced again
        (SeqTrack(), msgs(7, 8), (), (1, 8, 0)),  # first sight: counting starts at 7
    ],
)
def test_boots(
    stored: SeqTrack,
    batch: list[tuple[int | None, int, int]],
    boots: tuple[int, ...],
    expected: tuple[int | None, int | None, int],
) -> None:
    track, lost, _ = advance(stored, boots, batch, T0, WINDOW)
    assert (track.boot, track.seq, lost) == expected


def test_a_new_boot_drops_the_old_boots_open_holes_uncounted() -> None:
    track, _ = run(SeqTrack(1, 0), [msgs(5)])
    track, lost = run(track, [msgs(1, boot=2)], at=LATER)
    assert (lost, track.boot, track.seq, track.ahead, track.hole_at) == (0, 2, 1, 0, None)


def test_the_span_bounds_the_bitmap_and_counts_the_oldest_holes_at_once() -> None:
    window = SeqWindow(wait=timedelta(hours=1), span=8)
    track, lost, forced = advance(SeqTrack(1, 0), [], msgs(3, 12), T0, window)
    # 1, 2 and 4..11 missing; the bitmap may hold 8 numbers past seq: 1..4 are given up
    assert (lost, forced, track.seq, track.highest) == (3, 3, 4, 12)
    assert track.ahead.bit_length() <= 8
    assert track.ahead_bytes() == track.ahead.to_bytes(1, "little")
    assert SeqTrack.bitmap(track.ahead_bytes()) == track.ahead


def test_a_backlog_covers_its_range() -> None:
    track, lost = run(SeqTrack(1, 0), [[(1, 5, 9)], [(1, 1, 4)]])
    assert (lost, track.seq, track.ahead) == (0, 9, 0)


seq_sets = st.sets(st.integers(min_value=1, max_value=300), min_size=1, max_size=80)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), seqs=seq_sets)
def test_any_commit_order_of_the_same_numbers_counts_the_same(
    data: st.DataObject, seqs: set[int]
) -> None:
    """Whatever the order and batching (and with redeliveries), nothing is counted within
    the window, and once it has passed (twice: holes opened after the first batch wait a
    window of their own) exactly the numbers never committed are."""
    order = data.draw(st.permutations(sorted(seqs)))
    redelivered = data.draw(st.lists(st.sampled_from(sorted(seqs)), max_size=10))
    stream = list(order) + redelivered
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=6)))
    batches, start = [], 0
    for cut in [*cuts, len(stream)]:
        batches.append(msgs(*stream[start:cut]))
        start = cut
    track, lost = run(SeqTrack(1, 0), batches)
    assert lost == 0
    assert track.highest == max(seqs)
    track, lost = run(track, [[]], at=LATER)
    track, more = run(track, [[]], at=LATER + timedelta(seconds=61))
    assert lost + more == max(seqs) - len(seqs)
    assert (track.seq, track.ahead, track.hole_at) == (max(seqs), 0, None)


def _reference(
    track: SeqTrack, sequences: list[tuple[int | None, int, int]], span: int
) -> tuple[int | None, int, int]:
    """The specification, for small numbers only: every committed number in a set, the
    oldest numbers given up whenever more than `span` lie past the mark; (seq, ahead, lost)."""
    seq, done, lost = track.seq, set(), 0
    for _boot, first, last in sequences:
        if seq is None:
            seq = first - 1
        done |= {n for n in range(first, last + 1) if n > seq}
        while seq + 1 in done:
            seq += 1
            done.discard(seq)
        while done and max(done) - seq > span:
            seq += 1
            if seq in done:
                done.discard(seq)
            else:
                lost += 1
            while seq + 1 in done:
                seq += 1
                done.discard(seq)
    assert seq is not None
    return seq, sum(1 << (n - seq - 1) for n in done), lost


@settings(max_examples=400, deadline=None)
@given(
    span=st.integers(1, 12),
    start=st.integers(0, 5),
    ranges=st.lists(
        st.tuples(st.integers(0, 60), st.integers(0, 40)).map(lambda r: (1, r[0], r[0] + r[1])),
        min_size=1,
        max_size=12,
    ),
)
def test_jumps_past_the_span_count_as_the_specification_does(
    span: int, start: int, ranges: list[tuple[int | None, int, int]]
) -> None:
    window = SeqWindow(wait=timedelta(hours=1), span=span)
    track, lost, forced = advance(SeqTrack(1, start), [], ranges, T0, window)
    assert (track.seq, track.ahead, lost) == _reference(SeqTrack(1, start), ranges, span)
    assert forced == lost
    assert track.ahead.bit_length() <= span


def test_a_huge_seq_jump_costs_no_more_than_a_small_one() -> None:
    """A hostile device leaping 2**40 numbers: counted exactly, with a bitmap no wider than
    the span (the first version built one as wide as the jump: 3.7 s for 2**30, MemoryError
    past ~2**35, and every later message of the device refused)."""
    import tracemalloc

    window = SeqWindow(wait=timedelta(seconds=60), span=65_536)
    tracemalloc.start()
    try:
        track, lost, forced = advance(SeqTrack(1, 5), [], msgs(2**40), T0, window)
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak
    assert (lost, forced, track.highest) == (2**40 - 5 - 65_536, 2**40 - 5 - 65_536, 2**40)
    track, later = run(track, [[]], at=LATER)
    assert lost + later == 2**40 - 6  # every number from 6 to 2**40 - 1
    # a backlog spanning the same leap is all committed: nothing lost, nothing built
    track, lost, _forced = advance(SeqTrack(1, 5), [], [(1, 6, 2**40)], T0, window)
    assert (lost, track.seq, track.ahead) == (0, 2**40, 0)
    track, lost, _forced = advance(SeqTrack(1, 5), [], [(1, 100, 2**40)], T0, window)
    assert (lost, track.seq, track.ahead) == (94, 2**40, 0)
