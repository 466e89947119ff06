"""The compiled anomaly-model artifact: plain numpy arrays plus typed metadata.

A model is fitted with scikit-learn in a short-lived child process (:mod:`agent.score.fit`) and
*compiled* into the arrays below; the daemon only ever loads those arrays and scores them with
numpy (:mod:`agent.score.detector`). Nothing here imports scikit-learn.

File format (version :data:`FORMAT_VERSION`): an uncompressed ``.npz`` (zip of ``.npy``, loaded
with ``allow_pickle=False``) holding

* one entry per array of :data:`ARRAY_SPECS` (float64),
* ``__meta__``: the UTF-8 JSON of :class:`ArtifactMeta`, as a uint8 array,
* ``__sha256__``: the hex sha256 of the content (:func:`content_hash`), as a uint8 array.

The hash covers every array (name, dtype, shape and bytes, in name order) and the metadata
JSON, and is verified on load: a truncated, edited or half-written file is refused with a
:class:`~agent.errors.ModelError` naming the file, never a traceback.
Files are written atomically (temporary file in the same directory, fsync, rename, fsync dir).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from agent.errors import ModelError
from agent.fsutil import atomic_write

FORMAT_VERSION = 2  # 2: threshold_geo (the geometric smoother's threshold)
KIND = "heald.anomaly"

F64 = npt.NDArray[np.float64]

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


class FeatureSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    unit: str = ""


class TrainingWindow(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    rows: int
    start: float | None = None  # wall-clock seconds of the first training sample, when known
    end: float | None = None
    source: str = ""


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
    options: dict[str, Any]
    sklearn_version: str
    numpy_version: str
    created: str  # ISO 8601, UTC

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)


@dataclass(frozen=True, slots=True)
class CompiledDetector:
    """A fitted anomaly detector as plain arrays + metadata; scored by ``StreamingDetector``."""

    meta: ArtifactMeta
    arrays: dict[str, F64]

    @property
    def sha256(self) -> str:
        return content_hash(self.arrays, meta_json(self.meta))

    @property
    def version(self) -> str:
        """Short model version for reports: the first 12 hex digits of the content hash."""
        return self.sha256[:12]

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


def meta_json(meta: ArtifactMeta) -> bytes:
    return msgspec.json.encode(meta, order="sorted")


def content_hash(arrays: dict[str, F64], meta: bytes) -> str:
    h = hashlib.sha256()
    # The hash's domain tag, fixed: the format version is in the metadata it covers, and the
    # classifier's artifacts (agent.score.classifier) share this hash.
    h.update(b"heald-artifact-v1\0")
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    h.update(b"meta\0")
    h.update(meta)
    return h.hexdigest()


def validate(meta: ArtifactMeta, arrays: dict[str, F64], where: str) -> None:
    """Check the arrays against the metadata; raise :class:`ModelError` naming ``where``."""
    if meta.format_version != FORMAT_VERSION:
        raise ModelError(
            f"{where}: model format version {meta.format_version} is not supported "
            f"(this heald reads version {FORMAT_VERSION}); retrain with this heald"
        )
    if meta.kind != KIND:
        raise ModelError(f"{where}: artifact kind {meta.kind!r} is not {KIND!r}")
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
    extra = set(arrays) - set(ARRAY_SPECS)
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
    if not 1 <= meta.top_k <= d:
        raise ModelError(f"{where}: top_k must be in [1, {d}], got {meta.top_k}")


def build(meta: ArtifactMeta, arrays: dict[str, Any]) -> CompiledDetector:
    """Make a validated :class:`CompiledDetector` (arrays are copied to read-only float64)."""
    clean: dict[str, F64] = {}
    for name, a in arrays.items():
        arr = np.array(a, dtype=np.float64, copy=True)
        arr.setflags(write=False)
        clean[name] = arr
    validate(meta, clean, "model")
    return CompiledDetector(meta=meta, arrays=clean)


def to_bytes(model: CompiledDetector) -> bytes:
    mj = meta_json(model.meta)
    digest = content_hash(model.arrays, mj)
    buf = io.BytesIO()
    payload: dict[str, Any] = dict(model.arrays)
    payload["__meta__"] = np.frombuffer(mj, dtype=np.uint8)
    payload["__sha256__"] = np.frombuffer(digest.encode("ascii"), dtype=np.uint8)
    np.savez(buf, **payload)
    return buf.getvalue()


def save(model: CompiledDetector, path: str | os.PathLike[str]) -> Path:
    """Write the artifact atomically: temporary file beside ``path``, fsync, rename, fsync dir."""
    return atomic_write(path, to_bytes(model), mode=0o644)


# What zipfile/numpy raise on damaged archives (found by fuzzing single-byte flips): zipfile raises
# NotImplementedError/RuntimeError for flipped flag bits ("encrypted", "compressed patched data").
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, IndexError, TypeError,
                RuntimeError, ArithmeticError, zlib.error, struct.error)


def from_bytes(data: bytes, where: str = "model") -> CompiledDetector:
    """Decode and verify an artifact; every failure is a :class:`ModelError` naming ``where``."""
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ModelError(f"{where}: not a heald model artifact (a bare array, not an .npz archive)")
        with loaded as z:
            entries = {name: z[name] for name in z.files}
    except _READ_ERRORS as exc:
        raise ModelError(f"{where}: not a readable heald model artifact ({exc})") from None
    raw_meta = entries.pop("__meta__", None)
    raw_hash = entries.pop("__sha256__", None)
    if raw_meta is None or raw_hash is None:
        raise ModelError(f"{where}: not a heald model artifact (no metadata or content hash)")
    mj = raw_meta.astype(np.uint8).tobytes()
    try:
        version = msgspec.json.decode(mj, type=dict[str, Any]).get("format_version")
    except msgspec.DecodeError as exc:
        raise ModelError(f"{where}: unreadable model metadata ({exc})") from None
    if version != FORMAT_VERSION:
        raise ModelError(
            f"{where}: model format version {version} is not supported "
            f"(this heald reads version {FORMAT_VERSION}); retrain with this heald"
        )
    try:
        meta = msgspec.json.decode(mj, type=ArtifactMeta)
    except msgspec.ValidationError as exc:
        raise ModelError(f"{where}: invalid model metadata: {exc}") from None
    arrays: dict[str, F64] = {}
    for name, a in entries.items():
        if a.dtype != np.float64:
            raise ModelError(f"{where}: array {name!r} has dtype {a.dtype}, expected float64")
        arr = np.ascontiguousarray(a, dtype=np.float64)
        arr.setflags(write=False)
        arrays[name] = arr
    expected = raw_hash.astype(np.uint8).tobytes().decode("ascii", errors="replace")
    actual = content_hash(arrays, mj)
    if actual != expected:
        raise ModelError(f"{where}: content hash mismatch (file corrupt or edited): "
                         f"recorded {expected[:12]}, computed {actual[:12]}")
    validate(meta, arrays, where)
    return CompiledDetector(meta=meta, arrays=arrays)


def load(path: str | os.PathLike[str], feature_names: list[str] | tuple[str, ...] | None = None,
         ) -> CompiledDetector:
    """Load and verify an artifact; with ``feature_names``, also check the feature schema."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelError(f"{p}: cannot read model artifact: {exc.strerror or exc}") from None
    model = from_bytes(data, str(p))
    if feature_names is not None:
        try:
            model.check_features(feature_names)
        except ModelError as exc:
            raise ModelError(f"{p}: {exc}") from None
    return model
