"""Fit the anomaly detector with scikit-learn and compile it into plain numpy arrays.

This module (with :mod:`agent.score.evaluate`) is the only place heald imports scikit-learn, and
only inside functions: the daemon calls :func:`fit_in_child`, which runs
``python -m agent model train --input TRAIN --output ARTIFACT`` as a short-lived child process
(argv list, timeout, reaped) that writes the compiled artifact atomically. The daemon then
loads the artifact with :func:`agent.score.compiled.load` and never pays for scikit-learn.

The method (chosen by measurement on SMD, see ``docs/model.md``): per-feature robust z-scores
(median/MAD, top-5 mean), distance to the nearest of 16 k-means centroids, and the squared norm
of the first difference, each normalised by its 99th training percentile, summed and smoothed
by an arithmetic and a geometric EWMA (alpha 0.1), plus a fast channel (an EWMA with alpha 0.5 that
alerts only when over its line for ``fast_min_s`` seconds). Each alert threshold is a high quantile
of its smoother's value over the training data times a margin: no labels are involved.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from agent.errors import InputError, ModelError, Problem
from agent.score import compiled as art
from agent.score import drift
from agent.score.artifact import F64, FeatureSpec, TrainingWindow
from agent.score.compiled import COMPONENTS, ArtifactMeta, CompiledDetector
from agent.score.detector import combine, component_scores, ewma, geo_ewma


class FitOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Fitting options; stored in the artifact's metadata."""

    n_clusters: int = 16
    top_k: int = 5
    scale_floor: float = 0.2  # robust scale >= this fraction of the standard deviation
    scale_min: float = 1e-3  # and >= this absolute value (in the feature's unit)
    ewma_alpha: float = 0.1
    divisor_quantile: float = 0.99
    threshold_quantile: float = 0.995  # the arithmetic EWMA's threshold (and the fast channel's)
    geo_quantile: float = 0.98  # the geometric EWMA's threshold (research log #59)
    threshold_margin: float = 1.0  # on every threshold
    # The fast channel (research log #61): an arithmetic EWMA with fast_alpha of the raw score over
    # its own threshold (train threshold_quantile x fast_margin x threshold_margin); it alerts once
    # over the line for fast_min_s seconds of sample time. fast=False fits without it.
    fast: bool = True
    fast_alpha: float = 0.5
    fast_margin: float = 1.3
    fast_power: float = 0.2
    fast_min_s: float = 15.0
    # Weights of robust_z, kmeans, delta, pca (0 switches a component off).
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.0)
    pca_variance: float = 0.95
    max_fit_rows: int = 50_000  # k-means/PCA fit on at most this many rows (evenly strided)
    random_state: int = 0
    # Left out of the model: feature names ("cpu.util_pct:ewma") or whole inputs ("cpu.util_pct",
    # "max(disk.util_pct[*])": all six transforms), e.g. workload levels that a healthy node
    # changes at will (see agent.score.stage.DEFAULT_FIT_OPTIONS).
    exclude: tuple[str, ...] = ()


def _problem(message: str, key: str = "") -> InputError:
    return InputError([Problem(file="fit options", key=key, message=message)])


def check_options(opts: FitOptions) -> None:
    problems = []
    if not 1 <= opts.n_clusters <= 4096:
        problems.append(Problem("fit options", "n_clusters", "must be in [1, 4096]"))
    if opts.top_k < 1:
        problems.append(Problem("fit options", "top_k", "must be >= 1"))
    if not 0 < opts.ewma_alpha <= 1:
        problems.append(Problem("fit options", "ewma_alpha", "must be in (0, 1]"))
    problems.extend(
        Problem("fit options", key, "must be in (0, 1]")
        for key in ("divisor_quantile", "threshold_quantile", "geo_quantile", "pca_variance", "fast_alpha")
        if not 0 < getattr(opts, key) <= 1
    )
    problems.extend(Problem("fit options", key, "must be positive")
                    for key in ("threshold_margin", "fast_margin", "fast_power")
                    if not (np.isfinite(getattr(opts, key)) and getattr(opts, key) > 0))
    if not (np.isfinite(opts.fast_min_s) and opts.fast_min_s >= 0):
        problems.append(Problem("fit options", "fast_min_s", "must be >= 0 seconds"))
    if any(w < 0 for w in opts.weights) or not any(w > 0 for w in opts.weights):
        problems.append(Problem("fit options", "weights", "must be >= 0 with at least one > 0"))
    if opts.scale_floor < 0:
        problems.append(Problem("fit options", "scale_floor", "must be >= 0"))
    if not opts.scale_min > 0:
        problems.append(Problem("fit options", "scale_min", "must be > 0"))
    if opts.max_fit_rows < 2:
        problems.append(Problem("fit options", "max_fit_rows", "must be >= 2"))
    if problems:
        raise InputError(problems)


def compile_kmeans(km: Any) -> tuple[F64, F64]:
    """A fitted ``sklearn.cluster.KMeans`` -> (centroids, squared centroid norms)."""
    c = np.ascontiguousarray(km.cluster_centers_, dtype=np.float64)
    return c, (c * c).sum(axis=1)


def compile_pca(pca: Any) -> tuple[F64, F64]:
    """A fitted ``sklearn.decomposition.PCA`` (no whitening) -> (mean, components)."""
    if getattr(pca, "whiten", False):
        raise ModelError("cannot compile a whitened PCA")
    return (np.ascontiguousarray(pca.mean_, dtype=np.float64),
            np.ascontiguousarray(pca.components_, dtype=np.float64))


def _clean_train(train: npt.ArrayLike) -> F64:
    x = np.array(train, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise _problem(f"training data must be a 2-D array of >= 2 rows, got shape {x.shape}", "train")
    x[~np.isfinite(x)] = np.nan
    keep = ~np.all(np.isnan(x), axis=1)
    x = x[keep]
    if x.shape[0] < 2:
        raise _problem("training data has fewer than 2 rows with any value", "train")
    empty = np.all(np.isnan(x), axis=0)
    if empty.any():
        cols = np.flatnonzero(empty)[:5].tolist()
        raise _problem(f"feature columns {cols} have no finite value in the training data", "train")
    if np.isnan(x).any():
        med = np.nanmedian(x, axis=0)
        rows, cols = np.nonzero(np.isnan(x))
        x[rows, cols] = med[cols]
    result: F64 = x
    return result


def fit_detector(
    train: npt.ArrayLike,
    feature_names: Sequence[str],
    *,
    units: Sequence[str] | None = None,
    train_start: float | None = None,
    train_end: float | None = None,
    source: str = "",
    **opts: object,
) -> CompiledDetector:
    """Fit on ``train`` (rows in time order, columns = ``feature_names``) and compile.

    ``opts`` are :class:`FitOptions` fields. Missing values (NaN) are imputed with the column
    median. Raises :class:`~agent.errors.InputError` for bad data or options.
    """
    import sklearn  # noqa: PLC0415  (training only: never imported by the daemon)
    from sklearn.cluster import KMeans  # noqa: PLC0415
    from sklearn.decomposition import PCA  # noqa: PLC0415

    try:
        options = msgspec.convert(opts, FitOptions)
    except msgspec.ValidationError as exc:
        raise _problem(str(exc)) from None
    x = _clean_train(train)
    n, d = x.shape
    names = list(feature_names)
    if len(names) != d:
        raise _problem(f"{len(names)} feature names for {d} columns", "feature_names")
    if len(set(names)) != d:
        raise _problem("feature names are not unique", "feature_names")
    unit_list = list(units) if units is not None else [""] * d
    if len(unit_list) != d:
        raise _problem(f"{len(unit_list)} units for {d} columns", "units")
    check_options(options)
    if options.exclude:
        out = set(options.exclude)
        keep = [j for j, nm in enumerate(names) if nm not in out and nm.rpartition(":")[0] not in out]
        if not keep:
            raise _problem("every feature is excluded", "exclude")
        x, names, unit_list = x[:, keep], [names[j] for j in keep], [unit_list[j] for j in keep]
        n, d = x.shape

    median = np.median(x, axis=0)
    mad = np.median(np.abs(x - median), axis=0) * 1.4826
    scale = np.maximum(np.maximum(mad, options.scale_floor * x.std(axis=0)), options.scale_min)

    stride = max(1, -(-n // options.max_fit_rows))
    xf = x[::stride]
    k = min(options.n_clusters, xf.shape[0])
    km = KMeans(n_clusters=k, n_init=3, random_state=options.random_state).fit(xf)
    centroids, centroid_sq = compile_kmeans(km)

    if options.weights[3] > 0:
        pca = PCA(n_components=options.pca_variance if options.pca_variance < 1 else None,
                  svd_solver="full").fit(xf)
        pca_mean, pca_components = compile_pca(pca)
    else:
        pca_mean, pca_components = np.zeros(d), np.zeros((0, d))

    n_comp = len(COMPONENTS)
    arrays: dict[str, npt.ArrayLike] = {
        "median": median, "scale": scale, "centroids": centroids, "centroid_sq": centroid_sq,
        "pca_mean": pca_mean, "pca_components": pca_components,
        "divisors": np.ones(n_comp), "weights": np.asarray(options.weights, dtype=np.float64),
    }
    # the training summary that live drift is measured against (agent.score.drift)
    arrays["drift_edges"], arrays["drift_expected"], arrays["drift_stable"] = drift.summarize(x)

    def meta(threshold: float, threshold_geo: float = 1.0, threshold_fast: float | None = None,
             ) -> ArtifactMeta:
        return ArtifactMeta(
            format_version=art.FORMAT_VERSION,
            kind=art.KIND,
            features=tuple(FeatureSpec(name=nm, unit=u) for nm, u in zip(names, unit_list, strict=True)),
            training=TrainingWindow(rows=n, start=train_start, end=train_end, source=source),
            threshold=threshold,
            threshold_geo=threshold_geo,
            ewma_alpha=options.ewma_alpha,
            top_k=min(options.top_k, d),  # robust z averages the top_k largest (at most d)
            options=msgspec.json.decode(msgspec.json.encode(options)),
            sklearn_version=sklearn.__version__,
            numpy_version=np.__version__,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            threshold_fast=threshold_fast,
            fast_alpha=options.fast_alpha,
            fast_power=options.fast_power,
            fast_min_s=options.fast_min_s,
        )

    provisional = art.build(meta(1.0), arrays)
    comps = component_scores(provisional, x)
    divisors = np.quantile(comps, options.divisor_quantile, axis=0)
    divisors = np.where(divisors > 1e-12, divisors, 1.0)
    arrays["divisors"] = divisors
    provisional = art.build(meta(1.0), arrays)
    raw = combine(provisional, comps)

    def limit(smoothed: F64, quantile: float, margin: float = 1.0) -> float:
        t = float(np.quantile(smoothed, quantile)) * options.threshold_margin * margin
        return t if t > 0 and np.isfinite(t) else 1.0

    alpha, q = options.ewma_alpha, options.threshold_quantile
    fast = limit(ewma(raw, options.fast_alpha), q, options.fast_margin) if options.fast else None
    geo = limit(geo_ewma(raw, alpha), options.geo_quantile)
    return art.build(meta(limit(ewma(raw, alpha), q), geo, fast), arrays)


def load_training(path: str | os.PathLike[str]) -> tuple[F64, list[str], list[str] | None]:
    """Read training rows from ``.npz`` (array ``train``, optional ``feature_names``/``units``),
    ``.npy`` or ``.csv`` (header row of feature names; empty cells are missing values)."""
    p = Path(path)
    where = str(p)
    units: list[str] | None = None
    try:
        if p.suffix == ".csv":
            with p.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
            if len(rows) < 2:
                raise InputError([Problem(where, "", "CSV needs a header row and >= 1 data row")])
            names = [h.strip() for h in rows[0]]
            data = np.full((len(rows) - 1, len(names)), np.nan)
            for i, row in enumerate(rows[1:]):
                if len(row) != len(names):
                    raise InputError([Problem(where, "", f"{len(row)} cells, header has {len(names)}",
                                              line=i + 2)])
                for j, cell in enumerate(row):
                    if cell.strip():
                        try:
                            data[i, j] = float(cell)
                        except ValueError:
                            raise InputError([Problem(where, names[j], f"not a number: {cell!r}",
                                                      line=i + 2)]) from None
            return data, names, None
        loaded = np.load(p, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            data = np.asarray(loaded, dtype=np.float64)
            names = [f"f{i}" for i in range(data.shape[1] if data.ndim == 2 else 0)]
        else:
            with loaded as z:
                key = "train" if "train" in z.files else (z.files[0] if len(z.files) == 1 else None)
                if key is None:
                    raise InputError([Problem(where, "train", "no 'train' array in the archive")])
                data = np.asarray(z[key], dtype=np.float64)
                ncol = data.shape[1] if data.ndim == 2 else 0
                names = ([str(s) for s in z["feature_names"]] if "feature_names" in z.files
                         else [f"f{i}" for i in range(ncol)])
                if "units" in z.files:
                    units = [str(s) for s in z["units"]]
    except OSError as exc:
        raise InputError([Problem(where, "", f"cannot read: {exc.strerror or exc}")]) from None
    except ValueError as exc:
        raise InputError([Problem(where, "", f"not a numeric .npz/.npy/.csv file: {exc}")]) from None
    if data.ndim != 2:
        raise InputError([Problem(where, "train", f"expected a 2-D array, got shape {data.shape}")])
    return data, names, units


def fit_file(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
             **opts: Any) -> CompiledDetector:
    """Fit on a training file and write the artifact atomically. ``opts``: :class:`FitOptions`
    fields (Any: they are passed on next to fit_detector's own keywords, so object would not do)."""
    data, names, units = load_training(input_path)
    model = fit_detector(data, names, units=units, source=Path(input_path).name, **opts)
    art.save(model, output_path)
    return model


def fit_in_child(
    train_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    options: Mapping[str, object] | None = None,
    timeout_s: float = 600.0,
    feature_names: Sequence[str] | None = None,
) -> CompiledDetector:
    """Fit in a short-lived ``python -m agent model train`` child and load its verified artifact.

    Blocking (the daemon wraps it in ``asyncio.to_thread``). The child is killed and reaped on
    timeout. Raises :class:`~agent.errors.ModelError` if the child fails or times out.
    """
    argv = [sys.executable, "-m", "agent", "model", "train", "--input", os.fspath(train_path),
            "--output", os.fspath(out_path)]
    if options:
        argv += ["--options", msgspec.json.encode(options).decode()]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        # subprocess.run has killed and waited for the child already.
        raise ModelError(f"model fitting on {train_path} timed out after {timeout_s:g} s") from None
    except OSError as exc:
        raise ModelError(f"cannot start the model-fitting process: {exc}") from None
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", errors="replace").strip().splitlines()[-5:]
        raise ModelError(f"model fitting on {train_path} failed (exit {proc.returncode}): "
                         + " | ".join(tail))
    return art.load(out_path, None if feature_names is None else list(feature_names))


OOM_SCORE_ADJ = "/proc/self/oom_score_adj"


def leave_oom_protection(path: str | None = None) -> None:
    """Give up the daemon's OOM protection (heald.service: OOMScoreAdjust=-900, inherited).

    Under memory pressure the kernel must kill the fit before the healer. Raising the value back
    to 0 needs no privilege; a value already >= 0 is left alone (lowering it might not be
    allowed), and any failure (no /proc, a read-only file) is ignored: fitting matters more.
    """
    path = path or OOM_SCORE_ADJ
    try:
        with open(path, encoding="ascii") as fh:
            current = int(fh.read().strip() or "0")
        if current < 0:
            with open(path, "w", encoding="ascii") as fh:
                fh.write("0\n")
    except (OSError, ValueError):
        pass
