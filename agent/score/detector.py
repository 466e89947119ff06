"""Streaming anomaly scoring from a compiled model: numpy only, one sample at a time.

The score is an ensemble of four per-sample components, each divided by a high quantile of its
own value on the training data (so they are comparable), weighted, summed and smoothed causally:

* ``robust_z``: mean of the ``top_k`` largest per-feature robust z-scores |x - median| / scale;
* ``kmeans``:   Euclidean distance to the nearest k-means centroid of the training data;
* ``delta``:    squared norm of the first difference x_t - x_{t-1} (sudden changes);
* ``pca``:      PCA reconstruction error (weight 0, i.e. off, in the default model).

``raw_t = sum_c w_c * component_c(x_t) / divisor_c`` is smoothed twice, causally, with the same
``alpha``:

* arithmetic EWMA ``s_t = alpha * raw_t + (1 - alpha) * s_{t-1}`` (``s_0 = raw_0``): reacts to the
  size of the deviation;
* geometric EWMA ``g_t = exp(alpha * log(raw_t + eps) + (1 - alpha) * log(g_{t-1}))``: the same
  recursion on the log scale. One sample ``k`` times the usual size moves it by a factor of only
  ``k ** alpha``, so it needs the deviation to *last*: a burst of a few seconds (a program
  starting: a handful of major faults and zombies) stays under it, a sustained drift does not.

:meth:`StreamingDetector.score` returns ``min(s_t / threshold, g_t / threshold_geo)``: 1.0 is the
alert threshold, and an alert needs both.

The fast channel (models that have ``threshold_fast``): ``f_t``, an arithmetic EWMA of ``raw_t``
with ``fast_alpha`` (0.5), over its own threshold. It alerts only once ``f_t / threshold_fast >= 1``
has held for ``fast_min_s`` seconds, judged by the samples' own timestamps: a sample stands for
the interval since the previous one, so one 60-s sample over the line spans a minute, while a
3-s burst at 1 Hz spans 3 s. While it alerts, the score is ``max(slow, (f_t/threshold_fast) **
fast_power)``. Without timestamps (``t=None``) a sample spans 0 s and the fast channel never
alerts (unless ``fast_min_s`` is 0). All thresholds are chosen from the training data only (see
:mod:`agent.score.fit`).

Missing metrics (NaN, None, +-inf) are imputed with the training median for the level components
and contribute no change to ``delta``. Nothing here imports scikit-learn.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from agent.errors import ModelError
from agent.native import DetCtx, Kernels, kernels, ptr
from agent.score.artifact import F64
from agent.score.compiled import COMPONENTS, CompiledDetector
from agent.score.types import Contribution

RZ, KM, DELTA, PCA = range(len(COMPONENTS))

SampleLike = npt.NDArray[np.floating] | Sequence[float | None]


def component_scores(model: CompiledDetector, rows: npt.ArrayLike) -> F64:
    """Vectorised raw components, shape (n, 4), for consecutive ``rows`` (no NaN allowed).

    Row 0's ``delta`` is 0 (no previous row), exactly as for the first sample of a stream.
    Used to derive divisors and threshold at fit time and to cross-check the streaming path.
    """
    a = model.arrays
    x = np.asarray(rows, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != a["median"].shape[0]:
        raise ModelError(f"expected rows of {a['median'].shape[0]} features, got shape {x.shape}")
    n = x.shape[0]
    top_k = model.meta.top_k
    out = np.zeros((n, len(COMPONENTS)), dtype=np.float64)
    z = np.abs(x - a["median"]) / a["scale"]
    d = z.shape[1]
    out[:, RZ] = np.partition(z, d - top_k, axis=1)[:, d - top_k:].sum(axis=1) / top_k
    c = a["centroids"]
    sq = (x * x).sum(axis=1)[:, None] - 2.0 * (x @ c.T) + a["centroid_sq"][None, :]
    out[:, KM] = np.sqrt(np.maximum(sq.min(axis=1), 0.0))
    if n > 1:
        diff = np.diff(x, axis=0)
        out[1:, DELTA] = (diff * diff).sum(axis=1)
    w = a["pca_components"]
    if w.shape[0] > 0:
        xc = x - a["pca_mean"]
        r = xc - (xc @ w.T) @ w
        out[:, PCA] = (r * r).sum(axis=1)
    return out


def combine(model: CompiledDetector, comps: F64) -> F64:
    """Weighted sum of normalised components: the unsmoothed raw score per row."""
    a = model.arrays
    result: F64 = comps @ (a["weights"] / a["divisors"])
    return result


def ewma(raw: F64, alpha: float) -> F64:
    """Causal EWMA with ``s_0 = raw_0`` (the same recursion the streaming detector runs)."""
    out = np.empty_like(raw)
    m = float(raw[0]) if raw.size else 0.0
    for i, v in enumerate(raw.tolist()):
        m = alpha * v + (1.0 - alpha) * m
        out[i] = m
    return out


# Added to the raw score before its log (raw scores are about 1 at the 99th training percentile
# of each component, so this only keeps log() finite for a score of exactly 0).
GEO_EPS = 1e-3


def geo_ewma(raw: F64, alpha: float) -> F64:
    """Causal geometric EWMA: ``exp(ewma(log(raw + GEO_EPS)))``, the streaming detector's ``g_t``."""
    result: F64 = np.exp(ewma(np.log(np.maximum(raw, 0.0) + GEO_EPS), alpha))
    return result


def fast_run_s(over: npt.NDArray[np.bool_], times: F64 | None) -> F64:
    """Per sample, how long (seconds of sample time) ``over`` has held up to and including it.

    A sample spans the interval since the previous one (the first one, and any interval that is
    not a positive finite number, spans 0 s)."""
    n = over.shape[0]
    span = np.zeros(n, dtype=np.float64)
    if times is not None and n > 1:
        dt = np.diff(np.asarray(times, dtype=np.float64))
        span[1:] = np.where(np.isfinite(dt) & (dt > 0), dt, 0.0)
    out = np.zeros(n, dtype=np.float64)
    run = 0.0
    for i in range(n):
        run = run + float(span[i]) if over[i] else 0.0
        out[i] = run
    return out


def smoothed_scores(model: CompiledDetector, raw: F64, times: F64 | None = None) -> F64:
    """The detector's reported scores for consecutive raw scores (1.0 = alert threshold), the
    samples taken at ``times`` (seconds; None: no timestamps, see the module docstring)."""
    m = model.meta
    alpha = m.ewma_alpha
    result: F64 = np.minimum(ewma(raw, alpha) / m.threshold, geo_ewma(raw, alpha) / m.threshold_geo)
    if m.threshold_fast is not None and raw.size:
        fr = ewma(raw, m.fast_alpha) / m.threshold_fast
        over = fr >= 1.0
        fire = over & (fast_run_s(over, times) >= m.fast_min_s)
        result = np.where(fire, np.maximum(result, np.where(fire, fr, 1.0) ** m.fast_power), result)
    return result


class StreamingDetector:
    """Score one sample at a time with internal causal state (EWMA and previous sample).

    ``score(x, t)`` returns ``(score, alert)`` where ``score`` is the smaller of the two smoothed
    anomaly scores, each divided by its threshold (1.0 = threshold), raised to the fast channel's
    compressed ratio while that alerts (module docstring), and ``alert`` is ``score >= 1``;
    ``t`` is the sample's time in seconds (any clock; None: unknown). :attr:`channel` says which
    channel alerted. ``explain(x)`` names the features that contribute most to the raw score of
    ``x`` given the state before ``x`` was scored (call it right after ``score(x)``).

    ``native``: score in the C kernel (:mod:`agent.native`) — None = when it is available,
    False = always numpy (the reference), True = require it. :meth:`bind` lets a caller have
    the kernel read the sample straight out of a larger vector (the feature window's output).
    """

    __slots__ = (
        "_alpha",
        "_bound",
        "_bound_keep",
        "_c",
        "_c2",
        "_channel",
        "_ctb",
        "_ctx",
        "_ctx_ref",
        "_d",
        "_diff",
        "_f",
        "_fac",
        "_fast_alpha",
        "_fast_min_s",
        "_fast_p",
        "_finite",
        "_g",
        "_has_prev",
        "_inv_scale",
        "_k",
        "_keep",
        "_kern",
        "_km_dist",
        "_last_ref",
        "_med",
        "_model",
        "_n",
        "_names",
        "_order",
        "_pca_m",
        "_pca_w",
        "_prev",
        "_run",
        "_s",
        "_src",
        "_src_idx",
        "_t",
        "_threshold",
        "_threshold_fast",
        "_threshold_geo",
        "_use",
        "_x",
        "_z",
        "max_span_s",
    )

    def __init__(self, model: CompiledDetector, *, native: bool | None = None,
                 max_span_s: float | None = None) -> None:
        # The longest interval one sample stands for in the fast channel's duration (None: no
        # bound): a sampler stalled for 20 s must not let the one sample after the stall count
        # as 20 s of deviation. The daemon passes twice its sample interval.
        self.max_span_s = max_span_s
        a = model.arrays
        self._model = model
        self._names = model.meta.feature_names
        self._d = len(self._names)
        self._k = model.meta.top_k
        self._alpha = float(model.meta.ewma_alpha)
        self._threshold = float(model.meta.threshold)
        self._threshold_geo = float(model.meta.threshold_geo)
        tf = model.meta.threshold_fast
        self._threshold_fast = None if tf is None else float(tf)
        self._fast_alpha = float(model.meta.fast_alpha)
        self._fast_p = float(model.meta.fast_power)
        self._fast_min_s = float(model.meta.fast_min_s)
        self._med = a["median"]
        self._inv_scale = 1.0 / a["scale"]
        self._c = a["centroids"]
        self._c2 = a["centroid_sq"]
        self._pca_m = a["pca_mean"]
        self._pca_w = a["pca_components"]
        fac = a["weights"] / a["divisors"]
        self._fac = [float(f) for f in fac]
        self._use = [f != 0.0 for f in self._fac]
        if self._pca_w.shape[0] == 0:
            self._use[PCA] = False
        # Preallocated work buffers.
        self._x = np.empty(self._d, dtype=np.float64)
        self._finite = np.empty(self._d, dtype=np.bool_)
        self._z = np.empty(self._d, dtype=np.float64)
        self._diff = np.empty(self._d, dtype=np.float64)
        self._km_dist = np.empty(self._c.shape[0], dtype=np.float64)
        self._prev = np.empty(self._d, dtype=np.float64)
        self._last_ref = np.empty(self._d, dtype=np.float64)
        self._kern: Kernels | None = None if native is False else kernels()
        if native and self._kern is None:
            raise ModelError("native kernels requested but not available (see the log)")
        self._ctx = DetCtx()
        self._ctx_ref: object = None  # ctypes.byref(self._ctx), opaque to Python
        self._src = np.zeros(self._d, dtype=np.float64)
        self._src_idx = np.arange(self._d, dtype=np.intp)
        self._bound: tuple[int, int] = (0, 0)
        self._order = np.zeros(8, dtype=np.intp)
        # Arrays the kernel reads, kept alive as long as this detector.
        self._keep: list[npt.NDArray[np.generic]] = []
        self._bound_keep: tuple[F64, npt.NDArray[np.intp]] | None = None
        self._ctb = np.zeros(self._d, dtype=np.float64)  # explain's per-feature contributions
        if self._kern is not None:
            self._bind_native()
        self.reset()

    def _bind_native(self) -> None:
        c, d = self._ctx, self._d
        keep = self._keep
        def own(arr: npt.NDArray[np.generic], dtype: type[np.generic]) -> int:
            a = np.ascontiguousarray(arr, dtype=dtype)
            keep.append(a)
            return ptr(a, dtype)
        c.d, c.nc, c.npca, c.top_k = d, self._c.shape[0], self._pca_w.shape[0], self._k
        c.med, c.inv_scale = own(self._med, np.float64), own(self._inv_scale, np.float64)
        c.centroids, c.c2 = own(self._c, np.float64), own(self._c2, np.float64)
        c.pca_mean = own(self._pca_m, np.float64)
        c.pca_w = own(self._pca_w.reshape(-1, d) if self._pca_w.size else np.zeros((0, d)), np.float64)
        c.fac = own(np.array(self._fac, dtype=np.float64), np.float64)
        c.use = own(np.array(self._use, dtype=np.int8), np.int8)
        c.x, c.prev, c.last_ref = ptr(self._x, np.float64), ptr(self._prev, np.float64), \
            ptr(self._last_ref, np.float64)
        c.missing = own(np.zeros(d, dtype=np.int8), np.int8)
        c.z = ptr(self._z, np.float64)
        c.km = ptr(self._km_dist, np.float64)
        c.pc = own(np.zeros(max(1, self._pca_w.shape[0])), np.float64)
        c.contrib = ptr(self._ctb, np.float64)
        self._bound = (ptr(self._src, np.float64), ptr(self._src_idx, np.intp))
        c.vec, c.idx = self._bound
        self._ctx_ref = ctypes.byref(c)

    @property
    def native(self) -> bool:
        """Whether scoring runs in the C kernel."""
        return self._kern is not None

    def bind(self, vec: npt.NDArray[np.float64], idx: npt.NDArray[np.intp]) -> None:
        """Have :meth:`score_bound` / :meth:`explain_bound` read the sample as ``vec[idx]``. The
        caller keeps both arrays alive (and their length fixed) while bound."""
        if idx.shape != (self._d,) or (idx.size and (int(idx.min()) < 0 or int(idx.max()) >= vec.size)):
            raise ModelError(f"bind: index of shape {idx.shape} does not select {self._d} features "
                             f"of a vector of {vec.size}")
        self._bound = (ptr(vec, np.float64), ptr(idx, np.intp))
        self._bound_keep = (vec, idx)

    def _take(self, x: SampleLike, out: F64) -> None:
        """Validate ``x`` (a sample in the model's feature order) and copy it into ``out``."""
        if isinstance(x, np.ndarray) and x.shape == out.shape and x.dtype.kind in "fiu":
            out[:] = x
            return
        try:
            arr = np.array(x, dtype=np.float64)  # None -> NaN
        except (ValueError, TypeError) as exc:
            raise ModelError(f"sample is not a sequence of numbers: {exc}") from None
        if arr.shape != out.shape:
            raise ModelError(f"sample has shape {arr.shape}, the model expects {self._d} features")
        out[:] = arr

    def _copy_in(self, x: SampleLike) -> None:
        """Validate ``x`` into the kernel's own source buffer and point the kernel at it."""
        self._take(x, self._src)
        self._ctx.vec, self._ctx.idx = ptr(self._src, np.float64), ptr(self._src_idx, np.intp)

    @property
    def model(self) -> CompiledDetector:
        return self._model

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def samples_seen(self) -> int:
        return self._n

    @property
    def channel(self) -> str:
        """Which channel made the last sample's alert: "slow" (the two EWMAs at alpha 0.1), "fast"
        (the fast channel alone), "both", or "" (no alert)."""
        return self._channel

    def reset(self) -> None:
        """Forget the stream (EWMA and previous sample), e.g. after a gap in sampling."""
        self._s = 0.0
        self._g = 0.0  # the geometric smoother, on the log scale
        self._f = 0.0  # the fast channel's EWMA
        self._run = 0.0  # seconds the fast channel has been over its line
        self._t: float | None = None  # the previous sample's time
        self._channel = ""
        self._n = 0
        self._has_prev = False
        self._ctx.has_prev = 0

    def _load(self, x: SampleLike) -> npt.NDArray[np.bool_] | None:
        """Copy ``x`` into the work buffer, impute missing values; return the missing mask or None."""
        self._take(x, self._x)
        finite = self._finite
        np.isfinite(self._x, out=finite)
        if finite.all():
            return None
        missing = ~finite
        np.copyto(self._x, self._med, where=missing)
        return missing

    def _raw(self, missing: npt.NDArray[np.bool_] | None) -> float:
        x = self._x
        raw = 0.0
        if self._use[RZ]:
            z = self._z
            np.subtract(x, self._med, out=z)
            np.abs(z, out=z)
            np.multiply(z, self._inv_scale, out=z)
            z.partition(self._d - self._k)
            raw += self._fac[RZ] * float(z[self._d - self._k:].sum()) / self._k
        if self._use[KM]:
            dist = self._km_dist
            np.dot(self._c, x, out=dist)
            np.multiply(dist, -2.0, out=dist)
            np.add(dist, self._c2, out=dist)
            best = float(dist.min()) + float(x @ x)
            raw += self._fac[KM] * math.sqrt(max(0.0, best))
        diff = self._diff
        if self._has_prev:
            np.subtract(x, self._prev, out=diff)
            if missing is not None:
                diff[missing] = 0.0
            if self._use[DELTA]:
                raw += self._fac[DELTA] * float(diff @ diff)
        if self._use[PCA]:
            xc = x - self._pca_m
            r = xc - (self._pca_w @ xc) @ self._pca_w
            raw += self._fac[PCA] * float(r @ r)
        return raw

    def _smooth(self, raw: float, t: float | None) -> tuple[float, bool]:
        lg = math.log(max(raw, 0.0) + GEO_EPS)
        first = self._n == 0
        if first:
            s, g, f = raw, lg, raw
        else:
            a = self._alpha
            s = a * raw + (1.0 - a) * self._s
            g = a * lg + (1.0 - a) * self._g
            f = self._fast_alpha * raw + (1.0 - self._fast_alpha) * self._f
        self._s, self._g, self._f = s, g, f
        self._n += 1
        self._has_prev = True
        norm = min(s / self._threshold, math.exp(g) / self._threshold_geo)
        slow = norm >= 1.0
        fast = False
        if self._threshold_fast is not None:
            # the interval this sample stands for: since the previous sample (0 when unknown)
            if t is not None and not math.isfinite(t):
                t = None
            span = 0.0 if first or t is None or self._t is None else t - self._t
            if self.max_span_s is not None and span > self.max_span_s:
                span = self.max_span_s
            fr = f / self._threshold_fast
            if fr >= 1.0:
                self._run += max(0.0, span)
                if self._run >= self._fast_min_s:
                    fast = True
                    norm = max(norm, fr ** self._fast_p)
            else:
                self._run = 0.0
            self._t = t
        self._channel = ("both" if fast else "slow") if slow else ("fast" if fast else "")
        return norm, slow or fast

    def score_bound(self, vec: npt.NDArray[np.float64], idx: npt.NDArray[np.intp],
                    t: float | None = None) -> tuple[float, bool]:
        """:meth:`score` of ``vec[idx]``; with the kernel, read in place from the arrays given to
        :meth:`bind` (which must be ``vec`` and ``idx``)."""
        if self._kern is None:
            return self.score(vec[idx], t)
        c = self._ctx
        c.vec, c.idx = self._bound
        return self._smooth(self._kern.det_score(self._ctx_ref), t)

    def explain_bound(self, vec: npt.NDArray[np.float64], idx: npt.NDArray[np.intp],
                      top_k: int = 3) -> list[Contribution]:
        """:meth:`explain` of ``vec[idx]`` (see :meth:`score_bound`)."""
        if self._kern is None:
            return self.explain(vec[idx], top_k)
        c = self._ctx
        c.vec, c.idx = self._bound
        return self._explain_native(top_k)

    def _explain_native(self, top_k: int) -> list[Contribution]:
        kern = self._kern
        if kern is None:
            raise ModelError("native kernel path taken without the kernels")
        if top_k > self._order.size:
            self._order = np.zeros(top_k, dtype=np.intp)
        n = int(kern.det_explain(self._ctx_ref, max(0, top_k), ptr(self._order, np.intp)))
        ct = self._ctb
        total = float(ct.sum())
        if not total > 0.0:
            return []
        return [Contribution(feature=self._names[i], share=float(ct[i] / total))
                for i in self._order[:n].tolist()]

    def score(self, x: SampleLike, t: float | None = None) -> tuple[float, bool]:
        """Score one sample (in the model's feature order) taken at time ``t`` (seconds, any
        clock; None: unknown); update the causal state."""
        if self._kern is not None:
            self._copy_in(x)
            return self._smooth(self._kern.det_score(self._ctx_ref), t)
        missing = self._load(x)
        raw = self._raw(missing)
        # Remember what delta was measured against (for explain), then advance the state.
        self._last_ref[:] = self._prev if self._has_prev else self._x
        if missing is None:
            self._prev[:] = self._x
        elif self._has_prev:
            np.copyto(self._prev, self._x, where=~missing)
        else:
            self._prev[:] = self._x
        return self._smooth(raw, t)

    def explain(self, x: SampleLike, top_k: int = 3) -> list[Contribution]:
        """The ``top_k`` features contributing most to the raw score of ``x`` (shares sum to <= 1).

        Each component's value is split over features: robust z over its top-k features, the
        k-means distance and PCA error by squared per-feature residual, delta by squared change.
        """
        if self._kern is not None:
            self._copy_in(x)
            return self._explain_native(top_k)
        missing = self._load(x)
        x_ = self._x
        contrib = np.zeros(self._d, dtype=np.float64)
        if self._use[RZ]:
            z = np.abs(x_ - self._med) * self._inv_scale
            top = np.argpartition(z, self._d - self._k)[self._d - self._k:]
            contrib[top] += self._fac[RZ] * z[top] / self._k
        if self._use[KM]:
            j = int(np.argmin(self._c2 - 2.0 * (self._c @ x_)))
            res = x_ - self._c[j]
            ss = float(res @ res)
            if ss > 0.0:
                contrib += self._fac[KM] * math.sqrt(ss) * (res * res) / ss
        if self._use[DELTA] and self._n > 0:
            diff = x_ - self._last_ref
            if missing is not None:
                diff[missing] = 0.0
            contrib += self._fac[DELTA] * diff * diff
        if self._use[PCA]:
            xc = x_ - self._pca_m
            r = xc - (self._pca_w @ xc) @ self._pca_w
            contrib += self._fac[PCA] * r * r
        total = float(contrib.sum())
        if not total > 0.0:
            return []
        order = np.argsort(-contrib, kind="stable")[: max(0, top_k)]
        return [Contribution(feature=self._names[i], share=float(contrib[i] / total))
                for i in order if contrib[i] > 0.0]

    def score_many(self, rows: npt.ArrayLike, times: npt.ArrayLike | None = None) -> F64:
        """Score consecutive rows one at a time (the streaming path), taken at ``times``; return
        the scores."""
        x = np.asarray(rows, dtype=np.float64)
        ts = None if times is None else np.asarray(times, dtype=np.float64)
        out = np.empty(x.shape[0], dtype=np.float64)
        for i in range(x.shape[0]):
            out[i] = self.score(x[i], None if ts is None else float(ts[i]))[0]
        return out
