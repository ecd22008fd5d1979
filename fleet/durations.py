"""Durations (`15m`, `24h`, `7d`), times (ISO 8601 or a duration back from now), buckets."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from fleet.errors import BadInputError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# longer durations, and times whose UTC falls outside years 1..9999, cannot be computed with
# (OverflowError): refused as bad input rather than failing the request
MAX_DURATION = timedelta(days=36_500)


def parse_duration(text: str) -> timedelta:
    """`30s`, `15m`, `1h`, `7d` as a timedelta; BadInputError for anything else."""
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise BadInputError(f"{text!r} is not a duration: use a number and s, m, h or d (15m)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds > MAX_DURATION.total_seconds():
        raise BadInputError(
            f"{text!r} is longer than {MAX_DURATION.days}d: give an ISO time instead"
        )
    return timedelta(seconds=seconds)


def back_from(now: datetime, text: str) -> datetime:
    """`now` minus the duration `text`; BadInputError if that is before year 1."""
    try:
        return now - parse_duration(text)
    except OverflowError:
        raise BadInputError(f"{text!r} back from now is before year 1") from None


def parse_time(text: str, now: datetime, what: str = "time") -> datetime:
    """An ISO 8601 time (UTC if it has no offset) or a duration back from `now`."""
    text = text.strip()
    if _DURATION.match(text):
        return back_from(now, text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise BadInputError(
            f"{what} {text!r} is neither an ISO 8601 time (2026-12-05T07:30:00+00:00) nor a "
            "duration back from now (15m, 24h, 7d)"
        ) from None
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC)  # year 1 at +14:00 is year 0 in UTC: not a time
    except OverflowError:
        raise BadInputError(f"{what} {text!r} is outside years 1 to 9999 in UTC") from None


def time_range(
    since: str, until: str | None, now: datetime | None = None
) -> tuple[datetime, datetime]:
    """(since, until) from the query's texts; until defaults to now; since must be earlier."""
    now = now or datetime.now(UTC)
    end = parse_time(until, now, "until") if until else now
    start = parse_time(since, now, "since")
    if start >= end:
        raise BadInputError(f"since ({start.isoformat()}) must be before until ({end.isoformat()})")
    return start, end


def bucket_seconds(start: datetime, end: datetime, points: int) -> int:
    """The smallest whole number of seconds >= (end - start) / points (at least 1): buckets
    counted from `start` then number at most `points`."""
    if points < 1:
        raise BadInputError(f"points must be at least 1, not {points}")
    span = (end - start).total_seconds()
    return max(1, math.ceil(span / points - 1e-9))
