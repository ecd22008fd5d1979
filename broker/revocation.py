"""The revoked serials of the fieldline CA, read from its CRL file and re-read when it changes."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from broker.errors import TlsSetupError
from certs import expired_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CrlSnapshot:
    """One verified CRL: what it revokes and until when it is current."""

    serials: frozenset[int]
    last_update: datetime
    next_update: datetime | None


class RevocationList:
    """A CRL file checked against the CA; `refresh()` re-reads it when its mtime or size change.

    A CRL that does not verify against the CA is refused: at start-up with TlsSetupError, later
    by keeping the last good one and logging why (a half-written file must not unrevoke anyone).
    """

    def __init__(self, crl_file: Path, ca_file: Path) -> None:
        self.crl_file = crl_file
        self._ca = _load_ca(ca_file)
        self._stamp: tuple[int, int] | None = None
        self.snapshot = self._read()
        self.expired = False
        self.check_expiry()

    @property
    def serials(self) -> frozenset[int]:
        return self.snapshot.serials

    def is_revoked(self, serial: int) -> bool:
        return serial in self.snapshot.serials

    def check_expiry(self, now: datetime | None = None) -> bool:
        """True while the enforced CRL is past its nextUpdate (then every handshake fails).

        Logs one line when it becomes stale and one when a current CRL replaces it: called
        on every refresh, so never a line every few seconds.
        """
        next_update = self.snapshot.next_update
        expired = next_update is not None and next_update <= (now or datetime.now(UTC))
        if expired and not self.expired:
            log.error("%s", expired_line(self.crl_file, next_update))
        elif self.expired and not expired:
            log.info(
                "event=crl_current next_update=%s file=%s",
                next_update.isoformat() if next_update else "never",
                self.crl_file,
            )
        self.expired = expired
        return expired

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when a new, valid CRL was loaded."""
        try:
            return self._refresh()
        finally:
            self.check_expiry()

    def _refresh(self) -> bool:
        try:
            stamp = _stamp(self.crl_file)
        except OSError as exc:
            log.error("event=crl_unreadable file=%s error=%s", self.crl_file, exc.strerror)
            return False
        if stamp == self._stamp:
            return False
        try:
            snapshot = self._read()
        except TlsSetupError as exc:
            log.error("event=crl_rejected file=%s error=%s", self.crl_file, exc)
            self._stamp = stamp  # do not retry the same broken file every second
            return False
        changed = snapshot != self.snapshot
        self.snapshot = snapshot
        return changed

    def _read(self) -> CrlSnapshot:
        try:
            stamp = _stamp(self.crl_file)
            data = self.crl_file.read_bytes()
        except OSError as exc:
            raise TlsSetupError(
                f"cannot read the CRL {self.crl_file}: {exc.strerror}; "
                "`fieldline certs crl renew` writes one"
            ) from exc
        try:
            crl = (
                x509.load_pem_x509_crl(data)
                if b"-----BEGIN" in data
                else x509.load_der_x509_crl(data)
            )
        except ValueError as exc:
            raise TlsSetupError(f"{self.crl_file} is not a CRL: {exc}") from exc
        if crl.issuer != self._ca.subject or not crl.is_signature_valid(self._ca.public_key()):  # type: ignore[arg-type]
            raise TlsSetupError(f"{self.crl_file} is not signed by the fieldline CA")
        self._stamp = stamp
        return CrlSnapshot(
            frozenset(r.serial_number for r in crl), crl.last_update_utc, crl.next_update_utc
        )


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size)


def _load_ca(ca_file: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(ca_file.read_bytes())
    except OSError as exc:
        raise TlsSetupError(f"cannot read the CA certificate {ca_file}: {exc.strerror}") from exc
    except ValueError as exc:
        raise TlsSetupError(f"{ca_file} is not a PEM certificate: {exc}") from exc
