"""The revoked serials of the fieldline CA, read from its CRL file and re-read when it changes."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from broker.errors import TlsSetupError

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

    @property
    def serials(self) -> frozenset[int]:
        return self.snapshot.serials

    def is_revoked(self, serial: int) -> bool:
        return serial in self.snapshot.serials

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when a new, valid CRL was loaded."""
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
                "`fieldline certs crl` writes one"
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
        next_update = crl.next_update_utc
        if next_update is not None and next_update < datetime.now(UTC):
            log.warning(
                "event=crl_expired file=%s next_update=%s hint='run fieldline certs crl'",
                self.crl_file,
                next_update.isoformat(),
            )
        return CrlSnapshot(
            frozenset(r.serial_number for r in crl), crl.last_update_utc, next_update
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
