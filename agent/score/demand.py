"""Demand forecasts: what a node's CPU, memory, GPU and network will need over the next hours.

The model, per resource (chosen by ``bench/demand_forecast.py`` on the nab/ and smd/ traces):

* a **seasonal profile**: the median of the series at each phase of the day (bins of ``step_s``),
  circularly smoothed over 3 bins or not at all, plus a per-weekday offset when the fit data spans
  two weeks or more; live, each closed step moves the profile at its phase by ``gamma`` towards
  the step's mean (0: the fitted profile stays; a Holt-Winters seasonal update);
* a **level**: an EWMA (``alpha``) of the deviation from the profile, damped by ``phi`` per step
  into the future (``phi`` = 1: the deviation persists; 0: straight back to the profile);
* **seasonal naive** (the value at the same phase one day or one week back, ``naive_lag``) as a
  candidate: the forecast is ``weight`` x the model above + (1 - ``weight``) x seasonal naive,
  ``weight`` 1 ("model"), 0 ("naive") or in between ("blend"; ``DemandMeta.choice`` names it);
* **intervals** from the chosen forecast's own out-of-sample errors: per horizon step, the
  ``q_lo`` and ``q_hi`` quantiles of ``actual - forecast``.

Everything is chosen per resource out of sample, on the fit data alone: the smoothing, ``gamma``,
``alpha`` and ``phi`` by grid search (mean absolute error over the horizon) on the last third of
the fit data against a profile fitted on the first two thirds, then ``weight`` and ``naive_lag``
on the same rows. Fitting is numpy only and runs where the other fits run (the fit child,
:mod:`agent.score.fit`); the daemon loads the compiled arrays (:data:`FORMAT`, the container of
:mod:`agent.score.artifact`) and :class:`DemandScorer` costs O(resources) per sample and
O(resources x horizon) per forecast. Artifacts fitted before the naive choice (no ``choice``,
no ``weight``/``naive_lag``/``gamma`` arrays) load and forecast with the model alone.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

from agent.errors import ModelError
from agent.features import demand_history
from agent.score import artifact
from agent.score.artifact import F64, Compiled, Container, TrainingWindow
from agent.score.types import DemandForecast

FORMAT_VERSION = 1
KIND = "heald.demand"
DAY_S = 86_400.0
WEEK_S = 7 * DAY_S
ALPHAS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
PHIS = (0.0, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
SMOOTHINGS = (3, 1)  # the profile's circular smoothing, in bins (1: none)
# how far each closed step moves the profile at its phase towards the step's mean (0: fixed profile)
GAMMAS = (0.0, 0.1, 0.2, 0.4)
# the fitted model's share in the forecast; the rest is seasonal naive (0: seasonal naive alone)
WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
CHOICES = ("model", "blend", "naive")
# at most this many forecast origins score each candidate (two weeks of 5-minute steps: all of them)
MAX_ORIGINS = 3000
# Resources the daemon forecasts when they are in the sample (wildcards: every label).
# (kept in agent.features.demand_history, which the daemon's history uses without numpy)
DEFAULT_RESOURCES = demand_history.DEFAULT_RESOURCES


class DemandMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    format_version: int
    kind: str
    resources: tuple[str, ...]
    step_s: float  # one profile bin and one forecast step
    horizon_steps: int
    weekly: bool  # the profile spans a week (weekday offsets) rather than a day
    quantiles: tuple[float, float]  # the interval's error quantiles
    training: TrainingWindow
    created: str
    # Per resource, what forecasts it (chosen out of sample by the fit): "model" (the profile and
    # level), "naive" (seasonal naive) or "blend" (the ``weight`` array's share of the model, the
    # rest seasonal naive, ``naive_lag`` steps back). Empty (artifacts fitted before the choice,
    # which have no weight, naive_lag or gamma array): the model, with a fixed profile, for all.
    choice: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CompiledDemand(Compiled[DemandMeta]):
    """Arrays: ``profile`` (r, bins), ``alpha`` (r,), ``phi`` (r,), ``err_lo``/``err_hi`` (r, H) and,
    with ``meta.choice``, ``weight`` (r,), ``naive_lag`` (r,) and ``gamma`` (r,)."""

    @property
    def bins(self) -> int:
        return int(self.arrays["profile"].shape[1])

    def naive_weight(self, j: int) -> tuple[float, int, float]:
        """Resource ``j``'s share of the fitted model (1: no seasonal naive), naive season in steps
        and the live profile's gamma."""
        if not self.meta.choice:
            return 1.0, self.bins, 0.0
        a = self.arrays
        return float(a["weight"][j]), int(a["naive_lag"][j]), float(a["gamma"][j])


def validate(meta: DemandMeta, arrays: dict[str, F64], where: str) -> None:
    FORMAT.check_head(meta, where)
    r, h = len(meta.resources), meta.horizon_steps
    if r == 0 or h < 1 or not meta.step_s > 0:
        raise ModelError(f"{where}: demand model needs resources, horizon_steps >= 1 and step_s > 0")
    bins = round((WEEK_S if meta.weekly else DAY_S) / meta.step_s)
    shapes = {"profile": (r, bins), "alpha": (r,), "phi": (r,), "err_lo": (r, h), "err_hi": (r, h)}
    if meta.choice:
        shapes |= {"weight": (r,), "naive_lag": (r,), "gamma": (r,)}
    if set(arrays) != set(shapes):
        raise ModelError(f"{where}: demand arrays {sorted(arrays)}, expected {sorted(shapes)}")
    for name, shape in shapes.items():
        a = arrays[name]
        if a.shape != shape or not np.all(np.isfinite(a)):
            raise ModelError(f"{where}: array {name!r} must be finite of shape {shape}, got {a.shape}")
    if meta.choice:
        w, lag, g = arrays["weight"], arrays["naive_lag"], arrays["gamma"]
        if len(meta.choice) != r or any(c not in CHOICES for c in meta.choice):
            raise ModelError(f"{where}: demand choice must be one of {list(CHOICES)} per resource, "
                             f"got {list(meta.choice)}")
        if not (np.all((w >= 0) & (w <= 1)) and np.all((g >= 0) & (g <= 1))
                and np.all((lag >= 1) & (lag <= bins) & (lag == np.round(lag)))):
            raise ModelError(f"{where}: demand weight and gamma must be in [0, 1] and naive_lag whole "
                             f"steps in [1, {bins}]")
        if tuple(_choice(float(x)) for x in w) != meta.choice:
            raise ModelError(f"{where}: demand choice {list(meta.choice)} does not match the weights "
                             f"{w.tolist()}")


FORMAT = Container(kind=KIND, version=FORMAT_VERSION, meta_type=DemandMeta, compiled=CompiledDemand,
                   validate=validate, noun="demand model", bare_array="a bare array, not an .npz",
                   kind_first=True)
save = artifact.save
from_bytes = FORMAT.from_bytes


def _phase(wall: npt.NDArray[np.float64], step_s: float, bins: int) -> npt.NDArray[np.intp]:
    return (np.floor(wall / step_s).astype(np.int64) % bins).astype(np.intp)


def _profile(y: F64, wall: F64, step_s: float, weekly: bool, smooth: int = 3) -> F64:
    """Median by phase of the day (circularly smoothed over ``smooth`` bins: 3 or 1, none), plus
    weekday offsets."""
    day_bins = round(DAY_S / step_s)
    ph = _phase(wall, step_s, day_bins)
    prof = np.full(day_bins, np.nan)
    order = np.argsort(ph, kind="stable")
    ph_s, y_s = ph[order], y[order]
    cuts = np.searchsorted(ph_s, np.arange(day_bins + 1))
    for b in range(day_bins):
        seg = y_s[cuts[b]:cuts[b + 1]]
        seg = seg[np.isfinite(seg)]
        if seg.size:
            prof[b] = np.median(seg)
    fill = np.nanmedian(y) if np.any(np.isfinite(y)) else 0.0
    prof = np.where(np.isfinite(prof), prof, fill)
    if smooth > 1:
        prof = np.asarray((np.roll(prof, 1) + prof + np.roll(prof, -1)) / 3.0, dtype=np.float64)
    if not weekly:
        return prof
    week = np.tile(prof, 7)
    dow = (np.floor(wall / DAY_S).astype(np.int64) % 7).astype(np.intp)
    resid = y - prof[ph]
    for d in range(7):
        r = resid[(dow == d) & np.isfinite(resid)]
        if r.size:
            week[d * day_bins:(d + 1) * day_bins] += np.median(r)
    return week


def _levels(dev: F64, alpha: float) -> F64:
    """EWMA of the deviation; NaN (unread) keeps the previous level."""
    out = np.empty_like(dev)
    level = 0.0
    for i, d in enumerate(dev.tolist()):
        if not math.isnan(d):
            level += alpha * (d - level)
        out[i] = level
    return out


def _seasonal(y: F64, prof: F64, ph: npt.NDArray[np.intp], gamma: float, start: int) -> F64:
    """``S[i]``: the live profile at row ``i``'s phase just after row ``i`` (``prof`` updated by
    ``gamma`` per row from row ``start`` on, NaN rows skipped; rows one ``step_s`` apart)."""
    out = np.asarray(prof[ph], dtype=np.float64).copy()
    n, bins = y.size, prof.shape[0]
    if gamma <= 0.0 or start >= n:
        return out
    off = int(ph[start])
    seasons = -(-(off + n - start) // bins)
    grid = np.full(seasons * bins, np.nan)
    grid[off:off + n - start] = y[start:]
    grid = grid.reshape(seasons, bins)
    cur = np.array(prof, dtype=np.float64)
    for i in range(seasons):
        row = grid[i]
        cur = np.where(np.isfinite(row), cur + gamma * (row - cur), cur)
        grid[i] = cur
    out[start:] = grid.reshape(-1)[off:off + n - start]
    return out


def _before(live: F64, fallback: F64, src: npt.NDArray[np.int64]) -> F64:
    """The live profile at row(s) ``src`` (see :func:`_seasonal`); ``fallback`` (the fitted
    profile at the same phase) where ``src`` is before the first row."""
    return np.where(src >= 0, live[np.maximum(src, 0)], fallback)


def naive_back(steps: npt.NDArray[np.int64], lag: int) -> npt.NDArray[np.int64]:
    """How many steps back the seasonal-naive value of ``steps`` ahead lies: the same phase of the
    latest season already seen (``lag`` steps back, or whole seasons more past a season ahead)."""
    return np.asarray(lag * -(-steps // lag), dtype=np.int64)


def _naive(y: F64, origins: npt.NDArray[np.intp], steps: npt.NDArray[np.int64], lag: int) -> F64:
    """Seasonal naive from each origin (rows) for each step (columns); NaN where not seen."""
    src = origins[:, None] + steps[None, :] - naive_back(steps, lag)[None, :]
    return np.where(src >= 0, y[np.maximum(src, 0)], np.nan)


def _combine(model: F64, naive: F64, weight: float) -> F64:
    """``weight`` of the fitted model's point and the rest seasonal naive (the model where naive
    has no value)."""
    if weight >= 1.0:
        return model
    return np.where(np.isfinite(naive), weight * model + (1.0 - weight) * naive, model)


def _choice(weight: float) -> str:
    return "model" if weight >= 1.0 else "naive" if weight <= 0.0 else "blend"


def fit_demand(
    values: npt.ArrayLike, wall: npt.ArrayLike, resources: Sequence[str], *, step_s: float = 300.0,
    horizon_s: float = 7200.0, quantiles: tuple[float, float] = (0.1, 0.9), source: str = "",
) -> CompiledDemand:
    """Fit on ``values`` (n, r), one row every ``step_s`` at wall times ``wall`` (n,)."""
    y_all = np.asarray(values, dtype=np.float64)
    if y_all.ndim == 1:
        y_all = y_all[:, None]
    t = np.asarray(wall, dtype=np.float64)
    n, r = y_all.shape
    h = max(1, round(horizon_s / step_s))
    if r != len(resources) or t.shape != (n,) or n < 2 * round(DAY_S / step_s):
        raise ModelError(f"demand fit needs {len(resources)} columns and at least two days of rows "
                         f"({2 * round(DAY_S / step_s)}), got shape {y_all.shape}")
    weekly = (t[-1] - t[0]) >= 2 * WEEK_S
    day = round(DAY_S / step_s)
    bins = round((WEEK_S if weekly else DAY_S) / step_s)
    steps = np.arange(1, h + 1, dtype=np.int64)
    # everything is chosen out of sample: on the last third, against a profile fitted on the first
    # two thirds (a profile fitted on the same rows would hide level shifts)
    k = 2 * n // 3
    oos = k >= 2 * day
    origins = np.arange(k if oos else 0, n - 1, dtype=np.intp)
    origins = origins[::max(1, -(-origins.size // MAX_ORIGINS))]  # evenly thinned: the grid's cost is bounded
    idx = origins[:, None] + steps[None, :]
    ph = _phase(t, step_s, bins)
    ph_fut = _phase(t[origins][:, None] + step_s * steps[None, :], step_s, bins)
    lags = (day, bins) if weekly else (day,)
    back = naive_back(steps, bins)
    profiles, gammas, alphas, phis, weights, naive_lags, lo, hi = [], [], [], [], [], [], [], []
    for j in range(r):
        y = y_all[:, j]
        actual = np.where(idx < n, y[np.minimum(idx, n - 1)], np.nan)
        # the fitted model: smoothing, gamma, alpha and phi by the mean absolute error over the horizon
        best: tuple[float, int, float, float, float, F64] = (math.inf, 3, 0.0, 1.0, 1.0, actual)
        for smooth in SMOOTHINGS:
            prof_v = _profile(y[:k], t[:k], step_s, weekly, smooth) if oos else \
                _profile(y, t, step_s, weekly, smooth)
            for g in GAMMAS:
                live = _seasonal(y, prof_v, ph, g, origins[0])
                dev = y - _before(live, prof_v[ph], np.arange(n) - bins)
                base = _before(live, prof_v[ph_fut], idx - back[None, :])
                fut = actual - base
                for a in ALPHAS:
                    lev = _levels(dev, a)[origins]
                    for p in PHIS:
                        err = fut - lev[:, None] * (p ** steps)[None, :]
                        mae = float(np.nanmean(np.abs(err))) if np.any(np.isfinite(err)) else math.inf
                        if mae < best[0]:
                            best = (mae, smooth, g, a, p, base + lev[:, None] * (p ** steps)[None, :])
        mae_m, smooth, g, a, p, model_pt = best
        # then its share against seasonal naive (the same phase one season back)
        pick: tuple[float, float, int, F64] = (mae_m, 1.0, day, actual - model_pt)
        for lag in lags:
            nv = _naive(y, origins, steps, lag)
            for w in WEIGHTS[1:]:
                err = actual - _combine(model_pt, nv, w)
                mae = float(np.nanmean(np.abs(err))) if np.any(np.isfinite(err)) else math.inf
                if mae < pick[0]:
                    pick = (mae, w, lag, err)
        _, w, lag, err = pick
        q = np.nanquantile(err, quantiles, axis=0) if np.any(np.isfinite(err)) else np.zeros((2, h))
        profiles.append(_profile(y, t, step_s, weekly, smooth))
        gammas.append(g)
        alphas.append(a)
        phis.append(p)
        weights.append(w)
        naive_lags.append(float(lag))
        lo.append(np.nan_to_num(q[0]))
        hi.append(np.nan_to_num(q[1]))
    meta = DemandMeta(
        format_version=FORMAT_VERSION, kind=KIND, resources=tuple(resources), step_s=float(step_s),
        horizon_steps=h, weekly=bool(weekly), quantiles=quantiles,
        training=TrainingWindow(rows=n, start=float(t[0]), end=float(t[-1]), source=source),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        choice=tuple(_choice(w) for w in weights),
    )
    arrays = {"profile": np.array(profiles), "alpha": np.array(alphas), "phi": np.array(phis),
              "err_lo": np.array(lo), "err_hi": np.array(hi), "weight": np.array(weights),
              "naive_lag": np.array(naive_lags), "gamma": np.array(gammas)}
    return FORMAT.build(meta, arrays)


def backtest(model: CompiledDemand, j: int, y: npt.ArrayLike, wall: npt.ArrayLike, *,
             steps: Sequence[int], start: int = 0) -> tuple[F64, F64, F64]:
    """Resource ``j``'s forecasts of ``y[t + k]`` from every origin ``t`` (rows, the level, the live
    profile and the naive season read up to and including ``y[t]``) for each of ``steps``
    (columns): point, lo, hi. What :class:`DemandScorer` forecasts, vectorised (for
    ``bench/demand_forecast.py``); the live profile moves from row ``start`` on (the rows before it
    are the fit's)."""
    yy = np.asarray(y, dtype=np.float64)
    tt = np.asarray(wall, dtype=np.float64)
    m, arr = model.meta, model.arrays
    prof = arr["profile"][j]
    bins = prof.shape[0]
    st = np.asarray(steps, dtype=np.int64)
    origins = np.arange(yy.size, dtype=np.intp)
    ph = _phase(tt, m.step_s, bins)
    w, lag, g = model.naive_weight(j)
    live = _seasonal(yy, prof, ph, g, start)
    lev = _levels(yy - _before(live, prof[ph], origins - bins), float(arr["alpha"][j]))
    ph_fut = _phase(tt[:, None] + m.step_s * st[None, :], m.step_s, bins)
    base = _before(live, prof[ph_fut], origins[:, None] + st[None, :] - naive_back(st, bins)[None, :])
    point = base + lev[:, None] * (float(arr["phi"][j]) ** st)[None, :]
    if w < 1.0:
        point = _combine(point, _naive(yy, origins, st, lag), w)
    e = np.minimum(st, m.horizon_steps) - 1  # (past the horizon: its last step's errors)
    return point, point + arr["err_lo"][j, e][None, :], point + arr["err_hi"][j, e][None, :]


class DemandScorer:
    """Scores a compiled demand model on live samples: ``push`` each sample, ``forecast`` when asked.

    Samples are averaged into ``step_s`` bins; a bin's mean updates each resource's level when
    the bin closes (a resource with no reading in a bin keeps its level), and moves the profile at
    that bin's phase by ``gamma`` towards it (the live profile). Where the model chose
    seasonal naive (wholly or in a blend), the closed bins' means of the last seasons are kept
    too (a ring of :attr:`warmup_steps` bins): the forecast of a step is the mean of the same
    phase one season back (the fitted model's point where that bin has no mean)."""

    def __init__(self, model: CompiledDemand) -> None:
        self.model = model
        m = model.meta
        h = m.horizon_steps
        self._step = m.step_s
        self._profile = np.array(model.arrays["profile"])  # the live profile (moved by gamma)
        self._alpha = model.arrays["alpha"]
        self._phi = model.arrays["phi"]
        self._powers = self._phi[:, None] ** np.arange(1, h + 1)[None, :]
        self._index = {k: i for i, k in enumerate(m.resources)}
        r = len(m.resources)
        self._level = np.zeros(r)
        self._sum = np.zeros(r)
        self._count = np.zeros(r)
        self._bin: int | None = None
        wl = [model.naive_weight(i) for i in range(r)]
        self._weight = np.array([w for w, _, _ in wl])
        self._gamma = np.array([g for _, _, g in wl])
        self._learn = bool(np.any(self._gamma > 0))
        self._naive = bool(np.any(self._weight < 1.0))
        # bins back from the first forecast step's bin to its naive source: the forecast's steps
        # are 1..h after the open bin, whose mean is not in yet (so h + 1 after the last closed)
        ahead = np.arange(2, h + 2, dtype=np.int64)
        self._back = np.array([naive_back(ahead, lag) for _, lag, _ in wl]).reshape(r, h)
        self._ring_n = int(self._back.max()) if self._naive else 0
        self._ring = np.full((r, self._ring_n), np.nan)
        self._ring_bin = np.full(self._ring_n, -1, dtype=np.int64)

    @property
    def warmup_steps(self) -> int:
        """Closed steps of history that bring a new scorer fully up to date (its level, and the
        seasons that seasonal naive reads)."""
        return max(4 * self.model.meta.horizon_steps, self._ring_n) + 1

    def warm(self, rows: Sequence[tuple[float, Mapping[str, float | None]]]) -> None:
        """Bring a new scorer up to date on rows of step means (wall, values) that the model was
        fitted on: the level and the naive seasons follow them, the profile (fitted on them
        already) does not move."""
        learn, self._learn = self._learn, False
        try:
            for wall, vals in rows:
                self.push(vals, wall)
        finally:
            self._learn = learn

    def push(self, metrics: Mapping[str, float | None], wall: float) -> None:
        b = int(wall // self._step)
        if self._bin is not None and b != self._bin:
            self._close(self._bin)
        self._bin = b
        for key, i in self._index.items():
            v = metrics.get(key)
            if v is not None and np.isfinite(v):
                self._sum[i] += v
                self._count[i] += 1

    def _close(self, b: int) -> None:
        seen = self._count > 0
        mean = np.divide(self._sum, self._count, out=np.zeros_like(self._sum), where=seen)
        col = b % self._profile.shape[1]
        prof = self._profile[:, col]
        self._level = np.where(seen, self._level + self._alpha * (mean - prof - self._level), self._level)
        if self._learn:
            self._profile[:, col] = np.where(seen, prof + self._gamma * (mean - prof), prof)
        if self._ring_n:
            slot = b % self._ring_n
            self._ring[:, slot] = np.where(seen, mean, np.nan)
            self._ring_bin[slot] = b
        self._sum[:] = 0.0
        self._count[:] = 0.0

    def forecast(self, wall: float) -> tuple[DemandForecast, ...]:
        """Forecasts for the steps after the current bin (after the last bin when none is open)."""
        m = self.model.meta
        start = (int(wall // self._step) if self._bin is None else self._bin) + 1
        cols = (start + np.arange(m.horizon_steps)) % self._profile.shape[1]
        point = self._profile[:, cols] + self._level[:, None] * self._powers
        if self._naive:
            src = (start + np.arange(m.horizon_steps))[None, :] - self._back  # (r, h) bins
            slot = src % self._ring_n
            rows = np.arange(len(m.resources))[:, None]
            nv = np.where(self._ring_bin[slot] == src, self._ring[rows, slot], np.nan)
            w = self._weight[:, None]
            point = np.where(np.isfinite(nv), w * point + (1.0 - w) * nv, point)
        lo = point + self.model.arrays["err_lo"]
        hi = point + self.model.arrays["err_hi"]
        return tuple(
            DemandForecast(resource=k, step_s=m.step_s, point=tuple(point[i].tolist()),
                           lo=tuple(lo[i].tolist()), hi=tuple(hi[i].tolist()))
            for k, i in self._index.items()
        )


def history_matrix(rows: Sequence[demand_history.Row], step_s: float) -> tuple[F64, F64, list[str]]:
    """A saved history's rows on a regular grid of ``step_s`` (NaN where no row), its wall times and
    the resources with at least a day of values (a resource seen for minutes cannot be profiled)."""
    if not rows:
        raise ModelError("demand history is empty")
    first = rows[0][0]
    n = round((rows[-1][0] - first) / step_s) + 1
    counts: dict[str, int] = {}
    for _, vals in rows:
        for k in vals:
            counts[k] = counts.get(k, 0) + 1
    day = round(DAY_S / step_s)
    keys = sorted(k for k, c in counts.items() if c >= day)
    if not keys:
        raise ModelError("demand history has no resource with a day of values")
    col = {k: j for j, k in enumerate(keys)}
    values = np.full((n, len(keys)), np.nan)
    for wall, vals in rows:
        i = round((wall - first) / step_s)
        for k, v in vals.items():
            j = col.get(k)
            if j is not None:
                values[i, j] = v
    return values, first + step_s * np.arange(n, dtype=np.float64), keys


def fit_history(history: str | os.PathLike[str], out: str | os.PathLike[str], *,
                horizon_s: float = 7200.0) -> CompiledDemand:
    """Fit on a saved demand history (:mod:`agent.features.demand_history`) and write the artifact
    atomically: the demand fit child's work (``heald model train-demand``)."""
    path = Path(history)
    try:
        step = demand_history.saved_step(path)
        rows = demand_history.load_rows(path, step)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read the demand history: {exc}") from None
    values, wall, keys = history_matrix(rows, step)
    model = fit_demand(values, wall, keys, step_s=step, horizon_s=horizon_s, source=path.name)
    save(model, out)
    return model


def fit_in_child(history: str | os.PathLike[str], out: str | os.PathLike[str], *, horizon_s: float,
                 timeout_s: float = 600.0) -> CompiledDemand:
    """Fit in a short-lived ``python -m agent model train-demand`` child (where the detector's fit
    runs: :func:`agent.score.fit.fit_in_child`) and load its verified artifact. Blocking (the
    daemon runs it in a worker thread); the child is killed and reaped on timeout. ModelError on
    any failure."""
    argv = [sys.executable, "-m", "agent", "model", "train-demand", "--history", os.fspath(history),
            "--output", os.fspath(out), "--horizon-s", f"{horizon_s:g}"]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ModelError(f"demand fit on {history} timed out after {timeout_s:g} s") from None
    except OSError as exc:
        raise ModelError(f"cannot start the demand fit process: {exc}") from None
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", errors="replace").strip().splitlines()[-3:]
        raise ModelError(f"demand fit on {history} failed (exit {proc.returncode}): " + " | ".join(tail))
    return FORMAT.load(Path(out))
