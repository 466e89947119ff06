"""The node's anomaly detector on a kept fault-free run, offline: which features make its alerts.

    python3 bench/faultfree_replay.py RUN [--fit-from RECORDING ...] [--keep INPUT ...] [--loads A,B]

``RUN``: a run kept by ``bench/faultfree_load.py --samples`` in ``bench/results/faultfree_load/``
(its name, e.g. ``20261206T184422Z-f8622b19f5d6``, or the path of its ``.json.gz``; the samples
are the ``.samples.jsonl.gz`` beside it). What the node had seen when each load began is rebuilt
as the daemon would hold it: the fit recordings (default: the run's own ``--fit-from``, in its
order; each through a fresh feature window), then the run's own samples up to that load. The
detector is fitted on that, as the daemon fits it (its usable-column rule,
``agent.score.stage.DEFAULT_FIT_OPTIONS``, in this process), and scores the load's samples and the
idle gap after it one by one; the alert samples are merged into episodes as the bench merges them
(gaps under 30 s). ``--keep INPUT``: put an input the shipped options leave out back into the
detector (``--keep proc.zombies``: the options before it was left out), to measure what leaving
it out changes.

It answers "what drove the detector here" without a 2-hour rerun. A fit per load is closer to the
daemon than one fit for the run (the daemon refits at start, as its history doubles and on
drift), not the same: the live run's episodes are the measurement; this names their features.

Prints a table per load: the largest score (1 = the alert line), alert samples, episodes (with
their length), the features that lead the explanation of the alert samples (top ``--top`` each).
Then the other alert sources on the same samples: the whole run through the daemon's score stage
(``agent.score.stage.RiskStage`` with its shipped classifier, forecaster and evidence gates, no
detector), per load the samples with a failure-class or forecast alert (the stage's own
``risk_alert`` lines), their episodes and reasons. ``--no-risk`` leaves that table out.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import gzip
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import faultfree_load as ffl  # noqa: E402
import healdbench as hb  # noqa: E402


def run_paths(run: str) -> tuple[Path, Path]:
    meta = Path(run)
    if not meta.name.endswith(".json.gz"):
        meta = ffl.RUNS / f"{run}.json.gz"
    samples = meta.with_name(meta.name.removesuffix(".json.gz") + ".samples.jsonl.gz")
    return meta, samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a kept run's name or its .json.gz")
    ap.add_argument("--fit-from", type=Path, action="append",
                    help="the node's past (default: the run's own --fit-from recordings)")
    ap.add_argument("--keep", action="append", default=[],
                    help="an input the shipped fit options leave out, put back in (repeatable)")
    ap.add_argument("--top", type=int, default=3, help="features per alert sample's explanation")
    ap.add_argument("--loads", help="only these loads (comma-separated; default: every load of the run)")
    ap.add_argument("--no-risk", action="store_true", help="the detector's table only")
    args = ap.parse_args()
    meta_path, samples_path = run_paths(args.run)
    for p in (meta_path, samples_path):
        if not p.is_file():
            ap.error(f"{p}: no such file (a run kept with --samples)")

    import numpy as np  # noqa: PLC0415

    from agent.errors import HealdError  # noqa: PLC0415
    from agent.features.history import usable_columns  # noqa: PLC0415
    from agent.features.schema import FeatureSchema  # noqa: PLC0415
    from agent.score.detector import StreamingDetector  # noqa: PLC0415
    from agent.score.fit import fit_detector  # noqa: PLC0415
    from agent.score.stage import DEFAULT_FIT_OPTIONS  # noqa: PLC0415

    try:
        meta: dict[str, Any] = json.loads(gzip.decompress(meta_path.read_bytes()))
        phases = meta["phases"]
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:  # not a kept run's .json.gz
        ap.error(f"{meta_path}: not a kept run ({exc!r})")
    fit = ffl.run_fit(meta)
    seeds = args.fit_from
    if seeds is None:
        if not fit.get("seeded"):
            ap.error("the run was not seeded (--fit-from): name the node's past with --fit-from")
        seeds = [ROOT / s for s in fit["source"].split(" + ")]
    for s in seeds:
        if not s.is_file():
            ap.error(f"--fit-from {s}: no such file")
    exclude = list(DEFAULT_FIT_OPTIONS["exclude"])  # type: ignore[call-overload]
    unknown = [k for k in args.keep if k not in exclude]
    if unknown:
        ap.error(f"--keep {unknown}: not left out by the shipped options")
    exclude = [e for e in exclude if e not in args.keep]
    opts = {**DEFAULT_FIT_OPTIONS, "exclude": exclude}

    try:
        past = np.vstack([hb.recording_features(s)[0] for s in seeds])
        x, wall = hb.recording_features(samples_path)
    except HealdError as exc:
        ap.error(str(exc))
    except (OSError, EOFError) as exc:  # gzip: not a gzip file, truncated
        ap.error(f"a recording: {exc}")
    names = FeatureSchema().names
    run_loads = [ph["name"] for ph in phases if ph.get("load")]
    only = [w.strip() for w in args.loads.split(",") if w.strip()] if args.loads else run_loads
    if not only or any(w not in run_loads for w in only):
        ap.error(f"--loads: choose from {', '.join(run_loads)}")
    print(f"# python3 bench/faultfree_replay.py {' '.join(sys.argv[1:])}")
    print(f"# {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}, {platform.node()}, {os.cpu_count()} cpu, "
          f"{platform.release()}; run {meta_path.name} (product tree {meta.get('product', '?')}), "
          f"past: {' + '.join(s.name for s in seeds)} ({len(past)} samples)")
    print(f"# detector fitted per load on the past + the run up to the load; left out: "
          f"{'the shipped list' if not args.keep else 'the shipped list but ' + ', '.join(args.keep)}")
    print()
    print("| load | past samples | largest score | alert samples | episodes (s) | leading features |")
    print("|---|---|---|---|---|---|")
    total_eps = 0
    for k, ph in enumerate(phases):
        if not ph.get("load") or ph["name"] not in only:
            continue
        end = ph["end"]
        nxt = phases[k + 1] if k + 1 < len(phases) else None
        if nxt is not None and not nxt.get("load"):
            end = nxt["end"]  # the idle gap after a load counts as the load's (as the bench counts)
        train = np.vstack([past, x[wall < ph["start"]]])
        keep = usable_columns(train)
        model = fit_detector(train[:, keep], [names[j] for j in keep], **opts)
        det = StreamingDetector(model)
        cols = [names.index(n) for n in model.meta.feature_names]
        warm = np.nonzero((wall >= ph["start"] - 60.0) & (wall < ph["start"]))[0]
        for i in warm:  # the detector's smoothing state as the load begins
            det.score(x[i, cols], float(wall[i]))
        top = 0.0
        alerts: list[tuple[float, list[str]]] = []
        feats: collections.Counter[str] = collections.Counter()
        for i in np.nonzero((wall >= ph["start"]) & (wall <= end))[0]:
            score, alert = det.score(x[i, cols], float(wall[i]))
            top = max(top, score)
            if alert:
                alerts.append((float(wall[i]), ["anomaly"]))
                feats.update(c.feature for c in det.explain(x[i, cols], top_k=args.top))
        eps = ffl.episodes(alerts)
        total_eps += len(eps)
        lens = ", ".join(f"{e['end'] - e['start'] + 1:.0f}" for e in eps)
        lead = ", ".join(f"{f} {n}" for f, n in feats.most_common(4)) or "-"
        print(f"| {ph['name']} | {len(train)} | {top:.2f} | {len(alerts)} | {len(eps)}"
              f"{f' ({lens})' if eps else ''} | {lead} |")
    print()
    print(f"detector alert episodes over the loads: {total_eps}")
    if not args.no_risk:
        try:
            risk_table(samples_path, phases, only)
        except HealdError as exc:
            ap.error(str(exc))
    return 0


def risk_table(samples_path: Path, phases: list[dict[str, Any]], only: list[str]) -> None:
    """Per load: the samples where the score stage's classifier or forecasts alert (no detector)."""
    import tempfile  # noqa: PLC0415

    from agent.decide.replay import samples  # noqa: PLC0415
    from agent.score.settings import ModelSettings  # noqa: PLC0415
    from agent.score.stage import RiskStage  # noqa: PLC0415

    spans = []  # (name, start, end with the idle gap after it)
    for k, ph in enumerate(phases):
        if ph.get("load") and ph["name"] in only:
            nxt = phases[k + 1] if k + 1 < len(phases) else None
            spans.append((ph["name"], ph["start"], nxt["end"] if nxt is not None and not nxt.get("load")
                          else ph["end"]))
    alerts: dict[str, list[tuple[float, list[str]]]] = {name: [] for name, _, _ in spans}
    with tempfile.TemporaryDirectory(prefix="heald-ffreplay-") as tmp:
        path = Path(tmp) / samples_path.name.removesuffix(".gz")
        path.write_bytes(gzip.decompress(samples_path.read_bytes()))
        stage = RiskStage(ModelSettings(cold_start_s=1e12), Path(tmp) / "state", history=False)
        for smp in sorted(samples(path), key=lambda x: x.seq):
            why = [w for w in stage.risk_alert(stage.on_sample(smp)) if w != "anomaly"]
            if why:
                for name, start, end in spans:
                    if start <= smp.wall <= end:
                        alerts[name].append((smp.wall, why))
        stage.close()
    print()
    print("The classifier and the forecasts (the score stage's alert lines, the whole run in order):")
    print()
    print("| load | alert samples | episodes (s) | reasons |")
    print("|---|---|---|---|")
    total = 0
    for name, _, _ in spans:
        eps = ffl.episodes(alerts[name])
        total += len(eps)
        lens = ", ".join(f"{e['end'] - e['start'] + 1:.0f}" for e in eps)
        why: collections.Counter[str] = collections.Counter(w for _, ws in alerts[name] for w in ws)
        print(f"| {name} | {len(alerts[name])} | {len(eps)}{f' ({lens})' if eps else ''} | "
              f"{', '.join(f'{w} {n}' for w, n in why.most_common(4)) or '-'} |")
    print()
    print(f"classifier and forecast alert episodes over the loads: {total}")


if __name__ == "__main__":
    raise SystemExit(main())
