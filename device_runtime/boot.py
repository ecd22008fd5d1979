"""The boot counter a device keeps across restarts: `boot` in telemetry and status."""

from __future__ import annotations

from pathlib import Path


class BootCounter:
    """The boot counter a real device keeps in flash: one small file per device."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def next(self) -> int:
        """Read, increment and persist; the first boot is 1."""
        try:
            boot = int(self.path.read_text().strip() or 0) + 1
        except FileNotFoundError:
            boot = 1
        except ValueError:
            boot = 1  # a corrupt counter is a new device as far as gap counting goes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{boot}\n")
        tmp.replace(self.path)
        return boot
