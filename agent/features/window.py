"""Sliding-window features, computed incrementally: O(1) work per metric per sample.

:class:`FeatureWindow` keeps, per tracked metric key (a *column*), a ring buffer of the last
``window`` values in one preallocated ``(window, capacity)`` numpy array plus running sums over
the valid (finite) entries: count, sum t, sum t^2, sum x, sum x^2, sum t*x. Pushing a sample
adds the new row and subtracts the row it overwrites, so mean, standard deviation and the
least-squares slope over the window cost a fixed number of vector operations whatever the
window length. Values and times are kept relative to a per-column reference that is reset every
``window`` samples, when the sums are recomputed exactly from the ring (amortised O(1)); this
bounds the floating-point drift and the cancellation in ``sum x^2`` for byte-sized metrics.

Wildcard inputs are reduced *first* (max/min/sum over every label present in this sample,
NaN-aware), then windowed: ``max(disk.used_pct[*]):slope`` is the trend of the fullest mount's
fill level. (Which mount runs out first, and when, is the forecaster's job, per mount.) The
labels are rescanned when the sample's key count changes and every ``window`` samples.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
import structlog

from agent.collect.sample import Sample, split_key
from agent.errors import ModelError
from agent.features.schema import TRANSFORMS, FeatureSchema

log = structlog.get_logger("heald.features")

F64 = npt.NDArray[np.float64]
_T_VALUE, _T_DELTA, _T_RATE, _T_EWMA, _T_STD, _T_SLOPE = range(len(TRANSFORMS))
_AGGS: Final = ("max", "min", "sum")
_RESCAN_EVERY = 5  # windows
_NS = 10  # rows of the running sums (see _reset_state)
_SX_ROWS = (4, 7, 8)  # rows holding sum x
_ST_ROWS = (5, 6, 9)  # rows holding sum t
_TINY = 1e-200  # a zero denominator becomes tiny; results for n < 2 are masked


class FeatureWindow:
    """``push(sample) -> features``: the vector is an internal buffer, overwritten by the next push
    (copy it to keep it)."""

    def __init__(self, schema: FeatureSchema) -> None:
        probs = schema.problems()
        if probs:
            raise ModelError("; ".join(str(p) for p in probs))
        self.schema = schema
        self.names = schema.names
        self.units = schema.units
        self._w = schema.window
        self._alpha = schema.ewma_alpha
        g = len(schema.inputs)
        self._g = g
        self._t_sel = np.array([TRANSFORMS.index(t) for t in schema.transforms], dtype=np.intp)
        # Raw columns: the exact keys first, then wildcard labels as they appear.
        self._raw_keys: list[str] = []
        self._raw_scale: list[float] = []
        self._members: list[list[int]] = [[] for _ in range(g)]  # input -> raw columns
        self._raw_index: dict[tuple[str, int], int] = {}
        self._wild: dict[str, list[int]] = {}  # family -> wildcard inputs
        for gi, spec in enumerate(schema.inputs):
            if spec.wildcard:
                self._wild.setdefault(spec.family, []).append(gi)
            else:
                self._add_raw(spec.key, gi)
        self._out = np.empty(schema.dim, dtype=np.float64)
        self._out2 = self._out.reshape(g, len(schema.transforms))  # a view: input-major order
        self._t_all = tuple(schema.transforms) == TRANSFORMS
        self._feat = np.full((len(TRANSFORMS), g), np.nan)
        self._res = np.empty((2, g))
        self._reset_state()
        self._reindex()

    # ------------------------------------------------------------------ raw columns
    def _add_raw(self, k: str, gi: int) -> None:
        self._raw_index[(k, gi)] = len(self._raw_keys)
        self._members[gi].append(len(self._raw_keys))
        self._raw_keys.append(k)
        self._raw_scale.append(self.schema.inputs[gi].scale)

    def _reindex(self) -> None:
        """Rebuild the gather/reduce index matrices (after new labels appeared)."""
        pad = len(self._raw_keys)  # index of the always-NaN pad entry
        self._scale = np.array([*self._raw_scale, 1.0])
        self._plan: list[tuple[int, npt.NDArray[np.intp], npt.NDArray[np.intp]]] = []
        exact = [gi for gi, spec in enumerate(self.schema.inputs) if not spec.wildcard]
        self._exact_rows = np.asarray(exact, dtype=np.intp)
        self._exact_idx = np.asarray([self._members[gi][0] for gi in exact], dtype=np.intp)
        for a, agg in enumerate(_AGGS):
            rows = [gi for gi, spec in enumerate(self.schema.inputs) if spec.agg == agg and spec.wildcard]
            if not rows:
                continue
            k = max(1, *(len(self._members[gi]) for gi in rows))
            idx = np.full((len(rows), k), pad, dtype=np.intp)
            for r, gi in enumerate(rows):
                m = self._members[gi]
                idx[r, : len(m)] = m
            self._plan.append((a, np.asarray(rows, dtype=np.intp), idx))
        self._raw_live = list(self._raw_keys)

    def _scan(self, metrics: dict[str, float | None]) -> None:
        added = False
        for k in metrics:
            fam, label = split_key(k)
            if label is None or fam not in self._wild:
                continue
            for gi in self._wild[fam]:
                if (k, gi) not in self._raw_index:
                    self._add_raw(k, gi)
                    added = True
        if added:
            self._reindex()

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        g, w = self._g, self._w
        self._vring = np.full((w, g), np.nan)  # values relative to _xref
        self._tring = np.full(w, np.nan)  # times relative to _t0
        # Running sums, rows laid out so that std and slope need slices only (x relative to xref,
        # t to t0): n, Sxx, Stx, Stt, Sx, St, St, Sx, Sx, St  (S = sum over the window's valid rows).
        self._cring = np.zeros((w, _NS, g))  # each slot's contribution to the sums
        self._sums = np.zeros((_NS, g))
        self._xref = np.zeros(g)  # exact references are set at the first rebase
        self._last = np.full(g, np.nan)
        self._tlast = np.full(g, np.nan)
        self._ewma = np.full(g, np.nan)
        self._pos = 0
        self._pushes = 0
        self._t0 = 0.0
        self._last_len = -1
        self._prev_mono: float | None = None
        # contribution = coef @ [valid, v, v*v] with v the (relative) value, 0 when missing
        self._coef = np.zeros((_NS, 3))
        self._coef[0, 0] = 1.0
        self._coef[1, 2] = 1.0
        for r in _SX_ROWS:
            self._coef[r, 1] = 1.0
        self._u = np.zeros((3, g))

    def reset(self) -> None:
        """Forget the window (e.g. after a long gap in sampling)."""
        self._reset_state()

    @property
    def samples_seen(self) -> int:
        return self._pushes

    @property
    def columns(self) -> list[str]:
        """The raw metric keys read so far (exact keys and wildcard labels)."""
        return list(dict.fromkeys(self._raw_keys))

    def _rebase(self, t: float) -> None:
        """Recompute the sums exactly from the ring with fresh references (every ``window`` pushes)."""
        vals = self._vring + self._xref  # absolute (NaN where empty)
        # The newest value as reference keeps x - ref small (exact sums for byte-sized metrics).
        ref = np.where(np.isfinite(self._last), self._last, 0.0)
        times = self._tring + self._t0
        self._t0 = t
        self._xref = ref
        trel = times - t
        xr = vals - ref
        valid = np.isfinite(xr) & np.isfinite(trel)[:, None]
        self._vring = np.where(valid, xr, np.nan)
        self._tring = trel
        f = valid.astype(np.float64)
        tz = np.where(np.isfinite(trel), trel, 0.0)[:, None]
        v = np.where(valid, xr, 0.0)
        c = self._cring
        c[:, 0] = f
        c[:, 1] = v * v
        c[:, 2] = v * tz
        c[:, 3] = f * tz * tz
        for r in _SX_ROWS:
            c[:, r] = v
        for r in _ST_ROWS:
            c[:, r] = f * tz
        self._sums = c.sum(axis=0)

    # ------------------------------------------------------------------ push
    def push(self, sample: Sample) -> F64:
        """Add one sample; return the feature vector in schema order (NaN where unknown)."""
        return self.push_metrics(sample.metrics, sample.mono)

    def gather(self, metrics: dict[str, float | None]) -> F64:
        """The inputs' current values (wildcards reduced), in schema input order; no state change."""
        if len(metrics) != self._last_len or (self._wild and self._pushes % (_RESCAN_EVERY * self._w) == 0):
            self._last_len = len(metrics)
            if self._wild:
                self._scan(metrics)
        get = metrics.get
        vals = [get(k) for k in self._raw_live]
        vals.append(None)
        raw = np.array(vals, dtype=np.float64)
        raw *= self._scale
        x = np.empty(self._g)
        x[self._exact_rows] = raw[self._exact_idx]
        for a, rows, idx in self._plan:
            m = raw[idx]
            if a == 0:
                x[rows] = np.fmax.reduce(m, axis=1)
            elif a == 1:
                x[rows] = np.fmin.reduce(m, axis=1)
            else:
                fin = np.isfinite(m)
                x[rows] = np.where(fin.any(axis=1), np.where(fin, m, 0.0).sum(axis=1), np.nan)
        return x

    def push_metrics(self, metrics: dict[str, float | None], mono: float) -> F64:
        if self._prev_mono is not None and not mono > self._prev_mono:
            mono = self._prev_mono + 1e-3  # never divide by a zero or negative interval
        self._prev_mono = mono
        x = self.gather(metrics)
        if self._pushes == 0:
            self._t0 = mono
        elif self._pushes % self._w == 0:
            self._rebase(mono)
        fin = np.isfinite(x)
        t = mono - self._t0
        xr = x - self._xref
        u = self._u
        np.copyto(u[0], fin)
        np.copyto(u[1], xr)
        np.copyto(u[1], 0.0, where=~fin)
        np.multiply(u[1], u[1], out=u[2])
        coef = self._coef
        coef[5, 0] = coef[6, 0] = coef[9, 0] = coef[2, 1] = t
        coef[3, 0] = t * t
        pos = self._pos
        slot = self._cring[pos]
        s = self._sums
        s -= slot
        np.matmul(coef, u, out=slot)
        s += slot
        self._vring[pos] = xr
        self._tring[pos] = t
        self._pos = (pos + 1) % self._w
        self._pushes += 1

        f = self._feat
        f[_T_VALUE] = x
        np.subtract(x, self._last, out=f[_T_DELTA])
        np.divide(f[_T_DELTA], mono - self._tlast, out=f[_T_RATE])
        e = self._ewma
        np.copyto(e, x, where=np.isnan(e))  # the first value of an input starts its EWMA
        np.copyto(e, e + self._alpha * (x - e), where=fin)
        f[_T_EWMA] = e
        # D = n * [Sxx, Stx, Stt] - [Sx, St, St] * [Sx, Sx, St]
        #   = [n^2 var * (n-1)/n, n^2 cov(t, x), n^2 var(t)]
        n = s[0]
        d = n * s[1:4] - s[4:7] * s[7:10]
        den = self._res
        np.multiply(n, n - 1.0, out=den[0])
        den[1] = d[2]
        np.maximum(den, _TINY, out=den)
        q = d[:2] / den  # [var, slope]; n < 2 gives 0/tiny = 0 here, masked below
        np.sqrt(np.maximum(q[0], 0.0), out=f[_T_STD])
        f[_T_SLOPE] = q[1]
        few = n < 1.5
        if few.any():
            f[_T_STD][few] = np.nan
            f[_T_SLOPE][few] = np.nan
        np.copyto(self._last, x, where=fin)
        np.copyto(self._tlast, mono, where=fin)
        if self._t_all:
            self._out2[:] = f.T
        else:
            self._out2[:] = f[self._t_sel].T
        return self._out
