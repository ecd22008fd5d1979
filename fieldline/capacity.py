"""Capacity planning: data volume, network traffic, ingest workers and the chunk interval.

The figures follow from a handful of inputs (devices, sensors per device, sampling rate,
payload bytes per message, months kept, RAM of the database server) by these formulas:

* rows/s = devices x sensors x rate (one `numeric_values` row per sensor reading).
* messages/s = devices x rate x ceil(sensors / metrics_per_message): one message carries a
  device's sensors (metrics_per_message defaults to sensors, so one message per tick).
* raw payload bytes/s = messages/s x payload bytes.
* on-the-wire bytes per message, device to broker: an MQTT 3.1.1 QoS 1 PUBLISH (fixed header
  1 byte + remaining-length varint 1..4 bytes + topic length 2 + topic
  `fl/<tenant>/<device>/telemetry` + packet id 2 + payload) plus the TLS record overhead per
  record (AES-GCM: TLS 1.2 = 5 header + 8 explicit nonce + 16 tag = 29 bytes, the default and
  the larger; TLS 1.3 = 5 header + 1 inner content type + 16 tag = 22 bytes; one record per
  16 KiB of plaintext). Back to the device: a PUBACK (4 bytes) in a TLS record of its own.
  Each packet is assumed to travel in its own TLS record (no coalescing: an upper bound).
  TCP/IP headers, TLS handshakes, PINGREQs and the broker-to-worker leg are not counted.
* per month = per second x 30.44 days; over K months = per month x K.
* compacted = rows x PACKED_BYTES_PER_SAMPLE (measured by benchmarks/storage.py) plus the
  last HOT_DAYS days at STORED_BYTES_PER_ROW: what the database holds with compaction on.
* stored bytes = rows x STORED_BYTES_PER_ROW (measured, see the constant: heap row plus the
  unique (metric_id, time) index plus TimescaleDB's default time index; no compression: the
  Apache build has none).
* ingest workers = ceil(1.5 x max(messages/s / worker msgs/s, rows/s / worker rows/s)):
  50% headroom over the measured throughput of one worker (docs/benchmarks.md: ~9,000 msg/s
  of 10-metric messages, ~92,000 rows/s with 100-sample messages, on 2 shared cores).
* chunk interval: one chunk plus its indexes should fit in 25% of RAM (RESEARCH.md), so
  interval = 0.25 x RAM / (STORED_BYTES_PER_ROW x rows/s), rounded down to the nearest of
  1 min, 5 min, 15 min, 30 min, 1 h, 2 h, 6 h, 12 h, 1 d, 7 d (7 d at most: TimescaleDB's
  default, and retention drops whole chunks). It assumes all rows land in one hypertable;
  with several tenants (one hypertable each) it is conservative.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from core.errors import FieldlineError
from schemas.packets import MAX_REMAINING_LENGTH, varint

# Measured, not guessed: a throwaway cluster (core.pgcluster.EmbeddedPostgres, PostgreSQL
# with TimescaleDB 2.19.3 Apache build), a hypertable with numeric_values' columns (time
# timestamptz, metric_id integer, value double precision, received boolean) and key
# UNIQUE (metric_id, time), 1-day chunks; 1,000,000 rows inserted in arrival order (1,000
# metrics x 1,000 seconds, time-major, as the ingest worker writes them), VACUUM ANALYZE, then
# hypertable_size() / rows = 110,665,728 / 1,000,000 = 110.7 bytes: heap 60.3 (24 tuple header
# + 25 data -> 56 aligned, + 4 item pointer), unique index 42.1 (scattered inserts leave
# pages half full after splits), TimescaleDB's default time index 8.2 (deduplicated).
STORED_BYTES_PER_ROW = 110.7
# Measured by benchmarks/storage.py (docs/benchmarks.md): the simulator's ARMA temperature and
# humidity sensors at 1 sample/min, 20 metrics x 31 days, after compaction into
# numeric_packed (heap, TOAST and index): 2.94 B/sample; the real UCI values, whose averaged
# columns carry 13 digits: 4.39. The larger, rounded up. Compaction keeps the last 1-2 days
# hot (storage.compact_after_s), at the row price.
PACKED_BYTES_PER_SAMPLE = 4.4
HOT_DAYS = 2

SECONDS_PER_MONTH = 30.44 * 86400
HEADROOM = 1.5
RAM_SHARE_FOR_CHUNK = 0.25
# docs/benchmarks.md: the worker end to end on the 2-core development machine
DEFAULT_WORKER_MSGS_PER_S = 9000.0
DEFAULT_WORKER_ROWS_PER_S = 90000.0

TLS_RECORD_OVERHEAD = {"1.2": 29, "1.3": 22}
TLS_MAX_PLAINTEXT = 16384
PUBACK_BYTES = 4
TOPIC_FIXED_CHARS = len("fl///telemetry")  # the topic without its two ids

CHUNK_STEPS: tuple[tuple[int, str], ...] = (
    (60, "1 minute"),
    (300, "5 minutes"),
    (900, "15 minutes"),
    (1800, "30 minutes"),
    (3600, "1 hour"),
    (7200, "2 hours"),
    (6 * 3600, "6 hours"),
    (12 * 3600, "12 hours"),
    (86400, "1 day"),
    (7 * 86400, "7 days"),
)

TlsVersion = Literal["1.2", "1.3"]


_OPTION_NAMES = {"rate_hz": "--rate", "payload_bytes": "--bytes"}


def option_name(field: str) -> str:
    """The command-line option that sets an input field (errors name what the user typed)."""
    return _OPTION_NAMES.get(field, "--" + field.replace("_", "-"))


class CapacityError(FieldlineError):
    """An input to the capacity estimate is out of range."""


@dataclass(frozen=True)
class CapacityInputs:
    """What the estimate starts from; `validate()` refuses zero and negative values."""

    devices: int
    sensors: int
    rate_hz: float
    payload_bytes: int
    months: float
    metrics_per_message: int | None = None
    ram_gib: float = 24.0
    worker_msgs_per_s: float = DEFAULT_WORKER_MSGS_PER_S
    worker_rows_per_s: float = DEFAULT_WORKER_ROWS_PER_S
    tenant_id_length: int = 8
    device_id_length: int = 12
    tls_version: TlsVersion = "1.2"

    def validate(self) -> None:
        """Raise CapacityError naming every input that is not a positive number."""
        fields = asdict(self)
        if self.metrics_per_message is None:
            del fields["metrics_per_message"]  # unset means "all of a device's sensors"
        problems = [
            f"{option_name(name)} must be greater than 0 (got {value:g})"
            for name, value in fields.items()
            if isinstance(value, int | float) and not (math.isfinite(value) and value > 0)
        ]
        if self.tls_version not in TLS_RECORD_OVERHEAD:
            problems.append(f"--tls-version must be 1.2 or 1.3 (got {self.tls_version})")
        for name in ("tenant_id_length", "device_id_length"):
            if fields[name] > 64:
                problems.append(f"{option_name(name)} is at most 64 (ids are 1 to 64 characters)")
        if problems:
            raise CapacityError("; ".join(problems))


@dataclass(frozen=True)
class CapacityReport:
    """The figures, per second, per month and over the whole period; bytes are decimal."""

    rows_per_s: float
    messages_per_s: float
    payload_bytes_per_s: float
    publish_wire_bytes: int
    puback_wire_bytes: int
    wire_bytes_per_s_up: float
    wire_bytes_per_s_down: float
    payload_bytes_per_month: float
    wire_bytes_per_month: float
    wire_bytes_total: float
    rows_per_month: float
    stored_bytes_per_row: float
    stored_bytes_per_month: float
    stored_bytes_total: float
    # with compaction (the default): the last HOT_DAYS days as rows, the rest packed
    packed_bytes_per_sample: float
    compacted_bytes_per_month: float
    compacted_bytes_total: float
    workers: int
    workers_bound_by: str
    chunk_interval_s: int
    chunk_interval: str
    chunk_bytes: float
    chunk_interval_ideal_s: float
    warnings: list[str]

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values."""
        return asdict(self)


def varint_length(value: int) -> int:
    """Bytes MQTT's remaining-length encoding takes for `value` (1 to 4)."""
    if value < 0 or value > MAX_REMAINING_LENGTH:
        raise CapacityError(f"an MQTT packet cannot be {value} bytes long")
    return len(varint(value))


def publish_packet_bytes(topic_length: int, payload_bytes: int) -> int:
    """An MQTT 3.1.1 QoS 1 PUBLISH: fixed header, topic, packet id, payload."""
    remaining = 2 + topic_length + 2 + payload_bytes
    return 1 + varint_length(remaining) + remaining


def tls_bytes(plaintext: int, tls_version: TlsVersion) -> int:
    """Plaintext plus one record overhead per 16 KiB record (AES-GCM)."""
    records = max(1, math.ceil(plaintext / TLS_MAX_PLAINTEXT))
    return plaintext + records * TLS_RECORD_OVERHEAD[tls_version]


def round_chunk_interval(seconds: float) -> tuple[int, str]:
    """The largest step of CHUNK_STEPS not above `seconds` (the smallest step if below it)."""
    chosen = CHUNK_STEPS[0]
    for step in CHUNK_STEPS:
        if step[0] <= seconds:
            chosen = step
    return chosen


def estimate(inputs: CapacityInputs) -> CapacityReport:
    """Apply the module's formulas to validated inputs."""
    inputs.validate()
    per_message = inputs.metrics_per_message or inputs.sensors
    messages_per_tick = math.ceil(inputs.sensors / per_message)
    rows_per_s = inputs.devices * inputs.sensors * inputs.rate_hz
    messages_per_s = inputs.devices * inputs.rate_hz * messages_per_tick
    payload_per_s = messages_per_s * inputs.payload_bytes

    topic_length = TOPIC_FIXED_CHARS + inputs.tenant_id_length + inputs.device_id_length
    publish = tls_bytes(
        publish_packet_bytes(topic_length, inputs.payload_bytes), inputs.tls_version
    )
    puback = tls_bytes(PUBACK_BYTES, inputs.tls_version)
    up, down = messages_per_s * publish, messages_per_s * puback
    wire_month = (up + down) * SECONDS_PER_MONTH

    stored_per_s = rows_per_s * STORED_BYTES_PER_ROW
    stored_month = stored_per_s * SECONDS_PER_MONTH
    packed_month = rows_per_s * PACKED_BYTES_PER_SAMPLE * SECONDS_PER_MONTH

    by_messages = messages_per_s / inputs.worker_msgs_per_s
    by_rows = rows_per_s / inputs.worker_rows_per_s
    workers = max(1, math.ceil(HEADROOM * max(by_messages, by_rows) - 1e-9))
    bound = "messages" if by_messages >= by_rows else "rows"

    ram_bytes = inputs.ram_gib * 1024**3
    ideal = RAM_SHARE_FOR_CHUNK * ram_bytes / stored_per_s
    interval_s, label = round_chunk_interval(ideal)
    warnings: list[str] = []
    if ideal < CHUNK_STEPS[0][0]:
        warnings.append(
            f"one minute of data ({stored_per_s * 60 / 1e9:.2f} GB) exceeds 25% of "
            f"{inputs.ram_gib:g} GiB of RAM: add RAM or split tenants across database servers"
        )
    if workers > 1:
        warnings.append(
            f"{workers} workers need a broker with shared subscriptions (Mosquitto, EMQX, "
            "HiveMQ): `fieldline ingest run --share-group ingest`, one identity each"
        )

    return CapacityReport(
        rows_per_s=rows_per_s,
        messages_per_s=messages_per_s,
        payload_bytes_per_s=payload_per_s,
        publish_wire_bytes=publish,
        puback_wire_bytes=puback,
        wire_bytes_per_s_up=up,
        wire_bytes_per_s_down=down,
        payload_bytes_per_month=payload_per_s * SECONDS_PER_MONTH,
        wire_bytes_per_month=wire_month,
        wire_bytes_total=wire_month * inputs.months,
        rows_per_month=rows_per_s * SECONDS_PER_MONTH,
        stored_bytes_per_row=STORED_BYTES_PER_ROW,
        stored_bytes_per_month=stored_month,
        stored_bytes_total=stored_month * inputs.months,
        packed_bytes_per_sample=PACKED_BYTES_PER_SAMPLE,
        compacted_bytes_per_month=packed_month,
        compacted_bytes_total=packed_month * inputs.months + stored_per_s * HOT_DAYS * 86400,
        workers=workers,
        workers_bound_by=bound,
        chunk_interval_s=interval_s,
        chunk_interval=label,
        chunk_bytes=stored_per_s * interval_s,
        chunk_interval_ideal_s=ideal,
        warnings=warnings,
    )


def human_bytes(value: float) -> str:
    """Decimal units (kB, MB, GB, TB, PB), as network and disk vendors quote them."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} PB"


def human_bits_per_s(bytes_per_s: float) -> str:
    """A byte rate as bits per second (kbit/s, Mbit/s, Gbit/s), as links are sized."""
    bits = bytes_per_s * 8
    for unit in ("bit/s", "kbit/s", "Mbit/s"):
        if abs(bits) < 1000:
            return f"{bits:.1f} {unit}"
        bits /= 1000
    return f"{bits:.2f} Gbit/s"
