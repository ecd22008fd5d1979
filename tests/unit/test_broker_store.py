"""The broker's durable store on a real SQLite file: what it records is what it recovers."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from broker.outbox import Message
from broker.store import BrokerStore, StoreError


def _message(payload: bytes, qos: int = 1) -> Message:
    return Message(b"fl/acme/dev-1/telemetry", payload, qos, False)


async def _reopen(path: Path) -> BrokerStore:
    store = BrokerStore(path)
    await store.open()
    return store


async def test_what_is_committed_is_recovered(tmp_path: Path) -> None:
    path = tmp_path / "broker" / "store.sqlite3"
    store = BrokerStore(path)
    assert (await store.open()).sessions == []
    store.save_session("ingest-1", '{"id": "ingest-1"}', None)
    store.subscribe("ingest-1", "fl/+/+/telemetry", 1)
    store.subscribe("ingest-1", "fl/+/+/status", 1)
    store.unsubscribe("ingest-1", "fl/+/+/status")
    journal = store.journal("ingest-1")
    messages = [_message(f"m-{i}".encode()) for i in range(4)]
    for message in messages:
        journal.added(message)
    journal.removed(messages[1])  # acknowledged in the same group: never written
    store.retain("fl/acme/dev-1/status", b"online", 1)
    store.retain("fl/acme/dev-2/status", b"online", 1)
    store.unretain("fl/acme/dev-2/status")
    store.qos2_received("ingest-1", 7, True)
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    again = BrokerStore(path)
    recovered = await again.open()
    assert [(s.client_id, s.identity, s.offline_since) for s in recovered.sessions] == [
        ("ingest-1", '{"id": "ingest-1"}', None)
    ]
    assert recovered.subscriptions == [("ingest-1", "fl/+/+/telemetry", 1)]
    assert [m.payload for m in recovered.messages] == [b"m-0", b"m-2", b"m-3"]
    assert [m.seq for m in recovered.messages] == sorted(m.seq for m in recovered.messages)
    assert recovered.retained == [("fl/acme/dev-1/status", b"online", 1)]
    assert recovered.qos2_received == [("ingest-1", 7)]
    # a removal after the commit deletes the row; new messages continue the sequence
    restored = _message(b"m-2")
    restored.seq = recovered.messages[1].seq
    again.remove_message(restored)
    later = _message(b"m-4")
    again.journal("ingest-1").added(later)
    assert later.seq > recovered.messages[-1].seq
    await again.close()
    third = BrokerStore(path)
    assert [m.payload for m in (await third.open()).messages] == [b"m-0", b"m-3", b"m-4"]
    await third.close()


async def test_deleting_a_session_removes_everything_it_held(tmp_path: Path) -> None:
    store = BrokerStore(tmp_path / "s.sqlite3")
    await store.open()
    store.save_session("dev-1", None, 1.0)
    store.subscribe("dev-1", "fl/acme/dev-1/cmd/#", 1)
    store.journal("dev-1").added(_message(b"kept until deleted"))
    store.qos2_received("dev-1", 3, True)
    await store.close()
    store = BrokerStore(tmp_path / "s.sqlite3")
    held = (await store.open()).messages
    # the broker clears the session's outbox (each message by its key), then deletes it
    for stored in held:
        gone = _message(stored.payload)
        gone.seq = stored.seq
        store.remove_message(gone)
    store.delete_session("dev-1")
    store.save_session("dev-1", None, None)  # the same id, a new session
    await store.close()
    recovered = await (store := BrokerStore(tmp_path / "s.sqlite3")).open()
    await store.close()
    assert [s.client_id for s in recovered.sessions] == ["dev-1"]
    assert recovered.subscriptions == recovered.qos2_received == recovered.messages == []


async def test_after_commit_waits_for_everything_recorded_before_it(tmp_path: Path) -> None:
    store = BrokerStore(tmp_path / "s.sqlite3")
    await store.open()
    order: list[str] = []
    store.after_commit(lambda: order.append("idle"))  # nothing pending: runs at once
    assert order == ["idle"]
    store.journal("c").added(_message(b"x"))
    store.after_commit(lambda: order.append("first"))
    store.retain("fl/acme/dev-1/status", b"on", 1)
    store.after_commit(lambda: order.append("second"))
    assert order == ["idle"]
    assert store.busy
    for _ in range(200):
        if not store.busy:
            break
        await asyncio.sleep(0.01)
    assert order == ["idle", "first", "second"]
    assert store.commits >= 1
    assert store.changes == 2
    await store.close()


async def test_a_second_broker_cannot_open_the_same_store(tmp_path: Path) -> None:
    first = BrokerStore(tmp_path / "s.sqlite3")
    await first.open()
    try:
        with pytest.raises(StoreError, match="another broker is using"):
            await BrokerStore(tmp_path / "s.sqlite3").open()
    finally:
        await first.close()
