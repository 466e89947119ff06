"""Replay fault-harness recordings through RiskStage; print lead times and false alerts.

    python3 bench/faults/evaluate.py bench/faults/data/host1.npz [--cold-start 600]
        [--classifier agent/score/data/default-classifier.npz] [--json out.json]

Writes ``bench/results/faults/<recording>.eval.json`` per recording, or
``<recording>.noclf.eval.json`` when no classifier was loaded (``--classifier /nonexistent``),
``<recording>.<classifier file stem>.eval.json`` for a classifier other than the shipped one;
``--json PATH`` writes one file with the results of all recordings instead. These files are
regenerated with the command above, not kept per commit: each records the options it was made with.

Each recording is replayed sample by sample through a fresh :class:`agent.score.stage.RiskStage`
(temporary state dir). Once ``--cold-start`` seconds of samples have been seen, the anomaly
detector is fitted exactly as the daemon does it (``python -m agent model export-history`` and
``python -m agent model train`` child processes), synchronously in the replay. A sample is a
*risk alert* when any source fires:

* ``anomaly``:  the detector's alert (normalised score >= 1);
* ``failure``:  a failure-class probability >= ``--p`` (0.5);
* ``forecast``: a forecast with ETA <= ``--eta`` (1800 s) and confidence >= 0.5.

Per fault: the first alert *about that fault* (anomaly, its own class, or a forecast on its own
resource: the fault's mount, or ``mem.*``) between injection and failure (ENOSPC / OOM kill) and
the lead time it gave, per source; for faults without a failure instant ahead (CPU, network,
service kill) the detection delay after injection. Per fault-free phase (idle, stress, ...): alert
samples and alert episodes, the phase duration and how much of it the detector was warm. The
classifier column is in-sample when the shipped model was trained on the same recording: see
``train.py`` for held-out figures, or pass ``--classifier /nonexistent`` to leave it out.
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

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "faults"
SOURCES = ("anomaly", "failure", "forecast")
FAULT_FREE = ("idle", "stress", "idle_post", "stress_post")
# Other engineers' test fixtures on the shared recording host mount and fill small tmpfs here.
FOREIGN_MOUNTS = "/tmp/heald-tmpfs-"  # noqa: S108 - a name to recognise, nothing is written there
MOUNT_OF = {"heald-fault-disk": "/mnt/heald-fault-disk", "heald-fault-tmpfs": "/mnt/heald-fault-tmpfs",
            "x": "/mnt/heald-fault-inodes"}


def relevant(reason: str, fault: dict[str, object]) -> bool:
    """Does this alert reason point at this fault (its class, or its own resource)?"""
    if reason == "anomaly":
        return True
    if reason.startswith("failure["):
        return reason == f"failure[{fault['cls']}]"
    res = reason[len("forecast["):-1]
    if fault["cls"] == "memory_exhaustion":  # host memory, or a memory-limited cgroup's headroom
        return res.startswith(("mem.", "cgroup.mem."))
    if fault["cls"] == "disk_full":
        mount = MOUNT_OF.get(str(fault["name"]).split(":")[1], "?")
        return res.endswith(f"[{mount}]")
    return False


def replay(path: Path, args: argparse.Namespace) -> dict[str, object]:
    rec = dataset.load(path)
    n = rec.wall.size
    fired = {s: np.zeros(n, dtype=bool) for s in SOURCES}
    why_first: list[list[str]] = [[] for _ in range(n)]
    cold = np.ones(n, dtype=bool)
    with tempfile.TemporaryDirectory(prefix="heald-eval-") as state:
        settings = ModelSettings(cold_start_s=args.cold_start, classifier_path=args.classifier or "")
        stage = RiskStage(settings, state, forecast_alert_s=args.eta, failure_threshold=args.p)
        classifier = stage.scorer.model.version if stage.scorer is not None else None
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
            if stage.refit_due():  # the daemon's schedule: cold start, then each doubling
                ok = asyncio.run(stage.refit())
                if fitted_at is None:
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
        # Faults whose failure is the injection itself (service kill) or has no instant (CPU, network):
        # detection delay within the fault, no lead time.
        predictive = np.isfinite(fail) and fail > start + 1.0
        end = fail if predictive else float(f["end"])  # type: ignore[arg-type]
        win = np.flatnonzero((rec.wall >= start) & (rec.wall <= end))
        rel = {s: np.zeros(n, dtype=bool) for s in SOURCES}
        for i in win:
            for w in why_first[i]:
                if relevant(w, f):
                    rel[w.split("[", 1)[0]][i] = True
        anyr = rel["anomaly"] | rel["failure"] | rel["forecast"]
        row: dict[str, object] = {"fault": f["name"], "class": f["cls"],
                                  "time_to_failure_s": (fail - start) if predictive else None}
        first = win[anyr[win]]
        t_first = float(rec.wall[first[0]]) if first.size else None
        row["first_alert_after_s"] = None if t_first is None else t_first - start
        row["lead_s"] = (end - t_first) if t_first is not None and predictive else None
        row["first_reason"] = [w for w in why_first[first[0]] if relevant(w, f)] if first.size else []
        for s in SOURCES:
            hit = win[rel[s][win]]
            if predictive:
                row[f"{s}_lead_s"] = (end - float(rec.wall[hit[0]])) if hit.size else None
            else:
                row[f"{s}_after_s"] = (float(rec.wall[hit[0]]) - start) if hit.size else None
        faults.append(row)

        def fmt(v: object) -> str:
            return "-" if v is None else f"{v:.0f} s"  # type: ignore[str-format]
        cells = [fmt(row.get(f"{s}_lead_s", row.get(f"{s}_after_s"))) + ("" if predictive else " after")
                 for s in SOURCES]
        print(f"{f['name']:36s} {fmt(row['time_to_failure_s']):>8s} {fmt(row['first_alert_after_s']):>12s} "
              f"{fmt(row['lead_s']):>8s}  " + " ".join(f"{c:>14s}" for c in cells)
              + f"  {','.join(row['first_reason'][:2])}")  # type: ignore[index]
    free = []
    print("\nfault-free phases, alerts by source (the anomaly detector runs once warm; forecasts and the "
          "classifier from the first sample)")
    print(f"{'phase':12s} {'evaluated':>10s} {'warm':>6s} {'alert samples':>14s} {'episodes':>9s}  "
          + " ".join(f"{s:>9s}" for s in SOURCES) + "  alerts w/o foreign tmpfs  forecast resources")
    phase = np.asarray(rec.phase)
    for ph in FAULT_FREE:
        m = phase == ph
        if not m.any():
            continue
        idx = np.flatnonzero(m)
        warm_s = int((m & ~cold).sum())
        a = anyf[idx]
        episodes = int(np.sum(a[1:] & ~a[:-1]) + (1 if a.size and a[0] else 0))
        dur = float(rec.wall[idx[-1]] - rec.wall[idx[0]]) + 1.0
        own = np.array([any(FOREIGN_MOUNTS not in w for w in why_first[i]) for i in idx])
        res = sorted({w for i in idx for w in why_first[i] if w.startswith("forecast[")})
        row = {"phase": ph, "evaluated_s": dur, "warm_samples": warm_s, "samples": int(idx.size),
               "alert_samples": int(a.sum()),
               "episodes": episodes, **{s: int(fired[s][idx].sum()) for s in SOURCES},
               "alert_samples_excluding_foreign_tmpfs": int(own.sum()), "forecast_resources": res}
        free.append(row)
        print(f"{ph:12s} {dur:9.0f}s {warm_s:5d}s {int(a.sum()):14d} {episodes:9d}  "
              + " ".join(f"{row[s]:9d}" for s in SOURCES) + f"  {int(own.sum()):24d}  {', '.join(res)[:80]}")
    options = {"cold_start_s": args.cold_start, "classifier": args.classifier or None,
               "classifier_loaded": classifier, "eta_s": args.eta, "p": args.p}
    return {"recording": rec.name, "options": options, "faults": faults, "fault_free": free}


def default_output(result: dict[str, object]) -> Path:
    """``bench/results/faults/<recording>[.noclf|.<classifier stem>].eval.json``."""
    options = result["options"]
    assert isinstance(options, dict)
    if options["classifier_loaded"] is None:
        variant = ".noclf"
    elif options["classifier"]:
        variant = f".{Path(str(options['classifier'])).stem}"
    else:
        variant = ""  # the shipped classifier
    return RESULTS / f"{result['recording']}{variant}.eval.json"


def write_json(path: Path, results: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recordings", nargs="+", type=Path)
    ap.add_argument("--cold-start", type=float, default=600.0)
    ap.add_argument("--classifier", default="")
    ap.add_argument("--eta", type=float, default=1800.0, help="forecast alert: ETA at most this (s)")
    ap.add_argument("--p", type=float, default=0.5, help="classifier alert: probability at least this")
    ap.add_argument("--json", type=Path, metavar="PATH",
                    help="write all results to this one file (default: one file per recording in "
                         "bench/results/faults/)")
    args = ap.parse_args()
    results = [replay(p, args) for p in args.recordings]
    if args.json:
        write_json(args.json, results)
    else:
        for result in results:
            write_json(default_output(result), [result])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
