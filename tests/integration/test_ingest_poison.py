"""Poison: messages that pass the schema but that the database refuses, for good or every time.

No such message may stop its tenant or hold back anyone's acknowledgements: the batch it
is in is split until it is alone, it becomes a dead letter `db_rejected` with the SQLSTATE,
and everything else commits. The poisons are planted in the database (a CHECK constraint,
triggers raising a chosen SQLSTATE), so they are deterministic and pass decoding.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from ingest_worker import writer
from ingest_worker.service import IngestWorker
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.ingest import burst, count, fetch, fetchval, wait_for, worker_config

pytestmark = pytest.mark.integration

ACME = "tenant_acme.numeric_values"
GLOBEX = "tenant_globex.numeric_values"
CHECK_VIOLATION = 666.0  # refused by a CHECK constraint: 23514
OUT_OF_MEMORY = 777.0  # a trigger raises 53200, as the chunk bomb made PostgreSQL do
DEADLOCK = 888.0  # a trigger raises 40P01 every time: transient, but never passing
SLOW = 999.0  # a trigger sleeps 3 s: past the statement timeout every time

POISON = f"""
CREATE FUNCTION public.fl_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.value = {OUT_OF_MEMORY} THEN
        RAISE EXCEPTION 'out of shared memory (planted)' USING ERRCODE = '53200';
    END IF;
    IF NEW.value = {DEADLOCK} THEN
        RAISE EXCEPTION 'deadlock detected (planted)' USING ERRCODE = '40P01';
    END IF;
    IF NEW.value = {SLOW} THEN
        PERFORM pg_sleep(3);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER fl_poison BEFORE INSERT ON {ACME} FOR EACH ROW EXECUTE FUNCTION public.fl_poison();
ALTER TABLE {ACME} ADD CONSTRAINT fl_no_666 CHECK (value <> {CHECK_VIOLATION});
"""


def telemetry(tenant: str, device: str, values: list[float]) -> list[tuple[str, bytes]]:
    base = int(time.time() * 1000) - 60_000
    return [
        (
            f"fl/{tenant}/{device}/telemetry",
            json.dumps({"ts": base + i, "metrics": {"v": v}}).encode(),
        )
        for i, v in enumerate(values)
    ]


async def execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def rows(dsn: str, table: str, n: int) -> bool:
    return await count(dsn, table) >= n


async def planted(broker: BrokerUnderTest, dsn: str) -> None:
    """Both tenants exist (one message each), then the poison goes into acme's table."""
    await asyncio.to_thread(burst, broker, broker.pki.device, telemetry("acme", "dev-1", [0.5]))
    await asyncio.to_thread(
        burst, broker, broker.pki.device_other_tenant, telemetry("globex", "dev-9", [0.5])
    )
    await wait_for(lambda: rows(dsn, ACME, 1), 15, "acme's first row")
    await wait_for(lambda: rows(dsn, GLOBEX, 1), 15, "globex's first row")
    await execute(dsn, POISON)


async def publish_together(broker: BrokerUnderTest, *parts: tuple[Any, list[Any]]) -> None:
    """Each device's messages at once, the devices side by side (so they share batches)."""
    await asyncio.gather(
        *(asyncio.to_thread(burst, broker, bundle, messages) for bundle, messages in parts)
    )


def sample(worker: IngestWorker, name: str, **labels: str) -> float:
    """A metric of the worker, as Prometheus would scrape it (0 before it is first counted)."""
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0


def failures(worker: IngestWorker, failure: str, state: str) -> float:
    return sample(worker, "fieldline_ingest_batch_failures_total", failure=failure, sqlstate=state)


async def test_refused_messages_become_dead_letters_and_the_rest_commits(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str
) -> None:
    broker = broker_factory("mosquitto")
    pki = broker.pki
    dsn = timescale_dsn
    # a long batch window: the poisons share their batch with good messages of both devices
    config = worker_config(broker, dsn, batch_max_wait_s=0.3)
    async with IngestWorker(config) as worker:
        await worker.wait_connected(15)
        await planted(broker, dsn)
        dev1 = [float(i) for i in range(1, 21)]
        dev1[5], dev1[12] = CHECK_VIOLATION, OUT_OF_MEMORY
        await publish_together(
            broker,
            (pki.device, telemetry("acme", "dev-1", dev1)),
            (pki.device2, telemetry("acme", "dev-2", [100.0 + i for i in range(10)])),
            (pki.device_other_tenant, telemetry("globex", "dev-9", [200.0 + i for i in range(10)])),
        )
        await wait_for(lambda: rows(dsn, ACME, 1 + 18 + 10), 30, "acme's good rows")
        await wait_for(lambda: rows(dsn, GLOBEX, 1 + 10), 30, "globex's rows")
        await wait_for(lambda: rows(dsn, "fieldline.dead_letters", 2), 30, "two dead letters")
        await wait_for(lambda: _all_acknowledged(worker), 10, "every message acknowledged")
        assert (
            sample(worker, "fieldline_ingest_batch_splits_total") >= 1
        )  # found by splitting its batch
        assert failures(worker, "permanent", "53200") >= 1
        assert failures(worker, "permanent", "23514") >= 1

    values = await fetch(dsn, f"SELECT value FROM {ACME} ORDER BY value")  # noqa: S608
    good = [0.5] + [v for v in dev1 if v not in (CHECK_VIOLATION, OUT_OF_MEMORY)]
    assert [r["value"] for r in values] == sorted(good + [100.0 + i for i in range(10)])
    dead = await fetch(
        dsn, "SELECT topic, payload, reason, error FROM fieldline.dead_letters ORDER BY error"
    )
    assert [(r["topic"], r["reason"]) for r in dead] == [
        ("fl/acme/dev-1/telemetry", "db_rejected")
    ] * 2
    assert "SQLSTATE 23514" in dead[0]["error"]
    assert "fl_no_666" in dead[0]["error"]
    assert "SQLSTATE 53200" in dead[1]["error"]
    assert "planted" in dead[1]["error"]
    assert b"666" in bytes(dead[0]["payload"])
    assert b"777" in bytes(dead[1]["payload"])


async def test_a_message_failing_transiently_every_time_is_isolated_after_n_tries(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str
) -> None:
    broker = broker_factory("mosquitto")
    pki = broker.pki
    dsn = timescale_dsn
    config = worker_config(broker, dsn, batch_max_wait_s=0.3, transient_tries=3)
    async with IngestWorker(config) as worker:
        await worker.wait_connected(15)
        await planted(broker, dsn)
        dev1 = [1.0, 2.0, DEADLOCK, 4.0, 5.0]
        await publish_together(
            broker,
            (pki.device, telemetry("acme", "dev-1", dev1)),
            (pki.device2, telemetry("acme", "dev-2", [10.0, 11.0])),
            (pki.device_other_tenant, telemetry("globex", "dev-9", [20.0, 21.0])),
        )
        await wait_for(lambda: rows(dsn, "fieldline.dead_letters", 1), 30, "the dead letter")
        await wait_for(lambda: rows(dsn, ACME, 1 + 4 + 2), 10, "acme's good rows")
        await wait_for(lambda: rows(dsn, GLOBEX, 1 + 2), 10, "globex's rows")
        await wait_for(lambda: _all_acknowledged(worker), 10, "every message acknowledged")
        tried = failures(worker, "transient", "40P01")
        assert tried >= 3  # retried as a deadlock should be, first
        await asyncio.sleep(1.0)
        assert failures(worker, "transient", "40P01") == tried  # and then no more
    error = await fetchval(
        dsn, "SELECT error FROM fieldline.dead_letters WHERE reason = 'db_rejected'"
    )
    assert "SQLSTATE 40P01" in error


async def test_a_statement_past_the_timeout_is_a_failed_try(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str
) -> None:
    """One try of a batch cannot take longer than ingest.statement_timeout_s; a message that
    makes every try time out is isolated like any other poison."""
    broker = broker_factory("mosquitto")
    pki = broker.pki
    dsn = timescale_dsn
    config = worker_config(broker, dsn, batch_max_wait_s=0.3, statement_timeout_s=0.5)
    async with IngestWorker(config) as worker:
        await worker.wait_connected(15)
        await planted(broker, dsn)
        await publish_together(
            broker,
            (pki.device, telemetry("acme", "dev-1", [1.0, SLOW, 3.0])),
            (pki.device2, telemetry("acme", "dev-2", [10.0])),
        )
        await wait_for(lambda: rows(dsn, "fieldline.dead_letters", 1), 30, "the dead letter")
        await wait_for(lambda: rows(dsn, ACME, 1 + 2 + 1), 10, "acme's good rows")
        await wait_for(lambda: _all_acknowledged(worker), 10, "every message acknowledged")
        assert failures(worker, "transient", "57014") >= 3
    error = await fetchval(dsn, "SELECT error FROM fieldline.dead_letters")
    assert "SQLSTATE 57014" in error
    assert "statement timeout" in error


async def test_an_unwritable_dead_letter_is_retried_never_acknowledged(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str
) -> None:
    """A refused message whose dead letter cannot be written either stays unacknowledged
    (and so on the broker) until it can be: nothing is dropped."""
    broker = broker_factory("mosquitto")
    dsn = timescale_dsn
    async with IngestWorker(worker_config(broker, dsn)) as worker:
        await worker.wait_connected(15)
        await planted(broker, dsn)
        await execute(
            dsn,
            """
            CREATE FUNCTION public.fl_no_dead_letters() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'dead letters refused (planted)'; END $$;
            CREATE TRIGGER fl_no_dead_letters BEFORE INSERT ON fieldline.dead_letters
                FOR EACH ROW EXECUTE FUNCTION public.fl_no_dead_letters();
            """,
        )
        before = sample(worker, "fieldline_ingest_db_retries_total")
        await asyncio.to_thread(
            burst, broker, broker.pki.device, telemetry("acme", "dev-1", [CHECK_VIOLATION])
        )

        async def retrying() -> bool:
            return bool(sample(worker, "fieldline_ingest_db_retries_total") >= before + 2)

        await wait_for(retrying, 20, "the dead letter retried")
        assert len(worker.pipeline.pending) == 1  # held: not acknowledged, not dropped
        assert await count(dsn, "fieldline.dead_letters") == 0
        await execute(dsn, "DROP TRIGGER fl_no_dead_letters ON fieldline.dead_letters")
        await wait_for(lambda: rows(dsn, "fieldline.dead_letters", 1), 20, "the dead letter")
        await wait_for(lambda: _all_acknowledged(worker), 10, "its acknowledgement")
    dead = await fetch(dsn, "SELECT reason, error, payload FROM fieldline.dead_letters")
    assert [r["reason"] for r in dead] == ["db_rejected"]
    assert "23514" in dead[0]["error"]
    assert b"666" in bytes(dead[0]["payload"])


async def test_dead_letters_are_written_in_statements_within_the_byte_budget(
    broker_factory: Callable[..., BrokerUnderTest],
    timescale_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    budget = 2_000
    monkeypatch.setattr(writer, "DEAD_LETTER_STATEMENT_BYTES", budget)
    broker = broker_factory("mosquitto")
    dsn = timescale_dsn
    config = worker_config(broker, dsn, batch_max_wait_s=0.3)
    async with IngestWorker(config) as worker:
        await worker.wait_connected(15)
        # every dead letter row notes its transaction, its statement and its weight
        await execute(
            dsn,
            """
            CREATE TABLE public.fl_dead_rows (tx bigint, stmt timestamptz, bytes int);
            CREATE FUNCTION public.fl_note_dead_row() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO public.fl_dead_rows VALUES (txid_current(), statement_timestamp(),
                    coalesce(octet_length(NEW.payload), 0) + coalesce(length(NEW.error), 0));
                RETURN NEW;
            END $$;
            CREATE TRIGGER fl_note_dead_row BEFORE INSERT ON fieldline.dead_letters
                FOR EACH ROW EXECUTE FUNCTION public.fl_note_dead_row();
            """,
        )
        bad = [("fl/acme/dev-1/telemetry", b"not json " + b"x" * 600) for _ in range(10)]
        await asyncio.to_thread(burst, broker, broker.pki.device, bad)
        await wait_for(lambda: rows(dsn, "fieldline.dead_letters", 10), 20, "10 dead letters")
        await wait_for(lambda: _all_acknowledged(worker), 10, "their acknowledgements")
    statements = await fetch(
        dsn,
        "SELECT tx, stmt, count(*) AS n, sum(bytes) AS bytes FROM public.fl_dead_rows "
        "GROUP BY tx, stmt ORDER BY stmt",
    )
    assert sum(s["n"] for s in statements) == 10
    assert all(s["bytes"] <= budget for s in statements), statements
    per_transaction: dict[int, int] = {}
    for s in statements:
        per_transaction[s["tx"]] = per_transaction.get(s["tx"], 0) + 1
    # ~6.5 KB of dead letters, 2,000 bytes a statement: several statements, in one transaction
    assert max(per_transaction.values()) >= 3, statements


async def _all_acknowledged(worker: IngestWorker) -> bool:
    return not worker.pipeline.pending
