"""The Pico W thermistor path and the machine that needs resetting."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from schemas.messages import decode_telemetry
from simulator.errors import ModelError, SensorFaultError
from simulator.machine import Machine
from simulator.thermistor import (
    STEINHART_HART_10K_3950,
    Fault,
    Thermistor,
    fault_of,
    fit_steinhart_hart,
    u16_from_raw12,
)

QUIET = Thermistor(noise_lsb=0.0)


# --- thermistor ---------------------------------------------------------------------------


def test_25_c_reads_half_scale() -> None:
    assert QUIET.resistance(25.0) == pytest.approx(10_000.0)
    assert QUIET.raw12(25.0) == 2048
    assert QUIET.read_u16(25.0) == 32_776  # 2048 << 4 | 2048 >> 8
    assert QUIET.to_celsius(32_768) == pytest.approx(25.0, abs=0.01)
    assert QUIET.to_celsius(32_776) == pytest.approx(25.0, abs=0.02)


def test_known_points_of_the_beta_curve() -> None:
    # R(T) = 10k exp(3950 (1/T - 1/298.15)): 0 C -> 33.62 kOhm, 50 C -> 3.588 kOhm
    assert QUIET.resistance(0.0) == pytest.approx(33_620.6, rel=1e-5)
    assert QUIET.resistance(50.0) == pytest.approx(3_588.3, rel=1e-4)
    # colder is a larger NTC resistance, a higher node voltage, a higher count
    assert QUIET.read_u16(0.0) > QUIET.read_u16(25.0) > QUIET.read_u16(50.0)
    assert QUIET.raw12(0.0) == round(33_620.6 / 43_620.6 * 4095)


def test_u16_scaling_of_the_12_bit_result() -> None:
    assert [u16_from_raw12(r) for r in (0, 1, 2048, 4095)] == [0, 16, 32_776, 65_535]
    with pytest.raises(ModelError, match=r"0\.\.4095"):
        u16_from_raw12(4096)


@pytest.mark.parametrize("celsius", [-20.0, -5.5, 0.0, 12.3, 25.0, 37.0, 60.0, 85.0, 100.0])
def test_round_trip_within_one_lsb(celsius: float) -> None:
    count = QUIET.read_u16(celsius)
    # the temperature step one 12-bit LSB makes at this point of the curve
    lsb = abs(QUIET.to_celsius(count + 16) - QUIET.to_celsius(count))
    assert QUIET.to_celsius(count) == pytest.approx(celsius, abs=lsb)
    assert QUIET.to_celsius(count, "steinhart-hart") == pytest.approx(celsius, abs=lsb)
    assert lsb < 0.6  # resolution is useful over the whole range


def test_steinhart_hart_coefficients_are_the_fit_of_the_part() -> None:
    t = np.arange(-40.0, 126.0)
    r = [QUIET.resistance(c) for c in t]
    a, b, c = fit_steinhart_hart(t, r)
    assert a == pytest.approx(STEINHART_HART_10K_3950[0], rel=1e-9)
    assert b == pytest.approx(STEINHART_HART_10K_3950[1], rel=1e-9)
    assert abs(c) < 1e-15
    documented = (1.0222847e-3, 2.5316456e-4, 0.0)
    assert pytest.approx(documented, rel=1e-6) == STEINHART_HART_10K_3950


def test_steinhart_hart_with_a_datasheet_c() -> None:
    coeffs = (1.009249522e-3, 2.378405444e-4, 2.019202697e-7)
    t = [-10.0, 20.0, 45.0, 80.0]
    part = Thermistor(noise_lsb=0.0, steinhart_hart=coeffs)
    r = [part.resistance(c, "steinhart-hart") for c in t]
    assert fit_steinhart_hart(t, r) == pytest.approx(coeffs, rel=1e-7)
    for celsius, ohms in zip(t, r, strict=True):
        assert part.temperature(ohms, "steinhart-hart") == pytest.approx(celsius, abs=1e-9)
    with pytest.raises(ModelError, match="at least three"):
        fit_steinhart_hart([1.0, 2.0], [3.0, 4.0])


def test_open_and_short_faults() -> None:
    assert QUIET.read_u16(25.0, fault=Fault.OPEN) == 65_535
    assert QUIET.read_u16(25.0, fault=Fault.SHORT) == 0
    assert (fault_of(65_535), fault_of(0), fault_of(32_776)) == (Fault.OPEN, Fault.SHORT, None)
    with pytest.raises(SensorFaultError, match="open circuit: reading 65535") as info:
        QUIET.to_celsius(65_535)
    assert info.value.fault == "open"
    with pytest.raises(SensorFaultError, match="short circuit: reading 0") as info:
        QUIET.to_celsius(0, "steinhart-hart")
    assert info.value.fault == "short"
    with pytest.raises(ModelError, match=r"0\.\.65535"):
        QUIET.to_celsius(70_000)


def test_lsb_noise() -> None:
    rng = np.random.default_rng(12)
    part = Thermistor(noise_lsb=1.0)
    counts = np.array([part.read_u16(25.0, rng) for _ in range(20_000)])
    raw = counts >> 4
    assert np.array_equal(counts & 0xF, raw >> 8)  # every count is a scaled 12-bit value
    # N(2047.5, 1) rounded: mean 2047.5, variance 1 + 1/12
    assert raw.mean() == pytest.approx(2047.5, abs=0.03)
    assert raw.var() == pytest.approx(1 + 1 / 12, rel=0.05)
    many = part.read_u16_many(np.full(20_000, 25.0), np.random.default_rng(12))
    assert many.dtype == np.uint16
    assert (many >> 4).var() == pytest.approx(1 + 1 / 12, rel=0.05)
    quiet = QUIET.read_u16_many(np.array([0.0, 25.0, 50.0]), rng)
    assert quiet.tolist() == [QUIET.read_u16(c) for c in (0.0, 25.0, 50.0)]


# --- machine ------------------------------------------------------------------------------


def test_machine_heats_by_half_a_degree_per_tick_on_average() -> None:
    machines = [Machine(seed) for seed in range(200)]
    for _ in range(100):
        for m in machines:
            m.step()
    rises = np.array([(m.temperature - 21.0) / 100 for m in machines])
    # per-tick increments are U(-0.25, 1.25): sd 0.433; over 20,000 ticks SE 0.003
    assert rises.mean() == pytest.approx(0.5, abs=0.012)


def test_machine_increments_and_ceiling() -> None:
    m = Machine(1)
    above = below = 0
    for _ in range(3_000):
        before = m.temperature
        m.step()
        step = m.temperature - before
        if before > 100.0:
            assert -0.5 <= step < 0.5
            above += 1
        else:
            assert -0.25 <= step < 1.25
            below += 1
    assert above > 2_000  # it reached the ceiling and wandered around it
    assert below > 150
    assert 95.0 < m.temperature < 140.0


def test_pressure_follows_temperature() -> None:
    m = Machine(2)
    for _ in range(50):
        m.step()
        assert m.pressure == pytest.approx(1 + (m.temperature - 21) * 9 / 79, abs=1e-12)
    m.temperature = 100.0
    assert m.pressure == pytest.approx(10.0)


def test_ambient_values() -> None:
    m = Machine(3)
    temps, hums = [], set()
    for _ in range(500):
        m.step()
        temps.append(m.ambient_temperature)
        hums.add(m.ambient_humidity)
    assert min(temps) >= 20.5
    assert max(temps) < 21.5
    assert hums == {24, 25, 26}


def test_reset_returns_to_the_minimum() -> None:
    m = Machine(4)
    for _ in range(300):
        m.step()
    assert m.temperature > 90
    m.reset()
    assert m.temperature == 21.0
    assert m.pressure == 1.0
    assert m.resets == 1
    m.step()
    assert 20.75 <= m.temperature < 22.25


def test_metrics_are_valid_telemetry() -> None:
    m = Machine(5)
    m.step()
    metrics = m.metrics()
    assert set(metrics) == {
        "machine_temperature",
        "machine_pressure",
        "ambient_temperature",
        "ambient_humidity",
    }
    assert metrics["machine_temperature"]["u"] == "degC"
    assert metrics["ambient_humidity"] == {"v": m.ambient_humidity, "u": "%RH"}
    assert math.isclose(m.metrics(units=False)["machine_pressure"], m.pressure, abs_tol=1e-4)
    payload = json.dumps({"ts": 1_732_269_600_123, "seq": 1, "metrics": metrics}).encode()
    assert decode_telemetry(payload).metrics.keys() == metrics.keys()
    with pytest.raises(ModelError, match="max_temp"):
        Machine(max_temp=10.0)
