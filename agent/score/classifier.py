"""Failure classifier: P(failure class within the horizon | features), compiled to numpy.

Model (fitted in a short-lived child process, ``python -m agent.score.classifier train``): a
scikit-learn ``Pipeline(SimpleImputer(median), StandardScaler(), EvidenceLogistic)`` (one binary
logistic regression per class, balanced class weights, each on its own evidence features:
:data:`CLASS_EVIDENCE`, :mod:`agent.score._evidence_lr`) wrapped in
``CalibratedClassifierCV(method="sigmoid", ensemble=False)`` whose calibration folds are drawn
over 20-sample blocks of the episodes (``StratifiedGroupKFold``; blocks rather than whole
episodes so that every class is in every calibration training fold). It compiles
to a handful of arrays, scored per sample with numpy only:

    x_i <- median_i where x_i is missing;  z = W x + b   (W = coef / scale, b folds the centring)
    p_c = 1 / (1 + exp(a_c z_c + b_c))  (Platt maps);  p <- p / sum(p)   (uniform when the sum is 0)

which equals ``predict_proba`` of the fitted scikit-learn object (tested to 1e-6). Classes are
``"none"`` plus the failure classes seen in training; :data:`FAILURE_CLASSES` lists all known ones.

Artifact (``.npz``, ``allow_pickle=False``, same container conventions as
:mod:`agent.score.compiled`): the arrays of :data:`ARRAY_SPECS`, ``__meta__`` (JSON of
:class:`ClassifierMeta`: classes, feature names/units, the full feature schema, horizon, training
window, scikit-learn/numpy versions, options and held-out metrics) and ``__sha256__`` (content
hash over arrays and metadata, verified on load). Written atomically.

Only :func:`train` and :func:`compile_calibrated`'s caller import scikit-learn; the daemon imports
this module for :func:`load` and :class:`CompiledClassifier` only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from agent.errors import ModelError
from agent.features.schema import FeatureSchema
from agent.fsutil import atomic_write
from agent.native import Kernels, kernels, ptr
from agent.score.compiled import _READ_ERRORS, F64, FeatureSpec, TrainingWindow, content_hash

FAILURE_CLASSES: tuple[str, ...] = (
    "disk_full", "memory_exhaustion", "cpu_runaway", "network_degradation", "gpu_fault", "service_down",
)
NONE = "none"
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
FORMAT_VERSION = 1
KIND = "heald.classifier"
DEFAULT_PATH = Path(__file__).with_name("data") / "default-classifier.npz"

ARRAY_SPECS: dict[str, int] = {
    "median": 1,  # (d,) imputation value per feature
    "weight": 2,  # (c, d) logistic weights on the raw (unscaled) features
    "bias": 1,  # (c,)
    "cal_a": 1,  # (c,) Platt slope per class
    "cal_b": 1,  # (c,) Platt offset per class
}


class ClassifierMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    format_version: int
    kind: str
    classes: tuple[str, ...]
    features: tuple[FeatureSpec, ...]
    schema: FeatureSchema
    horizon_s: float
    training: TrainingWindow
    sklearn_version: str
    numpy_version: str
    created: str
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    metrics: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)


def _meta_json(meta: ClassifierMeta) -> bytes:
    return msgspec.json.encode(meta, order="sorted")


@dataclass(frozen=True, slots=True)
class CompiledClassifier:
    meta: ClassifierMeta
    arrays: dict[str, F64]

    @property
    def sha256(self) -> str:
        return content_hash(self.arrays, _meta_json(self.meta))

    @property
    def version(self) -> str:
        return self.sha256[:12]

    def predict_proba(self, x: npt.ArrayLike) -> F64:
        """Probabilities (n, c) for rows of features in :attr:`ClassifierMeta.feature_names` order."""
        a = self.arrays
        xx = np.array(x, dtype=np.float64, ndmin=2)
        miss = ~np.isfinite(xx)
        if miss.any():
            xx = np.where(miss, a["median"][None, :], xx)
        z = xx @ a["weight"].T + a["bias"]
        p = 1.0 / (1.0 + np.exp(a["cal_a"] * z + a["cal_b"]))
        den = p.sum(axis=1, keepdims=True)
        out = np.full_like(p, 1.0 / p.shape[1])
        np.divide(p, den, out=out, where=den != 0)
        out[(out > 1.0) & (out <= 1.0 + 1e-5)] = 1.0
        result: F64 = out
        return result


class Scorer:
    """Per-sample scoring of a compiled classifier from a feature-window vector (preallocated).

    Per call: one gather, the median imputation, one matrix-vector product and five elementwise
    operations into preallocated buffers (no Python-scalar operands, no reductions); the
    normalisation sums the few class probabilities in Python, in the order numpy would.
    ``native``: the same in one C call (:mod:`agent.native`) — None = when it is available,
    False = always numpy (the reference), True = require it.
    """

    __slots__ = ("_a", "_args", "_b", "_bias", "_classes", "_idx", "_kern", "_med", "_miss", "_one",
                 "_vec", "_vec_addr", "_w", "_xbuf", "_z", "model")

    def __init__(self, model: CompiledClassifier, window_names: Sequence[str], *,
                 native: bool | None = None) -> None:
        pos = {n: i for i, n in enumerate(window_names)}
        missing = [n for n in model.meta.feature_names if n not in pos]
        if missing:
            raise ModelError(f"classifier {model.version}: features not produced by this node's feature "
                             f"schema: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self.model = model
        self._idx = np.array([pos[n] for n in model.meta.feature_names], dtype=np.intp)
        a = model.arrays
        self._med, self._w, self._bias = a["median"], a["weight"], a["bias"]
        self._a, self._b = a["cal_a"], a["cal_b"]
        self._classes = [(i, c) for i, c in enumerate(model.meta.classes) if c != NONE]
        self._miss = np.empty(self._idx.size, dtype=np.bool_)
        self._z = np.empty(len(model.meta.classes))
        self._one = np.ones(len(model.meta.classes))
        self._kern: Kernels | None = None if native is False else kernels()
        if native and self._kern is None:
            raise ModelError("native kernels requested but not available (see the log)")
        self._vec: F64 | None = None
        self._vec_addr = -1
        self._xbuf = np.empty(self._idx.size)
        self._args: tuple[int, ...] = ()
        if self._kern is not None:
            self._med, self._w = np.ascontiguousarray(self._med), np.ascontiguousarray(self._w)
            self._bias, self._a = np.ascontiguousarray(self._bias), np.ascontiguousarray(self._a)
            self._b = np.ascontiguousarray(self._b)
            f = np.float64
            self._args = (ptr(self._idx, np.intp), self._idx.size, ptr(self._med, f), ptr(self._w, f),
                          ptr(self._bias, f), ptr(self._a, f), ptr(self._b, f), self._z.size,
                          ptr(self._xbuf, f), ptr(self._z, f))

    def failure(self, window_vec: F64) -> dict[str, float]:
        """Failure class -> probability (the ``none`` class left out)."""
        if self._kern is not None:
            if window_vec is not self._vec:  # a new buffer: check what the kernel will read
                if (window_vec.ndim != 1 or window_vec.dtype != np.float64
                        or window_vec.size <= int(self._idx.max(initial=-1))):
                    raise ModelError(f"feature vector of shape {window_vec.shape} and dtype "
                                     f"{window_vec.dtype} cannot be scored")
                self._vec_addr = ptr(window_vec, np.float64) if window_vec.flags.c_contiguous else -1
                self._vec = window_vec
            if self._vec_addr < 0:  # a strided view: score a contiguous copy
                return self.failure(np.ascontiguousarray(window_vec))
            self._kern.clf_score(self._vec_addr, *self._args)
            return self._normalise(self._z.tolist())
        x = window_vec[self._idx]
        np.isnan(x, self._miss)
        np.putmask(x, self._miss, self._med)  # median imputation
        z, one = self._z, self._one
        np.dot(self._w, x, z)
        np.add(z, self._bias, z)
        np.multiply(self._a, z, z)
        np.add(z, self._b, z)
        with np.errstate(over="ignore"):  # exp overflow: p = 1 / inf = 0, as intended
            np.exp(z, z)
        np.add(one, z, z)
        np.divide(one, z, z)  # p = 1 / (1 + exp(a (W x + bias) + b))
        return self._normalise(z.tolist())

    def _normalise(self, pl: list[float]) -> dict[str, float]:
        s = 0.0
        for p in pl:  # numpy's own order for a handful of values: sequential
            s += p
        if not s > 0:
            return {c: 1.0 / len(pl) for _, c in self._classes}
        return {c: pl[i] / s for i, c in self._classes}


# ------------------------------------------------------------------------------- artifact I/O
def validate(meta: ClassifierMeta, arrays: dict[str, F64], where: str) -> None:
    if meta.format_version != FORMAT_VERSION:
        raise ModelError(f"{where}: classifier format version {meta.format_version} is not supported "
                         f"(this heald reads version {FORMAT_VERSION}); retrain with this heald")
    if meta.kind != KIND:
        raise ModelError(f"{where}: artifact kind {meta.kind!r} is not {KIND!r}")
    d, c = len(meta.features), len(meta.classes)
    if d == 0 or c < 2:
        raise ModelError(f"{where}: classifier needs >= 1 feature and >= 2 classes")
    unknown = [k for k in meta.classes if k != NONE and k not in FAILURE_CLASSES]
    if unknown:
        raise ModelError(f"{where}: unknown failure classes {unknown}")
    shapes = {"median": (d,), "weight": (c, d), "bias": (c,), "cal_a": (c,), "cal_b": (c,)}
    for name, shape in shapes.items():
        arr = arrays.get(name)
        if arr is None:
            raise ModelError(f"{where}: array {name!r} is missing")
        if arr.dtype != np.float64 or arr.shape != shape:
            raise ModelError(f"{where}: array {name!r} has {arr.dtype} {arr.shape}, expected float64 {shape}")
        if not np.all(np.isfinite(arr)):
            raise ModelError(f"{where}: array {name!r} holds NaN or infinite values")
    extra = set(arrays) - set(ARRAY_SPECS)
    if extra:
        raise ModelError(f"{where}: unexpected arrays {sorted(extra)}")
    names = set(meta.schema.names)
    foreign = [f.name for f in meta.features if f.name not in names]
    if foreign:
        raise ModelError(f"{where}: features {foreign[:5]} are not in the model's own schema")


def build(meta: ClassifierMeta, arrays: dict[str, Any]) -> CompiledClassifier:
    clean: dict[str, F64] = {}
    for name, a in arrays.items():
        arr = np.array(a, dtype=np.float64, copy=True)
        arr.setflags(write=False)
        clean[name] = arr
    validate(meta, clean, "classifier")
    return CompiledClassifier(meta=meta, arrays=clean)


def to_bytes(model: CompiledClassifier) -> bytes:
    mj = _meta_json(model.meta)
    payload: dict[str, Any] = dict(model.arrays)
    payload["__meta__"] = np.frombuffer(mj, dtype=np.uint8)
    payload["__sha256__"] = np.frombuffer(content_hash(model.arrays, mj).encode("ascii"), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **payload)
    return buf.getvalue()


def save(model: CompiledClassifier, path: str | os.PathLike[str]) -> Path:
    """Write atomically: temporary file beside ``path``, fsync, rename, fsync the directory."""
    return atomic_write(path, to_bytes(model), mode=0o644)


def from_bytes(data: bytes, where: str = "classifier") -> CompiledClassifier:
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ModelError(f"{where}: not a heald classifier artifact (not an .npz archive)")
        with loaded as z:
            entries = {name: z[name] for name in z.files}
    except _READ_ERRORS as exc:  # the detector's fuzz-found list: damaged zips raise odd types
        raise ModelError(f"{where}: not a readable heald classifier artifact ({exc})") from None
    raw_meta, raw_hash = entries.pop("__meta__", None), entries.pop("__sha256__", None)
    if raw_meta is None or raw_hash is None:
        raise ModelError(f"{where}: not a heald classifier artifact (no metadata or content hash)")
    mj = raw_meta.astype(np.uint8).tobytes()
    try:
        head = msgspec.json.decode(mj, type=dict[str, Any])
    except msgspec.DecodeError as exc:
        raise ModelError(f"{where}: unreadable classifier metadata ({exc})") from None
    if head.get("kind") != KIND:
        raise ModelError(f"{where}: artifact kind {head.get('kind')!r} is not {KIND!r}")
    if head.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{where}: classifier format version {head.get('format_version')} is not supported "
                         f"(this heald reads version {FORMAT_VERSION}); retrain with this heald")
    try:
        meta = msgspec.json.decode(mj, type=ClassifierMeta)
    except msgspec.ValidationError as exc:
        raise ModelError(f"{where}: invalid classifier metadata: {exc}") from None
    arrays: dict[str, F64] = {}
    for name, a in entries.items():
        if a.dtype != np.float64:
            raise ModelError(f"{where}: array {name!r} has dtype {a.dtype}, expected float64")
        arr = np.ascontiguousarray(a)
        arr.setflags(write=False)
        arrays[name] = arr
    expected = raw_hash.astype(np.uint8).tobytes().decode("ascii", errors="replace")
    actual = content_hash(arrays, mj)
    if actual != expected:
        raise ModelError(f"{where}: content hash mismatch (file corrupt or edited): "
                         f"recorded {expected[:12]}, computed {actual[:12]}")
    validate(meta, arrays, where)
    return CompiledClassifier(meta=meta, arrays=arrays)


def load(path: str | os.PathLike[str] | None = None) -> CompiledClassifier:
    """Load and verify a classifier artifact (the shipped default when ``path`` is empty)."""
    p = Path(path) if path else DEFAULT_PATH
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelError(f"{p}: cannot read classifier artifact: {exc.strerror or exc}") from None
    return from_bytes(data, str(p))


# ------------------------------------------------------------------------------- compile / train
def compile_calibrated(cal: Any, feature_names: Sequence[str], units: Sequence[str], schema: FeatureSchema,
                       *, horizon_s: float, training: TrainingWindow, options: dict[str, Any],
                       metrics: dict[str, Any] | None = None) -> CompiledClassifier:
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
                feature_names: Sequence[str] | None = None) -> Any:
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
    """Run :func:`train` in a short-lived ``python -m agent.score.classifier train`` child."""
    argv = [sys.executable, "-m", "agent.score.classifier", "train", "--data", os.fspath(data_path),
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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.score.classifier",
                                 description="Train or inspect heald's failure classifier.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="fit on a dataset .npz (X, y, groups, feature_names, units, "
                                      "schema_json) and write the compiled artifact")
    tr.add_argument("--data", required=True)
    tr.add_argument("--out", required=True)
    tr.add_argument("--c", type=float, default=0.1, help="inverse L2 regularisation strength")
    tr.add_argument("--splits", type=int, default=3, help="calibration folds (grouped by episode)")
    info = sub.add_parser("info", help="print an artifact's metadata")
    info.add_argument("path", nargs="?", default="")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "train":
            model = train(args.data, args.out, c_reg=args.c, n_splits=args.splits)
        else:
            model = load(args.path or None)
    except ModelError as exc:
        sys.stderr.write(f"heald classifier: {exc}\n")
        return 1
    except (OSError, KeyError, ValueError) as exc:
        sys.stderr.write(f"heald classifier: bad dataset: {exc}\n")
        return 2
    meta = msgspec.json.decode(_meta_json(model.meta))
    meta.pop("schema", None)
    meta["features"] = len(model.meta.features)
    meta["version"] = model.version
    sys.stdout.write(msgspec.json.encode(meta).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
