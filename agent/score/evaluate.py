"""Offline evaluation of heald's anomaly detector against baselines (``heald model evaluate``).

For each ``*.npz`` (arrays ``train``, ``test``, ``test_label``) in a directory: fit heald's
detector on ``train`` and score ``test`` causally, **one row at a time through
StreamingDetector**, timing the loop; then the same for baselines computed in the same run:

* ``pca``: scikit-learn PCA keeping 95% of the variance, squared reconstruction error;
* ``iforest``: scikit-learn IsolationForest with 100 trees, ``-score_samples``;
* ``random``: uniform random scores.

Baseline thresholds are the same train quantile heald uses (label-free). Baseline scores are
computed in batch (identical values); their ``us_per_sample`` is the single-row latency of
sklearn's ``transform``+``inverse_transform`` / ``score_samples`` measured on a subset of rows.

The test rows carry no timestamps: heald's detector is given row ``i`` at ``i * sample_interval_s``
seconds (60: SMD's and, conservatively, NAB's 5-minute samples are at least a minute apart), which
is what its fast channel's minimum duration is judged by (:mod:`agent.score.detector`).

Metrics per detector: AUC-PR (``average_precision_score``), point-F1 at the label-free
threshold, event recall (labelled anomaly segments with >= 1 alert inside), mean detection
delay in samples (segment start to first alert, over detected segments) and µs per sample.
Like :mod:`agent.score.fit`, this module is for the CLI only: it imports scikit-learn.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt

from agent.errors import InputError, Problem
from agent.score.artifact import F64
from agent.score.detector import StreamingDetector

DETECTORS: tuple[str, ...] = ("heald", "pca", "iforest", "random")
METRICS: tuple[str, ...] = ("auc_pr", "f1", "event_recall", "delay_mean", "us_per_sample")
TIMED_ROWS = {"pca": 500, "iforest": 100, "random": 2000}

Progress = Callable[[str], None]
# Metric name -> value (None where it is undefined, e.g. AUC-PR without a labelled anomaly).
Metrics = dict[str, float | None]


class Evaluation(TypedDict):
    """The ``heald model evaluate --json`` object."""

    files: dict[str, dict[str, Metrics]]  # file stem -> detector -> metrics
    mean: dict[str, Metrics]  # detector -> metric means over the files


def segments(labels: npt.ArrayLike) -> list[tuple[int, int]]:
    """Half-open ``[start, end)`` runs of 1 in a 0/1 label vector."""
    y = np.asarray(labels).astype(np.int8).ravel()
    padded = np.concatenate(([0], y, [0]))
    edges = np.flatnonzero(np.diff(padded))
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2], strict=True)]


def metrics(scores: F64, alerts: npt.NDArray[np.bool_], labels: npt.ArrayLike) -> Metrics:
    """AUC-PR, point-F1 of ``alerts``, event recall and mean detection delay (samples)."""
    from sklearn.metrics import average_precision_score  # noqa: PLC0415

    y = np.asarray(labels).astype(bool).ravel()
    out: Metrics = {}
    out["auc_pr"] = float(average_precision_score(y, scores)) if y.any() else None
    tp = int(np.sum(alerts & y))
    precision = tp / max(int(alerts.sum()), 1)
    recall = tp / max(int(y.sum()), 1)
    out["f1"] = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    segs = segments(y)
    delays = []
    for start, end in segs:
        hits = np.flatnonzero(alerts[start:end])
        if hits.size:
            delays.append(int(hits[0]))
    out["event_recall"] = len(delays) / len(segs) if segs else None
    out["delay_mean"] = float(np.mean(delays)) if delays else None
    out["alert_rate"] = float(alerts.mean()) if alerts.size else 0.0
    return out


def _time_rows(fn: Callable[[F64], object], rows: F64) -> float:
    """Mean µs of ``fn(row[None, :])`` over ``rows``, one call per row."""
    fn(rows[:1])  # warm up
    t0 = time.perf_counter_ns()
    for i in range(rows.shape[0]):
        fn(rows[i : i + 1])
    elapsed_ns: int = time.perf_counter_ns() - t0
    return elapsed_ns / 1e3 / max(int(rows.shape[0]), 1)


def load_dataset(path: Path, max_rows: int | None = None) -> tuple[F64, F64, npt.NDArray[np.uint8]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            train = np.asarray(z["train"], dtype=np.float64)
            test = np.asarray(z["test"], dtype=np.float64)
            label = np.asarray(z["test_label"]).astype(np.uint8).ravel()
    except KeyError as exc:
        raise InputError([Problem(str(path), str(exc).strip("'\""), "array missing")]) from None
    except (OSError, ValueError) as exc:
        raise InputError([Problem(str(path), "", f"not a readable .npz dataset: {exc}")]) from None
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1] or len(label) != len(test):
        raise InputError([Problem(str(path), "", "need train [n, d], test [m, d], test_label [m]")])
    if max_rows is not None:
        test, label = test[:max_rows], label[:max_rows]
    return train, test, label


SAMPLE_INTERVAL_S = 60.0


def evaluate_file(path: Path, *, max_rows: int | None = None, seed: int = 0,
                  progress: Progress | None = None, sample_interval_s: float = SAMPLE_INTERVAL_S,
                  **fit_opts: Any) -> dict[str, Metrics]:
    """All detectors on one dataset file."""
    from sklearn.decomposition import PCA  # noqa: PLC0415
    from sklearn.ensemble import IsolationForest  # noqa: PLC0415

    from agent.score.fit import FitOptions, fit_detector  # noqa: PLC0415

    def note(what: str) -> None:
        if progress is not None:
            progress(f"{path.name}: {what}")

    train, test, label = load_dataset(path, max_rows)
    names = [f"f{i}" for i in range(train.shape[1])]
    q = fit_opts.get("threshold_quantile", FitOptions().threshold_quantile)
    results: dict[str, Metrics] = {}

    note("fitting heald")
    t0 = time.perf_counter()
    model = fit_detector(train, names, source=path.name, **fit_opts)
    fit_s = time.perf_counter() - t0
    det = StreamingDetector(model)
    note("scoring heald one row at a time")
    scores = np.empty(test.shape[0])
    alerts = np.empty(test.shape[0], dtype=bool)
    fast_only = np.zeros(test.shape[0], dtype=bool)
    score = det.score
    times = (np.arange(test.shape[0], dtype=np.float64) * sample_interval_s).tolist()
    t0_ns = time.perf_counter_ns()
    for i in range(test.shape[0]):
        scores[i], alerts[i] = score(test[i], times[i])
        if alerts[i]:
            fast_only[i] = det.channel == "fast"
    us = (time.perf_counter_ns() - t0_ns) / 1e3 / max(test.shape[0], 1)
    results["heald"] = {**metrics(scores, alerts, label), "us_per_sample": us, "fit_s": fit_s,
                        # the share of the alerts that the fast channel made alone
                        "fast_only": float(fast_only.sum() / max(int(alerts.sum()), 1))}

    note("PCA baseline")
    t0 = time.perf_counter()
    pca = PCA(n_components=0.95, svd_solver="full").fit(train)
    fit_s = time.perf_counter() - t0

    def pca_err(x: F64) -> F64:
        r = x - pca.inverse_transform(pca.transform(x))
        err: F64 = (r * r).sum(axis=1)
        return err

    s = pca_err(test)
    thr = float(np.quantile(pca_err(train), q))
    us = _time_rows(pca_err, test[: TIMED_ROWS["pca"]])
    results["pca"] = {**metrics(s, s >= thr, label), "us_per_sample": us, "fit_s": fit_s}

    note("IsolationForest baseline")
    t0 = time.perf_counter()
    forest = IsolationForest(n_estimators=100, random_state=seed).fit(train)
    fit_s = time.perf_counter() - t0
    s_forest: F64 = -forest.score_samples(test)
    thr = float(np.quantile(-forest.score_samples(train), q))
    us = _time_rows(forest.score_samples, test[: TIMED_ROWS["iforest"]])
    results["iforest"] = {**metrics(s_forest, s_forest >= thr, label), "us_per_sample": us, "fit_s": fit_s}

    rng = np.random.default_rng(seed)
    thr = float(np.quantile(rng.random(train.shape[0]), q))
    s_random: F64 = np.asarray(rng.random(size=(test.shape[0],)), dtype=np.float64)

    def one_random(_row: F64) -> float:
        return rng.random()

    us = _time_rows(one_random, test[: TIMED_ROWS["random"]])
    results["random"] = {**metrics(s_random, s_random >= thr, label), "us_per_sample": us, "fit_s": 0.0}
    return results


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def evaluate_dir(directory: str | Path, *, max_rows: int | None = None, seed: int = 0,
                 progress: Progress | None = None, sample_interval_s: float = SAMPLE_INTERVAL_S,
                 **fit_opts: Any) -> Evaluation:
    """Evaluate every ``*.npz`` in ``directory``; the ``heald model evaluate --json`` object."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError([Problem(str(d), "", "not a directory")])
    paths = sorted(d.glob("*.npz"))
    if not paths:
        raise InputError([Problem(str(d), "", "no *.npz datasets in this directory")])
    files: dict[str, dict[str, Metrics]] = {}
    for i, path in enumerate(paths):
        prefix = f"[{i + 1}/{len(paths)}] "

        def step(msg: str, prefix: str = prefix) -> None:
            if progress is not None:
                progress(prefix + msg)

        files[path.stem] = evaluate_file(path, max_rows=max_rows, seed=seed, progress=step,
                                         sample_interval_s=sample_interval_s, **fit_opts)
    mean = {
        det: {m: _mean([files[f][det][m] for f in files]) for m in METRICS}
        for det in DETECTORS
    }
    return {"files": files, "mean": mean}
