"""The CRL's life cycle: what it says, when it is due for renewal, and renewing it in time.

A CRL is current until its nextUpdate; past it both brokers refuse every client (OpenSSL
fails the handshake with "CRL has expired"). It is renewed when a third of its validity
remains, by `fieldline certs crl renew --if-due` (the systemd timer), and by the embedded
broker and `fieldline up` themselves when the CA key is on their machine and not encrypted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from certs.errors import CertsError

if TYPE_CHECKING:
    from certs.authority import Pki

log = logging.getLogger("certs.crl")

# renew when this fraction of the validity remains: a 30-day CRL is renewed 10 days ahead,
# so a renewal job that fails has days of daily retries before anyone is refused
RENEW_FRACTION = 1 / 3
RENEW_HINT = "run: fieldline certs crl renew"


@dataclass(frozen=True)
class CrlStatus:
    """One CRL file as read: issuer, update times, how many serials it revokes."""

    path: Path
    issuer: str
    this_update: datetime
    next_update: datetime | None
    serials: frozenset[int]

    @property
    def revoked(self) -> int:
        return len(self.serials)

    @property
    def validity(self) -> timedelta | None:
        """nextUpdate - thisUpdate (None for a CRL without nextUpdate, which never expires)."""
        return None if self.next_update is None else self.next_update - self.this_update

    def time_left(self, now: datetime | None = None) -> timedelta | None:
        """Until nextUpdate (negative once expired); None when it has none."""
        if self.next_update is None:
            return None
        return self.next_update - (now or datetime.now(UTC))

    def expired(self, now: datetime | None = None) -> bool:
        left = self.time_left(now)
        return left is not None and left <= timedelta(0)

    def renew_from(self) -> datetime | None:
        """When a third of the validity remains: renewal is due from then on."""
        if self.next_update is None or self.validity is None:
            return None
        return self.next_update - self.validity * RENEW_FRACTION

    def renewal_due(self, now: datetime | None = None) -> bool:
        start = self.renew_from()
        return start is not None and (now or datetime.now(UTC)) >= start


def read_crl(path: Path, ca: x509.Certificate | None = None) -> CrlStatus:
    """Parse a CRL (PEM or DER); with `ca`, CertsError unless that CA signed it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertsError(f"cannot read the CRL {path}: {exc.strerror}") from exc
    try:
        crl = (
            x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
        )
    except ValueError as exc:
        raise CertsError(f"{path} is not a CRL: {exc}") from exc
    if ca is not None and (
        crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    ):
        raise CertsError(f"{path} is not signed by the CA {ca.subject.rfc4514_string()}")
    return CrlStatus(
        path=path,
        issuer=crl.issuer.rfc4514_string(),
        this_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
        serials=frozenset(r.serial_number for r in crl),
    )


def expired_line(path: Path, next_update: datetime | None) -> str:
    """The one log line operators look for when a broker's CRL is stale."""
    when = next_update.isoformat() if next_update else "never"
    return f"event=crl_expired next_update={when} file={path} hint='{RENEW_HINT}'"


def format_left(left: timedelta) -> str:
    """A duration for people: '12d 4h', '3h 20m', '45s', '-2d 1h' once past."""
    sign, left = ("-", -left) if left < timedelta(0) else ("", left)
    seconds = int(left.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days}d {hours}h"
    if hours:
        return f"{sign}{hours}h {minutes}m"
    if minutes:
        return f"{sign}{minutes}m {secs}s"
    return f"{sign}{secs}s"


class Renewer:
    """Renews a PKI's CRL when a third of its validity remains, if its CA key is usable here.

    `check()` returns the new status when it renewed. A problem (encrypted CA key, unreadable
    registry) is logged once when it appears, not on every check.
    """

    def __init__(self, pki: Pki, check_s: float) -> None:
        self.pki = pki
        self.check_s = check_s
        self._last_problem: str | None = None

    def check(self, now: datetime | None = None) -> CrlStatus | None:
        """Renew if due; the new status, or None when nothing was (or could be) done."""
        try:
            if not self.pki.crl_status().renewal_due(now):
                self._problem(None)
                return None
            why_not = self.pki.ca_key_problem()
            if why_not is not None:
                self._problem(f"event=crl_renewal_skipped reason='{why_not}' hint='{RENEW_HINT}'")
                return None
            renewed = self.pki.renew_crl()
        except CertsError as exc:
            self._problem(f"event=crl_renewal_failed error='{exc}'")
            return None
        self._problem(None)
        log.info(
            "event=crl_renewed file=%s next_update=%s revoked=%d",
            renewed.path,
            renewed.next_update.isoformat() if renewed.next_update else "never",
            renewed.revoked,
        )
        return renewed

    async def run(self, on_renewed: Callable[[CrlStatus], object] | None = None) -> None:
        """Check every check_s until cancelled (signing runs off the event loop); `on_renewed`
        hands a new CRL to whoever keeps a copy of it (Mosquitto's)."""
        while True:
            await asyncio.sleep(self.check_s)
            renewed = await asyncio.to_thread(self.check)
            if renewed is not None and on_renewed is not None:
                on_renewed(renewed)

    def _problem(self, line: str | None) -> None:
        if line is not None and line != self._last_problem:
            log.warning("%s", line)
        self._last_problem = line
