"""ARMA(p, q) sensor models: fitted to a CSV column with statsmodels, saved and loaded as JSON.

The fit (`fit_csv`, `fit_series`) runs an augmented Dickey-Fuller test, computes ACF and PACF,
and fits every ARMA(p, q) of a grid with a constant (the mean) by exact maximum likelihood.
A fit is rejected when it did not converge, failed numerically, or has an AR root whose
modulus is below `min_root`: such a process is nearly a random walk and a simulation of it
wanders for days (RESEARCH.md: the humidity fit has a root at 1.0045 and drifts several %RH).
The model with the lowest AIC among the accepted fits is chosen.

With `stabilise=True`, a fit rejected only for its roots also yields a stabilised variant:
its AR coefficients are damped (`ar[k] * damping**(k+1)`, which moves every AR root outward by
`1/damping`) so the smallest modulus is exactly `min_root`, then the mean, MA coefficients
and sigma are re-estimated with the AR part fixed. It competes in the same AIC ranking (with
the same parameter count, so AICs are comparable) and records what was changed.

A model is `mean + x_t`, `x_t = sum(ar[i] x_{t-1-i}) + e_t + sum(ma[j] e_{t-1-j})`,
`e_t ~ N(0, sigma^2)`, read by a sensor quantised to `resolution`.
"""

from __future__ import annotations

import csv
import hashlib
import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from simulator.errors import ModelError

FloatArray = npt.NDArray[np.float64]

FORMAT: Final = "fieldline.arma/1"
DEFAULT_MODELS = ("humidity", "temperature")
MIN_ROOT = 1.01
OCCUPANCY_CITATION = (
    "Candanedo, L. M. and Feldheim, V. (2016). Accurate occupancy detection of an office room "
    "from light, temperature, humidity and CO2 measurements using statistical learning models. "
    "Energy and Buildings 112, 28-39. doi:10.1016/j.enbuild.2015.11.071. Data: UCI Machine "
    "Learning Repository, Occupancy Detection (16-minute subset shipped in the river package "
    "as river/drift/datasets/occupancy.csv)."
)


# --- the model file -----------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSource(_Strict):
    """Where a model's data came from, so a fit can be reproduced and credited."""

    file: str
    column: str
    rows: int = Field(ge=1)
    sha256: str
    interval_s: float | None = Field(default=None, gt=0)
    citation: str | None = None


class AdfTest(_Strict):
    """Augmented Dickey-Fuller test of the series (null hypothesis: it has a unit root)."""

    statistic: float
    p_value: float
    lags: int

    @property
    def stationary(self) -> bool:
        """True when the unit root is rejected at the 5 % level."""
        return self.p_value < 0.05


class FitOptions(_Strict):
    """The options a model was fitted with (what `fieldline sim fit` was given)."""

    max_p: int = Field(ge=0)
    max_q: int = Field(ge=0)
    min_root: float = Field(gt=1.0)
    stabilise: bool = False
    maxiter: int = Field(default=500, ge=1)


class Stabilisation(_Strict):
    """How a fit whose AR roots were too close to 1 was damped (see the module docstring)."""

    damping: float = Field(gt=0.0, le=1.0)
    original_ar: list[float]
    original_min_root: float
    original_aic: float


class ArmaModel(_Strict):
    """A fitted (or hand-written) ARMA sensor model, as stored in a model JSON file."""

    format: Literal["fieldline.arma/1"] = FORMAT
    name: str | None = None
    unit: str | None = None
    p: int = Field(ge=0)
    q: int = Field(ge=0)
    ar: list[float]
    ma: list[float]
    mean: float
    sigma: float = Field(ge=0.0)
    resolution: float = Field(default=0.0, ge=0.0, description="quantisation step; 0 for none")
    lo: float | None = None
    hi: float | None = None
    aic: float | None = None
    ar_root_moduli: list[float] = Field(default_factory=list, description="derived, ascending")
    ma_root_moduli: list[float] = Field(default_factory=list, description="derived, ascending")
    stabilised: Stabilisation | None = None
    adf: AdfTest | None = None
    source: DataSource | None = None
    fit: FitOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        # p, q and the root moduli follow from the coefficients: fill them in when absent
        # and recompute them always, so a hand-edited file cannot carry stale roots.
        if isinstance(data, Mapping):
            data = dict(data)
            ar, ma = data.get("ar"), data.get("ma", [])
            if isinstance(ar, list | tuple) and isinstance(ma, list | tuple):
                data.setdefault("p", len(ar))
                data.setdefault("q", len(ma))
                if all(isinstance(v, int | float) for v in (*ar, *ma)):
                    data["ar_root_moduli"] = ar_root_moduli(ar)
                    data["ma_root_moduli"] = ma_root_moduli(ma)
        return data

    @model_validator(mode="after")
    def _check(self) -> ArmaModel:
        if len(self.ar) != self.p:
            raise ValueError(f"p is {self.p} but ar has {len(self.ar)} coefficients")
        if len(self.ma) != self.q:
            raise ValueError(f"q is {self.q} but ma has {len(self.ma)} coefficients")
        values = [*self.ar, *self.ma, self.mean, self.sigma, self.resolution]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("coefficients, mean, sigma and resolution must be finite numbers")
        if self.ar_root_moduli and self.ar_root_moduli[0] <= 1.0:
            raise ValueError(
                f"the AR part is not stationary (smallest root modulus "
                f"{self.ar_root_moduli[0]:.4f} <= 1): a simulation would diverge; "
                "refit with `fieldline sim fit` or shrink the AR coefficients"
            )
        if self.lo is not None and self.hi is not None and self.lo >= self.hi:
            raise ValueError(f"lo ({self.lo}) must be below hi ({self.hi})")
        return self


def ar_root_moduli(ar: Sequence[float]) -> list[float]:
    """Moduli of the roots of 1 - ar[0] z - ... - ar[p-1] z^p, ascending (> 1: stationary)."""
    return _root_moduli([1.0, *(-float(c) for c in ar)])


def ma_root_moduli(ma: Sequence[float]) -> list[float]:
    """Moduli of the roots of 1 + ma[0] z + ... + ma[q-1] z^q, ascending (> 1: invertible)."""
    return _root_moduli([1.0, *(float(c) for c in ma)])


def _root_moduli(poly_low_first: list[float]) -> list[float]:
    coeffs = np.trim_zeros(np.asarray(poly_low_first[::-1], dtype=np.float64), "f")
    if coeffs.size <= 1:
        return []
    return sorted(float(m) for m in np.abs(np.roots(coeffs)))


def parse_model(data: object, what: str = "model") -> ArmaModel:
    """A model from parsed JSON (a dict), or ModelError naming every problem."""
    try:
        return ArmaModel.model_validate(data)
    except ValidationError as exc:
        raise ModelError(f"{what} is invalid: {_describe(exc)}") from exc


def load_model(path: str | Path) -> ArmaModel:
    """Read a model JSON file (as written by `save_model` or `fieldline sim fit`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    try:
        return ArmaModel.model_validate_json(text)
    except ValidationError as exc:
        raise ModelError(f"model file {path} is invalid: {_describe(exc)}") from exc


def save_model(model: ArmaModel, path: str | Path) -> Path:
    """Write a model as indented JSON (parent directories are created)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(model.model_dump_json(indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"cannot write model file {path}: {exc.strerror or exc}") from exc
    return path


def default_model(name: str) -> ArmaModel:
    """One of the shipped default models (`humidity`, `temperature`)."""
    if name not in DEFAULT_MODELS:
        raise ModelError(f"no default model {name!r}; choose one of {', '.join(DEFAULT_MODELS)}")
    text = resources.files("simulator").joinpath("models", f"{name}.json").read_text("utf-8")
    try:
        return ArmaModel.model_validate_json(text)
    except ValidationError as exc:  # a broken package, not a user error
        raise ModelError(f"shipped model {name} is invalid: {_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


# --- theory -------------------------------------------------------------------------------


def autocovariance(model: ArmaModel, nlags: int) -> FloatArray:
    """The model's theoretical autocovariance at lags 0..nlags."""
    from statsmodels.tsa.arima_process import arma_acovf

    return np.asarray(
        arma_acovf(_ar_poly(model.ar), _ma_poly(model.ma), nobs=nlags + 1, sigma2=model.sigma**2),
        dtype=np.float64,
    )


def state_covariance(model: ArmaModel) -> FloatArray:
    """Stationary covariance of (x_{t-1}..x_{t-p}, e_{t-1}..e_{t-q}), the engine's state.

    Drawing a new sensor's history from it starts the sensor in its stationary regime,
    with no burn-in.
    """
    from statsmodels.tsa.arima_process import arma2ma

    p, q, s2 = model.p, model.q, model.sigma**2
    gamma = autocovariance(model, max(p, 1))
    psi = np.asarray(arma2ma(_ar_poly(model.ar), _ma_poly(model.ma), lags=q + 1), np.float64)
    cov = np.zeros((p + q, p + q))
    for i in range(p):
        for j in range(p):
            cov[i, j] = gamma[abs(i - j)]
        # x_{t-1-i} contains e_{t-1-j} with weight psi[j - i] when j >= i
        for j in range(q):
            if j >= i:
                cov[i, p + j] = cov[p + j, i] = s2 * psi[j - i]
    for j in range(q):
        cov[p + j, p + j] = s2
    return cov


def _ar_poly(ar: Sequence[float]) -> FloatArray:
    return np.asarray([1.0, *(-float(c) for c in ar)], dtype=np.float64)


def _ma_poly(ma: Sequence[float]) -> FloatArray:
    return np.asarray([1.0, *(float(c) for c in ma)], dtype=np.float64)


# --- data ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Series:
    """One numeric CSV column, with what is needed to cite and reproduce it."""

    values: FloatArray
    source: DataSource


def read_csv_column(
    path: str | Path,
    column: str,
    *,
    time_column: str | None = "time",
    citation: str | None = None,
) -> Series:
    """Read one numeric column of a CSV file with a header row.

    The sampling interval is the median step of `time_column` (ISO 8601) when it exists.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    rows = list(csv.reader(raw.decode("utf-8-sig", errors="replace").splitlines()))
    if not rows:
        raise ModelError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    if column not in header:
        raise ModelError(
            f"{path} has no column {column!r}; its columns are {', '.join(header) or '(none)'}"
        )
    col = header.index(column)
    values: list[float] = []
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        cell = row[col].strip() if col < len(row) else ""
        try:
            value = float(cell)
        except ValueError:
            raise ModelError(f"{path} line {n}: {column} is {cell!r}, not a number") from None
        if not math.isfinite(value):
            raise ModelError(f"{path} line {n}: {column} is {cell!r}; gaps must be filled first")
        values.append(value)
    if len(values) < 20:
        raise ModelError(f"{path}: {column} has {len(values)} values; a fit needs at least 20")
    interval = None
    if time_column and time_column in header:
        interval = _median_interval(path, [r[header.index(time_column)] for r in rows[1:] if r])
    source = DataSource(
        file=_portable(path),
        column=column,
        rows=len(values),
        sha256=hashlib.sha256(raw).hexdigest(),
        interval_s=interval,
        citation=citation,
    )
    return Series(np.asarray(values, dtype=np.float64), source)


def _median_interval(path: Path, stamps: list[str]) -> float | None:
    try:
        times = [datetime.fromisoformat(s.strip()).timestamp() for s in stamps]
    except ValueError:
        return None  # not ISO 8601: the interval stays unknown rather than guessed
    steps = np.diff(np.asarray(times))
    if steps.size == 0 or not np.all(steps > 0):
        return None
    return float(np.median(steps))


def _portable(path: Path) -> str:
    # A file inside an installed package is recorded from the package on
    # (river/drift/datasets/occupancy.csv), not with this machine's venv path.
    resolved = path.resolve()
    for base in sorted({Path(p).resolve() for p in sys.path if p}, key=lambda b: -len(b.parts)):
        if base.name in ("site-packages", "dist-packages") and resolved.is_relative_to(base):
            return resolved.relative_to(base).as_posix()
    return str(path)


def estimate_resolution(values: FloatArray, share: float = 0.8, max_decimals: int = 6) -> float:
    """The data's quantisation step: the coarsest 10^-k that at least `share` values sit on.

    Averaged or resampled data (like the 16-minute occupancy set) are not all on one grid,
    hence a share rather than all of them.
    """
    for k in range(max_decimals + 1):
        scaled = values * 10.0**k
        on_grid = np.abs(scaled - np.round(scaled)) < 1e-9 * np.maximum(1.0, np.abs(scaled))
        if float(np.mean(on_grid)) >= share:
            return float(10.0**-k)
    return 0.0


# --- fitting ------------------------------------------------------------------------------


@dataclass(slots=True)
class Candidate:
    """One ARMA(p, q) fit of the grid, accepted or rejected with the reason."""

    p: int
    q: int
    aic: float | None = None
    llf: float | None = None
    mean: float = 0.0
    sigma: float = 0.0
    ar: list[float] = field(default_factory=list)
    ma: list[float] = field(default_factory=list)
    ar_root_moduli: list[float] = field(default_factory=list)
    converged: bool = False
    accepted: bool = False
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    stabilised: Stabilisation | None = None
    seconds: float = 0.0

    @property
    def label(self) -> str:
        """`ARMA(p,q)`, with `stabilised` when its AR part was damped."""
        return f"ARMA({self.p},{self.q})" + (" stabilised" if self.stabilised else "")

    @property
    def min_root(self) -> float | None:
        """The smallest AR root modulus (None for a pure MA model)."""
        return self.ar_root_moduli[0] if self.ar_root_moduli else None


@dataclass(slots=True)
class FitResult:
    """Everything a fit produced: the tests, the grid, the chosen model and its predictions."""

    series: FloatArray
    adf: AdfTest
    acf: FloatArray
    pacf: FloatArray
    pacf_cutoff: int
    candidates: list[Candidate]
    chosen: Candidate
    model: ArmaModel
    fitted: FloatArray  # one-step-ahead predictions of the chosen model

    @property
    def rejected(self) -> list[Candidate]:
        """The fits that were rejected, each with its reason."""
        return [c for c in self.candidates if not c.accepted]

    def hint(self, margin: float = 10.0) -> str | None:
        """Advice when a rejected fit is much better than the chosen one, else None."""
        best = min(
            (c for c in self.rejected if c.aic is not None and not c.stabilised),
            key=lambda c: c.aic if c.aic is not None else math.inf,
            default=None,
        )
        if best is None or best.aic is None or self.chosen.aic is None:
            return None
        gap = self.chosen.aic - best.aic
        if gap <= margin:
            return None
        advice = (
            "rerun with --stabilise to damp the AR roots of such fits out to --min-root"
            if self.model.fit is not None and not self.model.fit.stabilise
            else "consider a longer series, differencing, or a lower --min-root"
        )
        return (
            f"the chosen {self.chosen.label} has AIC {self.chosen.aic:.1f}, {gap:.1f} worse than "
            f"the rejected {best.label} ({best.reason}); {advice}"
        )


def fit_csv(
    path: str | Path,
    column: str,
    *,
    max_p: int = 5,
    max_q: int = 5,
    min_root: float = MIN_ROOT,
    stabilise: bool = False,
    maxiter: int = 500,
    resolution: float | None = None,
    name: str | None = None,
    unit: str | None = None,
    lo: float | None = None,
    hi: float | None = None,
    citation: str | None = None,
    time_column: str | None = "time",
) -> FitResult:
    """Fit the grid to one CSV column and choose the best acceptable model (see module doc)."""
    series = read_csv_column(path, column, time_column=time_column, citation=citation)
    return fit_series(
        series.values,
        series.source,
        max_p=max_p,
        max_q=max_q,
        min_root=min_root,
        stabilise=stabilise,
        maxiter=maxiter,
        resolution=resolution,
        name=name,
        unit=unit,
        lo=lo,
        hi=hi,
    )


def fit_series(
    values: npt.ArrayLike,
    source: DataSource | None = None,
    *,
    max_p: int = 5,
    max_q: int = 5,
    min_root: float = MIN_ROOT,
    stabilise: bool = False,
    maxiter: int = 500,
    resolution: float | None = None,
    name: str | None = None,
    unit: str | None = None,
    lo: float | None = None,
    hi: float | None = None,
) -> FitResult:
    """Fit ARMA(p, q) for p in 0..max_p, q in 0..max_q to a series; choose the best acceptable."""
    y = np.asarray(values, dtype=np.float64)
    if y.ndim != 1 or y.size < 20 or not np.all(np.isfinite(y)):
        raise ModelError("a fit needs a one-dimensional series of at least 20 finite numbers")
    if max_p < 0 or max_q < 0:
        raise ModelError("--max-p and --max-q must be 0 or more")
    if not min_root > 1.0:
        raise ModelError(f"--min-root must be above 1 (got {min_root})")
    if max(max_p, max_q) * 3 >= y.size:
        raise ModelError(f"{y.size} values are too few for orders up to {max(max_p, max_q)}")
    options = FitOptions(
        max_p=max_p, max_q=max_q, min_root=min_root, stabilise=stabilise, maxiter=maxiter
    )
    adf = adf_test(y)
    nlags = min(40, y.size // 4)
    acf_values, pacf_values = _acf_pacf(y, nlags)
    bound = 1.96 / math.sqrt(y.size)
    significant = np.nonzero(np.abs(pacf_values[1:]) > bound)[0]
    pacf_cutoff = int(significant[-1] + 1) if significant.size else 0

    candidates: list[Candidate] = []
    for p in range(max_p + 1):
        for q in range(max_q + 1):
            cand = _fit_one(y, p, q, maxiter)
            _judge(cand, min_root)
            candidates.append(cand)
            if stabilise and cand.reason is not None and cand.reason.startswith("AR root"):
                candidates.append(_stabilised(y, cand, min_root, maxiter))
    accepted = [c for c in candidates if c.accepted and c.aic is not None]
    if not accepted:
        reasons = "; ".join(f"{c.label}: {c.reason}" for c in candidates)
        raise ModelError(f"no acceptable fit in the grid ({reasons})")
    chosen = min(accepted, key=lambda c: (c.aic, c.p + c.q))
    model = ArmaModel(
        name=name,
        unit=unit,
        p=chosen.p,
        q=chosen.q,
        ar=chosen.ar,
        ma=chosen.ma,
        mean=chosen.mean,
        sigma=chosen.sigma,
        resolution=estimate_resolution(y) if resolution is None else resolution,
        lo=lo,
        hi=hi,
        aic=chosen.aic,
        stabilised=chosen.stabilised,
        adf=adf,
        source=source,
        fit=options,
    )
    return FitResult(
        series=y,
        adf=adf,
        acf=acf_values,
        pacf=pacf_values,
        pacf_cutoff=pacf_cutoff,
        candidates=candidates,
        chosen=chosen,
        model=model,
        fitted=_one_step(y, model),
    )


def adf_test(values: FloatArray) -> AdfTest:
    """The augmented Dickey-Fuller test with a constant, lags chosen by AIC."""
    from statsmodels.tsa.stattools import adfuller

    with warnings.catch_warnings():
        # statsmodels announces a change of return type; the leading fields stay as read here
        warnings.simplefilter("ignore", FutureWarning)
        try:
            out = adfuller(values, regression="c", autolag="AIC")
        except (ValueError, np.linalg.LinAlgError) as exc:
            raise ModelError(f"the ADF test failed: {exc}") from exc
    return AdfTest(statistic=float(out[0]), p_value=float(out[1]), lags=int(out[2]))


def _acf_pacf(y: FloatArray, nlags: int) -> tuple[FloatArray, FloatArray]:
    from statsmodels.tsa.stattools import acf, pacf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        a = acf(y, nlags=nlags, fft=True)
        pa = pacf(y, nlags=nlags, method="ywadjusted")
    a = a[0] if isinstance(a, tuple) else a
    pa = pa[0] if isinstance(pa, tuple) else pa
    return np.asarray(a, dtype=np.float64), np.asarray(pa, dtype=np.float64)


def _run_fit(
    y: FloatArray, p: int, q: int, maxiter: int, fixed: dict[str, float] | None = None
) -> tuple[Any, list[warnings.WarningMessage]]:
    from statsmodels.tsa.arima.model import ARIMA

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # sigma^2 concentrated out of the likelihood: one parameter fewer for the optimiser,
        # which halves the grid's time and converges more often, at the same optimum
        model = ARIMA(y, order=(p, 0, q), trend="c", concentrate_scale=True)
        kwargs: dict[str, Any] = {"method_kwargs": {"maxiter": maxiter}}
        if fixed:
            with model.fix_params(fixed):
                res = model.fit(**kwargs)
        else:
            res = model.fit(**kwargs)
    return res, list(caught)


def _fit_one(y: FloatArray, p: int, q: int, maxiter: int) -> Candidate:
    cand = Candidate(p=p, q=q)
    start = time.perf_counter()
    try:
        res, caught = _run_fit(y, p, q, maxiter)
    except (ValueError, np.linalg.LinAlgError, OverflowError) as exc:
        cand.reason = f"fit failed: {exc}"
        return cand
    finally:
        cand.seconds = time.perf_counter() - start
    _read_results(cand, res, caught, k=p + q + 2)
    return cand


def _read_results(
    cand: Candidate, res: Any, caught: list[warnings.WarningMessage], *, k: int
) -> None:
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    params = dict(zip(res.model.param_names, np.asarray(res.params, dtype=np.float64), strict=True))
    cand.mean = float(params["const"])
    sigma2 = float(params["sigma2"]) if "sigma2" in params else float(res.scale)
    cand.sigma = math.sqrt(max(sigma2, 0.0))
    cand.ar = [float(params[f"ar.L{i}"]) for i in range(1, cand.p + 1)]
    cand.ma = [float(params[f"ma.L{j}"]) for j in range(1, cand.q + 1)]
    cand.ar_root_moduli = ar_root_moduli(cand.ar)
    cand.llf = float(res.llf)
    # AIC with every parameter counted, also for a stabilised fit whose AR part statsmodels
    # sees as fixed: the damped coefficients were still estimated from the data.
    cand.aic = 2.0 * k - 2.0 * cand.llf
    retvals = getattr(res, "mle_retvals", None) or {}
    cand.converged = bool(retvals.get("converged", True))
    for w in caught:
        text = f"{w.category.__name__}: {str(w.message).splitlines()[0]}"
        if issubclass(w.category, ConvergenceWarning):
            cand.converged = False
        elif issubclass(w.category, RuntimeWarning):
            cand.reason = cand.reason or f"numerical trouble ({text})"
        elif text not in cand.notes:
            cand.notes.append(text)  # e.g. statsmodels replacing bad starting values


def _judge(cand: Candidate, min_root: float) -> None:
    if cand.aic is None or not math.isfinite(cand.aic):
        cand.reason = cand.reason or "no finite likelihood"
    elif cand.reason is not None:
        pass
    elif not cand.converged:
        cand.reason = "did not converge"
    elif cand.min_root is not None and cand.min_root < min_root:
        cand.reason = f"AR root {cand.min_root:.4f} < {min_root}"
    cand.accepted = cand.reason is None


def _stabilised(y: FloatArray, base: Candidate, min_root: float, maxiter: int) -> Candidate:
    assert base.min_root is not None
    assert base.aic is not None
    damping = base.min_root / min_root
    ar = [c * damping ** (i + 1) for i, c in enumerate(base.ar)]
    cand = Candidate(
        p=base.p,
        q=base.q,
        stabilised=Stabilisation(
            damping=damping,
            original_ar=base.ar,
            original_min_root=base.min_root,
            original_aic=base.aic,
        ),
    )
    start = time.perf_counter()
    fixed = {f"ar.L{i + 1}": c for i, c in enumerate(ar)}
    try:
        res, caught = _run_fit(y, base.p, base.q, maxiter, fixed)
    except (ValueError, np.linalg.LinAlgError, OverflowError) as exc:
        cand.reason = f"fit failed: {exc}"
        cand.seconds = time.perf_counter() - start
        return cand
    cand.seconds = time.perf_counter() - start
    _read_results(cand, res, caught, k=base.p + base.q + 2)
    # damping puts the smallest modulus at min_root up to rounding: judge against a hair less
    _judge(cand, min_root * (1.0 - 1e-9))
    return cand


def _one_step(y: FloatArray, model: ArmaModel) -> FloatArray:
    """One-step-ahead predictions of the model over the series (Kalman filter, no refit)."""
    from statsmodels.tsa.arima.model import ARIMA

    params = np.r_[model.mean, model.ar, model.ma, model.sigma**2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # filtering known parameters: nothing to warn about
        res = ARIMA(y, order=(model.p, 0, model.q), trend="c").filter(params)
    return np.asarray(res.fittedvalues, dtype=np.float64)


# --- plots --------------------------------------------------------------------------------


def plot(result: FitResult, directory: str | Path) -> list[Path]:
    """Write series.png, acf_pacf.png, aic_grid.png and fitted.png into `directory`."""
    try:
        from matplotlib import patheffects
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ModelError(
            "plotting needs matplotlib: pip install matplotlib (or the project's dev extra)"
        ) from exc
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create plot directory {out}: {exc.strerror or exc}") from exc
    model = result.model
    title = _title(model)
    t = np.arange(result.series.size, dtype=np.float64)
    xlabel = "sample"
    if model.source and model.source.interval_s:
        t *= model.source.interval_s / 3600.0
        xlabel = "hours"
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        path = out / name
        fig.savefig(path, dpi=110)
        written.append(path)

    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(t, result.series, lw=0.9)
    ax.axhline(model.mean, color="grey", ls="--", lw=0.8, label=f"model mean {model.mean:.3g}")
    ax.set(title=f"{title}: series (ADF p = {result.adf.p_value:.3f})", xlabel=xlabel)
    ax.legend(loc="best")
    save(fig, "series.png")

    fig = Figure(figsize=(9, 5), layout="constrained")
    bound = 1.96 / math.sqrt(result.series.size)
    for i, (values, label) in enumerate(((result.acf, "ACF"), (result.pacf, "PACF"))):
        ax = fig.add_subplot(2, 1, i + 1)
        lags = np.arange(values.size)
        ax.vlines(lags, 0, values, lw=1.5)
        ax.axhspan(-bound, bound, color="tab:blue", alpha=0.15, label="95 % band of white noise")
        ax.axhline(0, color="black", lw=0.6)
        ax.set(ylabel=label, xlabel="lag")
        if i == 1:
            ax.set_title(f"PACF: last significant lag {result.pacf_cutoff}")
            ax.legend(loc="upper right")
    save(fig, "acf_pacf.png")

    fig = Figure(figsize=(7, 5.5), layout="constrained")
    ax = fig.add_subplot()
    max_p = max(c.p for c in result.candidates)
    max_q = max(c.q for c in result.candidates)
    grid = np.full((max_p + 1, max_q + 1), np.nan)
    for c in result.candidates:
        if not c.stabilised and c.aic is not None:
            grid[c.p, c.q] = c.aic
    # the worst fits (often p = 0) are thousands of units worse: clip the colour scale so
    # differences among the good fits stay visible; the numbers tell the rest
    finite = grid[np.isfinite(grid)]
    vmax = float(np.percentile(finite, 75)) if finite.size else None
    image = ax.imshow(grid, cmap="viridis_r", origin="lower", aspect="auto", vmax=vmax)
    fig.colorbar(image, ax=ax, label="AIC (lower is better; scale clipped)")
    outline = [patheffects.withStroke(linewidth=2.5, foreground="white")]
    for c in result.candidates:
        if c.stabilised:
            continue
        mark = "" if c.accepted else "\u00d7"
        text = "-" if c.aic is None else f"{c.aic:.1f}{mark}"
        ax.text(c.q, c.p, text, ha="center", va="center", fontsize=8, path_effects=outline)
    ax.add_patch(_box(result.chosen.q, result.chosen.p))
    ax.set(
        xlabel="q (MA order)",
        ylabel="p (AR order)",
        xticks=range(max_q + 1),
        yticks=range(max_p + 1),
        title=f"{title}: AIC grid, \u00d7 rejected, box = chosen {result.chosen.label}",
    )
    save(fig, "aic_grid.png")

    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot(2, 1, 1)
    ax.plot(t, result.series, lw=0.9, label="actual")
    ax.plot(t, result.fitted, lw=0.9, label=f"{result.chosen.label} one step ahead")
    ax.set(title=f"{title}: estimated vs actual")
    ax.legend(loc="best")
    ax = fig.add_subplot(2, 1, 2)
    ax.plot(t, result.series - result.fitted, lw=0.7, color="tab:red")
    ax.set(ylabel="residual", xlabel=xlabel)
    save(fig, "fitted.png")
    return written


def _title(model: ArmaModel) -> str:
    if model.name:
        return model.name
    if model.source:
        return model.source.column
    return "series"


def _box(x: int, y: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.5)
