"""Per-sample scoring cost: heald's compiled numpy scorer vs scikit-learn on one row.

    python3 bench/scoring.py [--data ../shared/data/smd/machine-1-6.npz] [--rows 5000] [--repeats 5]

Fits heald's detector on the dataset's ``train`` rows (synthetic data if the file is absent),
then times, one row at a time over the first ``--rows`` test rows:

* heald: ``StreamingDetector.score(row)`` (robust z + k-means distance + delta + EWMA + alert);
* sklearn, for each estimator inside the detector fitted on the same rows with the same
  parameters: ``RobustScaler.transform`` (the robust-z centring/scaling), ``KMeans.transform``
  and ``KMeans.predict`` on a ``(1, d)`` row; "sklearn total" is robust scaler + k-means
  transform, the work sklearn would do per sample for the same model;
* for context, the evaluation baselines on one row: PCA reconstruction and
  ``IsolationForest.score_samples`` (100 trees).

Each figure is the median over ``--repeats`` passes (min..max shown). Writes
bench/results/scoring.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.preprocessing import RobustScaler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.score.detector import StreamingDetector  # noqa: E402
from agent.score.fit import FitOptions, fit_detector  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "smd" / "machine-1-6.npz"


def load(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    if path.is_file():
        with np.load(path) as z:
            return z["train"].astype(np.float64), z["test"].astype(np.float64), path.name
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 38)).cumsum(axis=0) * 0.01
    return x[:10000], x[10000:], "synthetic[20000,38]"


def per_row_us(fn: Callable[[np.ndarray], object], rows: np.ndarray, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        fn(rows[0])
        t0 = time.perf_counter_ns()
        for i in range(rows.shape[0]):
            fn(rows[i])
        out.append((time.perf_counter_ns() - t0) / 1e3 / rows.shape[0])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="300 rows, one repeat, no results file")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.repeats = 300, 1

    train, test, name = load(args.data)
    rows = test[: args.rows]
    d = train.shape[1]
    names = [f"f{i}" for i in range(d)]
    opts = FitOptions()
    model = fit_detector(train, names)
    det = StreamingDetector(model)

    stride = max(1, -(-train.shape[0] // opts.max_fit_rows))
    km = KMeans(n_clusters=opts.n_clusters, n_init=3, random_state=opts.random_state).fit(train[::stride])
    assert np.allclose(km.cluster_centers_, model.arrays["centroids"]), "refit k-means differs"
    scaler = RobustScaler().fit(train)
    pca = PCA(n_components=0.95, svd_solver="full").fit(train)
    forest = IsolationForest(n_estimators=100, random_state=0).fit(train)

    def one(f: Callable[[np.ndarray], object]) -> Callable[[np.ndarray], object]:
        return lambda row: f(row.reshape(1, -1))

    cases: dict[str, tuple[Callable[[np.ndarray], object], np.ndarray]] = {
        "heald StreamingDetector.score": (det.score, rows),
        "sklearn RobustScaler.transform": (one(scaler.transform), rows),
        "sklearn KMeans.transform": (one(km.transform), rows),
        "sklearn KMeans.predict": (one(km.predict), rows),
        "sklearn PCA reconstruction (baseline)": (
            one(lambda r: pca.inverse_transform(pca.transform(r))), rows),
        "sklearn IsolationForest.score_samples (baseline)": (one(forest.score_samples), rows[:300]),
    }
    results: dict[str, dict[str, float]] = {}
    for label, (fn, rr) in cases.items():
        samples = per_row_us(fn, rr, args.repeats)
        results[label] = {"us_median": statistics.median(samples), "us_min": min(samples),
                          "us_max": max(samples), "rows": int(rr.shape[0])}
    heald_us = results["heald StreamingDetector.score"]["us_median"]
    total = (results["sklearn RobustScaler.transform"]["us_median"]
             + results["sklearn KMeans.transform"]["us_median"])
    results["sklearn total (RobustScaler + KMeans.transform)"] = {
        "us_median": total, "us_min": float("nan"), "us_max": float("nan"), "rows": int(rows.shape[0])}

    width = max(len(k) for k in results)
    print(f"data: {name}, {d} features, {rows.shape[0]} rows one at a time, {args.repeats} repeats; "
          f"python {platform.python_version()}, numpy {np.__version__}")
    print(f"{'scorer'.ljust(width)}  {'µs/sample':>10}  {'min..max':>15}  {'x heald':>8}")
    print(f"{'-' * width}  {'-' * 10}  {'-' * 15}  {'-' * 8}")
    for label, r in results.items():
        rng_s = f"{r['us_min']:.1f}..{r['us_max']:.1f}" if np.isfinite(r["us_min"]) else ""
        r["ratio_to_heald"] = r["us_median"] / heald_us
        print(f"{label.ljust(width)}  {r['us_median']:10.1f}  {rng_s:>15}  {r['ratio_to_heald']:8.1f}")

    out = ROOT / "bench" / "results" / "scoring.json"
    if args.smoke:
        print(f"smoke run: {out.relative_to(ROOT)} left as it was")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "data": name, "features": d, "rows": int(rows.shape[0]), "repeats": args.repeats,
        "python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
        "results": {k: {kk: (vv if not (isinstance(vv, float) and np.isnan(vv)) else None)
                        for kk, vv in v.items()} for k, v in results.items()},
    }, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
