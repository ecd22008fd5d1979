"""`machine` for the firmware under CPython: the Pico W's pins, ADC, watchdog and reset."""

from __future__ import annotations

from tests.firmware_shims import board as _board

__all__ = ["ADC", "WDT", "Pin", "freq", "reset", "soft_reset", "unique_id"]


class Pin:
    IN = 0
    OUT = 1
    OPEN_DRAIN = 2
    PULL_UP = 1
    PULL_DOWN = 2

    def __init__(
        self, id: int | str, mode: int = -1, pull: int = -1, *, value: int | None = None
    ) -> None:
        _board.BOARD.check_power()
        if isinstance(id, int) and not 0 <= id <= 29:
            raise ValueError("invalid pin")
        if isinstance(id, str) and id not in ("LED", "WL_GPIO0", "WL_GPIO1", "WL_GPIO2"):
            raise ValueError("unknown named pin")
        self.id = id
        self.mode = mode
        self._value = value or 0

    def value(self, value: int | None = None) -> int | None:
        _board.BOARD.check_power()
        if value is None:
            return self._value
        self._value = 1 if value else 0
        return None

    def on(self) -> None:
        self.value(1)

    def off(self) -> None:
        self.value(0)

    def toggle(self) -> None:
        self.value(0 if self._value else 1)


class ADC:
    """rp2's ADC: a Pin on GP26-GP29, a GPIO number, or a channel 0-4 (4: core temperature)."""

    CORE_TEMP = 4

    def __init__(self, source: Pin | int) -> None:
        _board.BOARD.check_power()
        pin = source.id if isinstance(source, Pin) else source
        if isinstance(pin, int) and 26 <= pin <= 29:
            self.channel = pin - 26
        elif not isinstance(source, Pin) and isinstance(pin, int) and 0 <= pin <= 4:
            self.channel = pin
        else:
            raise ValueError("Pin doesn't have ADC capabilities")

    def read_u16(self) -> int:
        return _board.BOARD.adc_u16(self.channel)


class WDT:
    """Started watchdogs cannot be stopped; the board records any starvation."""

    def __init__(self, id: int = 0, timeout: int = 5000) -> None:
        if not 1 <= timeout <= 8388:
            raise ValueError("timeout exceeds 8388ms")  # rp2's hardware limit
        _board.BOARD.start_watchdog(timeout)

    def feed(self) -> None:
        _board.BOARD.feed_watchdog()


def reset() -> None:
    """Recorded; on the board it never returns, here the firmware's main() simply ends."""
    _board.BOARD.record_reset()


def soft_reset() -> None:
    reset()


def unique_id() -> bytes:
    return bytes.fromhex("e6614104032a5b2c")


def freq(hz: int | None = None) -> int | None:
    return 125_000_000 if hz is None else None
