"""`fieldline capacity`: the formulas at hand-computed points, rounding, JSON, help, errors."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from fieldline.capacity import (
    SECONDS_PER_MONTH,
    STORED_BYTES_PER_ROW,
    CapacityError,
    CapacityInputs,
    estimate,
    publish_packet_bytes,
    round_chunk_interval,
    tls_bytes,
    varint_length,
)
from fieldline.cli import app

runner = CliRunner()


def _inputs(**changes: object) -> CapacityInputs:
    base: dict[str, object] = {
        "devices": 1000,
        "sensors": 10,
        "rate_hz": 1.0,
        "payload_bytes": 300,
        "months": 12,
    }
    base.update(changes)
    return CapacityInputs(**base)  # type: ignore[arg-type]


def test_a_plant_of_1000_devices_by_hand() -> None:
    r = estimate(_inputs())
    assert r.rows_per_s == 10_000
    assert r.messages_per_s == 1_000
    assert r.payload_bytes_per_s == 300_000
    # topic fl/<8>/<12>/telemetry = 34 chars; remaining length 2 + 34 + 2 + 300 = 338 (2-byte
    # varint); PUBLISH 1 + 2 + 338 = 341; + 29 bytes of TLS 1.2 AES-GCM record = 370
    assert r.publish_wire_bytes == 370
    assert r.puback_wire_bytes == 4 + 29
    assert r.wire_bytes_per_s_up == 370_000
    assert r.wire_bytes_per_s_down == 33_000
    assert round(SECONDS_PER_MONTH) == 2_630_016
    assert r.wire_bytes_per_month == pytest.approx(403_000 * 2_630_016)
    assert r.wire_bytes_total == pytest.approx(12 * 403_000 * 2_630_016)
    assert r.payload_bytes_per_month == pytest.approx(300_000 * 2_630_016)
    assert r.stored_bytes_per_month == pytest.approx(10_000 * 110.7 * 2_630_016)
    assert r.stored_bytes_total == pytest.approx(12 * 10_000 * 110.7 * 2_630_016)
    assert r.workers == 1
    # 0.25 x 24 GiB / 1,107,000 B/s = 5,819.8 s -> rounded down to 1 hour
    assert r.chunk_interval_ideal_s == pytest.approx(0.25 * 24 * 2**30 / 1_107_000)
    assert (r.chunk_interval_s, r.chunk_interval) == (3600, "1 hour")
    assert r.chunk_bytes == pytest.approx(1_107_000 * 3600)


def test_stored_bytes_per_row_is_the_measured_figure() -> None:
    # heap alone is 60 bytes a row (24 + 25 -> 56 aligned, + 4 item pointer): the constant
    # must include the indexes, and stay below a doubled heap-plus-index guess
    assert 100 < STORED_BYTES_PER_ROW < 130


def test_metrics_per_message_splits_a_device_tick() -> None:
    r = estimate(_inputs(devices=10, sensors=25, metrics_per_message=10, rate_hz=2.0))
    assert r.rows_per_s == 500
    assert r.messages_per_s == 10 * 2 * 3  # ceil(25 / 10) messages per tick


@pytest.mark.parametrize(
    ("payload", "tls", "expected"),
    [
        (80, "1.2", 1 + 1 + (2 + 34 + 2 + 80) + 29),  # remaining 118: one varint byte
        (100, "1.2", 1 + 2 + (2 + 34 + 2 + 100) + 29),  # remaining 138: two
        (100, "1.3", 1 + 2 + (2 + 34 + 2 + 100) + 22),
        (20_000, "1.3", 1 + 3 + (2 + 34 + 2 + 20_000) + 2 * 22),  # two 16 KiB records
    ],
)
def test_wire_size_of_one_publish(payload: int, tls: str, expected: int) -> None:
    r = estimate(_inputs(payload_bytes=payload, tls_version=tls))
    assert r.publish_wire_bytes == expected


def test_mqtt_and_tls_building_blocks() -> None:
    assert [varint_length(v) for v in (0, 127, 128, 16_383, 16_384, 2_097_152)] == [
        1,
        1,
        2,
        2,
        3,
        4,
    ]
    assert publish_packet_bytes(topic_length=10, payload_bytes=0) == 1 + 1 + 14
    assert tls_bytes(16_384, "1.2") == 16_384 + 29
    assert tls_bytes(16_385, "1.2") == 16_385 + 58


def test_workers_have_50_percent_headroom_and_the_tighter_bound_wins() -> None:
    # 6,000 msg/s x 1.5 = 9,000: exactly one worker's measured throughput
    at_limit = estimate(_inputs(devices=6000, sensors=1))
    assert (at_limit.workers, at_limit.workers_bound_by) == (1, "messages")
    assert estimate(_inputs(devices=6001, sensors=1)).workers == 2
    # 1,000 messages/s of 100 metrics: 100,000 rows/s x 1.5 / 90,000 -> 2 workers, by rows
    rows = estimate(_inputs(sensors=100))
    assert (rows.workers, rows.workers_bound_by) == (2, "rows")
    custom = estimate(_inputs(devices=30_000, sensors=1, worker_msgs_per_s=5000))
    assert custom.workers == math.ceil(30_000 * 1.5 / 5000)


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (1, (60, "1 minute")),
        (299, (60, "1 minute")),
        (300, (300, "5 minutes")),
        (3599, (1800, "30 minutes")),
        (3600, (3600, "1 hour")),
        (21_599, (7200, "2 hours")),
        (86_399, (43_200, "12 hours")),
        (86_400, (86_400, "1 day")),
        (6 * 86_400, (86_400, "1 day")),
        (10**9, (604_800, "7 days")),
    ],
)
def test_chunk_interval_rounds_down_to_a_sensible_step(
    seconds: float, expected: tuple[int, str]
) -> None:
    assert round_chunk_interval(seconds) == expected


def test_a_small_site_gets_seven_day_chunks_and_a_huge_one_a_warning() -> None:
    small = estimate(_inputs(devices=10, sensors=1))
    assert small.chunk_interval == "7 days"
    assert small.warnings == []
    huge = estimate(_inputs(devices=1_000_000, sensors=100, rate_hz=10, ram_gib=8))
    assert huge.chunk_interval == "1 minute"
    assert any("exceeds 25%" in w for w in huge.warnings)
    assert any("--share-group" in w for w in huge.warnings)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"devices": 0}, "--devices must be greater than 0 (got 0)"),
        ({"rate_hz": -1.0}, "--rate must be greater than 0 (got -1)"),
        ({"payload_bytes": 0}, "--bytes must be greater than 0"),
        ({"months": math.nan}, "--months must be greater than 0"),
        ({"ram_gib": 0.0}, "--ram-gib must be greater than 0"),
        ({"metrics_per_message": 0}, "--metrics-per-message must be greater than 0"),
        ({"tls_version": "1.1"}, "--tls-version must be 1.2 or 1.3"),
        ({"device_id_length": 65}, "--device-id-length is at most 64"),
    ],
)
def test_invalid_inputs_are_refused_by_name(changes: dict[str, object], message: str) -> None:
    with pytest.raises(CapacityError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        estimate(_inputs(**changes))


def test_every_bad_input_is_listed_at_once() -> None:
    with pytest.raises(CapacityError) as info:
        estimate(_inputs(devices=-5, sensors=0))
    assert "--devices" in str(info.value)
    assert "--sensors" in str(info.value)


ARGS = ["capacity", "--devices", "1000", "--sensors", "10", "--rate", "1", "--bytes", "300"]


def test_cli_prints_a_table() -> None:
    result = runner.invoke(app, [*ARGS, "--months", "12"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    for text in ("10,000", "370 B/msg", "1.1 MB/s", "34.9 TB", "ingest workers: 1", "1 hour"):
        assert text in result.output, text


def test_cli_json_shape() -> None:
    result = runner.invoke(app, [*ARGS, "--months", "12", "--json", "--tls-version", "1.3"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["inputs"] == {
        "devices": 1000,
        "sensors": 10,
        "rate_hz": 1.0,
        "payload_bytes": 300,
        "months": 12.0,
        "metrics_per_message": 10,
        "ram_gib": 24.0,
        "worker_msgs_per_s": 9000.0,
        "worker_rows_per_s": 90000.0,
        "tls_version": "1.3",
    }
    assert data["rows_per_s"] == 10_000
    assert data["publish_wire_bytes"] == 370 - 29 + 22
    assert data["workers"] == 1
    assert data["chunk_interval"] == "1 hour"
    assert data["chunk_interval_s"] == 3600
    assert data["warnings"] == []
    numeric = {k: v for k, v in data.items() if k not in {"inputs", "warnings"}}
    assert all(isinstance(v, int | float | str) for v in numeric.values())


def test_cli_refuses_zero_with_a_clear_error() -> None:
    result = runner.invoke(app, [*ARGS, "--months", "0"])
    assert result.exit_code == 2
    assert "--months must be greater than 0" in result.output
    assert "Traceback" not in result.output


def test_cli_requires_the_five_inputs() -> None:
    result = runner.invoke(app, ["capacity", "--devices", "3"])
    assert result.exit_code == 2
    assert "--sensors" in result.output


def test_help_states_the_formulas() -> None:
    result = runner.invoke(app, ["capacity", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for formula in (
        "rows/s = devices x sensors x rate",
        "messages/s = devices x rate x ceil(sensors / metrics-per-message)",
        "29 bytes per record",
        "30.44 days",
        f"rows x {STORED_BYTES_PER_ROW} bytes",
        "ceil(1.5 x max(",
        "0.25 x RAM",
        "~9,000",
    ):
        assert formula in text, formula
