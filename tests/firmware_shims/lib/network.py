"""`network` for the firmware under CPython: a CYW43 station that joins the board's access point."""

from __future__ import annotations

from typing import Any

from tests.firmware_shims import board as _board

__all__ = [
    "AP_IF",
    "STAT_CONNECTING",
    "STAT_CONNECT_FAIL",
    "STAT_GOT_IP",
    "STAT_IDLE",
    "STAT_NO_AP_FOUND",
    "STAT_WRONG_PASSWORD",
    "STA_IF",
    "WLAN",
    "country",
    "hostname",
]

STA_IF = 0
AP_IF = 1
STAT_IDLE = 0
STAT_CONNECTING = 1
STAT_WRONG_PASSWORD = -3
STAT_NO_AP_FOUND = -2
STAT_CONNECT_FAIL = -1
STAT_GOT_IP = 3

_settings: dict[str, str] = {"country": "XX", "hostname": "PicoW"}


def country(code: str | None = None) -> str | None:
    if code is None:
        return _settings["country"]
    _board.BOARD.record("country", code)
    _settings["country"] = code
    return None


def hostname(name: str | None = None) -> str | None:
    if name is None:
        return _settings["hostname"]
    _settings["hostname"] = name
    return None


class WLAN:
    PM_NONE = 0x000010  # the constants exist on the Pico W; only recorded here
    PM_PERFORMANCE = 0xA11142
    PM_POWERSAVE = 0x000011

    def __init__(self, interface: int = STA_IF) -> None:
        if interface != STA_IF:
            raise ValueError("only the station interface is simulated")
        self._active = False
        self._status = STAT_IDLE

    def active(self, is_active: bool | None = None) -> bool | None:
        _board.BOARD.check_power()
        if is_active is None:
            return self._active
        self._active = bool(is_active)
        return None

    def connect(self, ssid: str | None = None, key: str | None = None, **_kw: Any) -> None:
        if not self._active:
            raise OSError("the interface is not active")  # the CYW43 driver says so too
        self._status = _board.BOARD.join(ssid or "", key or "")

    def disconnect(self) -> None:
        _board.BOARD.check_power()
        _board.BOARD.joined = False
        self._status = STAT_IDLE

    def isconnected(self) -> bool:
        _board.BOARD.check_power()
        return self._status == STAT_GOT_IP and _board.BOARD.network_up()

    def status(self, param: str | None = None) -> int:
        _board.BOARD.check_power()
        if param == "rssi":
            return -58
        if self._status == STAT_GOT_IP and not _board.BOARD.network_up():
            self._status = STAT_NO_AP_FOUND  # the access point went away
        return self._status

    def ifconfig(self) -> tuple[str, str, str, str]:
        return ("192.168.4.23", "255.255.255.0", "192.168.4.1", "192.168.4.1")

    def config(self, *args: str, **kwargs: Any) -> Any:
        if kwargs:
            _board.BOARD.record("wlan-config", repr(sorted(kwargs.items())))
            return None
        if args == ("mac",):
            return bytes.fromhex("28cdc1000001")
        if args == ("ssid",):
            return _board.BOARD.access_point[0]
        raise ValueError("unknown config param")
