"""Failure classifier, training side: fit with scikit-learn and compile to the scorer's arrays.

Runs only in a short-lived child process (``python -m agent model train-classifier``,
started by :func:`train_in_child`) or in offline tools (``bench/faults/train.py``); the daemon
never imports this module. scikit-learn is imported inside the functions that need it.

Model: a scikit-learn ``Pipeline(SimpleImputer(median), StandardScaler(), EvidenceLogistic)`` (one
binary logistic regression per class, balanced class weights, each on its own evidence features:
:data:`CLASS_EVIDENCE`, :mod:`agent.score._evidence_lr`) wrapped in
``CalibratedClassifierCV(method="sigmoid", ensemble=False)`` whose calibration folds are drawn
over 20-sample blocks of the episodes (``StratifiedGroupKFold``; blocks rather than whole
episodes so that every class is in every calibration training fold). :func:`compile_calibrated`
turns the fitted object into a :class:`~agent.score.classifier.CompiledClassifier`, which
:func:`train` checks against scikit-learn's ``predict_proba`` before writing it.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from agent.errors import ModelError
from agent.features.schema import FeatureSchema
from agent.score.artifact import F64, FeatureSpec, TrainingWindow
from agent.score.classifier import (
    FORMAT_VERSION,
    KIND,
    NONE,
    ClassifierMeta,
    CompiledClassifier,
    build,
    load,
    save,
)

# Which metrics may argue for which failure class (prefixes of the metric key a feature reads,
# see :func:`evidence_key`): each class's logistic model sees only these columns. Left out of
# every class: CPU steal (the hypervisor's business), zombies, blocked tasks.
CLASS_EVIDENCE: dict[str, tuple[str, ...]] = {
    "disk_full": ("disk.",),
    "memory_exhaustion": ("mem.", "psi.some_avg10_pct[memory]", "psi.full_avg10_pct[memory]"),
    "cpu_runaway": ("cpu.util_pct", "cpu.load1", "proc.running", "proc.top_cpu_pct",
                    "psi.some_avg10_pct[cpu]"),
    "network_degradation": ("net.",),
    "gpu_fault": ("gpu.",),
    "service_down": ("unit.", "proc.count"),
}
# A fitted ``CalibratedClassifierCV``: scikit-learn ships no type information (mypy is told to
# ignore its imports), so its objects are Any here.
Calibrated = Any


# ------------------------------------------------------------------------------- compile / train
def compile_calibrated(cal: Calibrated, feature_names: Sequence[str], units: Sequence[str],
                       schema: FeatureSchema, *, horizon_s: float, training: TrainingWindow,
                       options: dict[str, object],
                       metrics: dict[str, object] | None = None) -> CompiledClassifier:
    """A fitted ``CalibratedClassifierCV(Pipeline(imputer, scaler, EvidenceLogistic), "sigmoid",
    ensemble=False)`` -> :class:`CompiledClassifier`. Reads fitted attributes only."""
    import sklearn  # noqa: PLC0415 - training side only

    if len(cal.calibrated_classifiers_) != 1:
        raise ModelError("compile needs ensemble=False (one calibrated classifier)")
    cc = cal.calibrated_classifiers_[0]
    if cc.method != "sigmoid":
        raise ModelError(f"calibration method {cc.method!r} cannot be compiled (use sigmoid)")
    pipe = cc.estimator
    imp, sc, lr = pipe.named_steps["impute"], pipe.named_steps["scale"], pipe.named_steps["lr"]
    classes = [str(c) for c in cal.classes_]
    est_classes = [str(c) for c in lr.classes_]
    if est_classes != classes or len(classes) < 3:
        raise ModelError("compile needs >= 3 classes, all seen by the base estimator")
    coef = np.asarray(lr.coef_, dtype=np.float64)
    scale = np.asarray(sc.scale_, dtype=np.float64)
    mean = np.asarray(sc.mean_, dtype=np.float64)
    weight = coef / scale[None, :]
    bias = np.asarray(lr.intercept_, dtype=np.float64) - weight @ mean
    cal_a = np.array([c.a_ for c in cc.calibrators], dtype=np.float64)
    cal_b = np.array([c.b_ for c in cc.calibrators], dtype=np.float64)
    meta = ClassifierMeta(
        format_version=FORMAT_VERSION, kind=KIND, classes=tuple(classes),
        features=tuple(FeatureSpec(name=n, unit=u) for n, u in zip(feature_names, units, strict=True)),
        schema=schema, horizon_s=horizon_s, training=training,
        sklearn_version=sklearn.__version__, numpy_version=np.__version__,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        options=options, metrics=metrics or {},
    )
    return build(meta, {"median": np.asarray(imp.statistics_, dtype=np.float64), "weight": weight,
                        "bias": bias, "cal_a": cal_a, "cal_b": cal_b})


def calibration_groups(groups: npt.ArrayLike, chunk: int = 20) -> npt.NDArray[np.str_]:
    """Split each episode (consecutive rows of one group) into blocks of ``chunk`` rows.

    Calibration folds are drawn over these blocks so that every class, even one with only two
    recorded episodes, is present in every training fold of the calibration.
    """
    g = np.asarray(groups).astype(str)
    out = np.empty(g.size, dtype=object)
    seen: dict[str, int] = {}
    for i, gi in enumerate(g.tolist()):
        n = seen.get(gi, 0)
        seen[gi] = n + 1
        out[i] = f"{gi}#{n // chunk}"
    return out.astype(str)


def evidence_key(feature: str) -> str:
    """The metric key a feature reads: ``max(disk.used_pct[*]):slope`` -> ``disk.used_pct[*]``."""
    inp = feature.rsplit(":", 1)[0]
    if inp.endswith(")") and "(" in inp:
        inp = inp[inp.index("(") + 1: -1]
    return inp


def evidence_masks(feature_names: Sequence[str]) -> dict[str, list[int]]:
    """Class -> the columns of ``feature_names`` that may argue for it (:data:`CLASS_EVIDENCE`);
    ``none`` gets every column some class may use."""
    keys = [evidence_key(n) for n in feature_names]
    masks = {c: [j for j, k in enumerate(keys) if k.startswith(prefixes)]
             for c, prefixes in CLASS_EVIDENCE.items()}
    masks[NONE] = sorted({j for cols in masks.values() for j in cols})
    return masks


def fit_sklearn(x: F64, labels: Sequence[str], groups: npt.ArrayLike, *, c_reg: float = 0.1,
                n_splits: int = 3, random_state: int = 0,
                feature_names: Sequence[str] | None = None) -> Calibrated:
    """Fit the calibrated scikit-learn model (training side only); calibration folds are drawn
    over 20-row blocks of the episodes in ``groups`` (see :func:`calibration_groups`). With
    ``feature_names`` each class sees only its evidence columns (:func:`evidence_masks`);
    without, every class sees every column."""
    from sklearn.calibration import CalibratedClassifierCV  # noqa: PLC0415
    from sklearn.impute import SimpleImputer  # noqa: PLC0415
    from sklearn.model_selection import StratifiedGroupKFold  # noqa: PLC0415
    from sklearn.pipeline import Pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    from agent.score._evidence_lr import EvidenceLogistic  # noqa: PLC0415 - imports scikit-learn

    y = np.asarray(labels)
    g = calibration_groups(groups)
    masks = evidence_masks(feature_names) if feature_names is not None else None
    if masks is not None:
        empty = sorted(c for c in set(y.tolist()) if c in masks and not masks[c])
        if empty:
            raise ModelError(f"no feature may argue for class(es) {empty}: none of their evidence "
                             f"prefixes matches a usable feature")
    pipe = Pipeline([
        # keep_empty_features: a column empty in one calibration fold keeps its place (and mask)
        ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
        ("scale", StandardScaler()),
        ("lr", EvidenceLogistic(masks=masks, c_reg=c_reg)),
    ])
    splits = list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=random_state)
                  .split(x, y, g))
    cal = CalibratedClassifierCV(pipe, method="sigmoid", cv=splits, ensemble=False)
    return cal.fit(x, y)


def usable_features(x: F64, names: Sequence[str]) -> list[int]:
    """Columns with at least one finite value and some variation in the training data."""
    keep = []
    for j in range(x.shape[1]):
        col = x[:, j]
        fin = col[np.isfinite(col)]
        if fin.size and float(fin.max() - fin.min()) > 0:
            keep.append(j)
    if not keep:
        raise ModelError(f"no usable feature among {len(names)}: every column is empty or constant")
    return keep


def train(data_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, c_reg: float = 0.1,
          n_splits: int = 3) -> CompiledClassifier:
    """Train from a dataset file (see :func:`main`) and write the compiled artifact."""
    with np.load(data_path, allow_pickle=False) as z:
        x = np.asarray(z["X"], dtype=np.float64)
        labels = [str(s) for s in z["y"]]
        groups = np.asarray(z["groups"])
        names = [str(s) for s in z["feature_names"]]
        units = [str(s) for s in z["units"]]
        schema = msgspec.json.decode(bytes(z["schema_json"].astype(np.uint8)), type=FeatureSchema)
        horizon = float(z["horizon_s"]) if "horizon_s" in z.files else 300.0
        wall = np.asarray(z["wall"], dtype=np.float64) if "wall" in z.files else None
        metrics = (msgspec.json.decode(bytes(z["metrics_json"].astype(np.uint8)))
                   if "metrics_json" in z.files else {})
    x[~np.isfinite(x)] = np.nan
    keep = usable_features(x, names)
    xk = x[:, keep]
    kept = [names[j] for j in keep]
    cal = fit_sklearn(xk, labels, groups, c_reg=c_reg, n_splits=n_splits, feature_names=kept)
    training = TrainingWindow(rows=int(xk.shape[0]),
                              start=float(np.nanmin(wall)) if wall is not None else None,
                              end=float(np.nanmax(wall)) if wall is not None else None,
                              source=Path(data_path).name)
    model = compile_calibrated(cal, kept, [units[j] for j in keep], schema,
                               horizon_s=horizon, training=training,
                               options={"c_reg": c_reg, "n_splits": n_splits,
                                        "model": "calibrated(sigmoid) one-vs-rest logistic regression, "
                                                 "each class on its evidence features",
                                        "evidence": {c: list(p) for c, p in CLASS_EVIDENCE.items()}},
                               metrics=metrics)
    got = model.predict_proba(xk)
    want = cal.predict_proba(xk)
    err = float(np.max(np.abs(got - want)))
    if err > 1e-6:
        raise ModelError(f"compiled classifier differs from scikit-learn by {err:.2e}")
    save(model, out_path)
    return model


def train_in_child(data_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *,
                   timeout_s: float = 600.0, c_reg: float = 0.1) -> CompiledClassifier:
    """Run :func:`train` in a short-lived ``python -m agent model train-classifier`` child."""
    argv = [sys.executable, "-m", "agent", "model", "train-classifier", "--data", os.fspath(data_path),
            "--out", os.fspath(out_path), "--c", str(c_reg)]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ModelError(f"classifier training timed out after {timeout_s:g} s") from None
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", errors="replace").strip().splitlines()[-5:]
        raise ModelError(f"classifier training failed (exit {proc.returncode}): " + " | ".join(tail))
    return load(out_path)
