"""Retrain heald's default failure classifier from fault-harness recordings.

    python3 bench/faults/train.py bench/faults/data/host1.npz [...] \
        [--out agent/score/data/default-classifier.npz] [--folds 4]

1. Replays each recording through the default feature schema (``FeatureWindow``).
2. Held-out metrics: episodes (one fault each; fault-free stretches in 60-s chunks) are split
   with ``StratifiedGroupKFold``; for every fold a model is trained on the other folds and scores
   the held-out faults. Prints per-class precision/recall/F1 (sample level, argmax) and, per
   fault episode, whether its class reached p >= 0.5 before the failure and how early.
3. Trains the shipped model on everything, in a child process
   (``python -m agent model train-classifier``), and checks it loads.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dataset

from agent.features.schema import FeatureSchema
from agent.score import classifier as clf
from agent.score import classifier_train as clf_train
from agent.score.artifact import TrainingWindow

THRESHOLD = 0.5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recordings", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=clf.DEFAULT_PATH)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--c", type=float, default=0.1)
    ap.add_argument("--horizon", type=float, default=300.0)
    args = ap.parse_args()
    from sklearn.metrics import precision_recall_fscore_support  # noqa: PLC0415
    from sklearn.model_selection import StratifiedGroupKFold  # noqa: PLC0415

    schema = FeatureSchema()
    xs, ys, gs, walls, recs = [], [], [], [], []
    for p in args.recordings:
        rec = dataset.load(p)
        recs.append(rec)
        xs.append(dataset.features(rec, schema))
        ys += rec.label
        gs += rec.groups()
        walls.append(rec.wall)
    x = np.vstack(xs)
    y = np.asarray(ys)
    g = np.asarray(gs)
    wall = np.concatenate(walls)
    x[~np.isfinite(x)] = np.nan
    keep = clf_train.usable_features(x, schema.names)
    names = [schema.names[j] for j in keep]
    units = [schema.units[j] for j in keep]
    xk = x[:, keep]
    classes = sorted(set(ys))
    print(f"{x.shape[0]} samples, {len(keep)}/{schema.dim} usable features, classes: "
          + ", ".join(f"{c}={int((y == c).sum())}" for c in classes))

    # ---- held-out evaluation by episode
    oof = np.full((x.shape[0], len(classes)), np.nan)
    outer = StratifiedGroupKFold(n_splits=args.folds, shuffle=True, random_state=1)
    for k, (tr, te) in enumerate(outer.split(xk, y, g)):
        cal = clf_train.fit_sklearn(xk[tr], y[tr], g[tr], c_reg=args.c, n_splits=2, random_state=k,
                              feature_names=names)
        model = clf_train.compile_calibrated(cal, names, units, schema, horizon_s=args.horizon,
                                             training=TrainingWindow(rows=len(tr)), options={})
        p = model.predict_proba(xk[te])
        for ci, c in enumerate(model.meta.classes):
            oof[te, classes.index(c)] = p[:, ci]
    oof = np.nan_to_num(oof, nan=0.0)
    pred = np.asarray(classes)[np.argmax(oof, axis=1)]
    prec, rec_, f1, sup = precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
    metrics: dict[str, object] = {"held_out": "StratifiedGroupKFold by episode", "folds": args.folds,
                                  "per_class": {}}
    print(f"\nheld-out per-class metrics (sample level, argmax; {args.folds} folds grouped by episode)")
    print(f"{'class':22s} {'precision':>9s} {'recall':>7s} {'f1':>6s} {'samples':>8s}")
    for c, a, b, f, s in zip(classes, prec, rec_, f1, sup, strict=True):
        print(f"{c:22s} {a:9.3f} {b:7.3f} {f:6.3f} {s:8d}")
        metrics["per_class"][c] = {"precision": round(float(a), 3), "recall": round(float(b), 3),  # type: ignore[index]
                                   "f1": round(float(f), 3), "samples": int(s)}
    # per-episode detection before failure
    print(f"\nheld-out fault episodes: first p(class) >= {THRESHOLD} (seconds after injection; lead before "
          "failure)")
    off = 0
    episodes = []
    for rec in recs:
        n = rec.wall.size
        for f in rec.faults:
            m = (rec.wall >= f["start"]) & (rec.wall <= (f["end"] if np.isfinite(f["end"]) else rec.wall[-1]))
            idx = np.flatnonzero(m) + off
            ci = classes.index(str(f["cls"])) if f["cls"] in classes else None
            hit = None
            if ci is not None:
                hits = idx[oof[idx, ci] >= THRESHOLD]
                hit = float(wall[hits[0]]) if hits.size else None
            fail = f["failure"]
            lead = (fail - hit) if (hit is not None and np.isfinite(fail)) else None
            after = (hit - f["start"]) if hit is not None else None
            episodes.append({"fault": f["name"], "detected_after_s": after, "lead_s": lead})
            print(f"  {f['name']:36s} "
                  f"{'missed' if hit is None else f'+{after:5.0f} s'}"
                  f"{'' if lead is None else f'   lead {lead:6.1f} s before failure'}")
        off += n
    ff = np.isin(np.asarray(y), [clf.NONE])
    fail_p = np.delete(oof, classes.index(clf.NONE), axis=1)
    free_alerts = int(np.sum(np.max(fail_p[ff], axis=1) >= THRESHOLD))
    print(f"\nfault-free samples with some failure p >= {THRESHOLD}: {free_alerts} / {int(ff.sum())}")
    metrics["episodes"] = episodes
    metrics["false_positive_samples"] = [free_alerts, int(ff.sum())]

    # ---- final model on everything, fitted in a child process
    tmpdir = tempfile.mkdtemp(prefix="heald-classifier-")
    tmp = Path(tmpdir) / "dataset.npz"
    np.savez_compressed(tmp, X=x, y=y.astype(str), groups=g.astype(str),
                        feature_names=np.asarray(schema.names),
                        units=np.asarray(schema.units), wall=wall, horizon_s=np.float64(args.horizon),
                        schema_json=np.frombuffer(schema.to_json(), dtype=np.uint8),
                        metrics_json=np.frombuffer(msgspec.json.encode(metrics), dtype=np.uint8))
    try:
        model = clf_train.train_in_child(tmp, args.out, c_reg=args.c)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    print(f"\nwrote {args.out} ({args.out.stat().st_size} bytes), version {model.version}, "
          f"classes {list(model.meta.classes)}, {len(model.meta.features)} features")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
