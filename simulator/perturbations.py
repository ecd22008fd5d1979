"""Perturbations and faults added to a sensor's clean signal, with ground-truth labels.

The disturbances of a sensor are a list of specs, as in the `disturbances` list of a
`sensor-add` command body; each has a `type`:

| type | parameters | effect on sample k (t = k * interval_s seconds) |
|---|---|---|
| `noise` | `mu` (0), `sigma` | + N(mu, sigma^2), every sample |
| `spike` | `probability` (alias `p`), `a`, `b` | with that probability, + U(a, b) |
| `drift` | `d0` (0), `r` (per second) | + d0 + r * t |
| `stuck` | `start`, `duration`, `probability`, `value` | frozen: `value`, or the last one emitted |
| `dropout` | `start`, `duration`, `probability` | no sample (NaN) |

`k` counts the sensor's samples from 0 since its disturbances were set, dropouts included;
using the sample index times the nominal interval rather than wall-clock seconds makes a
drift reproducible and independent of scheduling jitter. A fault is active from sample
`start` for `duration` samples (for ever without one), and/or begins at each sample with
`probability` and then lasts `duration` samples (for ever without one).

Each sample gets a `Label` bit mask of what shaped the emitted value, so anomaly detection
can be scored later. A fault masks the additive labels: a stuck sample is labelled `STUCK`
only, a dropped one `DROPOUT` only (they no longer carry the noise, spike or drift).
"""

from __future__ import annotations

from enum import IntFlag
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from simulator.errors import DisturbanceError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
LabelArray = npt.NDArray[np.uint8]


class Label(IntFlag):
    """What shaped one emitted sample (bits of a uint8)."""

    NONE = 0
    NOISE = 1
    SPIKE = 2
    DRIFT = 4
    STUCK = 8
    DROPOUT = 16


def label_names(mask: int) -> list[str]:
    """The lower-case names of the bits set in a label mask, e.g. ['noise', 'spike']."""
    return [flag.name.lower() for flag in Label if flag and flag.name and mask & flag]


# --- specs (the sensor-add JSON body) -----------------------------------------------------


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class NoiseSpec(_Spec):
    """White noise N(mu, sigma^2) added to every sample."""

    type: Literal["noise"]
    mu: float = 0.0
    sigma: float = Field(ge=0.0)


class SpikeSpec(_Spec):
    """With `probability` per sample, a spike U(a, b) is added."""

    type: Literal["spike"]
    probability: float = Field(ge=0.0, le=1.0, validation_alias=AliasChoices("probability", "p"))
    a: float
    b: float

    @model_validator(mode="after")
    def _ordered(self) -> SpikeSpec:
        if self.a > self.b:
            raise ValueError(f"a ({self.a}) must not exceed b ({self.b}): spikes are U(a, b)")
        return self


class DriftSpec(_Spec):
    """A linear drift d0 + r * t, t in seconds (sample index times the interval)."""

    type: Literal["drift"]
    d0: float = 0.0
    r: float


class _FaultSpec(_Spec):
    start: int | None = Field(default=None, ge=0, description="first faulty sample")
    duration: int | None = Field(default=None, ge=1, description="samples; none: for ever")
    probability: float = Field(default=0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _triggered(self) -> _FaultSpec:
        if self.start is None and self.probability == 0.0:
            raise ValueError("give a start (sample index) or a probability > 0, or both")
        return self


class StuckSpec(_FaultSpec):
    """The sensor repeats one value: `value`, or the last value it emitted before."""

    type: Literal["stuck"]
    value: float | None = None


class DropoutSpec(_FaultSpec):
    """The sensor emits no sample."""

    type: Literal["dropout"]


Disturbance = Annotated[
    NoiseSpec | SpikeSpec | DriftSpec | StuckSpec | DropoutSpec, Field(discriminator="type")
]
_SPECS: dict[str, type[_Spec]] = {
    "noise": NoiseSpec,
    "spike": SpikeSpec,
    "drift": DriftSpec,
    "stuck": StuckSpec,
    "dropout": DropoutSpec,
}


def parse_disturbances(data: object, where: str = "disturbances") -> list[Disturbance]:
    """Validate a `disturbances` list; DisturbanceError names the item and what is wrong."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise DisturbanceError(f"{where} must be a list of objects, not {type(data).__name__}")
    specs: list[Disturbance] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(data):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise DisturbanceError(f"{at} must be an object with a type, not {item!r}")
        kind = item.get("type")
        if kind not in _SPECS:
            raise DisturbanceError(
                f"{at}: type {kind!r} is unknown; use one of {', '.join(_SPECS)}"
                if kind is not None
                else f"{at}: type is missing; use one of {', '.join(_SPECS)}"
            )
        if kind in seen:
            raise DisturbanceError(
                f"{at}: a second {kind} disturbance (the first is {where}[{seen[kind]}]); "
                "give each type at most once"
            )
        seen[kind] = i
        model = _SPECS[kind]
        try:
            spec: Any = model.model_validate(item)
        except ValidationError as exc:
            raise DisturbanceError(f"{at} ({kind}): {_describe(exc, model)}") from exc
        specs.append(spec)
    return specs


def _describe(exc: ValidationError, model: type[_Spec]) -> str:
    allowed = ", ".join(sorted(set(model.model_fields) - {"type"}))
    parts = []
    for err in exc.errors(include_url=False):
        name = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field {name!r} (allowed: {allowed})")
        elif err["type"] == "missing":
            parts.append(f"{name} is required")
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            parts.append(f"{name}: {msg} (got {err['input']!r})" if name else msg)
    return "; ".join(parts)


# --- vectorised application ---------------------------------------------------------------


class _Faults:
    """Fault windows (stuck or dropout) of every slot."""

    def __init__(self, capacity: int) -> None:
        self.start = np.full(capacity, -1, np.int64)  # -1: no scheduled window
        self.duration = np.full(capacity, -1, np.int64)  # -1: for ever
        self.probability = np.zeros(capacity)
        self.remaining = np.zeros(capacity, np.int64)  # random episode: samples left, -1 for ever
        self.was = np.zeros(capacity, bool)

    def grow(self, capacity: int) -> None:
        extra = capacity - self.start.size
        self.start = np.r_[self.start, np.full(extra, -1, np.int64)]
        self.duration = np.r_[self.duration, np.full(extra, -1, np.int64)]
        self.probability = np.r_[self.probability, np.zeros(extra)]
        self.remaining = np.r_[self.remaining, np.zeros(extra, np.int64)]
        self.was = np.r_[self.was, np.zeros(extra, bool)]

    def set(self, slot: IntArray, spec: StuckSpec | DropoutSpec | None) -> None:
        self.start[slot] = -1 if spec is None or spec.start is None else spec.start
        self.duration[slot] = -1 if spec is None or spec.duration is None else spec.duration
        self.probability[slot] = 0.0 if spec is None else spec.probability
        self.remaining[slot] = 0
        self.was[slot] = False

    def active(
        self, idx: IntArray | slice, k: IntArray, rng: np.random.Generator
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """(active, just started) for the slots idx at their sample indices k."""
        start, duration = self.start[idx], self.duration[idx]
        scheduled = (start >= 0) & (k >= start) & ((duration < 0) | (k < start + duration))
        remaining = self.remaining[idx]
        ongoing = remaining != 0
        onset = ~ongoing & (rng.random(start.size) < self.probability[idx])
        remaining[onset] = duration[onset]  # -1 (for ever) stays -1
        active = scheduled | ongoing | onset
        remaining[remaining > 0] -= 1
        self.remaining[idx] = remaining
        started = active & ~self.was[idx]
        self.was[idx] = active
        return active, started


class Perturbations:
    """Disturbances of many sensors (slots 0..capacity-1), applied to a whole tick at once."""

    def __init__(self, capacity: int = 0) -> None:
        self._cap = 0
        self.k = np.zeros(0, np.int64)
        self.interval = np.zeros(0)
        self.noise_mu = np.zeros(0)
        self.noise_sigma = np.zeros(0)
        self.spike_p = np.zeros(0)
        self.spike_a = np.zeros(0)
        self.spike_b = np.zeros(0)
        self.drift_d0 = np.zeros(0)
        self.drift_r = np.zeros(0)
        self.stuck_value = np.zeros(0)
        self.frozen = np.zeros(0)
        self.last = np.zeros(0)
        self._kinds: dict[str, npt.NDArray[np.bool_]] = {}
        self.stuck = _Faults(0)
        self.dropout = _Faults(0)
        self._index: dict[str, Selection] | None = None
        self._index_n = 0
        self._set = np.zeros(0, bool)  # slots with at least one disturbance
        self._nset = 0
        self.labels: LabelArray = np.zeros(0, np.uint8)
        self.grow(capacity)

    @property
    def capacity(self) -> int:
        """How many slots the arrays hold."""
        return self._cap

    @property
    def has_any(self) -> bool:
        """True when at least one slot has a disturbance."""
        return self._nset > 0

    def grow(self, capacity: int) -> None:
        """Make room for slots up to capacity - 1 (never shrinks)."""
        if capacity <= self._cap:
            return
        extra = capacity - self._cap
        zeros, nans = np.zeros(extra), np.full(extra, np.nan)
        self.k = np.r_[self.k, np.zeros(extra, np.int64)]
        self.interval = np.r_[self.interval, np.ones(extra)]
        for name in ("noise_mu", "noise_sigma", "spike_p", "spike_a", "spike_b"):
            setattr(self, name, np.r_[getattr(self, name), zeros])
        self.drift_d0 = np.r_[self.drift_d0, zeros]
        self.drift_r = np.r_[self.drift_r, zeros]
        self.stuck_value = np.r_[self.stuck_value, nans]
        self.frozen = np.r_[self.frozen, nans]
        self.last = np.r_[self.last, nans]
        for kind in _SPECS:
            self._kinds[kind] = np.r_[
                self._kinds.get(kind, np.zeros(0, bool)), np.zeros(extra, bool)
            ]
        self.stuck.grow(capacity)
        self.dropout.grow(capacity)
        self.labels = np.r_[self.labels, np.zeros(extra, np.uint8)]
        self._set = np.r_[self._set, np.zeros(extra, bool)]
        self._cap = capacity
        self._index = None

    def set(self, slots: int | IntArray, specs: list[Disturbance], interval_s: float) -> None:
        """Replace the disturbances of one slot or an array of slots; their sample count restarts.

        `specs` come from `parse_disturbances`.
        """
        if not interval_s > 0:
            raise DisturbanceError(f"the sampling interval must be > 0 s (got {interval_s})")
        idx = np.atleast_1d(np.asarray(slots, dtype=np.int64))
        if idx.size == 0:
            return
        self.grow(int(idx.max()) + 1)
        self.clear(idx)
        self.interval[idx] = interval_s
        if specs:
            self._set[idx] = True
            self._nset += idx.size
        for spec in specs:
            self._kinds[spec.type][idx] = True
            if isinstance(spec, NoiseSpec):
                self.noise_mu[idx], self.noise_sigma[idx] = spec.mu, spec.sigma
            elif isinstance(spec, SpikeSpec):
                self.spike_p[idx] = spec.probability
                self.spike_a[idx], self.spike_b[idx] = spec.a, spec.b
            elif isinstance(spec, DriftSpec):
                self.drift_d0[idx], self.drift_r[idx] = spec.d0, spec.r
            elif isinstance(spec, StuckSpec):
                self.stuck.set(idx, spec)
                self.stuck_value[idx] = np.nan if spec.value is None else spec.value
            else:
                self.dropout.set(idx, spec)

    def clear(self, slots: int | IntArray) -> None:
        """Remove every disturbance of one slot or an array of slots."""
        idx = np.atleast_1d(np.asarray(slots, dtype=np.int64))
        idx = idx[idx < self._cap]
        if idx.size == 0:
            return
        for kind in self._kinds.values():
            kind[idx] = False
        for arr in (self.noise_mu, self.noise_sigma, self.spike_p, self.spike_a, self.spike_b):
            arr[idx] = 0.0
        self.drift_d0[idx] = self.drift_r[idx] = 0.0
        self.stuck_value[idx] = self.frozen[idx] = self.last[idx] = np.nan
        self.stuck.set(idx, None)
        self.dropout.set(idx, None)
        self.k[idx] = 0
        self.interval[idx] = 1.0
        self._nset -= int(np.count_nonzero(self._set[idx]))
        self._set[idx] = False
        self._index = None

    def kinds(self, slot: int) -> list[str]:
        """The disturbance types set on a slot."""
        return [kind for kind, on in self._kinds.items() if slot < self._cap and on[slot]]

    def apply(self, values: FloatArray, rng: np.random.Generator) -> tuple[FloatArray, LabelArray]:
        """Disturbed copy of one tick's values (one per slot) and their labels; advances k."""
        n = values.shape[0]
        self.grow(n)
        out = np.array(values, dtype=np.float64, copy=True)
        labels = np.zeros(n, np.uint8)
        index = self._indices(n)
        k = self.k[:n]

        sel = index["noise"]
        if size := _size(sel):
            out[sel] += self.noise_mu[sel] + self.noise_sigma[sel] * rng.standard_normal(size)
            labels[sel] |= np.uint8(Label.NOISE)
        sel = index["spike"]
        if size := _size(sel):
            fire = _slots(sel, rng.random(size) < self.spike_p[sel])
            if fire.size:
                out[fire] += rng.uniform(self.spike_a[fire], self.spike_b[fire])
                labels[fire] |= np.uint8(Label.SPIKE)
        sel = index["drift"]
        if _size(sel):
            t = k[sel] * self.interval[sel]
            out[sel] += self.drift_d0[sel] + self.drift_r[sel] * t
            labels[sel] |= np.uint8(Label.DRIFT)
        sel = index["stuck"]
        if _size(sel):
            active, started = self.stuck.active(sel, k[sel], rng)
            new = _slots(sel, started)
            fixed = self.stuck_value[new]
            previous = np.where(np.isnan(self.last[new]), out[new], self.last[new])
            self.frozen[new] = np.where(np.isnan(fixed), previous, fixed)
            on = _slots(sel, active)
            out[on] = self.frozen[on]
            labels[on] = np.uint8(Label.STUCK)
        sel = index["dropout"]
        if _size(sel):
            active, _ = self.dropout.active(sel, k[sel], rng)
            on = _slots(sel, active)
            out[on] = np.nan
            labels[on] = np.uint8(Label.DROPOUT)
        emitted = ~np.isnan(out)
        np.copyto(self.last[:n], out, where=emitted)
        self.k[:n] += 1
        self.labels = labels
        return out, labels

    def _indices(self, n: int) -> dict[str, Selection]:
        # Slots per disturbance type, rebuilt only when a slot's disturbances change, so a
        # tick touches only the sensors that have the disturbance. A contiguous run (often
        # every sensor) becomes a slice: views instead of gathers and scatters, 3x faster.
        if self._index is None or self._index_n != n:
            self._index = {kind: _selection(on[:n]) for kind, on in self._kinds.items()}
            self._index_n = n
        return self._index


Selection = IntArray | slice


def _selection(mask: npt.NDArray[np.bool_]) -> Selection:
    idx = np.flatnonzero(mask).astype(np.int64)
    if idx.size and idx[-1] - idx[0] + 1 == idx.size:
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _size(sel: Selection) -> int:
    return sel.stop - sel.start if isinstance(sel, slice) else int(sel.size)


def _slots(sel: Selection, mask: npt.NDArray[np.bool_]) -> IntArray:
    """The slots of a selection where mask (one entry per selected slot) is true."""
    if isinstance(sel, slice):
        return np.flatnonzero(mask).astype(np.int64) + np.int64(sel.start)
    return np.asarray(sel[mask], dtype=np.int64)
