"""What the fleet queries raise: something asked for does not exist, or the request is bad."""

from core.errors import FieldlineError


class FleetError(FieldlineError):
    """Base of the fleet queries' errors; the message says what was wrong and what to do."""


class NotFoundError(FleetError):
    """A tenant, device, metric or command that does not exist (or is not the caller's)."""


class BadInputError(FleetError):
    """A malformed request: a bad id, duration, time range, or a metric of the wrong kind."""
