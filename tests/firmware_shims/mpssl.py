"""MicroPython's `ssl` module API (micropython-lib's ssl.py over the `tls` module) on CPython.

The differences it bridges: MicroPython's `load_cert_chain` takes the certificate and key as
bytes (DER or PEM) where CPython wants file paths, so they go through PEM files in a private
temporary directory that is removed at once; `load_verify_locations(cadata=...)` takes DER or
PEM bytes (CPython: DER bytes or PEM text); a new context starts with CERT_NONE as on
MicroPython, and CERT_REQUIRED also checks the server's name, as mbedTLS does when it is given
`server_hostname`. Everything else is CPython's own TLS.

One known difference: CPython matches an IP address in `server_hostname` against the
certificate's IP SANs; mbedTLS learned that only in 3.5 (2023), so with an older MicroPython
build `broker_host` must be a DNS name from the broker's certificate (the safe choice anyway).
"""

from __future__ import annotations

import socket
import ssl as _ssl
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization

__all__ = [
    "CERT_NONE",
    "CERT_OPTIONAL",
    "CERT_REQUIRED",
    "PROTOCOL_TLS_CLIENT",
    "PROTOCOL_TLS_SERVER",
    "SSLContext",
    "wrap_socket",
]

PROTOCOL_TLS_CLIENT = _ssl.PROTOCOL_TLS_CLIENT
PROTOCOL_TLS_SERVER = _ssl.PROTOCOL_TLS_SERVER
CERT_NONE = _ssl.CERT_NONE
CERT_OPTIONAL = _ssl.CERT_OPTIONAL
CERT_REQUIRED = _ssl.CERT_REQUIRED


def _is_pem(data: bytes) -> bool:
    return data.lstrip().startswith(b"-----BEGIN")


def _read(source: bytes | bytearray | str) -> bytes:
    """MicroPython's ssl.py reads a str as a file name and takes bytes as the content."""
    if isinstance(source, str):
        return Path(source).read_bytes()
    return bytes(source)


class SSLContext:
    def __init__(self, protocol: int) -> None:
        self._context = _ssl.SSLContext(protocol)
        self._client = protocol == PROTOCOL_TLS_CLIENT
        self.verify_mode = CERT_NONE  # micropython-lib's ssl.SSLContext does the same

    @property
    def verify_mode(self) -> int:
        return int(self._context.verify_mode)

    @verify_mode.setter
    def verify_mode(self, mode: int) -> None:
        if mode == CERT_NONE:
            self._context.check_hostname = False
            self._context.verify_mode = _ssl.CERT_NONE
        else:
            self._context.verify_mode = _ssl.VerifyMode(mode)
            self._context.check_hostname = self._client and mode == CERT_REQUIRED

    def load_cert_chain(self, certfile: bytes | str, keyfile: bytes | str) -> None:
        cert, key = _read(certfile), _read(keyfile)
        cert_pem = cert if _is_pem(cert) else _ssl.DER_cert_to_PEM_cert(cert).encode()
        if not _is_pem(key):
            # PKCS#8, SEC1 or PKCS#1 DER, as mbedtls_pk_parse_key accepts
            key = serialization.load_der_private_key(key, password=None).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        with tempfile.TemporaryDirectory(prefix="mpssl-") as tmp:
            cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert_path.write_bytes(cert_pem)
            key_path.write_bytes(key)
            self._context.load_cert_chain(cert_path, key_path)

    def load_verify_locations(
        self, cafile: str | None = None, cadata: bytes | bytearray | None = None
    ) -> None:
        if cafile:
            cadata = Path(cafile).read_bytes()
        if cadata is None:
            raise TypeError("cadata is required")
        data = bytes(cadata)
        if _is_pem(data):
            self._context.load_verify_locations(cadata=data.decode("ascii"))
        else:
            self._context.load_verify_locations(cadata=data)

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        server_hostname: str | None = None,
    ) -> _ssl.SSLSocket:
        return self._context.wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            server_hostname=server_hostname,
        )


def wrap_socket(
    sock: socket.socket,
    server_side: bool = False,
    key: bytes | str | None = None,
    cert: bytes | str | None = None,
    cert_reqs: int = CERT_NONE,
    cadata: bytes | None = None,
    server_hostname: str | None = None,
    do_handshake: bool = True,
) -> _ssl.SSLSocket:
    """The legacy module-level form (umqtt.simple's `ssl=True, ssl_params={...}`)."""
    context = SSLContext(PROTOCOL_TLS_SERVER if server_side else PROTOCOL_TLS_CLIENT)
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    if cadata:
        context.load_verify_locations(cadata=cadata)
    context.verify_mode = cert_reqs
    return context.wrap_socket(
        sock,
        server_side=server_side,
        do_handshake_on_connect=do_handshake,
        server_hostname=server_hostname,
    )
