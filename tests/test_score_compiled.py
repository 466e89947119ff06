"""Model artifact: round trip, content hash, format version, schema checks; never a traceback."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ModelError
from agent.score import compiled as art
from agent.score.artifact import FeatureSpec, meta_json
from agent.score.compiled import CompiledDetector
from agent.score.detector import StreamingDetector
from agent.score.fit import fit_detector

NAMES = ["cpu.util", "mem.used_pct", "disk.io", "net.rx"]


@pytest.fixture(scope="module")
def model() -> CompiledDetector:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 4)).cumsum(axis=0) * 0.01 + rng.normal(size=(800, 4)) * 0.1
    return fit_detector(x, NAMES, units=["%", "%", "B/s", "B/s"], n_clusters=4, top_k=2,
                        train_start=1.7e9, train_end=1.7e9 + 800, source="unit-test")


def test_round_trip(model: CompiledDetector, tmp_path: Path) -> None:
    path = art.save(model, tmp_path / "sub" / "model.npz")
    loaded = art.load(path, NAMES)
    assert loaded.meta == model.meta
    assert loaded.sha256 == model.sha256
    for k, v in model.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[k], v)
    assert loaded.meta.features[2] == FeatureSpec(name="disk.io", unit="B/s")
    assert loaded.meta.training.rows == 800
    assert loaded.meta.training.start == 1.7e9
    assert loaded.meta.sklearn_version
    assert loaded.meta.options["n_clusters"] == 4
    x = np.ones(4)
    assert StreamingDetector(loaded).score(x) == StreamingDetector(model).score(x)
    assert [p.name for p in path.parent.iterdir()] == ["model.npz"]  # no temp file left behind


def test_atomic_replace_keeps_old_file_on_failure(model: CompiledDetector, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = art.save(model, tmp_path / "model.npz")
    before = path.read_bytes()

    def boom(*_a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(art.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        art.save(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


def _rewrite(data: bytes, edit: dict[str, np.ndarray]) -> bytes:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        entries = {k: z[k] for k in z.files}
    entries.update(edit)
    buf = io.BytesIO()
    np.savez(buf, **entries)
    return buf.getvalue()


def test_tampered_array_is_refused(model: CompiledDetector) -> None:
    data = art.to_bytes(model)
    bad = _rewrite(data, {"median": model.arrays["median"] + 1.0})
    with pytest.raises(ModelError, match="content hash mismatch"):
        art.from_bytes(bad, "m.npz")


def test_tampered_metadata_is_refused(model: CompiledDetector) -> None:
    meta = msgspec.json.decode(meta_json(model.meta))
    meta["threshold"] = 1e9
    bad = _rewrite(art.to_bytes(model), {"__meta__": np.frombuffer(msgspec.json.encode(meta), np.uint8)})
    with pytest.raises(ModelError, match="content hash mismatch"):
        art.from_bytes(bad)


def test_wrong_format_version_is_refused(model: CompiledDetector) -> None:
    meta = msgspec.json.decode(meta_json(model.meta))
    meta["format_version"] = 99
    bad = _rewrite(art.to_bytes(model), {"__meta__": np.frombuffer(msgspec.json.encode(meta), np.uint8)})
    with pytest.raises(ModelError, match="format version 99 is not supported"):
        art.from_bytes(bad, "m.npz")


def test_schema_mismatch(model: CompiledDetector, tmp_path: Path) -> None:
    path = art.save(model, tmp_path / "m.npz")
    with pytest.raises(ModelError, match=r"missing \['net.rx'\]"):
        art.load(path, NAMES[:3])
    with pytest.raises(ModelError, match="different order"):
        art.load(path, list(reversed(NAMES)))
    with pytest.raises(ModelError, match="unexpected"):
        art.load(path, [*NAMES, "gpu.temp"])


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        art.load(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ModelError, match=r"junk\.npz"):
        art.load(tmp_path / "junk.npz")
    np.save(tmp_path / "bare.npy", np.zeros(3))
    with pytest.raises(ModelError, match="bare array"):
        art.load(tmp_path / "bare.npy")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ModelError, match="not a heald model artifact"):
        art.load(tmp_path / "other.npz")


def test_truncated_file(model: CompiledDetector) -> None:
    data = art.to_bytes(model)
    for cut in (10, len(data) // 2, len(data) - 5):
        with pytest.raises(ModelError):
            art.from_bytes(data[:cut])


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash(blob: bytes) -> None:
    with pytest.raises(ModelError):
        art.from_bytes(blob)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_any_single_byte_flip_is_detected_or_harmless(model_bytes_pos: int, value: int) -> None:
    data = bytearray(_MODEL_BYTES)
    pos = model_bytes_pos % len(data)
    if data[pos] == value:
        return
    data[pos] = value
    try:
        loaded = art.from_bytes(bytes(data))
    except ModelError:
        return
    # A flip in zip bookkeeping that the reader ignores must not change the content.
    assert loaded.sha256 == _MODEL_SHA


def _small_model() -> CompiledDetector:
    rng = np.random.default_rng(1)
    return fit_detector(rng.normal(size=(200, 3)), ["a", "b", "c"], n_clusters=2, top_k=1)


_M = _small_model()
_MODEL_BYTES = art.to_bytes(_M)
_MODEL_SHA = _M.sha256


def test_build_rejects_inconsistent_arrays(model: CompiledDetector) -> None:
    arrays = dict(model.arrays)
    arrays["scale"] = np.zeros(4)
    with pytest.raises(ModelError, match="positive"):
        art.build(model.meta, arrays)
    arrays = dict(model.arrays)
    arrays["centroids"] = np.zeros((2, 5))
    with pytest.raises(ModelError, match="centroid"):
        art.build(model.meta, arrays)
    arrays = dict(model.arrays)
    arrays["median"] = np.full(4, np.nan)
    with pytest.raises(ModelError, match="NaN"):
        art.build(model.meta, arrays)


def test_zip_is_plain_npz(model: CompiledDetector) -> None:
    with zipfile.ZipFile(io.BytesIO(art.to_bytes(model))) as zf:
        names = set(zf.namelist())
    assert {"__meta__.npy", "__sha256__.npy", "median.npy", "centroids.npy"} <= names
