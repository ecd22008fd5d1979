"""Server TLS for the embedded broker: client certificates required, CRL checked, reloadable.

amqtt 0.12.1 builds its listener context with CERT_OPTIONAL and no CRL. Ours requires a
certificate from the fieldline CA and checks the leaf against the CRL. A listening socket
keeps the context it was created with, so a new CRL is brought in by the SNI callback:
OpenSSL calls it for every ClientHello (with or without a server name) and it switches the
handshake to the newest context.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from broker.errors import TlsSetupError


def server_context(
    ca_file: Path, cert_file: Path, key_file: Path, crl_file: Path | None
) -> ssl.SSLContext:
    """A TLS 1.2+ server context that requires and verifies client certificates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(
            f"cannot load the server certificate {cert_file} and key {key_file}: {exc}; "
            "`fieldline certs server` issues one"
        ) from exc
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"cannot load the CA certificate {ca_file}: {exc}") from exc
    if crl_file is not None:
        try:
            context.load_verify_locations(cafile=str(crl_file))
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError(f"cannot load the CRL {crl_file}: {exc}") from exc
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class ReloadableTls:
    """The listener's context; `reload()` makes new handshakes use a freshly built one."""

    def __init__(
        self, ca_file: Path, cert_file: Path, key_file: Path, crl_file: Path | None
    ) -> None:
        self._files = (ca_file, cert_file, key_file, crl_file)
        self._current = server_context(*self._files)
        self.listener_context = server_context(*self._files)
        self.listener_context.sni_callback = self._select

    def reload(self) -> None:
        """Rebuild the context from the files; a broken file keeps the old one (and raises)."""
        self._current = server_context(*self._files)

    def _select(self, ssl_object: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        ssl_object.context = self._current
