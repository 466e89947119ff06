"""The artifact container shared by heald's compiled models: numpy arrays plus typed JSON metadata.

Both on-disk models use it: the anomaly detector (:mod:`agent.score.compiled`, kind
``heald.anomaly``) and the failure classifier (:mod:`agent.score.classifier`, kind
``heald.classifier``). Each describes its format with a :class:`Container` (kind, version,
metadata type and the wording of its error messages) and keeps its own array checks. Nothing
here imports scikit-learn.

File format: an uncompressed ``.npz`` (zip of ``.npy``, loaded with ``allow_pickle=False``) holding

* one float64 entry per model array,
* ``__meta__``: the UTF-8 JSON of the metadata struct (keys sorted), as a uint8 array,
* ``__sha256__``: the hex sha256 of the content (:func:`content_hash`), as a uint8 array.

The hash covers every array (name, dtype, shape and bytes, in name order) and the metadata JSON
under one fixed domain tag, and is verified on load: a truncated, edited or half-written file is
refused with a :class:`~agent.errors.ModelError` naming the file, never a traceback. Files are
written atomically (temporary file in the same directory, fsync, rename, fsync dir).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

from agent.errors import ModelError
from agent.fsutil import atomic_write

F64 = npt.NDArray[np.float64]

# The content hash's domain tag, fixed: the format version is in the metadata it covers, and
# changing the tag would change the hash (and so the reported version) of every shipped artifact.
HASH_DOMAIN = b"heald-artifact-v1\0"
META_ENTRY = "__meta__"
HASH_ENTRY = "__sha256__"

# What zipfile/numpy raise on damaged archives (found by fuzzing single-byte flips): zipfile raises
# NotImplementedError/RuntimeError for flipped flag bits ("encrypted", "compressed patched data").
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, IndexError, TypeError,
               RuntimeError, ArithmeticError, zlib.error, struct.error)


class FeatureSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    unit: str = ""


class TrainingWindow(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    rows: int
    start: float | None = None  # wall-clock seconds of the first training sample, when known
    end: float | None = None
    source: str = ""


class ArtifactHead(Protocol):
    """The metadata fields the container itself reads (every format's metadata struct has them)."""

    @property
    def format_version(self) -> int: ...

    @property
    def kind(self) -> str: ...


M = TypeVar("M", bound=ArtifactHead)
C = TypeVar("C")  # a format's compiled-model class


def meta_json(meta: ArtifactHead) -> bytes:
    """The metadata as stored and hashed: JSON with sorted keys."""
    return msgspec.json.encode(meta, order="sorted")


def content_hash(arrays: Mapping[str, F64], meta: bytes) -> str:
    h = hashlib.sha256()
    h.update(HASH_DOMAIN)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    h.update(b"meta\0")
    h.update(meta)
    return h.hexdigest()


def frozen_arrays(arrays: Mapping[str, npt.ArrayLike]) -> dict[str, F64]:
    """Read-only float64 copies of ``arrays`` (what a compiled model holds)."""
    clean: dict[str, F64] = {}
    for name, a in arrays.items():
        arr = np.array(a, dtype=np.float64, copy=True)
        arr.setflags(write=False)
        clean[name] = arr
    return clean


@dataclass(frozen=True, slots=True)
class Compiled(Generic[M]):
    """A compiled model: validated read-only float64 arrays plus their typed metadata."""

    meta: M
    arrays: dict[str, F64]

    @property
    def sha256(self) -> str:
        return content_hash(self.arrays, meta_json(self.meta))

    @property
    def version(self) -> str:
        """Short model version for reports: the first 12 hex digits of the content hash."""
        return self.sha256[:12]


def to_bytes(model: Compiled[M]) -> bytes:
    """The artifact file's bytes: the arrays, then the metadata and the content hash."""
    mj = meta_json(model.meta)
    digest = content_hash(model.arrays, mj)
    # Any, not NDArray: numpy's stub for savez types these keywords together with its own
    # ``allow_pickle: bool``, so a dict of arrays does not type-check against it.
    payload: dict[str, Any] = {
        **model.arrays,
        META_ENTRY: np.frombuffer(mj, dtype=np.uint8),
        HASH_ENTRY: np.frombuffer(digest.encode("ascii"), dtype=np.uint8),
    }
    buf = io.BytesIO()
    np.savez(buf, **payload)
    return buf.getvalue()


def save(model: Compiled[M], path: str | os.PathLike[str]) -> Path:
    """Write the artifact atomically: temporary file beside ``path``, fsync, rename, fsync dir."""
    return atomic_write(path, to_bytes(model), mode=0o644)


@dataclass(frozen=True, slots=True)
class Container(Generic[M, C]):
    """One artifact format in this container: its kind, version and metadata type, the class of
    its compiled models, its own checks of the arrays against the metadata, and how its error
    messages name it.

    The two formats keep the messages they had before they shared this code: ``noun`` names the
    artifact ("model", "classifier"), ``bare_array`` says why a bare ``.npy`` array is refused,
    and ``kind_first`` checks the recorded kind before the format version (the classifier's
    order; the detector's reader has always reported a foreign file by its format version).
    """

    kind: str
    version: int
    meta_type: type[M]
    compiled: Callable[[M, dict[str, F64]], C]
    validate: Callable[[M, dict[str, F64], str], None]  # raises ModelError naming the str
    noun: str
    bare_array: str
    kind_first: bool

    def build(self, meta: M, arrays: Mapping[str, npt.ArrayLike]) -> C:
        """A validated compiled model (arrays are copied to read-only float64)."""
        clean = frozen_arrays(arrays)
        self.validate(meta, clean, self.noun)
        return self.compiled(meta, clean)

    def from_bytes(self, data: bytes, where: str | None = None) -> C:
        """Decode and verify an artifact; every failure is a :class:`ModelError` naming ``where``
        (by default the format's noun)."""
        where = self.noun if where is None else where
        meta, arrays = self.decode(data, where)
        self.validate(meta, arrays, where)
        return self.compiled(meta, arrays)

    def load(self, path: Path) -> C:
        """Read, decode and verify the artifact at ``path``."""
        return self.from_bytes(self.read(path), str(path))

    def check_head(self, meta: ArtifactHead, where: str) -> None:
        """Refuse metadata of another format version or kind (version first)."""
        if meta.format_version != self.version:
            raise ModelError(self._version_error(meta.format_version, where))
        if meta.kind != self.kind:
            raise ModelError(f"{where}: artifact kind {meta.kind!r} is not {self.kind!r}")

    def _version_error(self, version: object, where: str) -> str:
        return (f"{where}: {self.noun} format version {version} is not supported "
                f"(this heald reads version {self.version}); retrain with this heald")

    def read(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ModelError(f"{path}: cannot read {self.noun} artifact: {exc.strerror or exc}") from None

    def decode(self, data: bytes, where: str) -> tuple[M, dict[str, F64]]:
        """Decode an artifact and verify its content hash; every failure is a
        :class:`ModelError` naming ``where``. The format's own array checks are the caller's."""
        noun = self.noun
        try:
            loaded = np.load(io.BytesIO(data), allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ModelError(f"{where}: not a heald {noun} artifact ({self.bare_array})")
            with loaded as z:
                entries = {name: z[name] for name in z.files}
        except READ_ERRORS as exc:
            raise ModelError(f"{where}: not a readable heald {noun} artifact ({exc})") from None
        raw_meta, raw_hash = entries.pop(META_ENTRY, None), entries.pop(HASH_ENTRY, None)
        if raw_meta is None or raw_hash is None:
            raise ModelError(f"{where}: not a heald {noun} artifact (no metadata or content hash)")
        mj = raw_meta.astype(np.uint8).tobytes()
        try:
            head = msgspec.json.decode(mj, type=dict[str, object])
        except msgspec.DecodeError as exc:
            raise ModelError(f"{where}: unreadable {noun} metadata ({exc})") from None
        if self.kind_first and head.get("kind") != self.kind:
            raise ModelError(f"{where}: artifact kind {head.get('kind')!r} is not {self.kind!r}")
        if head.get("format_version") != self.version:
            raise ModelError(self._version_error(head.get("format_version"), where))
        try:
            meta = msgspec.json.decode(mj, type=self.meta_type)
        except msgspec.ValidationError as exc:
            raise ModelError(f"{where}: invalid {noun} metadata: {exc}") from None
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
        return meta, arrays
