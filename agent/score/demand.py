"""Demand forecasts: what a node's CPU, memory, GPU and network will need over the next hours.

The model, per resource (chosen by ``bench/demand_forecast.py`` on the nab/ and smd/ traces):

* a **seasonal profile**: the median of the series at each phase of the day (bins of ``step_s``),
  circularly smoothed, plus a per-weekday offset when the fit data spans two weeks or more;
* a **level**: an EWMA (``alpha``) of the deviation from the profile, damped by ``phi`` per step
  into the future (``phi`` = 1: the deviation persists; 0: straight back to the profile);
* **intervals** from the fit data's own forecast errors: per horizon step, the ``q_lo`` and
  ``q_hi`` quantiles of ``actual - forecast``.

``alpha`` and ``phi`` are picked per resource by grid search on the fit data (mean absolute
error over the horizon). Fitting is numpy only and runs where the other fits run (the fit child,
:mod:`agent.score.fit`); the daemon loads the compiled arrays (:data:`FORMAT`, the container of
:mod:`agent.score.artifact`) and :class:`DemandScorer` costs O(resources) per sample and
O(resources x horizon) per forecast.
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
# Resources the daemon forecasts when they are in the sample (wildcards: every label).
# (kept in agent.features.demand_history, which the daemon's history uses without numpy)
DEFAULT_RESOURCES = demand_history.DEFAULT_RESOURCES


class DemandMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    format_version: int
    kind: str
    resources: tuple[str, ...]
    step_s: float  # one profile bin and one forecast step
    horizon_steps: int
    weekly: bool  # the profile spans a week (weekday offsets) rather than a day
    quantiles: tuple[float, float]  # the interval's error quantiles
    training: TrainingWindow
    created: str


@dataclass(frozen=True, slots=True)
class CompiledDemand(Compiled[DemandMeta]):
    """Arrays: ``profile`` (r, bins), ``alpha`` (r,), ``phi`` (r,), ``err_lo``/``err_hi`` (r, H)."""

    @property
    def bins(self) -> int:
        return int(self.arrays["profile"].shape[1])


def validate(meta: DemandMeta, arrays: dict[str, F64], where: str) -> None:
    FORMAT.check_head(meta, where)
    r, h = len(meta.resources), meta.horizon_steps
    if r == 0 or h < 1 or not meta.step_s > 0:
        raise ModelError(f"{where}: demand model needs resources, horizon_steps >= 1 and step_s > 0")
    bins = round((WEEK_S if meta.weekly else DAY_S) / meta.step_s)
    shapes = {"profile": (r, bins), "alpha": (r,), "phi": (r,), "err_lo": (r, h), "err_hi": (r, h)}
    if set(arrays) != set(shapes):
        raise ModelError(f"{where}: demand arrays {sorted(arrays)}, expected {sorted(shapes)}")
    for name, shape in shapes.items():
        a = arrays[name]
        if a.shape != shape or not np.all(np.isfinite(a)):
            raise ModelError(f"{where}: array {name!r} must be finite of shape {shape}, got {a.shape}")


FORMAT = Container(kind=KIND, version=FORMAT_VERSION, meta_type=DemandMeta, compiled=CompiledDemand,
                   validate=validate, noun="demand model", bare_array="a bare array, not an .npz",
                   kind_first=True)
save = artifact.save
from_bytes = FORMAT.from_bytes


def _phase(wall: npt.NDArray[np.float64], step_s: float, bins: int) -> npt.NDArray[np.intp]:
    return (np.floor(wall / step_s).astype(np.int64) % bins).astype(np.intp)


def _profile(y: F64, wall: F64, step_s: float, weekly: bool) -> F64:
    """Median by phase of the day (circularly smoothed over 3 bins), plus weekday offsets."""
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
    steps = np.arange(1, h + 1)
    profiles, alphas, phis, lo, hi = [], [], [], [], []
    for j in range(r):
        y = y_all[:, j]
        prof = _profile(y, t, step_s, weekly)
        ph = _phase(t, step_s, bins)
        # alpha, phi and the error quantiles are chosen out of sample: against a profile fitted
        # on the first two thirds (a profile fitted on the same rows would hide level shifts)
        k = 2 * n // 3
        dev = y - _profile(y[:k], t[:k], step_s, weekly)[ph] if k >= 2 * day else y - prof[ph]
        held = np.arange(n) >= (k if k >= 2 * day else 0)
        # actual - profile at t + k, for every origin t and step k (NaN past the end)
        idx = np.arange(n)[:, None] + steps[None, :]
        ok = idx < n
        fut = np.where(ok & held[:, None], dev[np.minimum(idx, n - 1)], np.nan)
        best: tuple[float, float, float, F64] = (math.inf, 1.0, 1.0, fut)
        for a in ALPHAS:
            lev = _levels(dev, a)
            for p in PHIS:
                err = fut - lev[:, None] * (p ** steps)[None, :]
                mae = float(np.nanmean(np.abs(err)))
                if mae < best[0]:
                    best = (mae, a, p, err)
        _, a, p, err = best
        q = np.nanquantile(err, quantiles, axis=0) if np.any(np.isfinite(err)) else np.zeros((2, h))
        profiles.append(prof)
        alphas.append(a)
        phis.append(p)
        lo.append(np.nan_to_num(q[0]))
        hi.append(np.nan_to_num(q[1]))
    meta = DemandMeta(
        format_version=FORMAT_VERSION, kind=KIND, resources=tuple(resources), step_s=float(step_s),
        horizon_steps=h, weekly=bool(weekly), quantiles=quantiles,
        training=TrainingWindow(rows=n, start=float(t[0]), end=float(t[-1]), source=source),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    arrays = {"profile": np.array(profiles), "alpha": np.array(alphas), "phi": np.array(phis),
              "err_lo": np.array(lo), "err_hi": np.array(hi)}
    return FORMAT.build(meta, arrays)


class DemandScorer:
    """Scores a compiled demand model on live samples: ``push`` each sample, ``forecast`` when asked.

    Samples are averaged into ``step_s`` bins; a bin's mean updates each resource's level when
    the bin closes (a resource with no reading in a bin keeps its level)."""

    def __init__(self, model: CompiledDemand) -> None:
        self.model = model
        m = model.meta
        self._step = m.step_s
        self._profile = model.arrays["profile"]
        self._alpha = model.arrays["alpha"]
        self._phi = model.arrays["phi"]
        self._powers = self._phi[:, None] ** np.arange(1, m.horizon_steps + 1)[None, :]
        self._index = {k: i for i, k in enumerate(m.resources)}
        r = len(m.resources)
        self._level = np.zeros(r)
        self._sum = np.zeros(r)
        self._count = np.zeros(r)
        self._bin: int | None = None

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
        prof = self._profile[:, b % self._profile.shape[1]]
        self._level = np.where(seen, self._level + self._alpha * (mean - prof - self._level), self._level)
        self._sum[:] = 0.0
        self._count[:] = 0.0

    def forecast(self, wall: float) -> tuple[DemandForecast, ...]:
        """Forecasts for the steps after the current bin (after the last bin when none is open)."""
        m = self.model.meta
        start = (int(wall // self._step) if self._bin is None else self._bin) + 1
        cols = (start + np.arange(m.horizon_steps)) % self._profile.shape[1]
        point = self._profile[:, cols] + self._level[:, None] * self._powers
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
