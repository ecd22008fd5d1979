"""From an MQTT message to what storage needs: readings, a status, an event, or a dead letter.

Pure and synchronous: the topic is parsed by `schemas.topics`, the payload validated by
`schemas.messages` in one pass (telemetry first through its `fast_telemetry` path, which
vouches only for plain valid payloads). Nothing here raises on bad input; a refused message
comes back as a dead letter with the reason code of the `dead_letters` table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from schemas.errors import PayloadError, SchemaError
from schemas.limits import Limits
from schemas.messages import (
    CommandResult,
    Event,
    MetricValue,
    Status,
    decode_command_result,
    decode_event,
    decode_status,
    decode_telemetry,
    fast_telemetry,
)
from schemas.topics import Kind, parse

# reasons of our own, next to schemas.messages.Reason's payload reasons
BAD_TOPIC = "bad_topic"
UNEXPECTED_TOPIC = "unexpected_topic"
WRONG_TENANT = "wrong_tenant"
KIND_CHANGED = "metric_kind_changed"
DB_REJECTED = "db_rejected"


@dataclass(slots=True)
class Decoded:
    """One received message, decoded; `source` is the receiver's handle for acknowledging."""

    source: Any
    topic: str
    payload: bytes
    received_at: datetime
    tenant: str | None = None
    device: str | None = None
    kind: Kind | None = None
    # telemetry: (time, stamped with the receive time because the device sent no ts, metrics)
    # with the metrics as validated: name -> bool | int | float | str | Quantity
    samples: list[tuple[datetime, bool, dict[str, MetricValue]]] = field(default_factory=list)
    # the epoch microseconds of each sample's time, when the fast path had them at hand (the
    # writer then needs no datetime arithmetic per row); None: the writer reads `samples`
    micros: list[int] | None = None
    nrows: int = 1
    # the earliest device timestamp it carries (samples, an event's or a status's ts)
    oldest: datetime | None = None
    seq: int | None = None  # the highest seq the message carries
    first_seq: int | None = None
    boot: int | None = None
    status: Status | None = None
    event: Event | None = None
    result: CommandResult | None = None
    dead_reason: str | None = None
    dead_error: str | None = None
    keep: bool | None = None  # as a dead letter: stored (True) or past its device's budget
    ignored: bool = False  # nothing to store (a cleared retained status)
    done: bool = False  # committed (or nothing to commit): may be acknowledged
    weight: int = 0  # rows it counted for in the pipeline's bound (kill() changes nrows)

    @property
    def dead(self) -> bool:
        return self.dead_reason is not None

    def kill(self, reason: str, error: str) -> None:
        """Make this message a dead letter (it is acknowledged and kept with the reason)."""
        # PostgreSQL text holds no NUL; the message may quote the offending input
        self.dead_reason, self.dead_error = reason, error.replace("\x00", "\\u0000")
        self.samples = []
        self.micros = None
        self.nrows = 1
        self.status = self.event = self.result = None

    @property
    def rows(self) -> int:
        """How many rows it writes (for batch sizing)."""
        return self.nrows


def decode_message(
    source: Any, topic: str, payload: bytes, received_at: float, limits: Limits
) -> Decoded:
    """Decode one message; bad input becomes a dead letter, never an exception."""
    now = datetime.fromtimestamp(received_at, UTC)
    item = Decoded(source, topic, payload, now)
    try:
        parsed = parse(topic)
    except SchemaError as exc:
        item.kill(BAD_TOPIC, str(exc))
        return item
    item.tenant, item.device, item.kind = parsed.tenant, parsed.device, parsed.kind
    try:
        if parsed.kind is Kind.TELEMETRY:
            # The common payload without a model per sample; anything else (and every
            # refusal) through full validation, which words the dead letter.
            micros: list[int] = []
            fast = fast_telemetry(payload, limits=limits, now=now, micros=micros)
            samples: Iterable[tuple[datetime | None, int | None, dict[str, MetricValue]]]
            if fast is not None:
                item.boot, samples = fast
                if len(micros) == len(fast[1]):
                    item.micros = micros
            else:
                telemetry = decode_telemetry(payload, limits=limits, now=now)
                item.boot = telemetry.boot
                samples = telemetry.iter_samples()
            out = item.samples
            rows = 1
            oldest = None
            for ts, seq, metrics in samples:
                if ts is None:
                    out.append((now, True, metrics))
                else:
                    out.append((ts, False, metrics))
                    if oldest is None or ts < oldest:
                        oldest = ts
                rows += len(metrics)
                if seq is not None:
                    if item.first_seq is None:
                        item.first_seq = seq
                    item.seq = seq
            item.nrows = rows
            item.oldest = oldest
        elif parsed.kind is Kind.STATUS:
            if not payload:
                item.ignored = True  # an empty retained message clears the retained status
            else:
                item.status = decode_status(payload, limits=limits, now=now)
                item.oldest = item.status.ts  # it dates the presence event it may cause
        elif parsed.kind is Kind.EVENTS:
            item.event = decode_event(payload, limits=limits, now=now)
            item.oldest = item.event.ts
        elif parsed.kind is Kind.COMMAND_RESULT:
            item.result = decode_command_result(payload, limits=limits, now=now)
        else:
            item.kill(UNEXPECTED_TOPIC, f"{topic}: the worker ingests device topics, not commands")
    except PayloadError as exc:
        item.kill(str(exc.reason), str(exc))
    return item
