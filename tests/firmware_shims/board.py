"""The simulated Pico W the shims in `lib/` consult: sensor physics, Wi-Fi, power, records.

The firmware runs in its own thread; the test drives the board from the test thread. Every
hardware call checks the power: once `power_off()` is called the next one raises `PowerOff`
in the firmware's thread (a BaseException, which the firmware never catches), and the board's
TCP connections are shut down without an MQTT DISCONNECT, as a power cut drops them.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from simulator.thermistor import Thermistor

__all__ = [
    "AP_PASSWORD",
    "AP_SSID",
    "BOARD",
    "TICKS_PERIOD",
    "Board",
    "PowerOff",
    "Record",
    "adc_step_celsius",
    "celsius_from_counts",
    "thermistor_counts",
]

# rp2's ticks_ms() wraps at 2**30 ms (about 12.4 days), like most MicroPython ports.
TICKS_PERIOD = 1 << 30

R_FIXED = 10_000.0  # 3V3 to GP26
R25 = 10_000.0
BETA = 3950.0
T25 = 298.15

AP_SSID = "fieldline-test"
AP_PASSWORD = "correct horse"


class PowerOff(BaseException):
    """The board lost power: unwinds the firmware's thread."""


_PART = Thermistor(r0=R25, beta=BETA, r_fixed=R_FIXED, noise_lsb=0.0)


def thermistor_counts(celsius: float) -> int:
    """What `ADC(Pin(26)).read_u16()` returns with the NTC at this temperature.

    The divider gives V/Vref = R_ntc / (R_fixed + R_ntc); the RP2040's 12-bit ADC turns it
    into floor(4096 * V/Vref) (at most 4095), which read_u16() scales as raw << 4 | raw >> 8.
    """
    # the simulator's model of the same part (noise-free): the platform's simulated Pico and
    # this board read the same counts, so the firmware and the simulator cannot drift apart
    return _PART.read_u16(celsius)


def celsius_from_counts(u: float) -> float:
    """The inverse of the divider and Beta equation, for expected values in tests."""
    r = R_FIXED * u / (65535 - u)
    return 1.0 / (1.0 / T25 + math.log(r / R25) / BETA) - 273.15


def adc_step_celsius(celsius: float) -> float:
    """How far apart in temperature two neighbouring 12-bit ADC codes are around `celsius`:
    the resolution a reading can have there."""
    raw = thermistor_counts(celsius) >> 4
    here, there = raw << 4 | raw >> 8, (raw + 1) << 4 | (raw + 1) >> 8
    return abs(celsius_from_counts(here) - celsius_from_counts(there))


@dataclass(frozen=True)
class Record:
    """Something the firmware did to the hardware, with time.monotonic()."""

    t: float
    kind: str
    detail: str = ""


class Board:
    """One Pico W with a thermistor on GP26, an access point in range and a power switch."""

    def __init__(self, ssid: str = AP_SSID, password: str = AP_PASSWORD) -> None:
        self._lock = threading.Lock()
        self.powered = False
        # degrees C, or a function of the wall-clock time (time.time()) giving degrees C
        self.temperature: float | Callable[[float], float] = 25.0
        self.fault: str | None = None  # "open" (NTC missing) or "short" (NTC shorted)
        self.access_point = (ssid, password)
        self.in_range = True
        self.joined = False
        self.ntp_failures = 0  # the next n NTP requests time out
        self.first_packet_id = 0  # umqtt.simple clients start counting packet ids here
        self.ticks_offset_ms = 0
        self.records: list[Record] = []
        self.resets = 0
        self.watchdog_ms: int | None = None
        self._last_feed = 0.0
        self.starved: list[float] = []  # feed gaps longer than the watchdog timeout, seconds
        self._sockets: list[socket.socket] = []

    # -- power -------------------------------------------------------------------------------
    def power_on(self) -> None:
        """Power up: Wi-Fi not joined, no watchdog, ticks_ms() 1.5 s before it wraps around
        (the firmware is online by then: telemetry and pings cross the wrap)."""
        with self._lock:
            self.powered = True
            self.joined = False
            self.watchdog_ms = None
            now_ms = int(time.monotonic() * 1000)
            self.ticks_offset_ms = (TICKS_PERIOD - now_ms % TICKS_PERIOD - 1500) % TICKS_PERIOD
        self.record("power-on")

    def power_off(self) -> None:
        with self._lock:
            self.powered = False
            self.joined = False
        self._check_watchdog()
        self.drop_links()
        self.record("power-off")

    def check_power(self) -> None:
        """Every hardware call starts here."""
        if not self.powered:
            raise PowerOff
        self._check_watchdog()

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            self.check_power()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.01))

    # -- records -------------------------------------------------------------------------------
    def record(self, kind: str, detail: str = "") -> None:
        with self._lock:
            self.records.append(Record(time.monotonic(), kind, detail))

    def of_kind(self, kind: str) -> list[Record]:
        with self._lock:
            return [r for r in self.records if r.kind == kind]

    def kinds(self) -> list[str]:
        with self._lock:
            return [r.kind for r in self.records]

    def record_reset(self) -> None:
        with self._lock:
            self.resets += 1
        self.record("reset")

    # -- sensor --------------------------------------------------------------------------------
    def celsius_now(self) -> float:
        t = self.temperature
        return t(time.time()) if callable(t) else t

    def adc_u16(self, channel: int) -> int:
        self.check_power()
        if channel == 4:  # the RP2040's own temperature sensor: about 0.706 V at 27 C
            return int(0.706 / 3.3 * 4096) << 4
        if channel != 0:
            return 0  # nothing wired to GP27-GP29
        if self.fault == "open":
            return 65535
        if self.fault == "short":
            return 0
        return thermistor_counts(self.celsius_now())

    # -- Wi-Fi and sockets -----------------------------------------------------------------------
    def join(self, ssid: str, password: str) -> int:
        """A WLAN.connect(): the network.STAT_* it ends in."""
        self.check_power()
        self.record("wifi-join", ssid)
        if not self.in_range or ssid != self.access_point[0]:
            return -2  # STAT_NO_AP_FOUND
        if password != self.access_point[1]:
            return -3  # STAT_WRONG_PASSWORD
        self.joined = True
        return 3  # STAT_GOT_IP

    def network_up(self) -> bool:
        return self.powered and self.in_range and self.joined

    def leave_range(self) -> None:
        """The access point goes away: Wi-Fi drops, and with it every connection."""
        with self._lock:
            self.in_range = False
            self.joined = False
        self.drop_links()

    def enter_range(self) -> None:
        with self._lock:
            self.in_range = True

    def add_socket(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def remove_socket(self, sock: socket.socket) -> None:
        with self._lock:
            if sock in self._sockets:
                self._sockets.remove(sock)

    def release(self) -> None:
        """Close what the firmware left open when it stopped (a power cut closes nothing, but
        CPython wants its sockets closed). Call it from the firmware's thread as it ends."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    def drop_links(self) -> None:
        """Shut every connection down at the TCP level: no MQTT DISCONNECT, so the broker
        publishes the Will. The firmware's blocked reads see EOF; it closes them itself."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            # socket.socket's own shutdown: SSLSocket.shutdown would also drop its TLS object
            # under the firmware thread's feet. OSError: the firmware closed it already.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        if sockets:
            self.record("link-dropped", str(len(sockets)))

    # -- watchdog --------------------------------------------------------------------------------
    def start_watchdog(self, timeout_ms: int) -> None:
        self.check_power()
        with self._lock:
            self.watchdog_ms = timeout_ms
            self._last_feed = time.monotonic()
        self.record("watchdog", str(timeout_ms))

    def feed_watchdog(self) -> None:
        self.check_power()
        with self._lock:
            self._last_feed = time.monotonic()

    def _check_watchdog(self) -> None:
        with self._lock:
            if self.watchdog_ms is None:
                return
            gap = time.monotonic() - self._last_feed
            if gap > self.watchdog_ms / 1000:
                # A real RP2040 would have reset here; record it once per starvation.
                self.starved.append(gap)
                self._last_feed = time.monotonic()


BOARD = Board()
"""The board the shims use; each test installs a fresh one (monkeypatch.setattr)."""
