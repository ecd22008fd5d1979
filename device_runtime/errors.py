"""Errors of the device runtime: each message says what was wrong and what to do."""


class DeviceError(Exception):
    """Base: a device's link or command handling failed."""


class LinkError(DeviceError):
    """A device's MQTT connection failed or was refused; the message says by whom and why."""


class CommandError(DeviceError):
    """A command a device cannot carry out; `status` is the result it answers with."""

    def __init__(self, status: str, detail: str) -> None:
        self.status = status
        self.detail = detail
        self.command_id: str | None = None  # set when refused before it ran
        super().__init__(detail)
