"""Failure classifier: P(failure class within the horizon | features), scored from numpy arrays.

This is what the daemon loads: the artifact format and the per-sample :class:`Scorer` (numpy,
or one C call of :mod:`agent.native`). Nothing here imports scikit-learn; the model is fitted
and compiled in a short-lived child process by :mod:`agent.score.classifier_train`.

The compiled model is a handful of arrays, scored per sample as

    x_i <- median_i where x_i is missing;  z = W x + b   (W = coef / scale, b folds the centring)
    p_c = 1 / (1 + exp(a_c z_c + b_c))  (Platt maps);  p <- p / sum(p)   (uniform when the sum is 0)

which equals ``predict_proba`` of the fitted scikit-learn object (tested to 1e-6). Classes are
``"none"`` plus the failure classes seen in training; :data:`FAILURE_CLASSES` lists all known ones.

Artifact: the container of :mod:`agent.score.artifact` (``.npz``, ``allow_pickle=False``, content
hash verified on load, written atomically) holding the arrays of :data:`ARRAY_SPECS` and the JSON
of :class:`ClassifierMeta` (classes, feature names/units, the full feature schema, horizon,
training window, scikit-learn/numpy versions, options and held-out metrics).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

from agent.errors import ModelError
from agent.features.schema import FeatureSchema
from agent.native import Kernels, kernels, ptr
from agent.score import artifact
from agent.score.artifact import F64, Compiled, Container, FeatureSpec, TrainingWindow

FAILURE_CLASSES: tuple[str, ...] = (
    "disk_full", "memory_exhaustion", "cpu_runaway", "network_degradation", "gpu_fault", "service_down",
)
NONE = "none"
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
    options: dict[str, object] = msgspec.field(default_factory=dict)  # training options, as JSON
    metrics: dict[str, object] = msgspec.field(default_factory=dict)  # held-out metrics, as JSON

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)


@dataclass(frozen=True, slots=True)
class CompiledClassifier(Compiled[ClassifierMeta]):
    """A fitted failure classifier as plain arrays + metadata; scored by :class:`Scorer`."""

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
    """Check the arrays against the metadata; raise :class:`ModelError` naming ``where``."""
    FORMAT.check_head(meta, where)
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


FORMAT = Container(kind=KIND, version=FORMAT_VERSION, meta_type=ClassifierMeta, compiled=CompiledClassifier,
                   validate=validate, noun="classifier", bare_array="not an .npz archive", kind_first=True)
# The format's operations, under the names the stage, the training side and the CLI use.
build = FORMAT.build
from_bytes = FORMAT.from_bytes
to_bytes = artifact.to_bytes
save = artifact.save


def load(path: str | os.PathLike[str] | None = None) -> CompiledClassifier:
    """Load and verify a classifier artifact (the shipped default when ``path`` is empty)."""
    return FORMAT.load(Path(path) if path else DEFAULT_PATH)
