"""The compiled anomaly-model artifact: plain numpy arrays plus typed metadata.

A model is fitted with scikit-learn in a short-lived child process (:mod:`agent.score.fit`) and
*compiled* into the arrays below; the daemon only ever loads those arrays and scores them with
numpy (:mod:`agent.score.detector`). Nothing here imports scikit-learn.

File format (version :data:`FORMAT_VERSION`, kind :data:`KIND`): the container of
:mod:`agent.score.artifact` (an ``.npz`` of float64 arrays with the ``__meta__`` JSON and the
``__sha256__`` content hash, verified on load, written atomically) holding the arrays of
:data:`ARRAY_SPECS` and the JSON of :class:`ArtifactMeta`. This module adds the detector's own
checks: the arrays against the metadata (:func:`validate`) and the feature schema (:func:`load`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from agent.errors import ModelError
from agent.score import artifact
from agent.score.artifact import F64, Compiled, Container, FeatureSpec, TrainingWindow

FORMAT_VERSION = 2  # 2: threshold_geo (the geometric smoother's threshold)
KIND = "heald.anomaly"

# Component names, in the order of ``divisors`` and ``weights``.
COMPONENTS: tuple[str, ...] = ("robust_z", "kmeans", "delta", "pca")

# Array name -> rank; ``d`` features, ``k`` centroids, ``r`` principal components.
ARRAY_SPECS: dict[str, int] = {
    "median": 1,  # (d,) training median per feature: robust centre and imputation value
    "scale": 1,  # (d,) robust scale per feature: max(1.4826 MAD, floor * std, 1e-3)
    "centroids": 2,  # (k, d) k-means centroids (k >= 1)
    "centroid_sq": 1,  # (k,) squared norms of the centroids
    "pca_mean": 1,  # (d,) PCA centre (zeros when the PCA component is off)
    "pca_components": 2,  # (r, d) orthonormal principal axes (r may be 0)
    "divisors": 1,  # (4,) per-component normaliser: a high train quantile of the raw component
    "weights": 1,  # (4,) per-component weight in the ensemble (0 switches a component off)
}
# Optional arrays (artifacts fitted before drift detection lack them): the training summary that
# live drift is measured against (agent.score.drift): decile edges and the training's bin shares.
# Name -> n for shape (d, n); 0: shape (d,).
OPTIONAL_ARRAYS: dict[str, int] = {"drift_edges": 9, "drift_expected": 10, "drift_stable": 0}


class ArtifactMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    format_version: int
    kind: str
    features: tuple[FeatureSpec, ...]
    training: TrainingWindow
    # Alert thresholds of the two smoothers of the raw score (see agent.score.detector): the
    # arithmetic EWMA's and the geometric EWMA's. The detector reports the smaller of the two
    # ratios smoothed / threshold, so 1.0 is the alert threshold.
    threshold: float
    threshold_geo: float
    ewma_alpha: float
    top_k: int
    options: dict[str, object]  # the fit options (agent.score.fit.FitOptions) as JSON
    sklearn_version: str
    numpy_version: str
    created: str  # ISO 8601, UTC
    # The fast channel (agent.score.detector): an arithmetic EWMA of the raw score with
    # ``fast_alpha`` over its own threshold, which alerts once it has stayed over it for
    # ``fast_min_s`` seconds of the samples' own timestamps. None: no fast channel (artifacts
    # fitted before it had none and score as before).
    threshold_fast: float | None = None
    fast_alpha: float = 0.5
    fast_power: float = 0.2
    fast_min_s: float = 15.0

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)


@dataclass(frozen=True, slots=True)
class CompiledDetector(Compiled[ArtifactMeta]):
    """A fitted anomaly detector as plain arrays + metadata; scored by ``StreamingDetector``."""

    def check_features(self, names: list[str] | tuple[str, ...]) -> None:
        """Raise :class:`ModelError` unless ``names`` is exactly this model's feature schema."""
        expected = self.meta.feature_names
        if tuple(names) != expected:
            missing = [n for n in expected if n not in names]
            extra = [n for n in names if n not in expected]
            detail = []
            if missing:
                detail.append(f"missing {missing[:5]}")
            if extra:
                detail.append(f"unexpected {extra[:5]}")
            if not detail:
                detail.append("same features in a different order")
            raise ModelError(
                f"model {self.version}: feature schema mismatch ({'; '.join(detail)}); "
                f"retrain the model for this node's features"
            )


def validate(meta: ArtifactMeta, arrays: dict[str, F64], where: str) -> None:
    """Check the arrays against the metadata; raise :class:`ModelError` naming ``where``."""
    FORMAT.check_head(meta, where)
    d = len(meta.features)
    if d == 0:
        raise ModelError(f"{where}: the model has no features")
    if len(set(meta.feature_names)) != d:
        raise ModelError(f"{where}: duplicate feature names in the model schema")
    for name, rank in ARRAY_SPECS.items():
        if name not in arrays:
            raise ModelError(f"{where}: array {name!r} is missing")
        a = arrays[name]
        if a.dtype != np.float64 or a.ndim != rank:
            raise ModelError(f"{where}: array {name!r} has dtype {a.dtype} and rank {a.ndim}, "
                             f"expected float64 of rank {rank}")
        if not np.all(np.isfinite(a)):
            raise ModelError(f"{where}: array {name!r} holds NaN or infinite values")
    for name, cols in OPTIONAL_ARRAYS.items():
        shape = (d, cols) if cols else (d,)
        if name in arrays and (arrays[name].dtype != np.float64 or arrays[name].shape != shape
                               or not np.all(np.isfinite(arrays[name]))):
            raise ModelError(f"{where}: array {name!r} must be finite float64 of shape {shape}")
    extra = set(arrays) - set(ARRAY_SPECS) - set(OPTIONAL_ARRAYS)
    if extra:
        raise ModelError(f"{where}: unexpected arrays {sorted(extra)}")
    k = arrays["centroids"].shape[0]
    shapes = {
        "median": (d,), "scale": (d,), "centroid_sq": (k,), "pca_mean": (d,),
        "divisors": (len(COMPONENTS),), "weights": (len(COMPONENTS),),
    }
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            raise ModelError(f"{where}: array {name!r} has shape {arrays[name].shape}, expected {shape}")
    if k < 1 or arrays["centroids"].shape[1] != d:
        raise ModelError(f"{where}: centroids have shape {arrays['centroids'].shape}, expected (k>=1, {d})")
    if arrays["pca_components"].shape[1] != d:
        raise ModelError(f"{where}: pca_components have {arrays['pca_components'].shape[1]} columns, "
                         f"expected {d}")
    if np.any(arrays["scale"] <= 0) or np.any(arrays["divisors"] <= 0):
        raise ModelError(f"{where}: scales and divisors must be positive")
    for name in ("threshold", "threshold_geo"):
        value = getattr(meta, name)
        if not (np.isfinite(value) and value > 0):
            raise ModelError(f"{where}: {name} must be a positive number, got {value}")
    if not 0 < meta.ewma_alpha <= 1:
        raise ModelError(f"{where}: ewma_alpha must be in (0, 1], got {meta.ewma_alpha}")
    if meta.threshold_fast is not None:
        if not (np.isfinite(meta.threshold_fast) and meta.threshold_fast > 0):
            raise ModelError(f"{where}: threshold_fast must be a positive number, got {meta.threshold_fast}")
        if not 0 < meta.fast_alpha <= 1:
            raise ModelError(f"{where}: fast_alpha must be in (0, 1], got {meta.fast_alpha}")
        if not (np.isfinite(meta.fast_power) and meta.fast_power > 0):
            raise ModelError(f"{where}: fast_power must be positive, got {meta.fast_power}")
        if not (np.isfinite(meta.fast_min_s) and meta.fast_min_s >= 0):
            raise ModelError(f"{where}: fast_min_s must be >= 0 seconds, got {meta.fast_min_s}")
    if not 1 <= meta.top_k <= d:
        raise ModelError(f"{where}: top_k must be in [1, {d}], got {meta.top_k}")


FORMAT = Container(kind=KIND, version=FORMAT_VERSION, meta_type=ArtifactMeta, compiled=CompiledDetector,
                   validate=validate, noun="model", bare_array="a bare array, not an .npz archive",
                   kind_first=False)
# The format's operations, under the names fit.py, the stage and the CLI use.
build = FORMAT.build
from_bytes = FORMAT.from_bytes
to_bytes = artifact.to_bytes
save = artifact.save


def load(path: str | os.PathLike[str], feature_names: list[str] | tuple[str, ...] | None = None,
         ) -> CompiledDetector:
    """Load and verify an artifact; with ``feature_names``, also check the feature schema."""
    p = Path(path)
    model = FORMAT.load(p)
    if feature_names is not None:
        try:
            model.check_features(feature_names)
        except ModelError as exc:
            raise ModelError(f"{p}: {exc}") from None
    return model
