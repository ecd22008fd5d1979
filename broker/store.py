"""The embedded broker's durable store: persistent sessions, their subscriptions and queued
QoS 1/2 messages, QoS 2 packet ids not yet released, and retained messages, in SQLite (WAL).

The broker keeps working from memory; the store is a journal of what it holds, so that a
restart after kill -9 finds it again. Changes are grouped: whatever the event loop records
while one commit runs (in the store's own thread) goes into the next one, so a commit costs
one transaction per group, not per message. `after_commit` runs a callback once everything
recorded before it is committed: the broker writes a PUBACK that way, so a publisher is
never acknowledged for a message the store could still lose.

A committed transaction survives the process being killed (it is in the WAL file, in the
operating system's page cache). With `sync="full"` every commit is also fsync'ed and
survives a power cut, at the price of a disk flush per group.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Protocol

from broker.errors import BrokerError
from core.retry import Backoff

log = logging.getLogger("broker.store")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    client_id TEXT PRIMARY KEY,
    identity TEXT,            -- the principal and certificate serial, as the broker wrote them
    offline_since REAL        -- unix time; NULL while connected
);
CREATE TABLE IF NOT EXISTS subscriptions (
    client_id TEXT NOT NULL,
    filter TEXT NOT NULL,
    qos INTEGER NOT NULL,
    PRIMARY KEY (client_id, filter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,  -- the order messages were queued in, store-wide
    client_id TEXT NOT NULL,
    topic BLOB NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS qos2_received (
    client_id TEXT NOT NULL,
    packet_id INTEGER NOT NULL,
    PRIMARY KEY (client_id, packet_id)
) WITHOUT ROWID;
"""
# SQLite allows 32,766 host parameters per statement; stay far below
_IN_CHUNK = 500
RETRY_MAX_S = 5.0
# at shutdown, a commit that keeps failing is tried this often, then given up (and logged)
CLOSE_TRIES = 3
# free pages returned to the file system per step, every VACUUM_EVERY commits
VACUUM_PAGES = 2000
VACUUM_EVERY = 500

Sync = Literal["normal", "full"]


class StoreError(BrokerError):
    """The store cannot be opened or used."""


class Stored(Protocol):
    """What the store needs of a queued message (broker.outbox.Message)."""

    seq: int
    topic: bytes
    payload: bytes
    qos: int
    retain: bool


@dataclass
class StoredSession:
    client_id: str
    identity: str | None
    offline_since: float | None


@dataclass
class StoredMessage:
    seq: int
    client_id: str
    topic: bytes
    payload: bytes
    qos: int
    retain: bool


@dataclass
class Recovered:
    """What the store held when the broker started."""

    sessions: list[StoredSession] = field(default_factory=list)
    subscriptions: list[tuple[str, str, int]] = field(default_factory=list)
    retained: list[tuple[str, bytes, int]] = field(default_factory=list)
    qos2_received: list[tuple[str, int]] = field(default_factory=list)
    messages: list[StoredMessage] = field(default_factory=list)


class _Batch:
    """The changes of one commit; the last change of a key wins."""

    def __init__(self) -> None:
        self.deleted_sessions: set[str] = set()
        self.sessions: dict[str, tuple[str, str | None, float | None]] = {}
        self.subscriptions: dict[tuple[str, str], int | None] = {}
        self.retained: dict[str, tuple[bytes, int] | None] = {}
        self.qos2: dict[tuple[str, int], bool] = {}
        self.inserts: dict[int, tuple[int, str, bytes, bytes, int, int]] = {}
        self.deletes: set[int] = set()
        self.callbacks: list[Callable[[], None]] = []
        self.ops = 0

    def forget_client(self, client_id: str) -> None:
        """The session is deleted: earlier changes to it need not be written."""
        self.deleted_sessions.add(client_id)
        self.sessions.pop(client_id, None)
        for key in [k for k in self.subscriptions if k[0] == client_id]:
            del self.subscriptions[key]
        for key2 in [k for k in self.qos2 if k[0] == client_id]:
            del self.qos2[key2]
        for seq in [s for s, row in self.inserts.items() if row[1] == client_id]:
            del self.inserts[seq]


class Journal:
    """One session's outbox writes through this: messages queued and gone."""

    __slots__ = ("_client_id", "_store")

    def __init__(self, store: BrokerStore, client_id: str) -> None:
        self._store = store
        self._client_id = client_id

    def added(self, message: Stored) -> None:
        self._store.add_message(self._client_id, message)

    def removed(self, message: Stored) -> None:
        self._store.remove_message(message)


class BrokerStore:
    """`await store.open()` returns what it held; record changes; `await store.close()`."""

    def __init__(self, path: Path, sync: Sync = "normal") -> None:
        self.path = path
        self.sync = sync
        self._db: sqlite3.Connection | None = None
        self._lock_file: IO[bytes] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._current = _Batch()
        self._committing: _Batch | None = None
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._seq = 0
        self._applied = 0  # commits, counted in the store's thread
        # figures for metrics
        self.commits = 0
        self.changes = 0
        self.errors = 0
        self.commit_seconds = 0.0

    # -- life cycle -------------------------------------------------------------------------
    async def open(self) -> Recovered:
        """Lock and open the store (creating it, 0600), read what it holds, start committing."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="broker-store")
        recovered = await self._run(self._open)
        self._seq = max((m.seq for m in recovered.messages), default=0)
        self._flusher = asyncio.create_task(self._flush_loop(), name="broker-store")
        return recovered

    async def close(self) -> None:
        """Commit what is recorded, then close."""
        self._closing = True
        self._wake.set()
        if self._flusher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        if self._executor is not None:
            with contextlib.suppress(StoreError):
                await self._run(self._close_db)
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @property
    def busy(self) -> bool:
        """True while something recorded is not yet committed."""
        return self._current.ops > 0 or self._committing is not None

    @property
    def pending(self) -> int:
        """Changes recorded and not yet committed."""
        ops = self._current.ops
        if self._committing is not None:
            ops += self._committing.ops
        return ops

    def size_bytes(self) -> int:
        """The database and its write-ahead log on disk."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once every change recorded so far is committed (now, if it is)."""
        if self._current.ops:
            self._current.callbacks.append(callback)
        elif self._committing is not None:
            self._committing.callbacks.append(callback)
        else:
            callback()

    # -- changes ----------------------------------------------------------------------------
    def journal(self, client_id: str) -> Journal:
        return Journal(self, client_id)

    def save_session(
        self, client_id: str, identity: str | None, offline_since: float | None
    ) -> None:
        self._current.sessions[client_id] = (client_id, identity, offline_since)
        self._changed()

    def delete_session(self, client_id: str) -> None:
        """The session, its subscriptions and QoS 2 state (its messages go one by one, by
        `remove_message`, as its outbox is cleared)."""
        self._current.forget_client(client_id)
        self._changed()

    def subscribe(self, client_id: str, topic_filter: str, qos: int) -> None:
        self._current.subscriptions[(client_id, topic_filter)] = qos
        self._changed()

    def unsubscribe(self, client_id: str, topic_filter: str) -> None:
        self._current.subscriptions[(client_id, topic_filter)] = None
        self._changed()

    def retain(self, topic: str, payload: bytes, qos: int) -> None:
        self._current.retained[topic] = (payload, qos)
        self._changed()

    def unretain(self, topic: str) -> None:
        self._current.retained[topic] = None
        self._changed()

    def qos2_received(self, client_id: str, packet_id: int, held: bool) -> None:
        self._current.qos2[(client_id, packet_id)] = held
        self._changed()

    def add_message(self, client_id: str, message: Stored) -> None:
        self._seq += 1
        message.seq = self._seq
        self._current.inserts[message.seq] = (
            message.seq, client_id, message.topic, message.payload, message.qos,
            int(message.retain),
        )  # fmt: skip
        self._changed()

    def remove_message(self, message: Stored) -> None:
        seq = message.seq
        if not seq:
            return
        message.seq = 0
        if self._current.inserts.pop(seq, None) is None:
            self._current.deletes.add(seq)
        self._changed()

    def _changed(self) -> None:
        self._current.ops += 1
        if self._current.ops == 1:
            self._wake.set()

    # -- committing -------------------------------------------------------------------------
    async def _flush_loop(self) -> None:
        backoff = Backoff(0.1, RETRY_MAX_S)
        given_up = 0
        while True:
            if not self._current.ops and not self._current.callbacks:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                # let this turn of the event loop record what it will; they commit together
                await asyncio.sleep(0)
            batch, self._current = self._current, _Batch()
            self._committing = batch
            while True:
                try:
                    started = time.perf_counter()
                    await self._run(self._apply, batch)
                except StoreError as exc:
                    self.errors += 1
                    log.error("event=store_commit_failed changes=%d error=%s", batch.ops, exc)
                    if self._closing:
                        given_up += 1
                        if given_up >= CLOSE_TRIES:
                            log.error(
                                "event=store_abandoned changes=%d callbacks=%d detail=%s",
                                batch.ops + self._current.ops, len(batch.callbacks), exc,
                            )  # fmt: skip
                            self._committing = None
                            return
                    await asyncio.sleep(backoff.next())
                    continue
                backoff.reset()
                given_up = 0
                self.commits += 1
                self.changes += batch.ops
                self.commit_seconds += time.perf_counter() - started
                break
            self._committing = None
            for callback in batch.callbacks:
                try:
                    callback()
                except Exception:  # one connection's reply must not stop the store
                    log.exception("event=store_callback_failed")

    async def _run(self, fn: Callable[..., object], *args: object) -> Recovered:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StoreError(f"broker store {self.path}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"broker store {self.path}: {exc.strerror or exc}") from exc
        return result  # type: ignore[return-value]

    # -- in the store's thread --------------------------------------------------------------
    def _open(self) -> Recovered:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_file = open(lock_path, "ab")  # noqa: SIM115 - held for the broker's life
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock_file.close()
            self._lock_file = None
            raise StoreError(
                f"another broker is using {self.path}; stop it, or give this one its own "
                "FIELDLINE_BROKER__STORE_PATH"
            ) from exc
        if not self.path.exists():
            # the store holds message payloads: readable by the broker's user only
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            db.close()
            raise StoreError(
                f"{self.path} was written by a newer fieldline (store version {version}); "
                "upgrade fieldline or move the file away"
            )
        if version == 0:
            # set before the first table: freed pages can then be given back (incrementally)
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        # the WAL file is truncated to this after a checkpoint instead of keeping its peak
        db.execute("PRAGMA journal_size_limit=67108864")
        db.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._db = db
        return Recovered(
            sessions=[StoredSession(*row) for row in db.execute("SELECT * FROM sessions")],
            subscriptions=list(db.execute("SELECT client_id, filter, qos FROM subscriptions")),
            retained=list(db.execute("SELECT topic, payload, qos FROM retained")),
            qos2_received=list(db.execute("SELECT client_id, packet_id FROM qos2_received")),
            messages=[
                StoredMessage(seq, client, bytes(topic), bytes(payload), qos, bool(retain))
                for seq, client, topic, payload, qos, retain in db.execute(
                    "SELECT * FROM messages ORDER BY seq"
                )
            ],
        )

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _apply(self, b: _Batch) -> None:
        db = self._db
        if db is None:
            raise sqlite3.OperationalError("the store is closed")
        db.execute("BEGIN")
        try:
            for chunk in _chunks(sorted(b.deleted_sessions)):
                marks = ",".join("?" * len(chunk))
                for table in ("sessions", "subscriptions", "qos2_received"):
                    db.execute(f"DELETE FROM {table} WHERE client_id IN ({marks})", chunk)  # noqa: S608
            db.executemany("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)", b.sessions.values())
            db.executemany(
                "INSERT OR REPLACE INTO subscriptions VALUES (?, ?, ?)",
                [(c, f, q) for (c, f), q in b.subscriptions.items() if q is not None],
            )
            db.executemany(
                "DELETE FROM subscriptions WHERE client_id = ? AND filter = ?",
                [key for key, q in b.subscriptions.items() if q is None],
            )
            db.executemany(
                "INSERT OR REPLACE INTO retained VALUES (?, ?, ?)",
                [(t, m[0], m[1]) for t, m in b.retained.items() if m is not None],
            )
            db.executemany(
                "DELETE FROM retained WHERE topic = ?",
                [(t,) for t, m in b.retained.items() if m is None],
            )
            db.executemany(
                "INSERT OR IGNORE INTO qos2_received VALUES (?, ?)",
                [key for key, held in b.qos2.items() if held],
            )
            db.executemany(
                "DELETE FROM qos2_received WHERE client_id = ? AND packet_id = ?",
                [key for key, held in b.qos2.items() if not held],
            )
            db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)", b.inserts.values())
            db.executemany("DELETE FROM messages WHERE seq = ?", [(s,) for s in b.deletes])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._applied += 1
        if self._applied % VACUUM_EVERY == 0:
            # the file shrinks after a backlog drains, a step at a time
            db.execute(f"PRAGMA incremental_vacuum({VACUUM_PAGES})").fetchall()


def _chunks(items: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == _IN_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
