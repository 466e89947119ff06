"""Per-sample cost of the score stage, one sample at a time, next to scikit-learn single-row predict.

    python3 bench/pipeline_cost.py [bench/faults/data/host1.npz] [--samples 3000]

Replays recorded samples (real collector output from the fault harness) through
``RiskStage.on_sample`` — features + history + forecasts + classifier + anomaly detector — with
models fitted on the same recording, and times each part separately on the same samples. For
the comparison, the same calibrated classifier is also scored with scikit-learn's
``predict_proba`` on one row, and a k-means with the detector's centroid count with
``KMeans.transform`` on one row (one of the detector's four components only).
Prints, per part, the thread CPU time per sample (robust on a shared host) and the per-call wall
time mean / p50 / p99 in microseconds.
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
    ct = time.thread_time_ns
    cpu: dict[str, int] = dict.fromkeys(rows, 0)
    counts: dict[str, int] = dict.fromkeys(rows, 0)

    def timed(name: str, fn: object, items: list[object]) -> list[object]:
        """Call fn on each item one at a time; per-call wall times, total thread CPU time."""
        out = []
        walls = rows[name]
        c0 = ct()
        for it in items:
            t0 = pc()
            out.append(fn(it))  # type: ignore[operator]
            walls.append(pc() - t0)
        cpu[name] += ct() - c0
        counts[name] += len(items)
        return out

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
        samples = [Sample(node="b", seq=i, wall=1.7e9 + t, mono=t, metrics=m) for i, (m, t) in enumerate(seq)]
        timed("RiskStage.on_sample (all + history)", stage.on_sample, samples)  # type: ignore[arg-type]
        vecs = timed("features (FeatureWindow.push)", lambda s: fw.push(s).copy(), samples)  # type: ignore[arg-type]
        timed("forecast (Forecaster.push)", lambda s: fc.push(s.metrics, s.mono), samples)  # type: ignore[attr-defined]
        timed("classifier (compiled)", scorer.failure, vecs)  # type: ignore[arg-type]
        timed("detector (StreamingDetector.score)", lambda v: sd.score(v[didx]), vecs)  # type: ignore[index]
        xk = feats[:, keep]
        xd = np.nan_to_num(feats[:, cols])
        m1 = min(1000, len(xk))
        timed("sklearn predict_proba, 1 row", cal.predict_proba, [xk[i : i + 1] for i in range(m1)])
        timed("sklearn KMeans.transform, 1 row", km.transform, [xd[i : i + 1] for i in range(m1)])
        stage.close()
    print(f"{len(seq)} samples from {args.recording.name}; schema {schema.dim} features "
          f"({len(keep)} in the classifier, {len(cols)} in the detector)")
    print("wall: per-call perf_counter (includes preemption by other processes on a shared host);")
    print("cpu: this thread's CPU time over all calls / calls (what the agent itself spends)")
    print(f"{'part':40s} {'cpu us':>8s} {'wall mean':>10s} {'wall p50':>9s} {'wall p99':>9s}")
    cpu_us = {k: cpu[k] / 1000.0 / max(1, counts[k]) for k in rows}
    for k, v in rows.items():
        mean, p50, p99 = stats(v)
        print(f"{k:40s} {cpu_us[k]:8.1f} {mean:10.1f} {p50:9.1f} {p99:9.1f}")
    stage_mean = cpu_us["RiskStage.on_sample (all + history)"]
    skl = cpu_us["sklearn predict_proba, 1 row"]
    ours = cpu_us["classifier (compiled)"]
    km_us = cpu_us["sklearn KMeans.transform, 1 row"]
    det_us = cpu_us["detector (StreamingDetector.score)"]
    print(f"\n(cpu) classifier: compiled {ours:.1f} us vs sklearn {skl:.0f} us = {skl / ours:.0f}x cheaper; "
          f"detector (4 components) {det_us:.1f} us vs one sklearn KMeans.transform {km_us:.0f} us = "
          f"{km_us / det_us:.0f}x; whole stage {stage_mean:.1f} us/sample vs the two sklearn calls "
          f"{skl + km_us:.0f} us = {(skl + km_us) / stage_mean:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
