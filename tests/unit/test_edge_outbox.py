"""The edge agent's SQLite outbox: durability, in-flight state, the byte bound, backlog batches."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.errors import EdgeError, OutboxError
from edge_agent.outbox import Outbox
from schemas.messages import decode_event, decode_telemetry

ROOT = Path(__file__).resolve().parents[2]
TEL = "fl/acme/press-1/telemetry"
TEL2 = "fl/acme/press-2/telemetry"
EVT = "fl/acme/press-1/events"
NOW_MS = int(time.time() * 1000)


def tel(seq: int | None, boot: int | None = 2, ts: int | None = None, **extra: object) -> bytes:
    body: dict[str, object] = {"ts": NOW_MS - 60_000 + (seq or 0) if ts is None else ts}
    if seq is not None:
        body["seq"] = seq
    if boot is not None:
        body["boot"] = boot
    body["metrics"] = {"temperature": 20.5 + (seq or 0), "on": True, "t2": {"v": 1, "u": "degC"}}
    body.update(extra)
    return json.dumps(body).encode()


class Clock:
    """A settable clock, so that creation times and ages are exact."""

    def __init__(self, t: float = 1_732_269_600.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.db") as outbox:
        yield outbox


def test_put_pending_ack(tmp_path: Path) -> None:
    clock = Clock()
    with Outbox(tmp_path / "o.db", clock=clock) as box:
        assert box.pending(10) == []
        assert box.depth() == 0
        assert box.oldest_age_s() is None
        a = box.put(TEL, b'{"metrics":{"x":1}}', kind="telemetry")
        clock.t += 5
        b, c = box.put_many([(EVT, b'{"kind":"k"}', "event"), (TEL, b"x", "telemetry")])
        assert a < b < c
        entries = box.pending(10)
        assert [e.id for e in entries] == [a, b, c]
        assert (entries[1].topic, entries[1].payload, entries[1].kind) == (
            EVT,
            b'{"kind":"k"}',
            "event",
        )
        assert entries[0].created_at == clock.t - 5
        assert box.pending(2) == entries[:2]
        assert box.depth() == 3
        assert box.bytes() == sum(len(e.payload) + len(e.topic) for e in entries)
        assert box.oldest_age_s(clock.t + 1) == 6.0
        assert box.ack([a, c, 999]) == 2
        assert [e.id for e in box.pending(10)] == [b]
        assert box.depth() == 1
        assert box.bytes() == len(EVT) + 12
        assert box.ack([a]) == 0  # a second PUBACK (a redelivery) is harmless
        with pytest.raises(ValueError, match="kind must be one of"):
            box.put(TEL, b"{}", kind="metrics")


def test_in_flight_is_excluded_until_released(box: Outbox) -> None:
    ids = box.put_many([(TEL, b"%d" % i, "telemetry") for i in range(5)])
    box.mark_in_flight(ids[:2])
    assert [e.id for e in box.pending(2)] == ids[2:4]
    assert [b.ids for b in box.backlog_batches(10, 1)] == [(i,) for i in ids[2:]]
    assert box.depth() == 5  # in flight is still stored
    box.ack([ids[0]])
    box.release_in_flight()
    assert [e.id for e in box.pending(10)] == ids[1:]


def test_restart_keeps_everything_unacked_in_order(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        ids = [box.put(TEL if i % 2 else EVT, b"m%d" % i, kind="event") for i in range(20)]
        box.mark_in_flight(ids[:10])
        box.ack(ids[:3])
        before = box.pending(100)
    with Outbox(path) as box:
        after = box.pending(100)
        # in flight was memory only: after a restart those rows are pending again
        assert [e.id for e in after] == ids[3:]
        assert after[7:] == before
        assert (box.depth(), box.bytes()) == (17, sum(len(e.payload) + len(e.topic) for e in after))
        box.ack(ids)
    with Outbox(path) as box:
        # ids never go back, even when the outbox was empty
        assert box.put(TEL, b"x", kind="telemetry") > ids[-1]


_PRODUCER = """
import sys
from pathlib import Path
from edge_agent.outbox import Outbox

box = Outbox(Path(sys.argv[1]))
i = 0
while True:
    if i % 2:
        ids = box.put_many([(sys.argv[2], b"%d-%d" % (i, k), "telemetry") for k in range(3)])
    else:
        ids = [box.put(sys.argv[2], b"%d" % i, kind="event")]
    print(*ids, flush=True)
    i += 1
"""


def test_kill_9_loses_nothing_accepted(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _PRODUCER, str(path), TEL],
        stdout=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    lines: list[bytes] = []
    deadline = time.monotonic() + 30
    try:
        while len(lines) < 400 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-stream: it is putting as fast as it can
        rest = proc.stdout.read()
        proc.stdout.close()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(lines) == 400, "the producer did not start"
    lines += rest.splitlines(keepends=True)
    accepted = [int(i) for line in lines if line.endswith(b"\n") for i in line.split()]
    with Outbox(path) as box:
        stored = {e.id: e.payload for e in box.pending(1_000_000)}
    assert set(accepted) <= set(stored)
    assert max(stored) - max(accepted) <= 3  # at most the put it was killed in returning
    assert len(accepted) >= 800


def test_byte_bound_drops_oldest_telemetry_first(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "o.db"
    size = len(TEL) + 100
    with Outbox(path, max_bytes=10 * size, clock=clock) as box:
        event = box.put(TEL, b"e" * 100, kind="event")  # oldest of all, but an event
        status = box.put(TEL, b"s" * 100, kind="status")
        first = clock.t
        tels = []
        for _ in range(8):
            clock.t += 1
            tels.append(box.put(TEL, b"t" * 100, kind="telemetry"))
        assert box.dropped() is None
        assert box.bytes() == 10 * size
        box.mark_in_flight([tels[0]])  # in flight: spared while anything else can go
        clock.t += 1
        new = box.put_many([(TEL, b"n" * 100, "telemetry")] * 3)
        box.release_in_flight()
        ids = [e.id for e in box.pending(100)]
        assert ids == [event, status, tels[0], *tels[4:], *new]
        assert box.bytes() == 10 * size
        report = box.dropped()
        assert report is not None
        assert (report.messages, report.bytes) == (3, 3 * size)
        assert (report.first_ts, report.last_ts) == (first + 2, first + 4)
        # telemetry goes first, and all of it before status; events and results last
        box.put_many([(TEL, b"x" * 100, "telemetry")] * 9)
        box.put(TEL, b"y" * 100, kind="cmd-res")
        assert [e.kind for e in box.pending(100)] == [
            "event",
            "status",
            *["telemetry"] * 7,
            "cmd-res",
        ]
        box.put_many([(TEL, b"y" * 100, "cmd-res")] * 8)
        assert [e.kind for e in box.pending(100)] == ["event", *["cmd-res"] * 9]
        with pytest.raises(OutboxError, match="larger than the whole outbox"):
            box.put(TEL, b"z" * 10 * size, kind="event")
    with Outbox(path, max_bytes=10 * size, clock=clock) as box:
        report = box.dropped()  # the counters are in the file
        assert report is not None
        assert report.messages == 3 + 9 + 1 + 8
        assert report.bytes == report.messages * size
        assert (report.first_ts, report.last_ts) == (first, clock.t)
        # with everything in flight the bound still holds: in-flight rows go last, but go
        box.mark_in_flight(e.id for e in box.pending(100))
        box.put(TEL, b"z" * 100, kind="event")
        assert box.bytes() == 10 * size


def test_drop_report_event_and_clear(tmp_path: Path) -> None:
    clock = Clock(time.time() - 600)
    with Outbox(tmp_path / "o.db", max_bytes=1000, clock=clock) as box:
        assert box.drop_event_body() is None
        assert box.put_drop_event(EVT) is None
        for _ in range(30):
            clock.t += 10
            box.put(TEL, tel(1), kind="telemetry")
        report = box.dropped()
        assert report is not None
        assert report.messages > 0
        body = box.drop_event_body(now=time.time())
        assert body is not None
        event = decode_event(json.dumps(body).encode())
        assert (event.kind, event.severity, event.data["messages"]) == (
            "outbox_dropped",
            "warning",
            report.messages,
        )
        assert event.data["bytes"] == report.bytes
        assert event.data["first_ts"] == round(report.first_ts * 1000)
        assert event.data["last_ts"] < body["ts"]
        assert event.message is not None
        assert f"{report.messages} messages" in event.message
        # drops after the report was taken stay counted when it is cleared
        box.put(TEL, tel(1), kind="telemetry")
        box.clear_dropped(report)
        later = box.dropped()
        assert later is not None
        assert later.messages == 1
        box.clear_dropped()
        assert box.dropped() is None
        # the atomic form: the event is stored and its report cleared in one transaction
        box.put_many([(TEL, tel(1), "telemetry")] * 3)
        event_id = box.put_drop_event(EVT)
        assert event_id is not None
        stored = [e for e in box.pending(100) if e.id == event_id]
        assert decode_event(stored[0].payload).data["messages"] == 3
        # storing the event itself evicted telemetry: that is the next report
        later = box.dropped()
        assert later is not None
        assert later.messages >= 1


def test_backlog_batches_combine_samples(box: Outbox) -> None:
    ids = box.put_many([(TEL, tel(seq), "telemetry") for seq in range(10, 17)])
    batches = box.backlog_batches(10, 3)
    assert [b.ids for b in batches] == [tuple(ids[0:3]), tuple(ids[3:6]), (ids[6],)]
    assert batches[2].payload == tel(16)  # a lone row goes out byte for byte
    message = decode_telemetry(batches[0].payload)
    assert message.boot == 2
    assert message.ts is None
    assert message.seq is None
    assert [(s.seq, s.metrics["temperature"]) for s in message.samples or []] == [
        (10, 30.5),
        (11, 31.5),
        (12, 32.5),
    ]
    assert [s.ts for s in message.samples or []] == [
        decode_telemetry(tel(seq)).ts for seq in (10, 11, 12)
    ]
    assert json.loads(batches[0].payload)["samples"][0]["metrics"] == json.loads(tel(10))["metrics"]
    box.mark_in_flight(batches[0].ids)
    assert box.backlog_batches(10, 3)[0].ids == tuple(ids[3:6])
    box.ack(batches[0].ids)  # a batch's PUBACK deletes every row it covers
    assert [e.id for e in box.pending(100)] == ids[3:]


def test_backlog_batches_never_mix_topics_boots_or_seq_gaps(box: Outbox) -> None:
    rows = [
        (TEL, tel(1), "telemetry"),
        (TEL2, tel(1), "telemetry"),
        (TEL, tel(2), "telemetry"),
        (EVT, b'{"kind":"k"}', "event"),
        (TEL2, tel(2), "telemetry"),
        (TEL, tel(4), "telemetry"),  # seq gap: a new batch, so the worker sees the loss
        (TEL, tel(5), "telemetry"),
        (TEL, tel(0, boot=3), "telemetry"),  # a new boot
        (TEL2, tel(None, boot=None, ts=NOW_MS), "telemetry"),  # no seq, no boot
        (TEL2, tel(None, boot=None, ts=NOW_MS + 1), "telemetry"),
    ]
    ids = box.put_many(rows)
    batches = box.backlog_batches(100, 100)
    assert [b.ids for b in batches] == [
        (ids[0], ids[2]),
        (ids[1], ids[4]),
        (ids[3],),
        (ids[5], ids[6]),
        (ids[7],),
        (ids[8], ids[9]),
    ]
    for batch in batches:
        assert {rows[ids.index(i)][0] for i in batch.ids} == {batch.topic}
        if batch.kind == "telemetry":
            decode_telemetry(batch.payload)
    assert b"boot" not in batches[-1].payload
    assert b"seq" not in batches[-1].payload
    # limit_messages counts outgoing messages; nothing later of a topic overtakes a row
    assert [b.ids for b in box.backlog_batches(2, 100)] == [(ids[0], ids[2]), (ids[1],)]
    assert [b.ids for b in box.backlog_batches(3, 100)][-1] == (ids[3],)


def test_backlog_batches_leave_odd_telemetry_alone(box: Outbox) -> None:
    odd = [
        b'{"seq": 3, "metrics": {"x": 1}}',  # no ts: a sample needs one
        b'{"samples": [{"ts": %d, "metrics": {"x": 1}}]}' % NOW_MS,  # already a backlog
        b"not json",
        b'{"ts": %d, "seq": true, "metrics": {"x": 1}}' % NOW_MS,  # a bool is no seq
        tel(7, seq_extra=1),  # an unknown key: the worker dead-letters it, unchanged
    ]
    ids = box.put_many([(TEL, p, "telemetry") for p in [tel(1), *odd, tel(2)]])
    batches = box.backlog_batches(100, 100)
    assert [b.ids for b in batches] == [(i,) for i in ids]
    assert [b.payload for b in batches] == [tel(1), *odd, tel(2)]
    with pytest.raises(ValueError, match="batch_samples"):
        box.backlog_batches(1, 1001)


def test_backlog_batches_respect_the_payload_limit(box: Outbox) -> None:
    ids = box.put_many([(TEL, tel(seq), "telemetry") for seq in range(50)])
    limit = 10 * len(tel(10))
    batches = box.backlog_batches(100, 1000, max_payload_bytes=limit)
    assert [i for b in batches for i in b.ids] == ids
    assert 3 <= len(batches) < 10
    assert all(len(b.payload) <= limit for b in batches)
    assert all(len(b.payload) > limit - len(tel(10)) for b in batches[:-1])  # filled
    for b in batches:
        decode_telemetry(b.payload)


def test_file_mode_and_parent_directory(tmp_path: Path) -> None:
    path = tmp_path / "home" / "edge" / "outbox.db"
    old = os.umask(0)
    try:
        with Outbox(path, synchronous="FULL") as box:
            box.put(TEL, b"x", kind="telemetry")
            assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
            for name in ("outbox.db", "outbox.db-wal"):
                assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name
            assert not (path.parent / "outbox.db-shm").exists()  # exclusive: no shared memory
    finally:
        os.umask(old)
    with Outbox(path) as box:
        assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ValueError, match="synchronous"):
        Outbox(path, synchronous="OFF")  # type: ignore[arg-type]


def test_unusable_files_raise_a_clear_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an sqlite file, it is text\n" * 100)
    with pytest.raises(OutboxError, match=r"garbage\.db is not a usable outbox") as info:
        Outbox(garbage)
    assert "move it aside" in str(info.value)
    assert isinstance(info.value, EdgeError)
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(OutboxError, match="database of something else"):
        Outbox(other)
    # a real outbox whose pages were overwritten in the middle
    broken = tmp_path / "broken.db"
    with Outbox(broken) as box:
        box.put_many([(TEL, os.urandom(500), "telemetry")] * 200)
    with broken.open("r+b") as f:
        f.seek(8192)
        f.write(b"\xff" * 8192)
    with pytest.raises(OutboxError, match=r"broken\.db is not a usable outbox"):
        Outbox(broken)


def test_one_process_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        box.put(TEL, b"x", kind="telemetry")
        with pytest.raises(OutboxError, match="in use by another process"):
            Outbox(path)
        box.put(TEL, b"y", kind="telemetry")  # the first one is not disturbed
    with Outbox(path) as box:
        assert box.depth() == 2
