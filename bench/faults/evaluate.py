"""Replay fault-harness recordings through RiskStage; print lead times and false alerts.

    python3 bench/faults/evaluate.py bench/faults/data/host1.npz [--cold-start 600]
        [--classifier agent/score/data/default-classifier.npz] [--json out.json]

Each recording is replayed sample by sample through a fresh :class:`agent.score.stage.RiskStage`
(temporary state dir). Once ``--cold-start`` seconds of samples have been seen, the anomaly
detector is fitted exactly as the daemon does it (history export + ``python -m agent.score.fit``
child processes), synchronously in the replay. A sample is a *risk alert* when any source fires:

* ``anomaly``:  the detector's alert (normalised score >= 1);
* ``failure``:  a failure-class probability >= ``--p`` (0.5);
* ``forecast``: a forecast with ETA <= ``--eta`` (1800 s) and confidence >= 0.5.

Per fault: the first alert between injection and failure (ENOSPC / OOM kill) and the lead time
it gave, per source. Per fault-free phase (idle, stress, ...): alert samples and alert episodes
after the cold-start window, and the phase duration. The classifier column is in-sample when the
shipped model was trained on the same recording: see ``train.py`` for held-out figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dataset

from agent.collect.sample import Sample
from agent.score.settings import ModelSettings
from agent.score.stage import RiskStage

SOURCES = ("anomaly", "failure", "forecast")
FAULT_FREE = ("idle", "stress", "idle_post", "stress_post")


def replay(path: Path, args: argparse.Namespace) -> dict[str, object]:
    rec = dataset.load(path)
    n = rec.wall.size
    fired = {s: np.zeros(n, dtype=bool) for s in SOURCES}
    why_first: list[list[str]] = [[] for _ in range(n)]
    cold = np.ones(n, dtype=bool)
    with tempfile.TemporaryDirectory(prefix="heald-eval-") as state:
        settings = ModelSettings(cold_start_s=args.cold_start, classifier_path=args.classifier or "")
        stage = RiskStage(settings, state, forecast_alert_s=args.eta, failure_threshold=args.p)
        fitted_at = None
        for i, m in enumerate(rec.metrics()):
            s = Sample(node="replay", seq=int(rec.seq[i]), wall=float(rec.wall[i]), mono=float(rec.mono[i]),
                       metrics=m)
            risk = stage.on_sample(s)
            cold[i] = risk.cold
            why = stage.risk_alert(risk)
            why_first[i] = why
            for w in why:
                fired[w.split("[", 1)[0]][i] = True
            if fitted_at is None and stage.refit_due():
                ok = asyncio.run(stage.refit())
                fitted_at = i if ok else -1
                print(f"  detector fitted after {i + 1} samples: {ok} ({stage.model_version})")
        stage.close()
    anyf = fired["anomaly"] | fired["failure"] | fired["forecast"]
    faults = []
    print(f"\n{rec.name}: {n} samples ({(rec.wall[-1] - rec.wall[0]) / 60:.1f} min), detector warm from "
          f"sample {fitted_at}")
    print(f"{'fault':36s} {'failure':>8s} {'first alert':>12s} {'lead':>8s}  "
          + " ".join(f"{s + ' lead':>14s}" for s in SOURCES) + "  first reason")
    for f in rec.faults:
        start, fail = float(f["start"]), float(f["failure"])  # type: ignore[arg-type]
        end = fail if np.isfinite(fail) else float(f["end"])  # type: ignore[arg-type]
        win = np.flatnonzero((rec.wall >= start) & (rec.wall <= end))
        row: dict[str, object] = {"fault": f["name"], "class": f["cls"],
                                  "time_to_failure_s": (fail - start) if np.isfinite(fail) else None}
        first = win[anyf[win]]
        t_first = float(rec.wall[first[0]]) if first.size else None
        row["first_alert_after_s"] = None if t_first is None else t_first - start
        row["lead_s"] = (end - t_first) if t_first is not None else None
        row["first_reason"] = why_first[first[0]] if first.size else []
        for s in SOURCES:
            hit = win[fired[s][win]]
            row[f"{s}_lead_s"] = (end - float(rec.wall[hit[0]])) if hit.size else None
        faults.append(row)

        def fmt(v: object) -> str:
            return "-" if v is None else f"{v:.0f} s"  # type: ignore[str-format]
        print(f"{f['name']:36s} {fmt(row['time_to_failure_s']):>8s} {fmt(row['first_alert_after_s']):>12s} "
              f"{fmt(row['lead_s']):>8s}  " + " ".join(f"{fmt(row[f'{s}_lead_s']):>14s}" for s in SOURCES)
              + f"  {','.join(row['first_reason'][:2])}")  # type: ignore[index]
    free = []
    print("\nfault-free phases (after the cold-start window: detector fitted), alerts by source")
    print(f"{'phase':12s} {'evaluated':>10s} {'alert samples':>14s} {'episodes':>9s}  "
          + " ".join(f"{s:>9s}" for s in SOURCES))
    phase = np.asarray(rec.phase)
    for ph in FAULT_FREE:
        m = (phase == ph) & ~cold
        if not m.any():
            continue
        idx = np.flatnonzero(m)
        a = anyf[idx]
        episodes = int(np.sum(a[1:] & ~a[:-1]) + (1 if a.size and a[0] else 0))
        dur = float(rec.wall[idx[-1]] - rec.wall[idx[0]]) + 1.0
        row = {"phase": ph, "evaluated_s": dur, "samples": int(idx.size), "alert_samples": int(a.sum()),
               "episodes": episodes, **{s: int(fired[s][idx].sum()) for s in SOURCES}}
        free.append(row)
        print(f"{ph:12s} {dur:9.0f}s {int(a.sum()):14d} {episodes:9d}  "
              + " ".join(f"{row[s]:9d}" for s in SOURCES))
    return {"recording": rec.name, "faults": faults, "fault_free": free}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recordings", nargs="+", type=Path)
    ap.add_argument("--cold-start", type=float, default=600.0)
    ap.add_argument("--classifier", default="")
    ap.add_argument("--eta", type=float, default=1800.0, help="forecast alert: ETA at most this (s)")
    ap.add_argument("--p", type=float, default=0.5, help="classifier alert: probability at least this")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = [replay(p, args) for p in args.recordings]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
