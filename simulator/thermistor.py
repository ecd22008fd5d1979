"""A Pico W reading a 10 kOhm NTC thermistor (B = 3950) through a divider on GP26 (ADC0).

Circuit: 3V3 -- 10 kOhm fixed -- GP26 -- NTC -- GND. The ADC is ratiometric (its reference
is the same 3V3), so the reading depends only on the divider ratio R / (R + R_fixed).
MicroPython's `ADC(Pin(26)).read_u16()` returns the 12-bit conversion scaled to 16 bits as
`raw << 4 | raw >> 8` (so 4095 becomes 65535). At 25 C the NTC is 10 kOhm, the ratio 1/2,
raw 2048 and the count 32,776.

Faults, given this divider: an open NTC (broken wire, R -> infinity) leaves GP26 pulled up
to 3V3 and reads 65535; a shorted NTC (R -> 0) ties GP26 to ground and reads 0. Neither
is a temperature: `to_celsius` raises `SensorFaultError` for them.

Conversions: the Beta equation, 1/T = 1/T0 + ln(R/R0)/B, and Steinhart-Hart,
1/T = A + B ln R + C (ln R)^3. A part specified only by R25 and B follows the Beta curve, and
Steinhart-Hart fitted to that curve is the Beta equation itself: A = 1/T0 - ln(R0)/B,
B = 1/B, C = 0 (least squares over -40..125 C leaves C below 1e-19). `STEINHART_HART_10K_3950`
holds those coefficients; with a datasheet's R-T table, `fit_steinhart_hart` gives a real
part's A, B, C (C is then non-zero), and `Thermistor(steinhart_hart=...)` uses them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import numpy as np
import numpy.typing as npt

from simulator.errors import ModelError, SensorFaultError

FloatArray = npt.NDArray[np.float64]
Method = Literal["beta", "steinhart-hart"]

KELVIN = 273.15
ADC_MAX = 4095  # 12 bits
# an ideal N-bit converter's code is floor(2^N * V/Vref), the top code also taking V = Vref
ADC_CODES = 4096
U16_MAX = 65535
GPIO = 26  # ADC0

# For R0 = 10 kOhm at 25 C and B = 3950 K (see the module docstring).
STEINHART_HART_10K_3950 = (
    1.0 / (25.0 + KELVIN) - math.log(10_000.0) / 3950.0,
    1.0 / 3950.0,
    0.0,
)


class Fault(StrEnum):
    """A wiring fault of the thermistor, and the rail it drives GP26 to."""

    OPEN = "open"  # reads 65535
    SHORT = "short"  # reads 0


def u16_from_raw12(raw: int) -> int:
    """The 16-bit count `read_u16` returns for a 12-bit conversion result."""
    if not 0 <= raw <= ADC_MAX:
        raise ModelError(f"a 12-bit ADC result is 0..{ADC_MAX}, not {raw}")
    return (raw << 4) | (raw >> 8)


def fault_of(count: int) -> Fault | None:
    """The fault a `read_u16` count signals (65535 open, 0 short), or None."""
    if count >= U16_MAX:
        return Fault.OPEN
    if count <= 0:
        return Fault.SHORT
    return None


def fit_steinhart_hart(
    celsius: Sequence[float], ohms: Sequence[float]
) -> tuple[float, float, float]:
    """Steinhart-Hart A, B, C from three or more (celsius, ohms) points, by least squares."""
    t = np.asarray(celsius, dtype=np.float64) + KELVIN
    r = np.asarray(ohms, dtype=np.float64)
    if t.shape != r.shape or t.size < 3:
        raise ModelError("give at least three temperatures and as many resistances")
    if np.any(r <= 0) or np.any(t <= 0):
        raise ModelError("resistances and absolute temperatures must be positive")
    ln = np.log(r)
    design = np.column_stack([np.ones_like(ln), ln, ln**3])
    coeffs, *_ = np.linalg.lstsq(design, 1.0 / t, rcond=None)
    a, b, c = (float(v) for v in coeffs)
    return a, b, c


@dataclass(frozen=True, slots=True)
class Thermistor:
    """The NTC, its divider and the ADC; defaults are the Pico W set-up of the module doc."""

    r0: float = 10_000.0  # ohms at t0_c
    t0_c: float = 25.0
    beta: float = 3950.0
    r_fixed: float = 10_000.0  # to 3V3
    noise_lsb: float = 1.0  # RMS noise of the 12-bit conversion, in LSB
    steinhart_hart: tuple[float, float, float] = STEINHART_HART_10K_3950

    # --- resistance <-> temperature -------------------------------------------------

    def resistance(self, celsius: float, method: Method = "beta") -> float:
        """The NTC's resistance at a temperature."""
        t = celsius + KELVIN
        if t <= 0:
            raise ModelError(f"{celsius} C is below absolute zero")
        if method == "beta":
            return self.r0 * math.exp(self.beta * (1.0 / t - 1.0 / (self.t0_c + KELVIN)))
        a, b, c = self.steinhart_hart
        if c == 0.0:
            return math.exp((1.0 / t - a) / b)
        # the cubic's real root: ln R = cbrt(y - x/2) - cbrt(y + x/2)
        x = (a - 1.0 / t) / c
        y = math.sqrt((b / (3.0 * c)) ** 3 + x * x / 4.0)
        return math.exp(math.cbrt(y - x / 2.0) - math.cbrt(y + x / 2.0))

    def temperature(self, ohms: float, method: Method = "beta") -> float:
        """Celsius at a resistance."""
        if not ohms > 0:
            raise ModelError(f"a thermistor's resistance is positive, not {ohms}")
        ln = math.log(ohms)
        if method == "beta":
            inv = 1.0 / (self.t0_c + KELVIN) + (ln - math.log(self.r0)) / self.beta
        else:
            a, b, c = self.steinhart_hart
            inv = a + b * ln + c * ln**3
        return 1.0 / inv - KELVIN

    # --- the ADC path ----------------------------------------------------------------

    def ratio(self, celsius: float, method: Method = "beta") -> float:
        """GP26's voltage as a fraction of 3V3."""
        r = self.resistance(celsius, method)
        return r / (r + self.r_fixed)

    def raw12(
        self,
        celsius: float,
        rng: np.random.Generator | None = None,
        fault: Fault | None = None,
        method: Method = "beta",
    ) -> int:
        """The 12-bit conversion result, with LSB noise when a generator is given."""
        if fault is Fault.OPEN:
            return ADC_MAX
        if fault is Fault.SHORT:
            return 0
        level = self.ratio(celsius, method) * ADC_CODES
        if rng is not None and self.noise_lsb > 0:
            level += self.noise_lsb * float(rng.standard_normal())
        return min(ADC_MAX, max(0, math.floor(level)))

    def read_u16(
        self,
        celsius: float,
        rng: np.random.Generator | None = None,
        fault: Fault | None = None,
        method: Method = "beta",
    ) -> int:
        """What `ADC(Pin(26)).read_u16()` returns at a temperature (or with a fault)."""
        return u16_from_raw12(self.raw12(celsius, rng, fault, method))

    def read_u16_many(
        self, celsius: FloatArray, rng: np.random.Generator
    ) -> npt.NDArray[np.uint16]:
        """`read_u16` for an array of temperatures at once (Beta curve, with noise)."""
        t = np.asarray(celsius, dtype=np.float64) + KELVIN
        r = self.r0 * np.exp(self.beta * (1.0 / t - 1.0 / (self.t0_c + KELVIN)))
        level = r / (r + self.r_fixed) * ADC_CODES
        if self.noise_lsb > 0:
            level = level + self.noise_lsb * rng.standard_normal(level.shape)
        raw = np.clip(np.floor(level), 0, ADC_MAX).astype(np.uint16)
        return np.asarray((raw << 4) | (raw >> 8), dtype=np.uint16)

    def to_celsius(self, count: int, method: Method = "beta") -> float:
        """Degrees Celsius from a `read_u16` count; SensorFaultError for 0 and 65535."""
        if not 0 <= count <= U16_MAX:
            raise ModelError(f"a read_u16 count is 0..{U16_MAX}, not {count}")
        fault = fault_of(count)
        if fault is Fault.OPEN:
            raise SensorFaultError(
                fault.value, count, "(GP26 at 3V3): the NTC is disconnected or its wire broken"
            )
        if fault is Fault.SHORT:
            raise SensorFaultError(fault.value, count, "(GP26 at ground): the NTC is shorted")
        # R = R_fixed * u / (65535 - u): the divider solved for the NTC
        return self.temperature(self.r_fixed * count / (U16_MAX - count), method)
