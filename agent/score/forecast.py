"""Exhaustion forecasts: time until a monotone resource runs out, from a robust trend.

Tracked resources (:data:`DEFAULT_RESOURCES`): free bytes and free inodes per mount
(``disk.free_bytes[M]``, ``disk.inodes_free[M]`` -> 0), available memory
(``mem.available_bytes`` -> 0), swap (``mem.swap_used_pct`` -> 100) and each memory-limited
cgroup's headroom under its limit (``cgroup.mem.headroom_bytes[CG]`` -> 0), and the headroom of
the kernel tables: PIDs per cgroup, fds per process and host-wide, host tasks, conntrack entries
(``cgroup.pids.headroom[CG]``, ``proc.fd.headroom[PID]``, ``fd.headroom``,
``proc.tasks.headroom``, ``net.conntrack.headroom`` -> 0).

Method. Every sample's values go into one preallocated ring (``capacity`` samples x resources);
every ``every`` samples the trend of each resource is re-estimated on several windows (by
default the last 30 s, 120 s and ``window_s`` = 600 s; a window of S seconds is refitted every
max(``every``, S/20) samples), each subsampled to at most ``max_points`` points:

1. a vectorised least-squares pre-filter: a resource that is not moving towards its limit, or
   whose least-squares ETA exceeds ``max_eta_s`` (2 days), is reported as not trending
   (``eta_s = None``) without further work;
2. otherwise the **Theil-Sen** slope (median of all pairwise slopes; tolerates up to ~29 % of
   outliers) and the robust level ``median(y - slope * t)`` at the latest sample time;
3. confidence = consistency * signal * coverage, where *consistency* = 2 p - 1 with p the share
   of pairwise slopes with the sign of the median (0 for a step or noise, 1 for a clean ramp),
   *signal* = 1 - exp(-|slope| span / (3 sigma)) with sigma = 1.4826 * MAD of the residuals
   (the trend's total change against the noise), and *coverage* = valid points / points wanted;
4. the window with the highest confidence wins (a fresh fill is clean on the short window, a slow
   noisy leak on the long one); ETA = (level - limit) / -slope for a resource falling to its
   limit, (limit - level) / slope for one rising to it, 0 once at the limit.
5. the last ``recent_s`` (15 s) are fitted on their own: where they made less than half the
   progress the chosen trend says they should have, by more than three times their own noise
   and resolution, the trend has stopped and the confidence is scaled by observed / expected
   progress (:meth:`Forecaster._stopped`). A window remembers a fall for as long as the fall is
   in it: without this a job that allocated a quarter of the RAM in ten seconds and held it
   read as a leak for a minute and more after it stopped.
6. for a resource with ``min_fill`` (disks: free bytes and inodes, 0.1): the fill must already
   have taken that share of the room still left, counted from the lowest room the resource had
   shortly before it (:meth:`Forecaster._unproven`); until it has, the confidence is 0. A page-cache
   copy that writes a few GB in seconds and then deletes or overwrites them, or a backup that
   fills up to a cap and deletes, read as a fill of hundreds of MB/s with minutes to go on a
   big disk; a fill that keeps coming back never goes below its last low, and a first burst is
   a small share of a big disk's room.
7. memory (``min_used`` 2/3 of ``total``): confidence 0 until past two thirds of the host's
   memory or the cgroup's limit (:meth:`Forecaster._unused`; why: docs/risk.md, Forecaster).

A sudden cleanup (step up in free space) reads as not trending; a single step down reads as low
confidence. Cost: O(1) per sample (one itemgetter over the tracked keys into the ring) plus the
periodic refit (every ``every`` = 10 samples). A refit handles every due window at once: one
least-squares pre-filter over all (window, resource) rows, one Theil-Sen call over the
candidates of all windows (medians by partition when nothing is missing), and only forecasts
whose values changed are rebuilt; see bench/pipeline_cost.py.
Nothing here imports scikit-learn.
"""

from __future__ import annotations

import ctypes
import math
import operator
from collections.abc import Callable, Sequence
from typing import Literal

import msgspec
import numpy as np
import numpy.typing as npt

from agent.collect.sample import KeyDelta, in_order, split_key
from agent.collect.sample import key as metric_key
from agent.errors import ModelError
from agent.native import Kernels, TrendCtx, kernels, ptr
from agent.score.types import Forecast

F64 = npt.NDArray[np.float64]


class Resource(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    key: str  # exact key or "family[*]" (every label)
    direction: Literal["down", "up"] = "down"  # falls to / rises to the limit
    limit: float = 0.0
    # > 0: no confident forecast before the fill has taken this share of the room still left,
    # past the lowest room of the samples before it (:meth:`Forecaster._unproven`); 0: no check
    min_fill: float = 0.0
    # > 0: not confident below this share of ``total`` used (a key; "[*]": the same label)
    min_used: float = 0.0
    total: str = ""


# A disk's (and its inodes') forecast must have seen a tenth of what it extrapolates: copies,
# backups and spools that fill and then delete are the common case on disks, not leaks.
DISK_MIN_FILL = 0.1

# Memory forecasts past two thirds of the room only (fault-free under load: 57 % at most).
MEM_MIN_USED = 2.0 / 3.0

DEFAULT_RESOURCES: tuple[Resource, ...] = (
    Resource(key="disk.free_bytes[*]", min_fill=DISK_MIN_FILL),
    Resource(key="disk.inodes_free[*]", min_fill=DISK_MIN_FILL),
    Resource(key="mem.available_bytes", min_used=MEM_MIN_USED, total="mem.total_bytes"),
    Resource(key="mem.swap_used_pct", direction="up", limit=100.0),
    # a memory-limited cgroup's room left under its limit (agent.collect.cgroups)
    Resource(key="cgroup.mem.headroom_bytes[*]", min_used=MEM_MIN_USED, total="cgroup.mem.limit_bytes[*]"),
    # kernel tables: room left before EMFILE/ENFILE, fork's EAGAIN, a full conntrack table
    # (agent.collect.cgroups, agent.collect.limits)
    Resource(key="cgroup.pids.headroom[*]"),
    Resource(key="proc.fd.headroom[*]"),
    Resource(key="fd.headroom"),
    Resource(key="proc.tasks.headroom"),
    Resource(key="net.conntrack.headroom"),
)


_PAIRS: dict[int, tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]] = {}


def _pairs(m: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    p = _PAIRS.get(m)
    if p is None:
        i, j = np.triu_indices(m, k=1)
        p = _PAIRS[m] = (i.astype(np.intp), j.astype(np.intp))
    return p


def _nanmedian_rows(a: F64) -> tuple[F64, npt.NDArray[np.intp]]:
    """Row medians ignoring NaN (NaN where a row has none) and the count of valid entries."""
    m = a.shape[1]
    nv = np.isfinite(a).sum(axis=1)
    if m and bool((nv == m).all()):  # nothing missing: a partition finds the middle entries
        lo, hi = (m - 1) // 2, m // 2
        part = np.partition(a, (lo, hi) if lo != hi else lo, axis=1)
        return 0.5 * (part[:, lo] + part[:, hi]), nv
    srt = np.sort(a, axis=1)  # NaN sort last
    rows = np.arange(a.shape[0])
    lo_i = np.maximum((nv - 1) // 2, 0)
    hi_i = np.minimum(nv // 2, m - 1)
    med = 0.5 * (srt[rows, lo_i] + srt[rows, hi_i])
    med[nv == 0] = np.nan
    return med, nv


def robust_trend(t: F64, y: F64) -> tuple[F64, F64, F64]:
    """Theil-Sen fit of each row of ``y`` (k, m) over times ``t`` (m,) or, per row, (k, m);
    NaN = missing. The level is at each row's last time (``t[..., -1]``).

    Returns ``(slope, level_at_last_t, confidence_without_coverage)``, each (k,); NaN slope and
    level and 0 confidence where a row has fewer than 3 valid points.
    """
    m = y.shape[1]
    i, j = _pairs(m)
    tt = t if t.ndim == 2 else t[None, :]
    dt = tt.take(j, axis=1) - tt.take(i, axis=1)  # take: much cheaper than [:, j] here
    with np.errstate(invalid="ignore", divide="ignore"):
        sl = (y.take(j, axis=1) - y.take(i, axis=1)) / np.where(dt > 0, dt, np.nan)
        slope, nv = _nanmedian_rows(sl)
        ok = nv >= 3
        slope[~ok] = np.nan
        resid = y - slope[:, None] * (tt - tt[:, -1:])
        level, _ = _nanmedian_rows(resid)
        mad, _ = _nanmedian_rows(np.abs(resid - level[:, None]))
        valid = np.isfinite(y)
        first = np.argmax(valid, axis=1)
        last = m - 1 - np.argmax(valid[:, ::-1], axis=1)
        if tt.shape[0] == 1:
            span = tt[0, last] - tt[0, first]
        else:
            rows = np.arange(y.shape[0])
            span = tt[rows, last] - tt[rows, first]
        scale = np.maximum(1.4826 * mad, 1e-9 * np.maximum(np.abs(level), 1.0))
        signal = 1.0 - np.exp(-np.abs(slope) * span / (3.0 * scale))
        same = (np.sign(sl) == np.sign(slope)[:, None]).sum(axis=1) / np.maximum(nv, 1)
        conf = np.clip(2.0 * same - 1.0, 0.0, 1.0) * signal
    conf = np.where(ok & (slope != 0) & np.isfinite(conf), conf, 0.0)
    return slope, level, conf


class Forecaster:
    """Feed samples with :meth:`push`; read :attr:`forecasts` (refreshed every ``every`` samples).

    ``native``: run the trend fit in the C kernel (:mod:`agent.native`) — None = when it is
    available, False = always numpy (the reference), True = require it.
    """

    def __init__(self, resources: Sequence[Resource] = DEFAULT_RESOURCES, *, window_s: float = 600.0,
                 spans: Sequence[float] = (30.0, 120.0), every: int = 10, max_points: int = 30,
                 capacity: int = 600,
                 max_eta_s: float = 2 * 86400.0, min_points: int = 8, recent_s: float = 15.0,
                 native: bool | None = None) -> None:
        self._kern: Kernels | None = None if native is False else kernels()
        if native and self._kern is None:
            raise ModelError("native kernels requested but not available (see the log)")
        self.resources = tuple(resources)
        self.window_s = window_s
        self.spans = (*sorted(s for s in spans if s < window_s), float(window_s))
        self.every = max(1, every)
        self.max_points = max_points
        self.max_eta_s = max_eta_s
        self.min_points = min_points
        self.recent_s = recent_s
        self.recent_eta_s = 4 * 3600.0  # the check looks at ETAs up to 4 h, confidence >= 0.25
        self._cap = capacity
        self._exact = {r.key: r for r in self.resources if not r.key.endswith("[*]")}
        self._wild = {split_key(r.key)[0]: r for r in self.resources if r.key.endswith("[*]")}
        self._keys: list[str] = []
        self._spec: list[Resource] = []
        self._total_keys: list[tuple[int, str]] = []
        self._totals = np.empty(0)
        self._min_used = np.empty(0)
        self._get: Callable[[dict[str, float | None]], tuple[float | None, ...]] = lambda _m: ()
        # One extra ring row stays NaN: padding for windows with fewer points than others.
        self._ring = np.full((capacity + 1, 0), np.nan)
        self._t = np.full(capacity + 1, np.nan)
        self._ages = np.arange(capacity)
        self._pos = 0
        self._n = 0
        self._delta = KeyDelta()  # the keys that came and went since the last look
        self.forecasts: tuple[Forecast, ...] = ()
        self._results: dict[int, tuple[F64, F64, F64]] = {}
        self._subsample: dict[int, npt.NDArray[np.intp]] = {}
        self._shown: list[Forecast] = []
        self._shown_arr = (np.empty(0), np.empty(0), np.empty(0))
        # Native path state (trend_ctx, agent/native/kernels.h): per-window results and the chosen window's.
        self._res = np.zeros((0, 3, 0))
        self._best = np.zeros((3, 0))
        self._spans_arr = np.array(self.spans, dtype=np.float64)
        self._due_arr = np.ones(len(self.spans), dtype=np.int8)
        self._tctx = TrendCtx()
        self._tctx_ref: object = None  # ctypes.byref(self._tctx), opaque to Python
        if self._kern is not None:
            c = self._tctx
            c.cap, c.nspans, c.max_points = capacity, len(self.spans), max_points
            c.tring, c.spans = ptr(self._t, np.float64), ptr(self._spans_arr, np.float64)
            c.due = ptr(self._due_arr, np.int8)
            c.min_points, c.max_eta = float(min_points), float(max_eta_s)
            self._tctx_ref = ctypes.byref(c)

    @property
    def native(self) -> bool:
        """Whether refits run in the C kernel."""
        return self._kern is not None

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def _prune(self, metrics: dict[str, float | None]) -> None:
        """Forget keys gone for a whole ring: absent from this sample and without one value in
        the ring. Labelled keys come and go (a pid's fds, a cgroup); without this the ring, the
        fits and ``forecasts`` grew with the node's uptime."""
        if not self._keys:
            return
        seen = np.isfinite(self._ring[:self._cap]).any(axis=0)
        keep = [i for i, k in enumerate(self._keys) if seen[i] or k in metrics]
        if len(keep) == len(self._keys):
            return
        self._keys = [self._keys[i] for i in keep]
        self._spec = [self._spec[i] for i in keep]
        self._ring = np.ascontiguousarray(self._ring[:, keep])  # new: the kernel is re-pointed below
        self._set_spec()
        self._shown = []
        self._results.clear()
        self._res = np.zeros((0, 3, 0))  # the native path re-points at the new arrays at its next fit
        kept = set(self._keys)
        self.forecasts = tuple(f for f in self.forecasts if f.resource in kept)
        self._get = lambda _m: ()

    def _set_spec(self) -> None:
        self._sign = np.array([1.0 if s.direction == "down" else -1.0 for s in self._spec])
        self._limit = np.array([s.limit for s in self._spec])
        self._min_fill = np.array([s.min_fill for s in self._spec])
        self._min_used = np.array([s.min_used if s.total else 0.0 for s in self._spec])
        self._total_keys = [(i, _total_key(s.total, k)) for i, (k, s) in  # (index, key of its total)
                            enumerate(zip(self._keys, self._spec, strict=True)) if s.min_used > 0 and s.total]
        self._totals = np.full(len(self._keys), np.nan)

    def _scan(self, metrics: dict[str, float | None]) -> None:
        if self._n % 300 == 0:  # not on every change of the key count: a churning host rescans often
            self._prune(metrics)
        added, _removed = self._delta.delta(metrics)  # only the keys that arrived since the last look
        found: dict[str, Resource] = {}
        for k in added.difference(self._keys):
            spec = self._exact.get(k)
            if spec is None:
                fam, label = split_key(k)
                spec = self._wild.get(fam) if label is not None else None
            if spec is not None:
                found[k] = spec
        new = [(k, found[k]) for k in in_order(metrics, set(found))]
        if new:
            for k, spec in new:
                self._keys.append(k)
                self._spec.append(spec)
            self._ring = np.pad(self._ring, ((0, 0), (0, len(new))), constant_values=np.nan)
            self._set_spec()
            self._shown = []
        keys = self._keys
        if len(keys) >= 2:
            self._get = operator.itemgetter(*keys)
        elif keys:
            only = keys[0]
            self._get = lambda m: (m.get(only),)

    def push(self, metrics: dict[str, float | None], mono: float) -> None:
        if self._delta.changed(metrics) or self._n % 300 == 0:
            self._scan(metrics)
        row = self._ring[self._pos]
        try:
            vals = self._get(metrics)
        except KeyError:  # a tracked key is absent from this sample
            get = metrics.get
            row[:] = [math.nan if (v := get(k)) is None else v for k in self._keys]
        else:
            if vals.count(None):
                row[:] = vals  # None -> NaN
            else:
                row[:] = np.fromiter(vals, np.float64, len(vals))
        for i, tk in self._total_keys:
            self._totals[i] = math.nan if (v := metrics.get(tk)) is None else v
        self._t[self._pos] = mono
        self._pos = (self._pos + 1) % self._cap
        self._n += 1
        if self._n % self.every == 0 and self._keys:
            self._compute(mono)

    def _due(self, span: float) -> bool:
        """A window of ``span`` seconds is refitted every max(every, span / 20) samples."""
        cadence = max(self.every, int(span / 20.0) // self.every * self.every)
        return self._n % cadence == 0

    def _points(self, size: int) -> npt.NDArray[np.intp]:
        """Evenly spaced subsample of ``size`` points down to ``max_points`` (cached per size)."""
        idx = self._subsample.get(size)
        if idx is None:
            idx = self._subsample[size] = np.linspace(0, size - 1, self.max_points).round().astype(np.intp)
        return idx

    def _compute(self, now: float) -> None:
        """Refit the due windows — all of them in one vectorised pass — and publish forecasts."""
        if self._kern is not None:
            self._compute_native(now)
            return
        k = len(self._keys)
        n = min(self._n, self._cap)
        order = (self._pos - n + self._ages[:n]) % self._cap
        t_all = self._t[order]
        fits: list[tuple[int, npt.NDArray[np.intp]]] = []
        for si, span in enumerate(self.spans):
            res = self._results.get(si)
            if res is not None and res[0].size == k and not self._due(span):
                continue  # keep this window's last fit
            self._results[si] = (np.full(k, np.nan), np.zeros(k), np.zeros(k))
            sel = order[t_all >= now - span]
            if sel.size < self.min_points:
                continue
            if sel.size > self.max_points:
                sel = sel[self._points(sel.size)]
            fits.append((si, sel))
        if fits:
            self._fit(fits, k)
        self._publish(k)

    def _fit(self, fits: list[tuple[int, npt.NDArray[np.intp]]], k: int) -> None:
        """Pre-filter and Theil-Sen fit of every (window, resource) row at once."""
        m = max(sel.size for _, sel in fits)
        nw = len(fits)
        idx = np.full((nw, m), self._cap, dtype=np.intp)  # the NaN row pads shorter windows (front)
        for w, (_, sel) in enumerate(fits):
            idx[w, m - sel.size:] = sel
        tw = self._t[idx]  # (windows, points)
        yk = self._ring[idx].transpose(0, 2, 1).reshape(nw * k, m)  # (windows * keys, points)
        t = np.repeat(tw, k, axis=0)
        sign = np.tile(self._sign, nw)
        limit = np.tile(self._limit, nw)
        # Least-squares pre-filter: moving towards the limit, plausibly within max_eta_s?
        valid = np.isfinite(yk)
        cnt = valid.sum(axis=1)
        tc = t - t[:, -1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            tz = np.where(valid, tc, 0.0)
            yz = np.where(valid, yk, 0.0)
            tm = tz.sum(axis=1) / cnt
            ym = yz.sum(axis=1) / cnt
            tcen = np.where(valid, tc - tm[:, None], 0.0)
            ycen = np.where(valid, yk - ym[:, None], 0.0)
            stt = (tcen * tcen).sum(axis=1)
            sty = (tcen * ycen).sum(axis=1)
            ols = sty / stt
            rvar = np.maximum((ycen * ycen).sum(axis=1) - ols * sty, 0.0) / np.maximum(cnt - 2, 1)
            change2 = ols * ols * 12.0 * stt / cnt  # (slope * span)^2 for evenly spaced points
            level = ym - ols * tm  # at the latest time (tc = 0)
            toward = -ols * sign  # > 0: moving towards the limit
            room = (level - limit) * sign
            # A trend that does not stand out of its own noise cannot reach confidence 0.5.
            cand = np.flatnonzero((cnt >= self.min_points) & (toward > 0) & (change2 >= rvar)
                                  & ((room < self.max_eta_s * toward) | (room <= 0)))
        if cand.size == 0:
            return
        slope, lev, conf = robust_trend(t[cand], yk[cand])
        conf *= np.minimum(1.0, cnt[cand] / self.min_points)
        sgn = sign[cand]
        tw_ = -slope * sgn
        rm = (lev - limit[cand]) * sgn
        with np.errstate(invalid="ignore", divide="ignore"):
            eta = np.where(rm <= 0, 0.0, rm / np.where(tw_ > 0, tw_, np.nan))
        good = np.isfinite(eta) & (eta <= self.max_eta_s)
        for w, (si, _) in enumerate(fits):
            lo = np.searchsorted(cand, w * k)
            hi = np.searchsorted(cand, (w + 1) * k)
            if lo == hi:
                continue
            g = good[lo:hi]
            r = cand[lo:hi][g] - w * k
            eta_s, conf_s, rate_s = self._results[si]
            eta_s[r], conf_s[r], rate_s[r] = eta[lo:hi][g], conf[lo:hi][g], slope[lo:hi][g]

    def _compute_native(self, now: float) -> None:
        """:meth:`_compute` (window choice, subsampling, fits, the most confident window) in one
        C call; the per-window results live in ``_res`` (windows, eta/conf/rate, resources)."""
        k, ns = len(self._keys), len(self.spans)
        kern = self._kern
        if kern is None:
            raise ModelError("native kernel path taken without the kernels")
        c = self._tctx
        if self._res.shape != (ns, 3, k):
            self._res = np.zeros((ns, 3, k))
            self._res[:, 0] = np.nan
            self._best = np.zeros((3, k))
            self._due_arr.fill(1)
            c.ring, c.sign, c.limit = ptr(self._ring, np.float64), ptr(self._sign, np.float64), \
                ptr(self._limit, np.float64)
            c.res, c.best = ptr(self._res, np.float64), ptr(self._best, np.float64)
            c.k = k
        else:
            for si, span in enumerate(self.spans):
                self._due_arr[si] = self._due(span)
        c.pos, c.n, c.now = self._pos, min(self._n, self._cap), now
        if kern.trend_update(self._tctx_ref) != 0:
            raise MemoryError("native trend fit: no scratch memory")
        b = self._best
        self._show(b[0], b[1], b[2], k)

    def _publish(self, k: int) -> None:
        """The window with the highest confidence wins, per resource; only changed forecasts are
        rebuilt."""
        best_eta = np.full(k, np.nan)
        best_conf = np.zeros(k)
        best_rate = np.zeros(k)
        for eta_s, conf_s, rate_s in self._results.values():
            better = conf_s > best_conf
            best_eta[better] = eta_s[better]
            best_conf[better] = conf_s[better]
            best_rate[better] = rate_s[better]
        self._show(best_eta, best_conf, best_rate, k)

    def _stopped(self, best_eta: F64, best_conf: F64, best_rate: F64) -> F64:
        """``best_conf`` lowered where the last ``recent_s`` seconds contradict the chosen trend.

        A window's fit remembers a fall for as long as the fall is in the window: a job that
        allocates a quarter of the RAM in ten seconds and then holds it read as a leak for a
        minute after it stopped (the 120-s window). Here the progress of the most recent points
        (at least ``min_points``) is read from themselves: the median of their last third minus
        the median of their first third. Where that is less than half the progress the chosen
        trend says they should have made, by more than three times their step noise (the median
        absolute step) and their resolution (the smallest step: a staircase of whole PIDs is not
        noise), the trend has stopped and the confidence is scaled by observed / expected
        progress (0 when the resource moved away from its limit). A leak that goes on keeps its
        confidence; a slow leak lost in noise is not judged by its last seconds (its expected
        progress there is within the noise). Checked for the forecasts some line may read
        (ETA <= 4 h, confidence >= 0.25), at each refit."""
        with np.errstate(invalid="ignore"):
            cand = np.flatnonzero((best_eta <= self.recent_eta_s) & (best_conf >= 0.25))
        n = min(self._n, self._cap, self.max_points)
        if cand.size == 0 or n < self.min_points:
            return best_conf
        idx = (self._pos - n + self._ages[:n]) % self._cap  # the last n samples, oldest first
        t = self._t[idx]
        keep = t >= t[-1] - self.recent_s
        m = int(keep.sum())
        if m < self.min_points:
            return best_conf
        idx, t = idx[keep], t[keep]
        y = self._ring[idx[None, :], cand[:, None]]  # (candidates, points)
        h = m // 3
        sign = self._sign[cand]
        observed = (_nanmedian_rows(y[:, :h])[0] - _nanmedian_rows(y[:, -h:])[0]) * sign  # NaN: no verdict
        expected = -best_rate[cand] * sign * float(t[-h:].mean() - t[:h].mean())
        d = np.abs(np.diff(y, axis=1))
        floor = 3.0 * np.fmax(_nanmedian_rows(d)[0], np.where(d > 0, d, np.inf).min(axis=1))
        with np.errstate(invalid="ignore"):
            bad = (expected > 0) & (observed < 0.5 * expected) & (expected - observed > floor)
        if not bad.any():
            return best_conf
        out = best_conf.copy()
        out[cand[bad]] *= np.clip(observed[bad] / expected[bad], 0.0, 1.0)
        return out

    def _unproven(self, best_eta: F64, best_conf: F64, best_rate: F64) -> F64:
        """``best_conf`` lowered where a resource with ``min_fill`` has not yet filled that share
        of the room it still has.

        The fill so far is the room the resource had from 4 to 2 x ``min_fill`` x ETA seconds ago
        (the lowest of those samples; the oldest sample while the ring is younger) minus the room
        now (the chosen trend's level). A steady fill of any speed on a disk of any size passes
        once it has run ``min_fill`` of its time to full (the lead keeps 1 / (1 + ``min_fill``)
        of it: 91 % at 0.1). It does not pass while the fill is a small share of the room (a copy
        of 4 GB in 10 s with 80 GB free: ETA 3 min, 5 % of the room) or while the room is not
        below its low of that earlier stretch (a copy that deletes or truncates its file and
        writes it again, a backup that fills to a cap and deletes: the fill keeps coming back).
        The stretch ends 4 x ``min_fill`` x ETA back, not at the ring's start: a disk that was
        full minutes ago (ENOSPC, then cleaned) and fills again is heading for full again, and a
        low that old must not hide it.
        Until it passes, the confidence is 0: a gate, not a scale (scaled by the share seen, the
        4-GB copy's 5 % of 10 % kept half its confidence, and a forecaster that was sure of the
        burst would still say so at 0.5). Checked for the forecasts some line may read (ETA <= 4
        h, confidence >= 0.25) whose look-back fits in a full ring (2 x ``min_fill`` x ETA <= the
        ring's time: ETAs up to 50 min at 1 Hz); beyond that the ring cannot show the share."""
        if not self._min_fill.any():
            return best_conf
        with np.errstate(invalid="ignore"):
            cand = np.flatnonzero((self._min_fill > 0) & (best_eta <= self.recent_eta_s)
                                  & (best_conf >= 0.25))
        n = min(self._n, self._cap)
        if cand.size == 0 or n < 2:
            return best_conf
        idx = (self._pos - n + self._ages[:n]) % self._cap  # oldest first
        t = self._t[idx]
        full = (t[-1] - t[0]) / (n - 1) * self._cap  # the time a full ring covers
        share = self._min_fill[cand]
        eta = best_eta[cand]
        sign = self._sign[cand]
        room = eta * np.maximum(-best_rate[cand] * sign, 0.0)  # the trend's room left now
        back = 2.0 * share * eta
        # the reference: samples from 2 x back to back seconds ago (the oldest one while the ring
        # is younger than back; the last one before it where sampling paused)
        hi = np.maximum(np.searchsorted(t, t[-1] - back, side="right"), 1)
        lo = np.minimum(np.searchsorted(t, t[-1] - 2.0 * back, side="left"), hi - 1)
        y = (self._ring[idx[:, None], cand[None, :]] - self._limit[cand]) * sign  # (n, candidates)
        at = np.arange(n)[:, None]
        ref = (at >= lo[None, :]) & (at < hi[None, :]) & ~np.isnan(y)
        low = np.where(ref, y, np.inf).min(axis=0)  # inf: no valid sample there
        with np.errstate(invalid="ignore"):
            short = (back <= full) & np.isfinite(low) & (low - room < share * room)
        if not short.any():
            return best_conf
        out = best_conf.copy()
        out[cand[short]] = 0.0
        return out

    def _unused(self, best_conf: F64) -> F64:
        """``best_conf`` 0 where the latest value is more than (1 - ``min_used``) x ``total`` from
        its limit; no verdict where either is missing."""
        if not self._total_keys:
            return best_conf
        with np.errstate(invalid="ignore"):
            cand = np.flatnonzero((self._min_used > 0) & (best_conf > 0))
        if cand.size == 0:
            return best_conf
        last = self._ring[(self._pos - 1) % self._cap, cand]
        room = (last - self._limit[cand]) * self._sign[cand]
        with np.errstate(invalid="ignore"):
            early = room > (1.0 - self._min_used[cand]) * self._totals[cand]  # False where NaN
        if not early.any():
            return best_conf
        out = best_conf.copy()
        out[cand[early]] = 0.0
        return out

    def _show(self, best_eta: F64, best_conf: F64, best_rate: F64, k: int) -> None:
        """Publish the chosen forecasts, rebuilding only the changed ones."""
        best_conf = self._unused(self._unproven(best_eta, self._stopped(best_eta, best_conf, best_rate),
                                                best_rate))
        shown = self._shown
        if len(shown) != k:
            shown[:] = [Forecast(resource=key, eta_s=None, confidence=0.0, rate_per_s=0.0)
                        for key in self._keys]
            self._shown_arr = (np.full(k, np.nan), np.zeros(k), np.zeros(k))
        old_eta, old_conf, old_rate = self._shown_arr
        changed = np.flatnonzero(((best_eta != old_eta) & ~(np.isnan(best_eta) & np.isnan(old_eta)))
                                 | (best_conf != old_conf) | (best_rate != old_rate))
        if changed.size or len(self.forecasts) != k:
            for i in changed.tolist():
                e, c, rt = float(best_eta[i]), float(best_conf[i]), float(best_rate[i])
                shown[i] = Forecast(resource=self._keys[i], eta_s=e if e == e else None,  # noqa: PLR0124
                                    confidence=round(c, 4), rate_per_s=rt)
            self._shown_arr = (best_eta.copy(), best_conf.copy(), best_rate.copy())
            self.forecasts = tuple(shown)


def _total_key(total: str, resource_key: str) -> str:
    """``total``, or for ``family[*]`` the family with the resource's label."""
    return metric_key(total[:-3], split_key(resource_key)[1]) if total.endswith("[*]") else total


def soonest(forecasts: Sequence[Forecast], min_confidence: float = 0.5) -> Forecast | None:
    """The confident forecast with the smallest ETA, if any."""
    best: Forecast | None = None
    for f in forecasts:
        if f.eta_s is None or f.confidence < min_confidence:
            continue
        if best is None or best.eta_s is None or f.eta_s < best.eta_s:
            best = f
    return best
