"""Errors of the broker package: each message says what was wrong and what to do."""


class BrokerError(Exception):
    """Base: the broker could not be configured, started or reloaded."""


class TlsSetupError(BrokerError):
    """The CA, server certificate, key or CRL cannot be used."""


class ProtocolError(BrokerError):
    """A client sent bytes that are not the MQTT 3.1.1 packet expected at that point."""


class UnsupportedProtocolError(ProtocolError):
    """A CONNECT for a protocol level other than MQTT 3.1.1 (4), such as MQTT 5."""

    def __init__(self, name: str, level: int) -> None:
        super().__init__(f"CONNECT for protocol {name!r} level {level}; this broker speaks 3.1.1")
        self.level = level
