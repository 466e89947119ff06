"""Per-sample cost of the score stage, one sample at a time, next to scikit-learn single-row predict.

    python3 bench/pipeline_cost.py [bench/faults/data/host1.npz] [--samples 3000]

Replays recorded samples (real collector output from the fault harness) through
``RiskStage.on_sample`` — features + history + forecasts + classifier + anomaly detector — with
models fitted on the same recording, and times each part separately on the same samples. For
the comparison, the same calibrated classifier is also scored with scikit-learn's
``predict_proba`` on one row, and a k-means with the detector's centroid count with
``KMeans.transform`` on one row (one of the detector's four components only).
Prints a table of mean / p50 / p99 microseconds per sample.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "faults"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataset

from agent.collect.sample import Sample
from agent.features.schema import FeatureSchema
from agent.features.window import FeatureWindow
from agent.score import classifier as clf
from agent.score import compiled as art
from agent.score.compiled import TrainingWindow
from agent.score.detector import StreamingDetector
from agent.score.fit import fit_detector
from agent.score.forecast import Forecaster
from agent.score.settings import ModelSettings
from agent.score.stage import DETECTOR_FILE, RiskStage


def stats(ns: list[int]) -> tuple[float, float, float]:
    a = np.asarray(ns, dtype=np.float64) / 1000.0
    return float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 99))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recording", nargs="?", type=Path, default=Path("bench/faults/data/host1.npz"))
    ap.add_argument("--samples", type=int, default=3000)
    args = ap.parse_args()
    from sklearn.cluster import KMeans  # noqa: PLC0415 - the comparison side

    rec = dataset.load(args.recording)
    schema = FeatureSchema()
    feats = dataset.features(rec, schema)
    feats[~np.isfinite(feats)] = np.nan
    names = list(schema.names)
    keep = clf.usable_features(feats, names)
    y = np.asarray(rec.label)
    cal = clf.fit_sklearn(feats[:, keep], y, rec.groups(), c_reg=0.1)
    cmodel = clf.compile_calibrated(cal, [names[j] for j in keep], [schema.units[j] for j in keep], schema,
                                    horizon_s=300.0, training=TrainingWindow(rows=len(y)), options={})
    train = feats[:600]
    cols = [j for j in range(train.shape[1]) if np.isfinite(train[:, j]).sum() >= len(train) // 2
            and np.nanmax(train[:, j]) > np.nanmin(train[:, j])]
    det = fit_detector(train[:, cols], [names[j] for j in cols])
    km = KMeans(n_clusters=det.arrays["centroids"].shape[0], n_init=1, random_state=0).fit(
        np.nan_to_num(train[:, cols]))

    metrics = list(rec.metrics())
    n = min(args.samples, len(metrics))
    reps = max(1, -(-args.samples // len(metrics)))
    seq = [(metrics[i % len(metrics)], float(i)) for i in range(n * reps)][: args.samples]
    rows: dict[str, list[int]] = {k: [] for k in (
        "features (FeatureWindow.push)", "forecast (Forecaster.push)", "classifier (compiled)",
        "detector (StreamingDetector.score)", "RiskStage.on_sample (all + history)",
        "sklearn predict_proba, 1 row", "sklearn KMeans.transform, 1 row")}
    pc = time.perf_counter_ns
    with tempfile.TemporaryDirectory() as state:
        art.save(det, Path(state) / "models" / DETECTOR_FILE)
        cpath = Path(state) / "clf.npz"
        clf.save(cmodel, cpath)
        stage = RiskStage(ModelSettings(classifier_path=str(cpath)), state)
        assert not stage.cold
        assert stage.scorer is not None
        fw, fc = FeatureWindow(schema), Forecaster()
        scorer = clf.Scorer(cmodel, names)
        sd = StreamingDetector(det)
        didx = np.array(cols, dtype=np.intp)
        for i, (m, t) in enumerate(seq):
            s = Sample(node="b", seq=i, wall=1.7e9 + t, mono=t, metrics=m)
            t0 = pc()
            stage.on_sample(s)
            t1 = pc()
            v = fw.push_metrics(m, t)
            t2 = pc()
            fc.push(m, t)
            t3 = pc()
            scorer.failure(v)
            t4 = pc()
            sd.score(v[didx])
            t5 = pc()
            rows["RiskStage.on_sample (all + history)"].append(t1 - t0)
            rows["features (FeatureWindow.push)"].append(t2 - t1)
            rows["forecast (Forecaster.push)"].append(t3 - t2)
            rows["classifier (compiled)"].append(t4 - t3)
            rows["detector (StreamingDetector.score)"].append(t5 - t4)
        xk = feats[:, keep]
        xd = np.nan_to_num(feats[:, cols])
        for i in range(min(1000, len(xk))):
            r = xk[i : i + 1]
            t0 = pc()
            cal.predict_proba(r)
            t1 = pc()
            km.transform(xd[i : i + 1])
            t2 = pc()
            rows["sklearn predict_proba, 1 row"].append(t1 - t0)
            rows["sklearn KMeans.transform, 1 row"].append(t2 - t1)
        stage.close()
    print(f"{len(seq)} samples from {args.recording.name}; schema {schema.dim} features "
          f"({len(keep)} in the classifier, {len(cols)} in the detector)")
    print(f"{'part':40s} {'mean us':>9s} {'p50 us':>9s} {'p99 us':>9s}")
    for k, v in rows.items():
        mean, p50, p99 = stats(v)
        print(f"{k:40s} {mean:9.1f} {p50:9.1f} {p99:9.1f}")
    stage_mean = stats(rows["RiskStage.on_sample (all + history)"])[0]
    skl = stats(rows["sklearn predict_proba, 1 row"])[0]
    ours = stats(rows["classifier (compiled)"])[0]
    print(f"\nclassifier: compiled is {skl / ours:.0f}x cheaper than sklearn predict_proba on one row; "
          f"whole stage {stage_mean:.1f} us/sample = {skl / stage_mean:.1f}x cheaper than the classifier "
          "alone in sklearn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
