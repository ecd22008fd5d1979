"""ARMA sensor models and the vectorised engine: theory, exactness against lfilter, fitting."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import lfilter
from statsmodels.tsa.arima_process import arma_acovf

from simulator.arma import (
    OCCUPANCY_CITATION,
    ArmaModel,
    DataSource,
    ar_root_moduli,
    autocovariance,
    default_model,
    estimate_resolution,
    fit_csv,
    fit_series,
    load_model,
    parse_model,
    save_model,
)
from simulator.engine import Engine, spawn_seeds
from simulator.errors import ModelError, UnknownSensorError
from tests.fixtures.prereq import missing

ARMA21 = ArmaModel(ar=[0.5, -0.3], ma=[0.4], mean=10.0, sigma=2.0)


def _simulate(engine: Engine, ticks: int) -> np.ndarray:
    return np.array([engine.step() for _ in range(ticks)])


def _acf(x: np.ndarray, nlags: int) -> np.ndarray:
    """Sample ACF pooled over columns (each column one sensor's series)."""
    d = x - x.mean(axis=0)
    c0 = np.mean(d * d)
    return np.array([np.mean(d[k:] * d[: d.shape[0] - k]) / c0 for k in range(nlags + 1)])


# --- the model file -----------------------------------------------------------------------


def test_roots_and_orders_are_derived() -> None:
    m = ArmaModel(ar=[0.5], ma=[0.25, 0.1], mean=0.0, sigma=1.0)
    assert (m.p, m.q) == (1, 2)
    assert m.ar_root_moduli == pytest.approx([2.0])
    # 1 + 0.25 z + 0.1 z^2 has complex roots of modulus sqrt(1 / 0.1)
    assert m.ma_root_moduli == pytest.approx([10**0.5, 10**0.5])
    assert ar_root_moduli([]) == []


def test_json_round_trip(tmp_path: Path) -> None:
    path = save_model(default_model("humidity"), tmp_path / "deep" / "h.json")
    again = load_model(path)
    assert again == default_model("humidity")
    assert json.loads(path.read_text())["format"] == "fieldline.arma/1"


def test_stale_roots_in_a_file_are_recomputed(tmp_path: Path) -> None:
    data = ARMA21.model_dump()
    data["ar_root_moduli"] = [9.0, 9.0]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    assert load_model(path).ar_root_moduli == pytest.approx(ar_root_moduli([0.5, -0.3]))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"ar": [1.0]}, "not stationary"),
        ({"ar": [0.5], "p": 2}, "p is 2 but ar has 1"),
        ({"sigma": -1.0}, "sigma"),
        ({"lo": 5.0, "hi": 1.0}, "lo (5.0) must be below hi (1.0)"),
        ({"colour": "red"}, "colour"),
        ({"mean": float("nan")}, "finite"),
    ],
)
def test_invalid_models_are_refused_with_the_reason(change: dict[str, object], words: str) -> None:
    data = {"ar": [0.5], "ma": [], "mean": 1.0, "sigma": 1.0} | change
    with pytest.raises(ModelError, match="model is invalid") as info:
        parse_model(data)
    assert words in str(info.value)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read model file"):
        load_model(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError, match=r"bad\.json is invalid"):
        load_model(bad)
    with pytest.raises(ModelError, match="choose one of humidity, temperature"):
        default_model("pressure")


def test_shipped_models_are_cited_and_portable() -> None:
    for name in ("humidity", "temperature"):
        m = default_model(name)
        assert m.name == name
        assert m.source is not None
        assert m.source.file == "river/drift/datasets/occupancy.csv"
        assert m.source.rows == 509
        assert m.source.interval_s == 960.0
        assert m.source.citation == OCCUPANCY_CITATION
        assert "Candanedo" in m.source.citation
        assert m.fit is not None
        assert m.ar_root_moduli[0] >= m.fit.min_root * (1 - 1e-9)
    humidity = default_model("humidity")
    assert (humidity.lo, humidity.hi, humidity.unit) == (0.0, 100.0, "%RH")


def test_estimate_resolution() -> None:
    assert estimate_resolution(np.array([1.25, 2.5, 3.75, 20.0])) == 0.01
    assert estimate_resolution(np.array([1.0, 2.0, 3.0])) == 1.0
    # one averaged value among many on the 0.1 grid does not refine the estimate
    assert estimate_resolution(np.array([*np.arange(10) / 10, 0.123456])) == pytest.approx(0.1)
    assert estimate_resolution(np.array([np.pi, np.e])) == 0.0


# --- theory vs simulation -----------------------------------------------------------------


def test_engine_matches_theoretical_mean_variance_and_acf() -> None:
    engine = Engine(seed=20241124)
    engine.add_many(ARMA21, 2_000)
    x = _simulate(engine, 300)
    theory = arma_acovf(np.r_[1, -0.5, 0.3], np.r_[1, 0.4], nobs=6, sigma2=4.0)
    assert autocovariance(ARMA21, 5) == pytest.approx(theory)
    # standard errors here: mean ~0.004, variance ~0.5 %, ACF ~0.002
    assert x.mean() == pytest.approx(10.0, abs=0.02)
    assert x.var() == pytest.approx(theory[0], rel=0.02)
    assert _acf(x, 5) == pytest.approx(theory / theory[0], abs=0.01)


def test_stationary_start_needs_no_burn_in() -> None:
    engine = Engine(seed=7)
    engine.add_many(ARMA21, 40_000)
    first = engine.step()
    second = engine.step()
    gamma = autocovariance(ARMA21, 1)
    # across sensors, the very first samples already have the stationary moments
    assert first.var() == pytest.approx(gamma[0], rel=0.03)
    assert np.corrcoef(first, second)[0, 1] == pytest.approx(gamma[1] / gamma[0], abs=0.02)
    at_rest = Engine(seed=7)
    at_rest.add_many(ARMA21, 40_000, start="mean")
    assert at_rest.step().var() == pytest.approx(4.0, rel=0.03)  # only e_0: sigma^2


def test_humidity_default_stays_near_its_mean_and_in_bounds() -> None:
    model = default_model("humidity")
    engine = Engine(seed=3)
    engine.add_many(model, 200)
    x = _simulate(engine, 2_000)
    sd = np.sqrt(autocovariance(model, 0)[0])
    assert np.all((x >= 0) & (x <= 100))
    assert abs(x.mean() - model.mean) < 0.1 * sd + 0.2
    assert x.std() == pytest.approx(sd, rel=0.1)


# --- the engine ---------------------------------------------------------------------------


def test_engine_equals_lfilter_for_the_same_innovations() -> None:
    models = [
        ArmaModel(ar=[0.5], ma=[], mean=1.0, sigma=1.0),
        ArmaModel(ar=[1.2, -0.5, 0.1], ma=[0.3, 0.2], mean=0.0, sigma=2.0),
        ArmaModel(ar=[], ma=[0.4, 0.1, 0.2], mean=0.0, sigma=1.0),
        default_model("temperature"),
    ]
    late = default_model("humidity")  # joins later with a larger p: the rings widen
    engine = Engine(seed=1)
    handles = [engine.add(m, start="mean") for m in models]
    rng = np.random.default_rng(2)
    ticks, join = 400, 150
    e = rng.normal(size=(ticks, 16))
    out = []
    for t in range(ticks):
        if t == join:
            late_handle = engine.add(late, start="mean")
        out.append(engine.advance(e[t, : engine.capacity]))
    x = np.array(out)
    assert engine.order == (4, 3)
    for handle, model in zip(handles, models, strict=True):
        ref = lfilter(np.r_[1, model.ma], np.r_[1, -np.asarray(model.ar)], e[:, handle])
        np.testing.assert_allclose(x[:, handle], ref, rtol=0, atol=1e-9)
    ref = lfilter(np.r_[1, late.ma], np.r_[1, -np.asarray(late.ar)], e[join:, late_handle])
    np.testing.assert_allclose(x[join:, late_handle], ref, rtol=0, atol=1e-9)


def test_output_is_quantised_and_clipped() -> None:
    model = ArmaModel(ar=[0.9], ma=[], mean=99.0, sigma=1.0, resolution=0.25, lo=0.0, hi=100.0)
    engine = Engine(seed=5)
    engine.add_many(model, 500)
    raw = engine.add(model, resolution=0.0, lo=-1e9, hi=1e9)
    x = _simulate(engine, 50)
    quantised = x[:, [h for h in engine.handles() if h != raw]]
    assert quantised.shape == (50, 500)
    assert np.array_equal(quantised / 0.25, np.round(quantised / 0.25))
    assert quantised.max() == 100.0
    assert (quantised == 100.0).mean() > 0.1  # clipping really happened
    assert x[:, raw].max() > 100.0
    assert not np.array_equal(x[:, raw], np.round(x[:, raw] / 0.25) * 0.25)


def test_offset_shifts_the_mean() -> None:
    engine = Engine(seed=11)
    engine.add_many(ARMA21, 1_000, offset=-4.0)
    assert _simulate(engine, 100).mean() == pytest.approx(6.0, abs=0.05)


def test_remove_and_reuse_slots() -> None:
    engine = Engine(seed=0, capacity=2)
    a, b, c = (engine.add(ARMA21) for _ in range(3))
    assert (a, b, c) == (0, 1, 2)
    assert engine.capacity >= 3
    engine.remove(b)
    values = engine.step()
    assert np.isnan(values[b])
    assert np.isfinite(values[[a, c]]).all()
    assert engine.size == 2
    assert list(engine.handles()) == [a, c]
    with pytest.raises(UnknownSensorError, match="no sensor with handle 1"):
        engine.remove(b)
    with pytest.raises(UnknownSensorError):
        engine.model(99)
    temperature = default_model("temperature")
    assert engine.add(temperature) == b  # the freed slot first
    assert engine.model(b) is temperature
    assert engine.model(a) is ARMA21
    assert np.isfinite(engine.step()[[a, b, c]]).all()


def test_bad_arguments_to_add() -> None:
    engine = Engine()
    with pytest.raises(ModelError, match="lo"):
        engine.add(ARMA21, lo=3.0, hi=2.0)
    with pytest.raises(ModelError, match="resolution"):
        engine.add(ARMA21, resolution=-1.0)
    with pytest.raises(ModelError, match="innovations must have shape"):
        engine.advance(np.zeros(3))


def test_seeds_reproduce_and_shards_differ() -> None:
    def run(seed: int | np.random.SeedSequence) -> np.ndarray:
        engine = Engine(seed)
        engine.add_many(ARMA21, 50)
        return _simulate(engine, 20)

    assert np.array_equal(run(42), run(42))
    one, two = spawn_seeds(42, 2)
    assert not np.array_equal(run(one), run(two))
    assert np.array_equal(run(spawn_seeds(42, 2)[0]), run(one))


# --- fitting ------------------------------------------------------------------------------


def _arma_series(ar: list[float], ma: list[float], n: int, seed: int, mean: float) -> np.ndarray:
    e = np.random.default_rng(seed).normal(size=n + 500)
    return mean + lfilter(np.r_[1, ma], np.r_[1, -np.asarray(ar)], e)[500:]


def test_fit_recovers_a_synthetic_arma() -> None:
    y = _arma_series([0.7], [0.3], 3_000, seed=9, mean=5.0)
    result = fit_series(y, max_p=2, max_q=2)
    m = result.model
    assert (m.p, m.q) == (1, 1)
    assert m.ar == pytest.approx([0.7], abs=0.04)
    assert m.ma == pytest.approx([0.3], abs=0.05)
    assert m.sigma == pytest.approx(1.0, abs=0.03)
    assert m.mean == pytest.approx(5.0, abs=0.15)
    assert len(result.candidates) == 9
    assert result.chosen.accepted
    assert result.fitted.shape == y.shape
    # one-step predictions leave residuals of about sigma
    assert np.std(y[10:] - result.fitted[10:]) == pytest.approx(1.0, abs=0.05)
    assert m.adf is not None
    assert m.adf.stationary


def test_near_unit_roots_are_rejected_and_can_be_stabilised() -> None:
    y = _arma_series([0.997], [], 2_000, seed=4, mean=50.0)
    plain = fit_series(y, max_p=1, max_q=0)
    ar1 = next(c for c in plain.candidates if c.p == 1)
    assert not ar1.accepted
    assert ar1.reason is not None
    assert ar1.reason.startswith("AR root 1.00")
    assert plain.chosen.p == 0  # only white noise was acceptable
    hint = plain.hint()
    assert hint is not None
    assert "--stabilise" in hint

    stable = fit_series(y, max_p=1, max_q=0, stabilise=True)
    assert stable.chosen.stabilised is not None
    assert stable.model.ar_root_moduli[0] == pytest.approx(1.01, abs=1e-9)
    assert stable.model.stabilised is not None
    assert stable.model.stabilised.original_min_root == pytest.approx(ar1.min_root)
    assert stable.hint() is None


def test_fit_input_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="at least 20"):
        fit_series(np.arange(5.0))
    with pytest.raises(ModelError, match="min-root must be above 1"):
        fit_series(np.random.default_rng(0).normal(size=100), min_root=1.0)
    csv = tmp_path / "d.csv"
    csv.write_text("time,a\n2024-01-01 00:00:00,1\n2024-01-01 00:01:00,x\n")
    with pytest.raises(ModelError, match="no column 'b'; its columns are time, a"):
        fit_csv(csv, "b")
    with pytest.raises(ModelError, match=r"line 3: a is 'x', not a number"):
        fit_csv(csv, "a")


def test_fit_csv_records_its_source(tmp_path: Path) -> None:
    y = _arma_series([0.6], [], 300, seed=1, mean=20.0)
    csv = tmp_path / "series.csv"
    lines = ["time,value"] + [
        f"2024-01-01T{i // 60:02d}:{i % 60:02d}:00,{v:.2f}" for i, v in enumerate(y)
    ]
    csv.write_text("\n".join(lines) + "\n")
    m = fit_csv(csv, "value", max_p=1, max_q=0, citation="made up").model
    assert m.source == DataSource(
        file=str(csv),
        column="value",
        rows=300,
        sha256=hashlib.sha256(csv.read_bytes()).hexdigest(),
        interval_s=60.0,
        citation="made up",
    )
    assert m.resolution == 0.01


@pytest.mark.slow
# each model is refit over the orders up to its own, which must still choose it: the
# recorded grid's higher orders (up to 36 fits of ARMA(5, 5)) took 1-4 minutes of the suite,
# and choosing over a whole grid is test_fit_recovers_a_synthetic_arma's
@pytest.mark.parametrize("name", ["humidity", "temperature"])
def test_shipped_models_refit_from_river(name: str) -> None:
    try:
        import river
    except ImportError:
        missing("river is not installed (the dev extra installs it); it ships the occupancy data")
        return
    csv = Path(river.__file__).parent / "drift" / "datasets" / "occupancy.csv"
    shipped = default_model(name)
    assert shipped.source is not None
    assert shipped.fit is not None
    assert hashlib.sha256(csv.read_bytes()).hexdigest() == shipped.source.sha256
    refit = fit_csv(
        csv,
        shipped.source.column,
        max_p=shipped.p,
        max_q=shipped.q,
        min_root=shipped.fit.min_root,
        stabilise=shipped.fit.stabilise,
        maxiter=shipped.fit.maxiter,
        name=shipped.name,
        unit=shipped.unit,
        lo=shipped.lo,
        hi=shipped.hi,
        citation=shipped.source.citation,
    ).model
    assert (refit.p, refit.q) == (shipped.p, shipped.q)
    assert refit.ar == pytest.approx(shipped.ar, abs=1e-3)
    assert refit.ma == pytest.approx(shipped.ma, abs=1e-3)
    assert refit.mean == pytest.approx(shipped.mean, rel=1e-4)
    assert refit.sigma == pytest.approx(shipped.sigma, rel=1e-3)
    assert refit.aic == pytest.approx(shipped.aic, abs=0.01)
    assert refit.ar_root_moduli == pytest.approx(shipped.ar_root_moduli, abs=1e-3)
    assert (refit.resolution, refit.source, refit.stabilised is None) == (
        shipped.resolution,
        shipped.source,
        shipped.stabilised is None,
    )
