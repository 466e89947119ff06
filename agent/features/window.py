"""Sliding-window features, computed incrementally: a fixed number of vector operations per sample.

:class:`FeatureWindow` keeps, for every schema input at once, the running sums over the valid
(finite) entries of the last ``window`` samples — count, sum t, sum t^2, sum x, sum x^2,
sum t*x — in one preallocated ``(rows, inputs)`` array, and each slot's contribution to them in
a ``(window, rows, inputs)`` ring. Pushing a sample subtracts the contribution it overwrites and
adds the new one (one small matrix product), so mean, standard deviation and the least-squares
slope over the window cost a fixed number of vector operations whatever the window length and
however many inputs the schema has: per sample, ~30 numpy calls on ``inputs``-long vectors,
no Python loop over inputs or features. Values and times are kept relative to a per-input
reference that is reset every ``window`` samples, when the sums are recomputed exactly from the
ring (amortised O(1)); this bounds the floating-point drift and the cancellation in ``sum x^2``
for byte-sized metrics.

Gathering a sample: the metric keys the schema reads are resolved into a *plan* — one
``operator.itemgetter`` over the keys present, ordered so that every input's keys are
contiguous, plus per-key scales and per-input reduction offsets — only when the sample's set of
keys may have changed (its key count changes, a planned key is missing, an absent exact key
appears) and every ``_RESCAN_EVERY`` windows; and when the count changed, only if one of the
keys that arrived is one an input reads or a new label of a wildcard family
(:class:`agent.collect.sample.KeyDelta`: per-process series change the count most samples on a
busy host, and no input reads them). Wildcard inputs are reduced *first* (max/min/sum
over every label present in this sample, NaN-aware: ``np.fmax.reduceat`` over all inputs at
once, min as the negated max of negated values, sums with ``np.add.reduceat``), then windowed:
``max(disk.used_pct[*]):slope`` is the trend of the fullest mount's fill level. (Which mount runs
out first, and when, is the forecaster's job, per mount.)

Despiking: before any transform, each input is replaced by the median of its last
``schema.despike`` (3) gathered values when all of them are finite. A single-sample blip (one
slow write of 332 ms on an otherwise idle disk, one burst of major faults) would otherwise stay
in the input's ``std``, ``ewma`` and ``slope`` for a whole window and read as a minute-long
anomaly; a real change (a step, a ramp) passes one sample late.
"""

from __future__ import annotations

import ctypes
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from agent.collect.sample import KeyDelta, Sample, in_order, split_key
from agent.errors import ModelError
from agent.features.schema import TRANSFORMS, FeatureSchema
from agent.native import FwCtx, Kernels, kernels, ptr

log = structlog.get_logger("heald.features")

F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]
Metrics = dict[str, float | None]
_T_VALUE, _T_DELTA, _T_RATE, _T_EWMA, _T_STD, _T_SLOPE = range(len(TRANSFORMS))
_RESCAN_EVERY = 5  # windows
# Rows of the running sums (S = sum over the window's valid entries, x relative to the input's
# reference, t to the window's t0), laid out in four blocks of four rows so that one
# same-shape product gives every numerator and denominator:
#   A * B - C * D = [n Sxx - Sx Sx, n Stx - St Sx, n (n-1) - 0, n Stt - St St]
#   A = [n, n, n, n], B = [Sxx, Stx, n-1, Stt], C = [Sx, St, 0, St], D = [Sx, Sx, 0, St]
# i.e. the numerators of [var, slope] over their denominators.
_NS = 16
_N_ROWS = (0, 1, 2, 3)
_ROW_SXX, _ROW_STX, _ROW_NM1, _ROW_STT = 4, 5, 6, 7
_SX_ROWS = (8, 12, 13)
_ST_ROWS = (9, 11, 15)
_T_ENTRIES = ((9, 0), (11, 0), (15, 0), (_ROW_STX, 1))  # coef entries equal to t
_TINY = 1e-200  # a zero denominator becomes tiny; results for n < 2 are masked


def _getter(keys: list[str]) -> Callable[[Metrics], tuple[Any, ...]]:
    """A C-speed gather of ``keys`` from a metrics dict (KeyError when one is absent)."""
    if len(keys) >= 2:
        return operator.itemgetter(*keys)
    if keys:
        only = keys[0]
        return lambda m: (m[only],)
    return lambda _m: ()


class FeatureWindow:
    """``push(sample) -> features``: the vector is an internal buffer, overwritten by the next push
    (copy it to keep it).

    ``native``: run the per-sample update in the C kernel (:mod:`agent.native`) — None = when it
    is available, False = always numpy (the reference), True = require it (ModelError if absent).
    Both paths keep the same state arrays, so the exact recomputation (``_rebase``) is shared.
    """

    def __init__(self, schema: FeatureSchema, *, native: bool | None = None) -> None:
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
        self._rescan_every = _RESCAN_EVERY * self._w
        self._t_sel = np.array([TRANSFORMS.index(t) for t in schema.transforms], dtype=np.intp)
        # Raw keys per input: the exact key, or the wildcard's labels in order of appearance.
        self._members: list[list[str]] = [[] if s.wildcard else [s.key] for s in schema.inputs]
        self._raw_keys: list[str] = [s.key for s in schema.inputs if not s.wildcard]
        self._labels: set[tuple[str, int]] = set()
        self._watch: set[str] = set(self._raw_keys)  # every key an input reads (exact, labels seen)
        self._delta = KeyDelta()  # the keys that came and went since the last look
        self._wild: dict[str, list[int]] = {}  # family -> wildcard inputs
        for gi, spec in enumerate(schema.inputs):
            if spec.wildcard:
                self._wild.setdefault(spec.family, []).append(gi)
        self._is_min = [s.wildcard and s.agg == "min" for s in schema.inputs]
        self._is_sum = [s.wildcard and s.agg == "sum" for s in schema.inputs]
        self._sum_in: Mask = np.array(self._is_sum, dtype=np.bool_)
        # Outputs: the transform-major view of the input-major output vector (writes go straight
        # to the output when the schema uses every transform in the canonical order).
        self._out = np.empty(schema.dim, dtype=np.float64)
        self._out2 = self._out.reshape(g, len(schema.transforms))
        self._t_all = tuple(schema.transforms) == TRANSFORMS
        self._feat: F64 = np.full((len(TRANSFORMS), g), np.nan)  # contiguous, copied out per push
        f = self._feat
        # State, allocated once (reset refills it).
        w = self._w
        self._kern: Kernels | None = None if native is False else kernels()
        if native and self._kern is None:
            raise ModelError("native kernels requested but not available (see the log)")
        self._tring: F64 = np.full(w, np.nan)
        # numpy path: each slot's contribution to the 16 sum rows; the kernel keeps its own
        # compact ring of relative values and six sums instead (see agent/native/window.c).
        self._cring: F64 = np.zeros((w if self._kern is None else 1, _NS, g))
        self._nring: F64 = np.full((w if self._kern is not None else 1, g), np.nan)
        self._nsums: F64 = np.zeros((6, g))
        self._slots = list(self._cring)  # per-slot views
        self._sums: F64 = np.zeros((_NS, g))
        self._xref: F64 = np.zeros(g)
        self._last: F64 = np.full(g, np.nan)
        self._tlast: F64 = np.full(g, np.nan)
        self._ewma: F64 = np.full(g, np.nan)
        # Scratch: the gathered input values (the "value" row of the output when it has one).
        self._xs: F64 = np.empty(g)
        self._tmp: F64 = np.empty(g)
        # Despike: the last k gathered values per input (row = pushes % k), raw.
        self._k = schema.despike
        self._dring: F64 = np.full((self._k, g), np.nan)
        self._dfin = np.empty((self._k, g), dtype=np.bool_)
        self._dok = np.empty(g, dtype=np.bool_)
        x = f[_T_VALUE]
        u = np.zeros((3, g))  # [valid, v, v*v], v = value - reference (0 when missing)
        # contribution = coef @ u; the t-dependent entries are set per push
        coef = np.zeros((_NS, 3))
        for r in (*_N_ROWS, _ROW_NM1):
            coef[r, 0] = 1.0
        coef[_ROW_SXX, 2] = 1.0
        for r in _SX_ROWS:
            coef[r, 1] = 1.0
        d4, d4b = np.empty((4, g)), np.empty((4, g))
        sums = self._sums
        # Everything push_metrics touches, bound once (locals are cheaper than attributes).
        self._bufs = (
            x, np.empty(g, dtype=np.bool_), np.empty(g, dtype=np.bool_), np.empty(g, dtype=np.bool_),
            self._tmp, u, u[0], u[1], u[2], coef, sums, sums[0:4], sums[4:8], sums[8:12], sums[12:16],
            sums[0:2], d4, d4b, d4[2:4], d4[0:2], np.empty((2, g), dtype=np.bool_), np.full((2, g), 1.5),
            self._xref, self._last, self._tlast, self._ewma, np.full(g, self._alpha), np.zeros(()),
            np.zeros(g), np.full((), np.nan), np.full((2, g), _TINY),
            f[_T_DELTA], f[_T_RATE], f[_T_EWMA], f[_T_STD:_T_SLOPE + 1], f[_T_STD],
        )
        self._base_coef = coef.copy()
        self._ctx = FwCtx()
        self._ctx_ref: Any = None
        if self._kern is not None:
            c = self._ctx
            c.g, c.ntrans, c.window = g, len(schema.transforms), w
            c.is_sum = ptr(self._sum_in, np.bool_)
            c.tsel = ptr(self._t_sel, np.intp)
            c.x = ptr(x, np.float64)
            c.sums = ptr(self._nsums, np.float64)
            c.ring = ptr(self._nring, np.float64)
            c.tring = ptr(self._tring, np.float64)
            for name in ("xref", "last", "tlast", "ewma"):
                setattr(c, name, ptr(getattr(self, f"_{name}"), np.float64))
            c.out = ptr(self._out, np.float64)
            c.alpha, c.tiny = self._alpha, _TINY
            c.despike = self._k
            c.dring = ptr(self._dring, np.float64)
            self._ctx_ref = ctypes.byref(c)
        self._reset_state()
        # The plan's keys, input starts and which keys hold numbers: an unchanged plan is kept.
        self._plan_sig: tuple[list[str], list[int], list[str]] | None = None
        self._plan({})

    @property
    def native(self) -> bool:
        """Whether pushes run in the C kernel."""
        return self._kern is not None

    @property
    def output(self) -> F64:
        """The feature vector buffer every push returns (fixed for the window's lifetime)."""
        return self._out

    # ------------------------------------------------------------------ gather plan
    def _scan(self, metrics: Metrics, keys: list[str]) -> None:
        """Add the wildcard labels among ``keys`` (new in ``metrics``, in its order) not seen
        before, then rebuild the plan."""
        if self._wild:
            for k in keys:
                fam, label = split_key(k)
                if label is None:
                    continue
                for gi in self._wild.get(fam, ()):
                    if (k, gi) not in self._labels:
                        self._labels.add((k, gi))
                        self._members[gi].append(k)
                        self._raw_keys.append(k)
                        self._watch.add(k)
        self._plan(metrics)

    def _look(self, metrics: Metrics) -> None:
        """The key set changed (or it is time to look again): re-plan when a key an input reads,
        or a new label of a wildcard family, arrived; a planned key that went is found by the
        gather itself (its KeyError)."""
        added, _removed = self._delta.delta(metrics)
        watch, wild = self._watch, self._wild
        fresh = {k for k in added if k in watch or (wild and split_key(k)[0] in wild)}
        if fresh:
            self._scan(metrics, in_order(metrics, fresh))

    def _plan(self, metrics: Metrics) -> None:
        """Resolve the gather for the keys present in ``metrics``.

        The present keys are read with two itemgetters: keys holding a number now (converted
        with ``np.fromiter``) and keys holding None now (skipped while they all stay None). A
        permutation puts them in plan order, every input's keys contiguous and reduced with
        ``np.fmax.reduceat``; an input with no key present is NaN. Summed inputs are reduced from
        a padded (inputs, labels) matrix exactly as a row sum, missing labels contributing 0.
        """
        keys: list[str] = []
        starts: list[int] = []
        scale: list[float] = []
        sign = np.ones(self._g)
        absent: list[str] = []
        for gi, spec in enumerate(self.schema.inputs):
            live = [k for k in self._members[gi] if k in metrics]
            starts.append(len(keys))
            if not live:
                sign[gi] = np.nan
                if not spec.wildcard:
                    absent.append(spec.key)
            elif self._is_min[gi]:
                sign[gi] = -1.0  # min = -max(-x)
            keys.extend(live)
            scale.extend([-spec.scale if self._is_min[gi] else spec.scale] * len(live))
        n = len(keys)
        num = [k for k in keys if metrics.get(k) is not None]
        nul = [k for k in keys if metrics.get(k) is None]
        sig = (keys, starts, num)
        if sig == self._plan_sig:  # the keys the schema reads did not change (others came or went)
            return
        self._plan_sig = sig
        slot = {k: i for i, k in enumerate(num)}
        slot.update({k: len(num) + i for i, k in enumerate(nul)})
        pad = n  # an always-NaN entry after the values
        self._n_num, self._n_nul = len(num), len(nul)
        self._get_num = _getter(num)
        self._get_nul = _getter(nul)
        self._nul_dirty = True
        self._vbuf: F64 = np.full(n + 1, np.nan)
        self._vbuf_num = self._vbuf[: len(num)]
        self._vbuf_nul = self._vbuf[len(num): n]
        self._perm = np.asarray([slot[k] for k in keys] + [pad], dtype=np.intp)
        self._nkeys = n
        # v has n + 1 entries (the NaN pad last): an input with no key present at the end starts
        # at the pad, so the inputs before it keep their whole range.
        self._starts = np.minimum(np.asarray(starts, dtype=np.intp), n)
        self._scale = np.asarray([*scale, 1.0], dtype=np.float64)
        self._sign = sign
        sum_rows = [gi for gi in range(self._g) if self._is_sum[gi]]
        width = max([1, *(len(self._members[gi]) for gi in sum_rows)])
        sidx = np.full((len(sum_rows), width), pad, dtype=np.intp)
        for r, gi in enumerate(sum_rows):
            # every label the input has seen, in order: missing ones read the pad (0 in the sum)
            pos = {k: starts[gi] + j for j, k in enumerate(k for k in self._members[gi] if k in metrics)}
            for c, k in enumerate(self._members[gi]):
                sidx[r, c] = pos.get(k, pad)
        self._sum_rows = np.asarray(sum_rows, dtype=np.intp)
        self._sum_idx = sidx
        self._sum_fin: Mask = np.empty(sidx.shape, dtype=np.bool_)
        self._sum_bad: Mask = np.empty(sidx.shape, dtype=np.bool_)
        self._sum_val: F64 = np.empty(len(sum_rows))
        self._sum_any: Mask = np.empty(len(sum_rows), dtype=np.bool_)
        self._absent = absent
        if self._kern is not None:
            # The kernel reads input gi's plan positions [lo, hi) directly (no clamping needed).
            st = np.asarray(starts, dtype=np.intp)
            self._lo = st
            self._hi = np.append(st[1:], n).astype(np.intp)
            ctx = self._ctx
            ctx.vbuf = ptr(self._vbuf, np.float64)
            ctx.perm = ptr(self._perm, np.intp)
            ctx.scale = ptr(self._scale, np.float64)
            ctx.lo = ptr(self._lo, np.intp)
            ctx.hi = ptr(self._hi, np.intp)
            ctx.sign = ptr(self._sign, np.float64)

    def _load(self, metrics: Metrics) -> bool:
        """Read the planned keys of ``metrics`` into the value buffer (re-planning when the keys
        changed); False when no key the schema reads is present."""
        if self._delta.changed(metrics) or self._pushes % self._rescan_every == 0:
            self._look(metrics)
        elif self._absent:
            for k in self._absent:
                if k in metrics:  # an exact key appeared
                    self._plan(metrics)
                    break
        try:
            num = self._get_num(metrics)
            nul = self._get_nul(metrics)
        except KeyError:  # a planned key is gone
            self._plan(metrics)
            num = self._get_num(metrics)
            nul = self._get_nul(metrics)
        if not self._nkeys:
            return False
        try:
            self._vbuf_num[:] = np.fromiter(num, np.float64, self._n_num)
        except TypeError:  # a number became None: convert slowly now, re-plan at the next sample
            self._vbuf_num[:] = num
            self._delta.forget()
        if nul.count(None) != self._n_nul:
            self._vbuf_nul[:] = nul  # None -> NaN
            self._nul_dirty = True
        elif self._nul_dirty:
            self._vbuf_nul.fill(np.nan)
            self._nul_dirty = False
        return True

    def _gather_into(self, metrics: Metrics, out: F64) -> None:
        """The inputs' current values (wildcards reduced, scaled) into ``out`` (numpy path)."""
        if not self._load(metrics):
            out.fill(np.nan)
            return
        v = self._vbuf[self._perm]
        np.multiply(v, self._scale, v)
        x = self._xs
        np.fmax.reduceat(v, self._starts, 0, None, x)
        if self._sum_rows.size:
            # Sums leave out labels that are not finite (NaN when none is), as a padded row sum.
            m = v[self._sum_idx]
            fin, bad, val, anyf = self._sum_fin, self._sum_bad, self._sum_val, self._sum_any
            np.isfinite(m, fin)
            np.logical_not(fin, bad)
            np.putmask(m, bad, 0.0)
            np.add.reduce(m, 1, out=val)
            np.logical_or.reduce(fin, 1, out=anyf)
            np.logical_not(anyf, anyf)
            np.putmask(val, anyf, np.nan)
            x[self._sum_rows] = val
        np.multiply(x, self._sign, out)  # un-negate min, NaN for inputs with no key present

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self._tring.fill(np.nan)  # times relative to _t0
        self._cring.fill(0.0)  # each slot's contribution to the sums
        self._nring.fill(np.nan)  # (kernel) each slot's value relative to the reference
        self._nsums.fill(0.0)
        self._sums.fill(0.0)
        self._sums[_ROW_NM1] = -1.0
        self._xref.fill(0.0)  # exact references are set at the first rebase
        self._last.fill(np.nan)
        self._tlast.fill(np.nan)
        self._ewma.fill(np.nan)
        self._dring.fill(np.nan)
        self._pos = 0
        self._pushes = 0
        self._t0 = 0.0
        self._delta.forget()
        self._prev_mono: float | None = None

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
        c = self._cring
        written = c[:, _N_ROWS[0]] > 0.5  # slots holding a valid value
        vals = np.where(written, c[:, _SX_ROWS[0]] + self._xref, np.nan)  # absolute
        # The newest value as reference keeps x - ref small (exact sums for byte-sized metrics).
        ref = np.where(np.isfinite(self._last), self._last, 0.0)
        times = self._tring + self._t0
        self._t0 = t
        self._xref[:] = ref
        trel = times - t
        xr = vals - ref
        valid = np.isfinite(xr) & np.isfinite(trel)[:, None]
        self._tring[:] = trel
        v = np.where(valid, xr, 0.0)
        u = np.stack([valid.astype(np.float64), v, v * v], axis=1)  # (window, 3, inputs)
        tz = np.where(np.isfinite(trel), trel, 0.0)
        coef = np.repeat(self._base_coef[None], self._w, axis=0)
        for r, col in _T_ENTRIES:
            coef[:, r, col] = tz
        coef[:, _ROW_STT, 0] = tz * tz
        np.matmul(coef, u, out=c)  # each slot's contribution, as push computes it
        np.sum(c, axis=0, out=self._sums)
        self._sums[_ROW_NM1] -= 1.0

    # ------------------------------------------------------------------ push
    def push(self, sample: Sample) -> F64:
        """Add one sample; return the feature vector in schema order (NaN where unknown)."""
        return self.push_metrics(sample.metrics, sample.mono)

    def gather(self, metrics: Metrics) -> F64:
        """The inputs' current values (wildcards reduced), in schema input order."""
        out = np.empty(self._g)
        self._gather_into(metrics, out)
        return out

    def push_metrics(self, metrics: Metrics, mono: float) -> F64:
        if self._prev_mono is not None and not mono > self._prev_mono:
            mono = self._prev_mono + 1e-3  # never divide by a zero or negative interval
        self._prev_mono = mono
        if self._kern is not None:
            return self._push_native(metrics, mono)
        with np.errstate(all="ignore"):  # inf inputs: the same NaN results as the kernel, silently
            return self._push_numpy(metrics, mono)

    def _push_numpy(self, metrics: Metrics, mono: float) -> F64:
        (x, fin, nfin, unset, tmp, u, u_f, u_v, u_vv, coef, sums, s_a, s_b, s_c, s_d, s_n2, d4, d4b,
         d4_den, d4_num, few, c15, xref, last, tlast, e, alpha, mono0, zero, nan0, tiny,
         f_delta, f_rate, f_ewma, f_q, f_std) = self._bufs
        self._gather_into(metrics, x)
        pushes = self._pushes
        if self._k > 1:
            self._despike(x, pushes % self._k)
        if pushes == 0:
            self._t0 = mono
        elif pushes % self._w == 0:
            self._rebase(mono)
        t = mono - self._t0
        mono0[()] = mono
        # the slot's contribution to the sums: coef(t) @ [valid, v, v*v], v = x - ref (0 if missing)
        np.isfinite(x, fin)
        np.logical_not(fin, nfin)
        np.copyto(u_f, fin)
        np.subtract(x, xref, u_v)
        np.putmask(u_v, nfin, zero)
        np.multiply(u_v, u_v, u_vv)
        coef[9, 0] = coef[11, 0] = coef[15, 0] = coef[_ROW_STX, 1] = t
        coef[_ROW_STT, 0] = t * t
        pos = self._pos
        slot = self._slots[pos]
        np.subtract(sums, slot, sums)
        np.dot(coef, u, slot)
        np.add(sums, slot, sums)
        self._tring[pos] = t
        self._pos = pos + 1 if pos + 1 < self._w else 0
        self._pushes = pushes + 1

        # value (x itself), delta, rate, ewma
        np.subtract(x, last, f_delta)
        np.subtract(mono0, tlast, tmp)
        np.divide(f_delta, tmp, f_rate)
        np.isnan(e, unset)
        np.copyto(e, x, where=unset)  # the first value of an input starts its EWMA
        np.subtract(x, e, tmp)
        np.multiply(tmp, alpha, tmp)
        np.add(e, tmp, tmp)
        np.copyto(e, tmp, where=fin)
        np.copyto(f_ewma, e)
        # std and slope: A*B - C*D -> [var, slope] numerators / denominators
        np.multiply(s_a, s_b, d4)
        np.multiply(s_c, s_d, d4b)
        np.subtract(d4, d4b, d4)
        np.maximum(d4_den, tiny, out=d4_den)
        np.less(s_n2, c15, few)
        np.putmask(d4_den, few, nan0)  # fewer than 2 valid values: no std, no slope
        np.divide(d4_num, d4_den, f_q)
        np.maximum(f_std, zero, out=f_std)
        np.sqrt(f_std, f_std)
        np.putmask(last, fin, x)
        np.putmask(tlast, fin, mono0)
        if self._t_all:
            self._out2[:] = self._feat.T
        else:
            self._out2[:] = self._feat[self._t_sel].T
        return self._out

    def _despike(self, x: F64, row: int) -> None:
        """Replace each input by the median of its last ``k`` gathered values where all of them
        are finite (a one-sample blip disappears; a step passes ``k // 2`` samples late). The
        median gets ``+ 0.0``: one canonical zero whichever signed zero the partition picked."""
        d, k = self._dring, self._k
        d[row] = x
        np.isfinite(d, self._dfin)
        np.logical_and.reduce(self._dfin, 0, out=self._dok)
        med = np.partition(d, k // 2, axis=0)[k // 2]
        np.add(med, 0.0, med)
        np.copyto(x, med, where=self._dok)

    def _push_native(self, metrics: Metrics, mono: float) -> F64:
        """The same update as the numpy path, in one C call (gather reduction included)."""
        self._load(metrics)  # no key present: the kernel reads only the NaN pad, every input NaN
        pushes = self._pushes
        kern = self._kern
        if kern is None:
            raise ModelError("native kernel path taken without the kernels")
        if pushes == 0:
            self._t0 = mono
        elif pushes % self._w == 0:
            kern.fw_rebase(self._ctx_ref, self._t0, mono)
            self._t0 = mono
        t = mono - self._t0
        pos = self._pos
        if kern.fw_push(self._ctx_ref, pos, t, mono, pushes % self._k) != 0:
            raise ModelError(f"native feature kernel refused slot {pos}")
        self._pos = pos + 1 if pos + 1 < self._w else 0
        self._pushes = pushes + 1
        return self._out
