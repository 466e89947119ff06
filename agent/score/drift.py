"""Drift: how far a node's live features have moved from its anomaly model's training data.

At fit time (:func:`summarize`, in the fitting child) the artifact keeps a compact summary of
the training data: per model feature the nine decile edges (``drift_edges``, ``(d, 9)``), the
share of training rows in each of the ten bins they cut (``drift_expected``, ``(d, 10)``; not a
flat 10 % where values tie) and whether the feature was stable within the training window
(``drift_stable``, ``(d,)``: 1.0 when its second half's PSI against its first half is under
:data:`PSI_MAJOR`). Live, :class:`DriftMonitor` bins each feature vector (d x 9
comparisons and one scatter-add a sample) and, every ``every`` samples, compares the block's bin
shares with the training shares by the population stability index per feature,
``PSI = sum((a - e) * ln(a / e))``. The node's *drift* is the share of informative features
(training deciles not all tied, and stable within the training window: a feature that was
constant, or already wandering, in training says nothing about a later window) whose PSI is
at least :data:`PSI_MAJOR` (0.25, the usual line for a major shift); at or past ``line`` the
stage flags it (logged, in :attr:`agent.score.types.Risk.drift`) and asks for a refit.

Measured on the four fault-free recordings (bench/faults/data; summary of the first 600 idle
samples, 500-sample blocks, every schema feature; docs/lifecycle.md): the next 500 idle samples
score 0.06-0.30, the idle phase after 40 min 0.14-0.40 on the three quiet VMs (0.83 on the
shared VM, where other test suites had started), a change of workload (idle to 50 % CPU stress)
0.09-0.55, the shared VM's idle data fed to a quiet VM's summary 0.68-0.85. The line (0.5)
flags the big moves; a refit is cheap insurance, not a verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
DECILES = np.linspace(0.1, 0.9, 9)
BINS = DECILES.size + 1
PSI_MAJOR = 0.25
DRIFT_LINE = 0.5
DRIFT_EVERY = 600
_SMOOTH = 0.5  # pseudo-count per bin: empty bins give a finite PSI
_CHUNK = 64  # samples binned at once


def summarize(x: F64) -> tuple[F64, F64, F64]:
    """The training summary of ``x`` (rows x features, NaN-free, in time order): decile edges, bin
    shares, and 1.0 for the features stable within the window (0.0 for those that wandered)."""
    edges = np.quantile(x, DECILES, axis=0).T.copy()
    counts = _bin_counts(x, edges)
    expected = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    half = x.shape[0] // 2
    first = _bin_counts(x[:half], edges)
    first /= np.maximum(first.sum(axis=1, keepdims=True), 1.0)
    stable = (psi(_bin_counts(x[half:], edges), first) < PSI_MAJOR).astype(np.float64)
    return edges, expected, stable


def _bin_counts(x: F64, edges: F64) -> F64:
    counts = np.zeros((edges.shape[0], BINS))
    for j in range(edges.shape[0]):  # a column at a time: a day of rows stays a day of rows
        counts[j] = np.bincount(np.searchsorted(edges[j], x[:, j], side="right"), minlength=BINS)
    return counts


def psi(counts: F64, expected: F64) -> F64:
    """Per-feature population stability index of live bin counts against training bin shares."""
    n = counts.sum(axis=1, keepdims=True)
    a = (counts + _SMOOTH) / (n + _SMOOTH * BINS)
    n_train = 1000.0  # the training shares are smoothed as if from this many rows
    e = (expected * n_train + _SMOOTH) / (n_train + _SMOOTH * BINS)
    out: F64 = ((a - e) * np.log(a / e)).sum(axis=1)
    return out


@dataclass(frozen=True, slots=True)
class DriftReport:
    score: float  # share of informative features with PSI >= PSI_MAJOR
    flagged: bool
    samples: int  # in the block compared
    top: tuple[tuple[int, float], ...]  # (model feature index, PSI), largest first, at most 5


class DriftMonitor:
    """Bins live feature vectors; every ``every`` samples, the drift of that block."""

    def __init__(self, edges: F64, expected: F64, stable: F64 | None = None, *, every: int = DRIFT_EVERY,
                 line: float = DRIFT_LINE) -> None:
        self.edges = edges
        self.expected = expected
        self.every = every
        self.line = line
        d = edges.shape[0]
        self.informative = (edges[:, -1] > edges[:, 0]) & (True if stable is None else stable > 0)
        self._counts = np.zeros((d, BINS))
        # Samples are binned in bulk, a chunk at a time: a sample costs one row copy, not a
        # handful of numpy calls (the counts are the same).
        self._buf = np.empty((min(every, _CHUNK), d))
        self._n = 0  # rows of _buf holding samples not binned yet
        self._flat = np.arange(d) * BINS  # column c's bin b is flat count c * BINS + b
        self._seen = 0
        self.last: DriftReport | None = None

    def push(self, vec: F64) -> DriftReport | None:
        """One sample's model features; a report when this sample completes a block."""
        self._buf[self._n] = vec
        self._n += 1
        self._seen += 1
        if self._n == self._buf.shape[0]:
            self._bin()
        if self._seen < self.every:
            return None
        return self._check()

    def _bin(self) -> None:
        """Add the buffered samples to the counts: per feature, the bin each finite value falls in."""
        rows = self._buf[: self._n]
        self._n = 0
        finite = np.isfinite(rows)
        bins = (rows[:, :, None] >= self.edges).sum(axis=2)
        flat = (bins + self._flat)[finite]
        self._counts += np.bincount(flat, minlength=self._counts.size).reshape(self._counts.shape)

    def _check(self) -> DriftReport:
        self._bin()
        counts, self._counts, seen, self._seen = self._counts, np.zeros_like(self._counts), self._seen, 0
        values = psi(counts, self.expected)
        live = self.informative & (counts.sum(axis=1) > 0)
        n = int(live.sum())
        score = float(np.mean(values[live] >= PSI_MAJOR)) if n else 0.0
        order = np.argsort(-np.where(live, values, -math.inf))[:5]
        top = tuple((int(i), round(float(values[i]), 3)) for i in order if live[i])
        self.last = DriftReport(score=round(score, 3), flagged=n > 0 and score >= self.line, samples=seen,
                                top=top)
        return self.last
