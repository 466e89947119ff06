"""Failure classifier: compiled numpy scoring equals scikit-learn; artifact integrity; child training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

from agent.errors import ModelError
from agent.features.schema import FeatureSchema
from agent.score import classifier as clf
from agent.score import classifier_train as clf_train
from agent.score.artifact import TrainingWindow

SCHEMA = FeatureSchema()
# three inputs (cpu.util_pct, mem.used_pct, max(disk.used_pct[*])), all six transforms each
COLS = [j for j, n in enumerate(SCHEMA.names)
        if n.split(":")[0] in ("cpu.util_pct", "mem.used_pct", "max(disk.used_pct[*])")]
NAMES = [SCHEMA.names[j] for j in COLS]
UNITS = [SCHEMA.units[j] for j in COLS]
# the column each synthetic class moves: its own subsystem's (none: a CPU column too)
SHIFT = {"none": 1, "cpu_runaway": 0, "memory_exhaustion": 6, "disk_full": 12}


def synthetic(n_per: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    classes = ["none", "disk_full", "memory_exhaustion", "cpu_runaway"]
    xs, ys, gs = [], [], []
    for c in classes:
        for ep in range(4):
            x = rng.normal(0, 1, (n_per // 4, len(NAMES)))
            x[:, SHIFT[c]] += 2.5
            xs.append(x)
            ys += [c] * x.shape[0]
            gs += [f"{c}/{ep}"] * x.shape[0]
    x = np.vstack(xs)
    x[rng.random(x.shape) < 0.03] = np.nan
    return x, np.asarray(ys), np.asarray(gs)


@pytest.fixture(scope="module")
def fitted() -> tuple[object, clf.CompiledClassifier, np.ndarray]:
    x, y, g = synthetic()
    cal = clf_train.fit_sklearn(x, y, g, c_reg=1.0, n_splits=3, feature_names=NAMES)
    model = clf_train.compile_calibrated(cal, NAMES, UNITS, SCHEMA, horizon_s=300.0,
                                         training=TrainingWindow(rows=x.shape[0]), options={"c": 1.0})
    return cal, model, x


Fitted = tuple[object, clf.CompiledClassifier, np.ndarray]


def test_compiled_equals_sklearn_predict_proba(fitted: Fitted) -> None:
    cal, model, x = fitted
    want = cal.predict_proba(x)  # type: ignore[attr-defined]
    got = model.predict_proba(x)
    assert np.max(np.abs(got - want)) < 1e-6
    rng = np.random.default_rng(5)
    other = rng.normal(0, 3, (200, len(NAMES)))
    other[rng.random(other.shape) < 0.2] = np.nan
    assert np.max(np.abs(model.predict_proba(other) - cal.predict_proba(other))) < 1e-6  # type: ignore[attr-defined]


def test_scorer_per_sample_equals_sklearn(fitted: tuple[object, clf.CompiledClassifier, np.ndarray]) -> None:
    cal, model, x = fitted
    scorer = clf.Scorer(model, SCHEMA.names)
    want = cal.predict_proba(x[:50])  # type: ignore[attr-defined]
    classes = list(model.meta.classes)
    for i in range(50):
        vec = np.full(SCHEMA.dim, np.nan)
        vec[COLS] = x[i]
        got = scorer.failure(vec)
        assert "none" not in got
        for c, p in got.items():
            assert p == pytest.approx(want[i, classes.index(c)], abs=1e-6)


def test_scorer_refuses_foreign_features(fitted: tuple[object, clf.CompiledClassifier, np.ndarray]) -> None:
    _, model, _ = fitted
    with pytest.raises(ModelError, match="not produced"):
        clf.Scorer(model, ["cpu.util_pct:value"])


def test_artifact_roundtrip_and_integrity(tmp_path: Path,
                                          fitted: tuple[object, clf.CompiledClassifier, np.ndarray]) -> None:
    _, model, x = fitted
    p = clf.save(model, tmp_path / "c.npz")
    back = clf.load(p)
    assert back.version == model.version
    assert back.meta.schema == SCHEMA
    assert back.meta.sklearn_version
    assert back.meta.classes == model.meta.classes
    np.testing.assert_array_equal(back.predict_proba(x[:5]), model.predict_proba(x[:5]))
    data = bytearray(p.read_bytes())
    with pytest.raises(ModelError, match="not a readable"):
        clf.from_bytes(bytes(data[: len(data) // 2]), "half")
    # an edited array: hash mismatch
    with np.load(p, allow_pickle=False) as z:
        entries = {k: z[k] for k in z.files}
    entries["bias"] = entries["bias"] + 1.0
    np.savez(tmp_path / "edited.npz", **entries)
    with pytest.raises(ModelError, match="content hash mismatch"):
        clf.load(tmp_path / "edited.npz")
    with pytest.raises(ModelError, match="cannot read"):
        clf.load(tmp_path / "absent.npz")


def test_wrong_kind_refused(tmp_path: Path) -> None:
    meta = msgspec.json.encode({"kind": "heald.anomaly", "format_version": 1})
    np.savez(tmp_path / "x.npz", __meta__=np.frombuffer(meta, dtype=np.uint8),
             __sha256__=np.frombuffer(b"0" * 64, dtype=np.uint8))
    with pytest.raises(ModelError, match="kind"):
        clf.load(tmp_path / "x.npz")


@pytest.mark.slow
def test_train_in_child_process(tmp_path: Path) -> None:
    x, y, g = synthetic(seed=3)
    full = np.full((x.shape[0], SCHEMA.dim), np.nan)
    full[:, COLS] = x
    data = tmp_path / "d.npz"
    np.savez(data, X=full, y=y, groups=g, feature_names=np.asarray(SCHEMA.names),
             units=np.asarray(SCHEMA.units),
             schema_json=np.frombuffer(SCHEMA.to_json(), dtype=np.uint8), horizon_s=np.float64(300))
    out = tmp_path / "m.npz"
    model = clf_train.train_in_child(data, out, timeout_s=300)
    assert model.meta.feature_names == tuple(NAMES)  # empty columns dropped
    info = subprocess.run([sys.executable, "-m", "agent", "model", "info", str(out)],
                          capture_output=True, text=True, check=True, timeout=60)
    assert model.version in info.stdout
    bad = subprocess.run([sys.executable, "-m", "agent", "model", "train-classifier", "--data",
                          str(tmp_path / "none.npz"), "--out", str(out)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr


def test_each_class_reads_only_its_evidence(fitted: Fitted) -> None:
    _, model, _ = fitted
    w = model.arrays["weight"]
    for ci, c in enumerate(model.meta.classes):
        allowed = clf_train.evidence_masks(NAMES)[c]
        assert allowed, c
        off = [j for j in range(len(NAMES)) if j not in allowed]
        assert np.all(w[ci, off] == 0.0), (c, [NAMES[j] for j in off if w[ci, j] != 0.0])
        assert np.any(w[ci, allowed] != 0.0), c
    assert clf_train.evidence_key("max(disk.used_pct[*]):slope") == "disk.used_pct[*]"
    assert clf_train.evidence_key("psi.some_avg10_pct[memory]:ewma") == "psi.some_avg10_pct[memory]"


def test_a_class_without_evidence_is_refused() -> None:
    x, y, g = synthetic()
    with pytest.raises(ModelError, match=r"no feature may argue for class\(es\) \['disk_full'\]"):
        clf_train.fit_sklearn(x[:, :12], y, g, feature_names=NAMES[:12])


def test_shipped_default_classifier_loads() -> None:
    if not clf.DEFAULT_PATH.exists():
        pytest.skip("no shipped classifier artifact in this checkout")
    model = clf.load()
    assert set(model.meta.classes) - {"none"} <= set(clf.FAILURE_CLASSES)
    clf.Scorer(model, SCHEMA.names)
    assert model.meta.schema == SCHEMA
    assert clf.DEFAULT_PATH.stat().st_size < 200_000
    # the shipped model's classes read only their own subsystems (no CPU steal for disk_full)
    w = model.arrays["weight"]
    names = model.meta.feature_names
    for ci, c in enumerate(model.meta.classes):
        if c == "none":
            continue
        used = {clf_train.evidence_key(names[j]) for j in np.flatnonzero(w[ci])}
        assert used, c
        assert all(k.startswith(clf_train.CLASS_EVIDENCE[c]) for k in used), (c, sorted(used))
