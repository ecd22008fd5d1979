"""The durable store-and-forward outbox: every upstream message waits here until its PUBACK.

Rows live in one SQLite file (WAL journal): `put` commits before it returns, and only `ack`
deletes, so delivery is at least once. "In flight" is memory only: after a restart every row
is pending again, which is what makes `kill -9` safe. With the default `synchronous="NORMAL"`
a committed row survives the death of the process (the WAL is in the OS page cache), but power
loss or a kernel crash may lose the last transactions (the file stays consistent);
`synchronous="FULL"` syncs the WAL at every commit and survives those too, at the cost of
an fsync per transaction (which `put_many` amortises).

The file is bounded by bytes (payload + topic). A put past the bound drops the oldest rows,
telemetry first, then status, then events and command results; what was dropped is counted
in the file and reported upstream as an `outbox_dropped` event once the agent is back online.
The file is locked to one process: a second agent on the same path gets an OutboxError.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

from edge_agent.errors import OutboxError
from schemas.limits import DEFAULT_LIMITS

__all__ = ["Batch", "DropReport", "Entry", "Outbox"]

# Eviction order: lower first. Status is retained (the newest wins), events and command
# results are what an operator looks for, telemetry is the bulk and the most replaceable.
_PRIORITY = {"telemetry": 0, "status": 1, "event": 2, "cmd-res": 2}
_VERSION = 1  # PRAGMA user_version: marks the file as an outbox of this layout
_SCHEMA = """
BEGIN;
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: never reused, even when empty
    topic TEXT NOT NULL, payload BLOB NOT NULL, kind TEXT NOT NULL,
    pri INTEGER NOT NULL, size INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE INDEX outbox_evict ON outbox (pri, id);
CREATE TABLE dropped (one INTEGER PRIMARY KEY CHECK (one = 1), messages INTEGER NOT NULL,
    bytes INTEGER NOT NULL, first_ts REAL, last_ts REAL);
INSERT INTO dropped VALUES (1, 0, 0, NULL, NULL);
PRAGMA user_version = 1;
COMMIT;
"""
_IDS = "SELECT value FROM json_each(?)"  # a list of ids bound as one JSON parameter
_SINGLE_KEYS = frozenset({"ts", "seq", "boot", "metrics"})


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored message; `created_at` is epoch seconds."""

    id: int
    topic: str
    payload: bytes
    kind: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Batch:
    """One message to publish and the rows it covers: ack all of `ids` on its PUBACK."""

    topic: str
    payload: bytes
    kind: str
    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DropReport:
    """What the byte bound dropped since the last clear; times are epoch seconds of creation."""

    messages: int
    bytes: int
    first_ts: float
    last_ts: float


class _Sample(NamedTuple):
    boot: int | None
    seq: int | None
    json: bytes  # {"ts", "seq"?, "metrics"} as it goes into `samples`


def _sample(payload: bytes) -> _Sample | None:
    """The backlog sample of a single-form telemetry payload, or None if it must go as is."""
    try:
        msg = json.loads(payload)
    except ValueError:
        return None
    if type(msg) is not dict or not msg.keys() <= _SINGLE_KEYS:
        return None
    seq, boot = msg.pop("seq", None), msg.pop("boot", None)
    # A backlog sample needs its own ts; an odd seq or boot is left to the worker to judge.
    odd = any(v is not None and type(v) is not int for v in (seq, boot))  # bool is no int here
    if odd or msg.get("ts") is None or msg.get("metrics") is None:
        return None
    if seq is not None:
        msg["seq"] = seq
    return _Sample(boot, seq, json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode())


class _Builder:
    """Consecutive samples of one topic becoming one `samples` payload."""

    def __init__(self, id_: int, payload: bytes, sample: _Sample) -> None:
        self.ids, self.parts, self.payload = [id_], [sample.json], payload
        self.boot, self.seq, self.size = sample.boot, sample.seq, len(sample.json)
        boot = b"" if sample.boot is None else b'"boot":%d,' % sample.boot
        self.prefix = b"{" + boot + b'"samples":['

    def accepts(self, s: _Sample, max_samples: int, max_bytes: int) -> bool:
        # The worker counts seq gaps per message from its first and last seq only, and a
        # backlog is of one boot: split wherever seq does not continue so loss stays visible.
        return (
            len(self.ids) < max_samples
            and s.boot == self.boot
            and (s.seq is None if self.seq is None else s.seq == self.seq + 1)
            and len(self.prefix) + self.size + len(s.json) + 3 <= max_bytes
        )

    def add(self, id_: int, s: _Sample) -> None:
        self.ids.append(id_)
        self.parts.append(s.json)
        self.size += len(s.json) + 1
        self.seq = s.seq

    def build(self, topic: str) -> Batch:
        # A single row goes out byte for byte as it was put.
        payload = (
            self.payload if len(self.ids) == 1 else self.prefix + b",".join(self.parts) + b"]}"
        )
        return Batch(topic, payload, "telemetry", tuple(self.ids))


class Outbox:
    """A SQLite outbox for one agent; synchronous, one connection, used from one thread."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 50_000_000,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.path, self.max_bytes, self._clock = Path(path), max_bytes, clock
        self._in_flight: set[int] = set()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Created here with 0600 so that SQLite (which copies the mode to its -wal file)
            # never leaves telemetry world-readable, whatever the umask.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(self.path, 0o600)
        except OSError as exc:
            raise OutboxError(f"cannot create the outbox {self.path}: {exc}") from exc
        # timeout=0: the file is ours alone (see _open), so waiting for a lock means nothing
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        try:
            self._count, self._bytes = self._open(synchronous)
        except (sqlite3.Error, OutboxError) as exc:
            self._db.close()
            if isinstance(exc, OutboxError):
                raise
            if "locked" in str(exc):
                raise OutboxError(
                    f"{self.path} is in use by another process (a second agent with the same "
                    "outbox?); stop it or give this agent its own outbox path"
                ) from exc
            raise OutboxError(self._unusable(str(exc))) from exc

    def _unusable(self, why: str) -> str:
        return (
            f"{self.path} is not a usable outbox ({why}); move it aside and start again to "
            "begin with an empty outbox (messages it held that were never sent are lost)"
        )

    def _open(self, synchronous: str) -> tuple[int, int]:
        db = self._db
        # One process at a time: two agents sharing a file would both publish every row. The
        # lock is taken by the first transaction below and held until close (or death).
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        # The first statement that reads the header: a file that is not SQLite fails here.
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
            raise OutboxError(self._unusable("its filesystem cannot hold a WAL journal"))
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("BEGIN IMMEDIATE")
        db.execute("COMMIT")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            if db.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
                raise OutboxError(self._unusable("it is an SQLite database of something else"))
            db.executescript(_SCHEMA)
        elif version != _VERSION:
            raise OutboxError(
                self._unusable(f"layout version {version}, this agent reads {_VERSION}")
            )
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise OutboxError(self._unusable(f"integrity check: {check}"))
        count, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM outbox").fetchone()
        return int(count), int(size)

    def close(self) -> None:
        """Close the file; unacknowledged rows stay for the next start."""
        self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {self.path}: {exc}") from exc

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # One write transaction; on failure the in-memory mirrors are put back as well.
        saved = self._count, self._bytes, set(self._in_flight)
        with self._errors():
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._count, self._bytes, self._in_flight = saved
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # --- storing ---------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, *, kind: str) -> int:
        """Store one message durably and return its id (ids only grow)."""
        return self.put_many([(topic, payload, kind)])[0]

    def put_many(self, items: Iterable[tuple[str, bytes, str]]) -> list[int]:
        """Store `(topic, payload, kind)` messages in one transaction; their ids, in order."""
        now = self._clock()
        rows = []
        for topic, payload, kind in items:
            if kind not in _PRIORITY:
                raise ValueError(f"kind must be one of {', '.join(_PRIORITY)}, not {kind!r}")
            size = len(payload) + len(topic.encode())
            if size > self.max_bytes:
                raise OutboxError(
                    f"a {size}-byte message on {topic} is larger than the whole outbox "
                    f"({self.max_bytes} bytes): raise max_bytes or send smaller messages"
                )
            rows.append((topic, bytes(payload), kind, _PRIORITY[kind], size, now))
        with self._tx() as db:
            return self._insert(db, rows)

    def _insert(self, db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[int]:
        sql = (
            "INSERT INTO outbox (topic, payload, kind, pri, size, created_at) VALUES (?,?,?,?,?,?)"
        )
        ids = [int(db.execute(sql, row).lastrowid or 0) for row in rows]
        self._count += len(rows)
        self._bytes += sum(row[4] for row in rows)
        if self._bytes > self.max_bytes:
            # Inserted first, evicted after: a put_many larger than the bound drops its own
            # oldest telemetry too, and all of it is counted.
            self._evict(db, self._bytes - self.max_bytes)
        return ids

    def _evict(self, db: sqlite3.Connection, excess: int) -> None:
        chosen: list[tuple[int, int, float]] = []
        spare: list[tuple[int, int, float]] = []  # in flight: dropped only as a last resort
        freed = 0
        cursor = db.execute("SELECT id, size, created_at FROM outbox ORDER BY pri, id")
        for row in cursor:
            if row[0] in self._in_flight:
                spare.append(row)
                continue
            chosen.append(row)
            freed += row[1]
            if freed >= excess:
                break
        cursor.close()
        for row in spare:
            if freed >= excess:
                break
            chosen.append(row)
            freed += row[1]
        ids = [row[0] for row in chosen]
        times = [row[2] for row in chosen]
        db.execute(f"DELETE FROM outbox WHERE id IN ({_IDS})", (json.dumps(ids),))  # noqa: S608
        db.execute(
            "UPDATE dropped SET messages = messages + ?, bytes = bytes + ?,"
            " first_ts = min(coalesce(first_ts, ?), ?), last_ts = max(coalesce(last_ts, ?), ?)",
            (len(ids), freed, min(times), min(times), max(times), max(times)),
        )
        self._count -= len(ids)
        self._bytes -= freed
        self._in_flight.difference_update(ids)

    # --- publishing ------------------------------------------------------------------

    def pending(self, limit: int) -> list[Entry]:
        """Up to `limit` rows not in flight, oldest first."""
        with self._errors():
            rows = self._db.execute(
                "SELECT id, topic, payload, kind, created_at FROM outbox ORDER BY id LIMIT ?",
                (limit + len(self._in_flight),),
            ).fetchall()
        return [Entry(*row) for row in rows if row[0] not in self._in_flight][:limit]

    def backlog_batches(
        self,
        limit_messages: int,
        batch_samples: int,
        *,
        max_payload_bytes: int = DEFAULT_LIMITS.max_payload_bytes,
    ) -> list[Batch]:
        """Up to `limit_messages` messages covering the pending rows, oldest first.

        Consecutive single-form telemetry of one topic (same boot, seq continuing) becomes one
        `{"boot"?, "samples": [...]}` payload of at most `batch_samples` samples and
        `max_payload_bytes`; anything else, and a lone row, goes out as it was put.
        """
        if not 1 <= batch_samples <= DEFAULT_LIMITS.max_samples:
            raise ValueError(f"batch_samples must be 1..{DEFAULT_LIMITS.max_samples}")
        done: list[Batch] = []
        building: dict[str, _Builder] = {}
        with self._errors():
            cursor = self._db.execute("SELECT id, topic, payload, kind FROM outbox ORDER BY id")
            for id_, topic, payload, kind in cursor:
                if id_ in self._in_flight:
                    continue
                sample = _sample(payload) if kind == "telemetry" else None
                builder = building.get(topic)
                if sample and builder and builder.accepts(sample, batch_samples, max_payload_bytes):
                    builder.add(id_, sample)
                    continue
                if len(done) + len(building) >= limit_messages:
                    break
                if builder is not None:  # closed now: nothing later may overtake this row
                    done.append(building.pop(topic).build(topic))
                if sample is not None:
                    building[topic] = _Builder(id_, payload, sample)
                else:
                    done.append(Batch(topic, payload, kind, (id_,)))
            cursor.close()
        done.extend(builder.build(topic) for topic, builder in building.items())
        return sorted(done, key=lambda batch: batch.ids[0])

    def mark_in_flight(self, ids: Iterable[int]) -> None:
        """These rows were published: `pending` and `backlog_batches` skip them until released."""
        self._in_flight.update(ids)

    def release_in_flight(self) -> None:
        """The connection dropped: every unacknowledged row is pending again."""
        self._in_flight.clear()

    def ack(self, ids: Iterable[int]) -> int:
        """The broker acknowledged these rows: delete them; returns how many were still here."""
        ids = list(ids)
        with self._tx() as db:
            sizes = db.execute(
                f"DELETE FROM outbox WHERE id IN ({_IDS}) RETURNING size",  # noqa: S608
                (json.dumps(ids),),
            ).fetchall()
            self._count -= len(sizes)
            self._bytes -= sum(size for (size,) in sizes)
            self._in_flight.difference_update(ids)
        return len(sizes)

    # --- what the bound dropped ------------------------------------------------------

    def dropped(self) -> DropReport | None:
        """What the byte bound dropped since the last clear, or None."""
        with self._errors():
            row = self._db.execute(
                "SELECT messages, bytes, first_ts, last_ts FROM dropped"
            ).fetchone()
        return DropReport(*row) if row[0] else None

    def clear_dropped(self, report: DropReport | None = None) -> None:
        """Forget the drops, or only those of `report` (drops after it stay counted)."""
        with self._tx() as db:
            self._clear(db, report)

    def _clear(self, db: sqlite3.Connection, report: DropReport | None) -> None:
        if report is not None:
            # Counts stay exact; the time range of what remains stays as wide as before.
            db.execute(
                "UPDATE dropped SET messages = max(messages - ?, 0), bytes = max(bytes - ?, 0)",
                (report.messages, report.bytes),
            )
        db.execute(
            "UPDATE dropped SET messages = 0, bytes = 0, first_ts = NULL, last_ts = NULL"
            " WHERE ? OR messages = 0",
            (report is None,),
        )

    def drop_event_body(self, now: float | None = None) -> dict[str, Any] | None:
        """The `outbox_dropped` Event payload (a dict) for what was dropped, or None."""
        report = self.dropped()
        return None if report is None else self._event_body(report, now)

    def _event_body(self, report: DropReport, now: float | None) -> dict[str, Any]:
        first, last = (datetime.fromtimestamp(t, UTC) for t in (report.first_ts, report.last_ts))
        return {
            "ts": _ms(self._clock() if now is None else now),
            "kind": "outbox_dropped",
            "severity": "warning",
            "message": (
                f"the outbox reached its bound of {self.max_bytes} bytes: {report.messages} "
                f"messages ({report.bytes} bytes) created from {first:%Y-%m-%d %H:%M:%S} to "
                f"{last:%Y-%m-%d %H:%M:%S} UTC were dropped, oldest telemetry first"
            ),
            "data": {
                "messages": report.messages,
                "bytes": report.bytes,
                "first_ts": _ms(report.first_ts),
                "last_ts": _ms(report.last_ts),
            },
        }

    def put_drop_event(self, topic: str, now: float | None = None) -> int | None:
        """Store the drop event on `topic` and clear what it reports, atomically; its id or None."""
        report = self.dropped()
        if report is None:
            return None
        payload = json.dumps(self._event_body(report, now), separators=(",", ":")).encode()
        size = len(payload) + len(topic.encode())
        with self._tx() as db:
            row = (topic, payload, "event", _PRIORITY["event"], size, self._clock())
            id_ = self._insert(db, [row])[0]
            # In the same transaction: a kill in between neither loses nor repeats the report.
            self._clear(db, report)
        return id_

    # --- metrics ---------------------------------------------------------------------

    def depth(self) -> int:
        """Rows stored (pending and in flight)."""
        return self._count

    def oldest_age_s(self, now: float | None = None) -> float | None:
        """Seconds since the oldest stored row was put, or None when empty."""
        with self._errors():
            row = self._db.execute("SELECT created_at FROM outbox ORDER BY id LIMIT 1").fetchone()
        if row is None:
            return None
        return max(0.0, (self._clock() if now is None else now) - float(row[0]))

    def bytes(self) -> int:
        """Bytes stored, as the bound counts them (payload + topic)."""
        return self._bytes


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
