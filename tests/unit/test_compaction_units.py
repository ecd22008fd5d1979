"""Compaction's pure parts: day windows and the value encodings it may choose."""

from __future__ import annotations

import random
import struct
from datetime import UTC, datetime

from ingest_worker.compaction import _K_MAX, _candidates, _day_start, _pack_sql


def _bits(x: float) -> bytes:
    return struct.pack("!d", x)


def test_day_start_is_the_utc_midnight_before() -> None:
    when = datetime(2026, 3, 4, 23, 59, 59, 999999, tzinfo=UTC)
    assert _day_start(when) == datetime(2026, 3, 4, tzinfo=UTC)
    assert _day_start(datetime(2026, 3, 4, tzinfo=UTC)) == datetime(2026, 3, 4, tzinfo=UTC)


def test_candidates_smallest_first_division_and_product() -> None:
    scales = [scale for _m, scale, _sql in _candidates()]
    assert scales == [1.0, 10.0, -0.1, 100.0, -0.01, 1000.0, -0.001, 10000.0, -0.0001]
    assert _K_MAX < 2**30  # so k fits int4, with room to spare


def test_decimals_come_back_bit_for_bit_from_integers() -> None:
    # the premise of scale > 0: a decimal with d digits, parsed, is k / 10^d exactly (IEEE
    # division rounds correctly, as parsing does); and a quantiser's k * 0.01 is k * 0.01
    rng = random.Random(7)
    for _ in range(20_000):
        d = rng.randint(0, 4)
        k = rng.randint(-(10**7), 10**7)
        text = f"{k / 10**d:.{d}f}"
        value = float(text)
        assert _bits(round(value * 10**d) / 10**d) == _bits(value), text
        product = k * [1.0, 0.1, 0.01, 0.001, 0.0001][d]
        assert _bits(round(product * 10**d) * [1.0, 0.1, 0.01, 0.001, 0.0001][d]) == _bits(product)


def test_negative_zero_is_not_an_integer() -> None:
    # what the SQL's ::bigint cast relies on: the integer 0 comes back as +0.0
    assert _bits(float(round(-0.0 * 100)) / 100) != _bits(-0.0)


def test_the_pack_statement_is_complete() -> None:
    sql = _pack_sql('"tenant_x"')
    assert "{" not in sql.replace("'{}'", "")
    for part in ('DELETE FROM "tenant_x".numeric_values', 'INSERT INTO "tenant_x".numeric_packed'):
        assert part in sql
