"""Files the broker renderers write: atomically, with their final mode (and owner) from the
first byte, so a key copy is never readable by anyone it should not be and a broker that
reloads never reads a half-written config."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(
    target: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None
) -> None:
    """Write `data` to `target` through a temporary file created with `mode` (and `owner`)."""
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)  # the umask may have narrowed it
    if owner is not None:
        os.chown(tmp, owner[0], owner[1])
    os.replace(tmp, target)
