"""A vectorised engine that steps thousands to millions of ARMA sensors per tick.

Every sensor has its own model (coefficients padded with zeros to the fleet's largest p
and q), mean, quantisation step and optional [lo, hi] bounds. One tick computes, for all
sensors at once,

    x_t = sum_i ar[i] x_{t-1-i} + e_t + sum_j ma[j] e_{t-1-j},   e_t = sigma * N(0, 1)

and emits `mean + x_t` (plus the sensor's disturbances, if any), rounded to the resolution
and clipped to [lo, hi]. Rounding and clipping happen on the output only: the process
itself stays continuous, as a real quantity read by a coarse sensor does.

The history lives in two ring buffers stored lag-major, shapes (p + 1, sensors) and
(q + 1, sensors): each lag is one contiguous row, a tick is 2 (p + q) whole-row ufunc calls,
and the ring turns by moving a head index, not by copying. Measured on the 2-core
machine, that is about 1.8x faster than a (sensors, p) layout with einsum and 3x faster
than shifting the history with a copy each tick. The extra row is where x_t is written.

Handles are slot numbers: stable for a sensor's life, reused after `remove`. Arrays are
indexed by handle; free slots emit NaN. One seeded generator (`numpy.random.SeedSequence`)
drives the innovations, the initial states and the disturbances; `spawn_seeds` splits a
seed into independent ones for shards (processes) of a fleet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from simulator.arma import ArmaModel, state_covariance
from simulator.errors import ModelError, UnknownSensorError
from simulator.perturbations import Disturbance, LabelArray, Perturbations

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Start = Literal["stationary", "mean"]


def spawn_seeds(
    seed: int | np.random.SeedSequence | None, shards: int
) -> list[np.random.SeedSequence]:
    """Independent seeds for `shards` engines (e.g. one per process) from one seed."""
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return root.spawn(shards)


class Engine:
    """ARMA sensors stepped together; see the module docstring."""

    def __init__(
        self, seed: int | np.random.SeedSequence | None = None, *, capacity: int = 16
    ) -> None:
        self.seed = (
            seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        )
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self._cap = 0
        self._p = 0
        self._q = 0
        self._ar = np.zeros((0, 0))
        self._ma = np.zeros((0, 0))
        self._x = np.zeros((1, 0))  # ring of x_{t-1..t-p} plus the row x_t goes into
        self._e = np.zeros((1, 0))
        self._xh = 0  # row of x_{t-1}
        self._eh = 0
        self._mean = np.zeros(0)
        self._sigma = np.zeros(0)
        self._res = np.zeros(0)
        self._lo = np.zeros(0)
        self._hi = np.zeros(0)
        self._active = np.zeros(0, bool)
        self._model_id = np.zeros(0, np.int64)  # index into _models, -1 for a free slot
        self._models: list[ArmaModel] = []
        self._model_index: dict[int, int] = {}
        self._unquantised = 0  # active sensors with resolution 0
        self._factors: dict[tuple[tuple[float, ...], tuple[float, ...], float], FloatArray] = {}
        self._tmp = np.zeros(0)
        self.perturbations = Perturbations()
        self._grow(capacity)

    # --- shape -----------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Slots allocated (the length of `step()`'s result)."""
        return self._cap

    @property
    def size(self) -> int:
        """Sensors currently present."""
        return int(self._active.sum())

    @property
    def order(self) -> tuple[int, int]:
        """The fleet's (p, q): the largest orders of any model added so far."""
        return self._p, self._q

    @property
    def active(self) -> npt.NDArray[np.bool_]:
        """A copy of the mask of slots that hold a sensor."""
        return self._active.copy()

    def handles(self) -> IntArray:
        """The handles of the sensors present, ascending."""
        return np.flatnonzero(self._active).astype(np.int64)

    def model(self, handle: int) -> ArmaModel:
        """The model a sensor was added with."""
        self._check(handle)
        return self._models[int(self._model_id[handle])]

    def _grow(self, capacity: int) -> None:
        if capacity <= self._cap:
            return
        capacity = max(capacity, 2 * self._cap)
        extra = capacity - self._cap

        def cols(a: FloatArray) -> FloatArray:
            return np.concatenate([a, np.zeros((a.shape[0], extra))], axis=1)

        self._ar, self._ma, self._x, self._e = (
            cols(a) for a in (self._ar, self._ma, self._x, self._e)
        )
        self._mean = np.r_[self._mean, np.full(extra, np.nan)]
        self._sigma = np.r_[self._sigma, np.zeros(extra)]
        self._res = np.r_[self._res, np.zeros(extra)]
        self._lo = np.r_[self._lo, np.full(extra, -np.inf)]
        self._hi = np.r_[self._hi, np.full(extra, np.inf)]
        self._active = np.r_[self._active, np.zeros(extra, bool)]
        self._model_id = np.r_[self._model_id, np.full(extra, -1, np.int64)]
        self._tmp = np.zeros(capacity)
        self._cap = capacity
        self.perturbations.grow(capacity)

    def _widen(self, p: int, q: int) -> None:
        # A model with a larger order joins: rebuild the rings in lag order with zeros at the
        # new, older lags (exact: every existing sensor has zero coefficients there).
        if p > self._p:
            x = np.zeros((p + 1, self._cap))
            for lag in range(1, self._p + 1):
                x[(0 - lag + 1) % (p + 1)] = self._x[self._xrow(lag)]
            self._x, self._xh = x, 0
            self._ar = np.concatenate([self._ar, np.zeros((p - self._p, self._cap))])
            self._p = p
        if q > self._q:
            e = np.zeros((q + 1, self._cap))
            for lag in range(1, self._q + 1):
                e[(0 - lag + 1) % (q + 1)] = self._e[self._erow(lag)]
            self._e, self._eh = e, 0
            self._ma = np.concatenate([self._ma, np.zeros((q - self._q, self._cap))])
            self._q = q

    def _xrow(self, lag: int) -> int:
        return (self._xh - lag + 1) % (self._p + 1)

    def _erow(self, lag: int) -> int:
        return (self._eh - lag + 1) % (self._q + 1)

    # --- sensors ---------------------------------------------------------------------

    def add(
        self,
        model: ArmaModel,
        *,
        offset: float = 0.0,
        resolution: float | None = None,
        lo: float | None = None,
        hi: float | None = None,
        start: Start = "stationary",
        disturbances: Sequence[Disturbance] = (),
        interval_s: float = 1.0,
    ) -> int:
        """Add one sensor; its handle. Bounds and resolution default to the model's."""
        return int(
            self.add_many(
                model,
                1,
                offset=offset,
                resolution=resolution,
                lo=lo,
                hi=hi,
                start=start,
                disturbances=disturbances,
                interval_s=interval_s,
            )[0]
        )

    def add_many(
        self,
        model: ArmaModel,
        count: int,
        *,
        offset: float = 0.0,
        resolution: float | None = None,
        lo: float | None = None,
        hi: float | None = None,
        start: Start = "stationary",
        disturbances: Sequence[Disturbance] = (),
        interval_s: float = 1.0,
    ) -> IntArray:
        """Add `count` sensors of one model (vectorised); their handles.

        `start="stationary"` draws each new sensor's history from the model's stationary
        distribution, so it needs no burn-in; `"mean"` starts it at rest (zero history).
        """
        if count < 0:
            raise ModelError(f"cannot add {count} sensors")
        res = model.resolution if resolution is None else resolution
        lo = model.lo if lo is None else lo
        hi = model.hi if hi is None else hi
        if res < 0 or not np.isfinite(res):
            raise ModelError(f"resolution must be 0 (none) or a positive step, not {res}")
        if lo is not None and hi is not None and lo >= hi:
            raise ModelError(f"lo ({lo}) must be below hi ({hi})")
        if not np.isfinite(offset):
            raise ModelError(f"offset must be a finite number, not {offset}")
        if count == 0:
            return np.zeros(0, np.int64)
        free = self._cap - self.size
        if free < count:
            self._grow(self._cap + count - free)
        self._widen(model.p, model.q)
        # the lowest free slots: a removed sensor's slot is reused first, the arrays stay dense
        slots = np.flatnonzero(~self._active)[:count].astype(np.int64)
        p, q = model.p, model.q
        self._ar[:, slots] = 0.0
        self._ma[:, slots] = 0.0
        self._ar[:p, slots] = np.asarray(model.ar)[:, None]
        self._ma[:q, slots] = np.asarray(model.ma)[:, None]
        self._x[:, slots] = 0.0
        self._e[:, slots] = 0.0
        if start == "stationary" and p + q:
            state = self._factor(model) @ self.rng.standard_normal((p + q, count))
            for lag in range(1, p + 1):
                self._x[self._xrow(lag), slots] = state[lag - 1]
            for lag in range(1, q + 1):
                self._e[self._erow(lag), slots] = state[p + lag - 1]
        self._mean[slots] = model.mean + offset
        self._sigma[slots] = model.sigma
        self._res[slots] = res
        self._lo[slots] = -np.inf if lo is None else lo
        self._hi[slots] = np.inf if hi is None else hi
        self._active[slots] = True
        if res == 0:
            self._unquantised += count
        if id(model) not in self._model_index:
            self._model_index[id(model)] = len(self._models)
            self._models.append(model)
        self._model_id[slots] = self._model_index[id(model)]
        if disturbances:
            self.perturbations.set(slots, list(disturbances), interval_s)
        return slots

    def remove(self, handle: int) -> None:
        """Remove a sensor; its slot emits NaN until a later `add` reuses it."""
        self._check(handle)
        if self._res[handle] == 0:
            self._unquantised -= 1
        self._ar[:, handle] = 0.0
        self._ma[:, handle] = 0.0
        self._x[:, handle] = 0.0
        self._e[:, handle] = 0.0
        self._mean[handle] = np.nan
        self._sigma[handle] = 0.0
        self._res[handle] = 0.0
        self._lo[handle], self._hi[handle] = -np.inf, np.inf
        self._active[handle] = False
        self._model_id[handle] = -1
        self.perturbations.clear(handle)

    def set_disturbances(
        self, handle: int, disturbances: Sequence[Disturbance], interval_s: float
    ) -> None:
        """Replace a sensor's disturbances (parsed with `parse_disturbances`)."""
        self._check(handle)
        self.perturbations.set(handle, list(disturbances), interval_s)

    def _check(self, handle: int) -> None:
        if not (0 <= handle < self._cap and self._active[handle]):
            raise UnknownSensorError(f"no sensor with handle {handle}: never added, or removed")

    def _factor(self, model: ArmaModel) -> FloatArray:
        # A square root of the stationary state covariance, cached per model.
        key = (tuple(model.ar), tuple(model.ma), model.sigma)
        factor = self._factors.get(key)
        if factor is None:
            w, v = np.linalg.eigh(state_covariance(model))
            factor = v * np.sqrt(np.clip(w, 0.0, None))
            self._factors[key] = factor
        return factor

    # --- stepping --------------------------------------------------------------------

    def advance(self, innovations: FloatArray) -> FloatArray:
        """One tick of the ARMA recursion with given innovations e_t (one per slot).

        Returns the deviations x_t from the means, neither quantised nor clipped: the
        part that must equal `scipy.signal.lfilter([1, *ma], [1, *-ar], e)`.
        """
        e = np.asarray(innovations, dtype=np.float64)
        if e.shape != (self._cap,):
            raise ModelError(f"innovations must have shape ({self._cap},), not {e.shape}")
        erow = (self._eh + 1) % (self._q + 1)
        self._e[erow] = e
        return self._recur(erow).copy()

    def _recur(self, erow: int) -> FloatArray:
        # x_t into the ring's free row; e_t is already in row erow of the e ring.
        p, q = self._p, self._q
        xrow = (self._xh + 1) % (p + 1)
        x: FloatArray = self._x[xrow]
        tmp = self._tmp
        np.copyto(x, self._e[erow])
        for lag in range(1, p + 1):
            np.multiply(self._ar[lag - 1], self._x[self._xrow(lag)], out=tmp)
            x += tmp
        for lag in range(1, q + 1):
            np.multiply(self._ma[lag - 1], self._e[self._erow(lag)], out=tmp)
            x += tmp
        self._xh, self._eh = xrow, erow
        return x

    def step(self) -> FloatArray:
        """One tick: a new value per slot (NaN for free slots and dropped samples).

        Disturbed by the sensors' disturbances (labels in `labels`), quantised, clipped.
        """
        erow = (self._eh + 1) % (self._q + 1)
        e = self._e[erow]
        self.rng.standard_normal(out=e)
        e *= self._sigma
        values = self._recur(erow) + self._mean
        if self.perturbations.has_any:
            values, _ = self.perturbations.apply(values, self.rng)
        return self._output(values)

    @property
    def labels(self) -> LabelArray:
        """The last tick's labels per slot (`perturbations.Label` bits; 0 when undisturbed)."""
        if not self.perturbations.has_any:
            return np.zeros(self._cap, np.uint8)
        return self.perturbations.labels

    def _output(self, values: FloatArray) -> FloatArray:
        res = self._res
        if self._unquantised == 0:
            # every sensor present has a resolution; free slots have res 0 and value NaN,
            # which the division keeps NaN
            with np.errstate(invalid="ignore", divide="ignore"):
                q = np.round(values / res) * res
        else:
            safe = np.where(res > 0, res, 1.0)
            q = np.where(res > 0, np.round(values / safe) * safe, values)
        return np.clip(q, self._lo, self._hi, out=q)
