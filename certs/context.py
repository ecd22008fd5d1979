"""TLS for a client holding an issued bundle: verify the broker, present our certificate."""

from __future__ import annotations

import ssl
from pathlib import Path

from certs.errors import BundleError

BUNDLE_FILES = ("ca.pem", "cert.pem", "key.pem")


def client_context(directory: Path) -> ssl.SSLContext:
    """A client SSLContext from `directory`/{ca,cert,key}.pem; BundleError names what is wrong."""
    files = [directory / name for name in BUNDLE_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise BundleError(f"certificate bundle incomplete, missing {', '.join(missing)}")
    try:
        context = ssl.create_default_context(cafile=str(files[0]))
        context.load_cert_chain(str(files[1]), str(files[2]))
    except (OSError, ssl.SSLError) as exc:
        raise BundleError(f"cannot load the certificate bundle in {directory}: {exc}") from exc
    return context
