"""Size and range limits of payloads: the tunable ones in `Limits`, the fixed ones as constants."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_DETAIL_LENGTH",
    "MAX_FW_LENGTH",
    "MAX_INT",
    "MAX_MAGNITUDE",
    "MAX_TEXT_LENGTH",
    "MAX_TIMESTAMP",
    "MAX_TTL_S",
    "MAX_UNIT_LENGTH",
    "METRIC_NAME_PATTERN",
    "Limits",
]

# Fixed parts of the contract (the JSON Schema files state them too).
METRIC_NAME_PATTERN = r"[A-Za-z][A-Za-z0-9_.-]{0,63}"
MAX_TEXT_LENGTH = 256  # a text metric value, in characters
MAX_UNIT_LENGTH = 32
MAX_FW_LENGTH = 64
MAX_DETAIL_LENGTH = 1024  # command result `detail`, event `message`
MAX_TTL_S = 7 * 24 * 3600
# Integers travel as int64 (`seq`, `boot`, integer metrics); beyond that send a float.
MAX_INT = 2**63 - 1
# Finite doubles well inside the float range, so that sums and averages do not overflow.
MAX_MAGNITUDE = 1e300
MAX_TIMESTAMP = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Limits:
    """What a receiver accepts; the defaults are the platform's and are documented for devices."""

    # Refused before the JSON is parsed: MQTT allows 256 MiB, a worker should not try.
    max_payload_bytes: int = 256 * 1024
    # Per `metrics` object (a single message or one backlog sample).
    max_metrics: int = 256
    max_samples: int = 1000
    # Nesting of objects and arrays, the payload object itself being level 1; only the
    # free-form `args` (commands) and `data` (events) can get deep.
    max_depth: int = 8
    # Timestamps later than receive time + this are refused (`future_timestamp`), since a
    # device with a wrong clock would write far-future rows; None disables the check.
    max_future_skew: timedelta | None = timedelta(seconds=300)
    # Earlier timestamps are refused (`bad_timestamp`): in practice epoch seconds sent where
    # milliseconds belong (they land in January 1970) or a clock that was never set.
    min_timestamp: datetime = datetime(2000, 1, 1, tzinfo=UTC)

    def __post_init__(self) -> None:
        for name in ("max_payload_bytes", "max_metrics", "max_samples", "max_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1")
        if self.min_timestamp.tzinfo is None:
            raise ValueError("Limits.min_timestamp must be timezone-aware")


DEFAULT_LIMITS = Limits()
