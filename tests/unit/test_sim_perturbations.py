"""Perturbations and faults: each component matches its formula, labels tell the truth."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from simulator.arma import ArmaModel
from simulator.engine import Engine
from simulator.errors import DisturbanceError
from simulator.perturbations import Label, Perturbations, label_names, parse_disturbances

N = 100_000


def _bank(specs: list[dict[str, Any]], n: int = N, interval_s: float = 1.0) -> Perturbations:
    bank = Perturbations(n)
    bank.set(np.arange(n), parse_disturbances(specs), interval_s)
    return bank


def _run(bank: Perturbations, ticks: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pairs = [bank.apply(np.zeros(n), rng) for _ in range(ticks)]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def test_noise_is_normal_with_mu_and_sigma() -> None:
    out, labels = _run(_bank([{"type": "noise", "mu": 0.5, "sigma": 2.0}]), 1, N)
    # standard errors: mean 0.006, variance 0.018
    assert out.mean() == pytest.approx(0.5, abs=0.03)
    assert out.var() == pytest.approx(4.0, abs=0.09)
    skew = np.mean(((out - out.mean()) / out.std()) ** 3)
    assert abs(skew) < 0.05
    assert np.all(labels == Label.NOISE)


def test_spikes_fire_with_probability_p_uniform_on_a_b() -> None:
    out, labels = _run(_bank([{"type": "spike", "p": 0.05, "a": 2.0, "b": 6.0}]), 2, N)
    fired = out != 0
    # standard error of the rate: 0.0005
    assert fired.mean() == pytest.approx(0.05, abs=0.002)
    spikes = out[fired]
    assert spikes.min() >= 2.0
    assert spikes.max() < 6.0
    assert spikes.mean() == pytest.approx(4.0, abs=0.05)
    assert spikes.var() == pytest.approx(16 / 12, rel=0.05)
    assert np.array_equal(labels == Label.SPIKE, fired)
    assert np.all(labels[~fired] == Label.NONE)


def test_drift_is_exactly_d0_plus_r_t_with_t_from_the_sample_index() -> None:
    bank = _bank([{"type": "drift", "d0": 1.5, "r": 0.01}], n=3, interval_s=2.0)
    out, labels = _run(bank, 100, 3)
    t = np.arange(100) * 2.0
    np.testing.assert_allclose(out, np.repeat((1.5 + 0.01 * t)[:, None], 3, axis=1), rtol=1e-15)
    assert np.all(labels == Label.DRIFT)


def test_components_add_up() -> None:
    specs = [
        {"type": "noise", "sigma": 0.0, "mu": 1.0},
        {"type": "drift", "r": 1.0},
        {"type": "spike", "probability": 1.0, "a": 10.0, "b": 10.0},
    ]
    out, labels = _run(_bank(specs, n=2), 3, 2)
    np.testing.assert_allclose(out[:, 0], [11.0, 12.0, 13.0])
    assert set(label_names(int(labels[0, 0]))) == {"noise", "spike", "drift"}


def test_stuck_freezes_the_last_emitted_value_for_its_window() -> None:
    bank = _bank([{"type": "drift", "r": 1.0}, {"type": "stuck", "start": 3, "duration": 4}], n=1)
    out, labels = _run(bank, 10, 1)
    assert out[:, 0].tolist() == [0, 1, 2, 2, 2, 2, 2, 7, 8, 9]
    assert [Label(int(v)) for v in labels[:, 0]] == (
        [Label.DRIFT] * 3 + [Label.STUCK] * 4 + [Label.DRIFT] * 3
    )


def test_stuck_at_a_value_and_for_ever() -> None:
    out, labels = _run(_bank([{"type": "stuck", "start": 2, "value": -5.0}], n=1), 6, 1)
    assert out[:, 0].tolist() == [0, 0, -5, -5, -5, -5]
    assert labels[:, 0].tolist() == [0, 0, 8, 8, 8, 8]


def test_random_stuck_episodes_last_their_duration() -> None:
    _, labels = _run(
        _bank([{"type": "stuck", "probability": 0.02, "duration": 5}], n=200), 300, 200
    )
    stuck = labels == Label.STUCK
    assert 0.05 < stuck.mean() < 0.15  # about 5 p / (1 + 5 p) ~ 0.09
    for column in stuck.T:
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, column.astype(int), 0])))[::2]
        assert np.all(runs[:-1] % 5 == 0)  # back-to-back episodes make multiples of 5


def test_dropout_emits_nothing_and_masks_other_labels() -> None:
    specs = [
        {"type": "noise", "sigma": 1.0},
        {"type": "dropout", "start": 1, "duration": 2},
    ]
    out, labels = _run(_bank(specs, n=4), 5, 4)
    assert np.isnan(out[1:3]).all()
    assert np.isfinite(out[[0, 3, 4]]).all()
    assert np.all(labels[1:3] == Label.DROPOUT)
    assert np.all(labels[[0, 3, 4]] == Label.NOISE)


def test_random_dropouts_happen_at_their_rate() -> None:
    out, labels = _run(_bank([{"type": "dropout", "probability": 0.1, "duration": 1}]), 1, N)
    assert np.isnan(out).mean() == pytest.approx(0.1, abs=0.005)
    assert np.array_equal(np.isnan(out), labels == Label.DROPOUT)


def test_engine_applies_disturbances_then_quantises() -> None:
    model = ArmaModel(ar=[], ma=[], mean=20.0, sigma=0.0, resolution=0.5)
    engine = Engine(seed=1)
    plain = engine.add(model)
    drifting = engine.add(
        model, disturbances=parse_disturbances([{"type": "drift", "r": 0.1}]), interval_s=1.0
    )
    values = np.array([engine.step() for _ in range(11)])
    assert values[:, plain].tolist() == [20.0] * 11
    # 20 + 0.1 k rounded to 0.5: half-way points round to even
    assert values[:, drifting].tolist() == [
        20.0,
        20.0,
        20.0,
        20.5,
        20.5,
        20.5,
        20.5,
        20.5,
        21.0,
        21.0,
        21.0,
    ]
    assert engine.labels[drifting] == Label.DRIFT
    assert engine.labels[plain] == Label.NONE
    engine.remove(drifting)
    assert not engine.perturbations.has_any
    again = engine.add(model)
    assert again == drifting
    assert engine.step()[again] == 20.0  # a reused slot carries no old disturbance


def test_set_disturbances_restarts_the_sample_count() -> None:
    model = ArmaModel(ar=[], ma=[], mean=0.0, sigma=0.0)
    engine = Engine(seed=1)
    h = engine.add(model, disturbances=parse_disturbances([{"type": "drift", "r": 1.0}]))
    for _ in range(5):
        engine.step()
    engine.set_disturbances(h, parse_disturbances([{"type": "drift", "r": 2.0}]), interval_s=3.0)
    assert [engine.step()[h] for _ in range(3)] == [0.0, 6.0, 12.0]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"type": "noise"}, "disturbances must be a list of objects, not dict"),
        (["noise"], r"disturbances\[0\] must be an object with a type, not 'noise'"),
        ([{"sigma": 1}], r"disturbances\[0\]: type is missing; use one of noise, spike"),
        ([{"type": "hum"}], r"disturbances\[0\]: type 'hum' is unknown; use one of noise"),
        ([{"type": "noise", "sigma": -1}], r"\(noise\): sigma: .*greater than or equal to 0"),
        ([{"type": "noise"}], r"\(noise\): sigma is required"),
        ([{"type": "noise", "sigma": 1, "sigmaa": 2}], r"unknown field 'sigmaa' \(allowed: mu"),
        ([{"type": "noise", "sigma": "nan"}], r"sigma: .*finite"),
        (
            [{"type": "spike", "p": 1.5, "a": 0, "b": 1}],
            r"\(spike\): p: .*less than or equal to 1 \(got 1.5\)",
        ),
        ([{"type": "spike", "p": 0.1, "a": 2, "b": 1}], r"a \(2.0\) must not exceed b \(1.0\)"),
        ([{"type": "drift"}], r"\(drift\): r is required"),
        ([{"type": "stuck"}], r"\(stuck\): give a start \(sample index\) or a probability"),
        ([{"type": "dropout", "start": -1}], r"\(dropout\): start: .*greater than or equal to 0"),
        ([{"type": "dropout", "start": 1, "duration": 0}], r"duration: .*greater than or equal"),
        (
            [{"type": "drift", "r": 1}, {"type": "drift", "r": 2}],
            r"disturbances\[1\]: a second drift disturbance \(the first is disturbances\[0\]\)",
        ),
    ],
)
def test_bad_disturbance_specs_say_what_is_wrong(data: object, message: str) -> None:
    with pytest.raises(DisturbanceError, match=message):
        parse_disturbances(data)


def test_good_specs_parse() -> None:
    specs = parse_disturbances(
        [
            {"type": "noise", "mu": 0, "sigma": 0.2},
            {"type": "spike", "probability": 0.01, "a": -3, "b": 3},
            {"type": "drift", "d0": 0.5, "r": 1e-4},
            {"type": "stuck", "probability": 0.001, "duration": 60},
            {"type": "dropout", "start": 100},
        ]
    )
    assert [s.type for s in specs] == ["noise", "spike", "drift", "stuck", "dropout"]
    assert parse_disturbances(None) == []
    with pytest.raises(DisturbanceError, match="interval must be > 0"):
        Perturbations(1).set(0, specs, 0.0)


def test_scattered_slots_only_are_disturbed() -> None:
    bank = Perturbations(10)
    specs = [{"type": "drift", "r": 1.0}, {"type": "stuck", "start": 1, "duration": 2}]
    bank.set(np.array([1, 3, 7]), parse_disturbances(specs), 1.0)
    out, labels = _run(bank, 4, 10)
    assert out[:, [1, 3, 7]].tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0], [3, 3, 3]]
    assert labels[:, 3].tolist() == [Label.DRIFT, Label.STUCK, Label.STUCK, Label.DRIFT]
    untouched = [0, 2, 4, 5, 6, 8, 9]
    assert not out[:, untouched].any()
    assert not labels[:, untouched].any()
    assert bank.kinds(3) == ["drift", "stuck"]
    bank.clear(3)
    assert bank.kinds(3) == []
    assert bank.has_any
