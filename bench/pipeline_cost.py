"""Per-sample cost of the score stage, one sample at a time, next to scikit-learn single-row predict.

    python3 bench/pipeline_cost.py [bench/faults/data/host1.npz] [--samples 5000] [--repeats 3]
    python3 bench/pipeline_cost.py --in-daemon [--seconds 300]
    python3 bench/pipeline_cost.py --smoke [--in-daemon]

``--in-daemon``: what a node really pays, measured inside a running ``heald run`` at 1 Hz (cold
caches and per-call overhead included): the daemon's own ``heald_pipeline_cpu_seconds`` summary
(thread CPU of the event loop around ``RiskStage.on_sample`` and around the playbook evaluation,
docs/metrics.md), read from its ``/metrics`` on a free loopback port twice a second; every sample
the scrapes see alone gives one value (mean over all samples after the warm-up, p50/p90/p99 over
those values). The agent runs as a fleet node (bench/healdbench.py): MQTT on to a private
mosquitto, the detector fitted before start (``heald_risk_cold`` must be 0), the shipped playbooks
forced into dry-run; its start summary and audit log are checked afterwards (an enforced run fails
the bench, exit 3). ``--smoke``: a few hundred samples, one run (with ``--in-daemon``: 8 s).

Replays recorded samples (real collector output from the fault harness) through
``RiskStage.on_sample`` — features + history + forecasts + classifier + anomaly detector — with
models fitted on the same recording, and times each part separately on the same samples. For
the comparison, the same calibrated classifier is also scored with scikit-learn's
``predict_proba`` on one row, and a k-means with the detector's centroid count with
``KMeans.transform`` on one row (one of the detector's four components only).
Prints, per part, the thread and process CPU time per sample (robust on a shared host) and the
per-call wall time mean / p50 / p99 in microseconds; the whole measurement runs ``--repeats``
times and the median of the runs is shown. The detector's ``explain`` (which the stage calls
when the score is >= 1) is shown amortised over all samples.

The stage runs with the native kernels when they are built (agent/native; the header says
which), ``--numpy`` forces the numpy reference path for comparison. As in the daemon, full
chunks of the feature history are written outside the sample path (there by the refit task's
worker thread, here between samples, untimed); their cost is shown on its own row, amortised.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "faults"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dataset
import healdbench as hb

from agent.collect.sample import Sample
from agent.features.schema import FeatureSchema
from agent.features.window import FeatureWindow
from agent.score import classifier as clf
from agent.score import classifier_train as clf_train
from agent.score import compiled as art
from agent.score.artifact import TrainingWindow
from agent.score.detector import StreamingDetector
from agent.score.fit import fit_detector
from agent.score.forecast import Forecaster
from agent.score.settings import ModelSettings
from agent.score.stage import DETECTOR_FILE, RiskStage


def stats(ns: list[int]) -> tuple[float, float, float]:
    if not ns:  # e.g. no sample scored >= 1 in a short --smoke run: nothing to explain
        return float("nan"), float("nan"), float("nan")
    a = np.asarray(ns, dtype=np.float64) / 1000.0
    return float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 99))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recording", nargs="?", type=Path, default=Path("bench/faults/data/host1.npz"))
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the whole measurement (median shown)")
    ap.add_argument("--numpy", action="store_true", help="score with the numpy path, not the C kernels")
    ap.add_argument("--in-daemon", action="store_true",
                    help="measure inside a running heald (1 Hz, MQTT on, detector fitted, dry-run)")
    ap.add_argument("--seconds", type=float, default=300.0, help="--in-daemon: measured seconds")
    ap.add_argument("--warmup", type=float, default=10.0, help="--in-daemon: seconds before measuring")
    ap.add_argument("--smoke", action="store_true", help="seconds, not minutes: checks the bench works")
    args = ap.parse_args()
    if args.smoke:
        args.samples, args.repeats, args.seconds, args.warmup = 300, 1, 8.0, 3.0
    if args.numpy:
        os.environ["HEALD_KERNELS"] = "0"
    from agent.native import kernels  # noqa: PLC0415 - after the environment is set
    native = kernels() is not None
    if args.in_daemon:
        return in_daemon(args, native)
    from sklearn.cluster import KMeans  # noqa: PLC0415 - the comparison side

    rec = dataset.load(args.recording)
    schema = FeatureSchema()
    feats = dataset.features(rec, schema)
    feats[~np.isfinite(feats)] = np.nan
    names = list(schema.names)
    keep = clf_train.usable_features(feats, names)
    y = np.asarray(rec.label)
    kept = [names[j] for j in keep]
    cal = clf_train.fit_sklearn(feats[:, keep], y, rec.groups(), c_reg=0.1, feature_names=kept)
    cmodel = clf_train.compile_calibrated(cal, kept, [schema.units[j] for j in keep], schema,
                                          horizon_s=300.0, training=TrainingWindow(rows=len(y)), options={})
    train = feats[:600]
    cols = [j for j in range(train.shape[1]) if np.isfinite(train[:, j]).sum() >= len(train) // 2
            and np.nanmax(train[:, j]) > np.nanmin(train[:, j])]
    det = fit_detector(train[:, cols], [names[j] for j in cols])
    km = KMeans(n_clusters=det.arrays["centroids"].shape[0], n_init=1, random_state=0).fit(
        np.nan_to_num(train[:, cols]))

    metrics = list(rec.metrics())
    seq = [(metrics[i % len(metrics)], float(i)) for i in range(args.samples)]
    names_ = ("features (FeatureWindow.push)", "forecast (Forecaster.push)", "classifier (compiled)",
              "detector (StreamingDetector.score)", "detector explain (when score >= 1)",
              "RiskStage.on_sample (all + history)", "history chunk writes (worker thread)",
              "sklearn predict_proba, 1 row", "sklearn KMeans.transform, 1 row")
    pc = time.perf_counter_ns
    ct = time.thread_time_ns
    pt = time.process_time_ns
    # per repeat: part -> (thread cpu us/sample, process cpu us/sample, wall mean, p50, p99)
    runs: list[dict[str, tuple[float, float, float, float, float]]] = []

    with tempfile.TemporaryDirectory() as state:
        art.save(det, Path(state) / "models" / DETECTOR_FILE)
        cpath = Path(state) / "clf.npz"
        clf.save(cmodel, cpath)
        samples = [Sample(node="b", seq=i, wall=1.7e9 + t, mono=t, metrics=m) for i, (m, t) in enumerate(seq)]
        xk = feats[:, keep]
        xd = np.nan_to_num(feats[:, cols])
        m1 = min(1000, len(xk))
        for _ in range(args.repeats):
            row: dict[str, tuple[float, float, float, float, float]] = {}

            def timed(name: str, fn: object, items: list[object],
                      row: dict[str, tuple[float, float, float, float, float]] = row) -> list[object]:
                """Call fn on each item one at a time: per-call wall times, total thread and process
                CPU time per call."""
                out = []
                walls = []
                hist = getattr(getattr(fn, "__self__", None), "history", None)
                drain = 0
                c0, p0 = ct(), pt()
                for it in items:
                    t0 = pc()
                    out.append(fn(it))  # type: ignore[operator]
                    walls.append(pc() - t0)
                    if hist is not None and hist.pending:  # the daemon's worker thread, untimed
                        d0 = ct()
                        hist.write_pending()
                        drain += ct() - d0
                c1, p1 = ct(), pt()
                c1 -= drain
                p1 -= drain
                if hist is not None:
                    nan = float("nan")
                    row["history chunk writes (worker thread)"] = (drain / 1000.0 / max(1, len(items)),
                                                                   nan, nan, nan, nan)
                mean, p50, p99 = stats(walls)
                n = max(1, len(items))
                row[name] = ((c1 - c0) / 1000.0 / n, (p1 - p0) / 1000.0 / n, mean, p50, p99)
                return out

            stage = RiskStage(ModelSettings(classifier_path=str(cpath)), state)
            assert not stage.cold
            assert stage.scorer is not None
            fw, fc = FeatureWindow(schema), Forecaster()
            scorer = clf.Scorer(cmodel, names)
            sd = StreamingDetector(det)
            didx = np.array(cols, dtype=np.intp)
            timed("RiskStage.on_sample (all + history)", stage.on_sample, samples)  # type: ignore[arg-type]
            vecs = timed("features (FeatureWindow.push)", lambda s, fw=fw: fw.push(s).copy(), samples)  # type: ignore[arg-type]
            timed("forecast (Forecaster.push)", lambda s, fc=fc: fc.push(s.metrics, s.mono), samples)  # type: ignore[attr-defined]
            # As in the stage: each vector arrives in the window's one output buffer, which the
            # classifier and the (bound) detector read in place; the copy in is timed too.
            buf = np.empty(schema.dim)
            sd.bind(buf, didx)

            def clf_one(v: np.ndarray, buf: np.ndarray = buf, scorer: clf.Scorer = scorer) -> object:
                np.copyto(buf, v)
                return scorer.failure(buf)

            def det_one(v: np.ndarray, buf: np.ndarray = buf, sd: StreamingDetector = sd,
                        didx: np.ndarray = didx) -> object:
                np.copyto(buf, v)
                return sd.score_bound(buf, didx)

            def explain_one(v: np.ndarray, buf: np.ndarray = buf, sd: StreamingDetector = sd,
                            didx: np.ndarray = didx) -> object:
                np.copyto(buf, v)
                return sd.explain_bound(buf, didx)

            timed("classifier (compiled)", clf_one, vecs)
            scores = timed("detector (StreamingDetector.score)", det_one, vecs)
            hot = [v for v, (a, _) in zip(vecs, scores, strict=True) if a >= stage.explain_above]  # type: ignore[misc]
            timed("detector explain (when score >= 1)", explain_one, hot)

            share = len(hot) / max(1, len(vecs))
            timed("sklearn predict_proba, 1 row", cal.predict_proba, [xk[i : i + 1] for i in range(m1)])
            timed("sklearn KMeans.transform, 1 row", km.transform, [xd[i : i + 1] for i in range(m1)])
            stage.close()
            # explain runs on a share of the samples only: report it amortised over all samples
            e = row["detector explain (when score >= 1)"]
            row["detector explain (when score >= 1)"] = (e[0] * share, e[1] * share, e[2], e[3], e[4])
            runs.append(row)
    med = {k: tuple(float(np.median([r[k][i] for r in runs])) for i in range(5)) for k in names_}
    print(f"scoring path: {'native C kernels (agent/native)' if native else 'numpy (reference)'}")
    print(f"{len(seq)} samples from {args.recording.name}, {args.repeats} runs (median of runs shown); "
          f"schema {schema.dim} features ({len(keep)} in the classifier, {len(cols)} in the detector); "
          f"explain on {share:.0%} of the samples (amortised below)")
    print("thread/process cpu: CPU time over all calls / calls (what the agent itself spends);")
    print("wall: per-call perf_counter (includes preemption by other processes on a shared host)")
    print(f"{'part':40s} {'thread cpu':>10s} {'proc cpu':>9s} {'wall mean':>10s} {'wall p50':>9s} "
          f"{'wall p99':>9s}")
    for k in names_:
        c, p, mean, p50, p99 = med[k]
        print(f"{k:40s} {c:10.1f} {p:9.1f} {mean:10.1f} {p50:9.1f} {p99:9.1f}")
    stage_us = med["RiskStage.on_sample (all + history)"][0]
    stage_wall = med["RiskStage.on_sample (all + history)"][2]
    skl = med["sklearn predict_proba, 1 row"][0]
    ours = med["classifier (compiled)"][0]
    km_us = med["sklearn KMeans.transform, 1 row"][0]
    det_us = med["detector (StreamingDetector.score)"][0]
    print(f"\n(thread cpu) classifier: compiled {ours:.1f} us vs sklearn {skl:.0f} us = {skl / ours:.0f}x "
          "cheaper; "
          f"detector (4 components) {det_us:.1f} us vs one sklearn KMeans.transform {km_us:.0f} us = "
          f"{km_us / det_us:.0f}x; whole stage {stage_us:.1f} us/sample vs the two sklearn calls "
          f"{skl + km_us:.0f} us = {(skl + km_us) / stage_us:.0f}x")
    print(f"goal <= 50 us/sample (thread cpu): {'met' if stage_us <= 50 else 'NOT met'} ({stage_us:.1f} us; "
          f"wall mean {stage_wall:.1f} us); goal >= 20x cheaper than sklearn: "
          f"{'met' if (skl + km_us) / stage_us >= 20 else 'NOT met'} ({(skl + km_us) / stage_us:.0f}x)")
    return 0


Cost = dict[str, tuple[float, float]]  # stage -> (count, sum seconds)


def scrape(url: str) -> tuple[Cost, dict[str, float]]:
    """The daemon's heald_pipeline_cpu_seconds (count, sum) per stage, and its plain gauges."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - the bench's own loopback endpoint
        text = r.read().decode()
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    gauges: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for smp in family.samples:
            if smp.name == "heald_pipeline_cpu_seconds_count":
                counts[smp.labels["stage"]] = smp.value
            elif smp.name == "heald_pipeline_cpu_seconds_sum":
                sums[smp.labels["stage"]] = smp.value
            elif not smp.labels:
                gauges[smp.name] = smp.value
    return {k: (counts[k], sums.get(k, 0.0)) for k in counts}, gauges


def in_daemon(args: argparse.Namespace, native: bool) -> int:
    stages = {"score": "score stage (RiskStage.on_sample)", "decide": "playbook evaluation (decide)",
              "sample": "score + decide, per sample"}
    values: dict[str, list[float]] = {k: [] for k in stages}
    with tempfile.TemporaryDirectory(prefix="bench-stage-cost-") as tmp:
        d = Path(tmp)
        log = d / "heald.log"
        port = hb.free_port()
        with hb.Mosquitto(d) as broker:
            config = hb.write_config(d, mqtt_port=broker.port, prometheus_port=port)
            hb.fit_detector(d / "state")
            proc = hb.start_heald(d, config, log)
            url = f"http://127.0.0.1:{port}/metrics"
            try:
                time.sleep(args.warmup)
                if proc.poll() is not None:
                    raise SystemExit(f"heald exited: {log.read_text()[-3000:]}")
                first, gauges = scrape(url)
                for _ in range(60):  # the first risk may not be out yet
                    if "heald_risk_cold" in gauges and "sample" in first:
                        break
                    time.sleep(0.5)
                    first, gauges = scrape(url)
                if gauges.get("heald_risk_cold") != 0.0:
                    cold = gauges.get("heald_risk_cold")
                    raise SystemExit(f"the detector is not live (heald_risk_cold={cold})")
                prev, t0 = first, time.monotonic()
                while time.monotonic() - t0 < args.seconds:
                    time.sleep(0.5)
                    cur, _ = scrape(url)
                    for k in stages:
                        dn = cur[k][0] - prev[k][0]
                        if dn == 1:  # this scrape saw exactly one new sample: its own value
                            values[k].append((cur[k][1] - prev[k][1]) * 1e6)
                    prev = cur
                last = prev
            finally:
                hb.stop(proc)
        checked = hb.check_agent(d, log)
    n = last["sample"][0] - first["sample"][0]
    if n < 1:
        raise SystemExit("no sample measured")
    print(f"inside a running heald (heald run, 1 Hz), {args.seconds:.0f} s after {args.warmup:.0f} s of "
          f"warm-up; {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({os.cpu_count()} cpus); scoring "
          f"path {'native C kernels' if native else 'numpy'}")
    print("heald as a fleet node: MQTT on (private mosquitto), detector fitted before start and live "
          "(heald_risk_cold 0), shipped playbooks forced dry-run")
    hb.print_safety(checked)
    print("thread CPU time of the daemon's event loop per sample (heald_pipeline_cpu_seconds), "
          "µs; mean over all samples, percentiles over the samples seen one per scrape")
    print(f"{'stage':34s} {'samples':>8s} {'mean':>8s} {'p50':>8s} {'p90':>8s} {'p99':>8s}")
    for k, label in stages.items():
        mean = (last[k][1] - first[k][1]) / n * 1e6
        v = np.asarray(values[k]) if values[k] else np.asarray([float("nan")])
        p50, p90, p99 = (float(np.percentile(v, q)) for q in (50, 90, 99))
        print(f"{label:34s} {int(n):8d} {mean:8.1f} {p50:8.1f} {p90:8.1f} {p99:8.1f}")
    mean_all = (last["sample"][1] - first["sample"][1]) / n * 1e6
    print(f"goal (issue 25) <= 60 µs per sample, score + decide: {'met' if mean_all <= 60 else 'NOT met'} "
          f"({mean_all:.1f} µs mean)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
