"""Fitting: compiled numpy arrays reproduce scikit-learn; fitting in a reaped child process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from agent.cli.main import main
from agent.errors import InputError, ModelError
from agent.score import compiled as art
from agent.score import fit
from agent.score.detector import KM, RZ, StreamingDetector, combine, component_scores, ewma, geo_ewma
from agent.score.detector import PCA as PCA_COMPONENT
from agent.score.fit import compile_kmeans, compile_pca, fit_detector, fit_in_child, load_training

NAMES = [f"f{i}" for i in range(7)]


def _data(n: int = 1500, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 3)) @ rng.normal(size=(3, 7))
    return base + 0.1 * rng.normal(size=(n, 7))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_distance_equals_sklearn(seed: int) -> None:
    x = _data(seed=seed)
    model = fit_detector(x, NAMES, n_clusters=5, random_state=seed)
    km = KMeans(n_clusters=5, n_init=1, random_state=seed).fit(x)
    centroids, sq = compile_kmeans(km)
    arrays = dict(model.arrays)
    arrays["centroids"], arrays["centroid_sq"] = centroids, sq
    m = art.build(model.meta, arrays)
    probe = np.random.default_rng(seed + 10).normal(size=(300, 7)) * 3
    ours = component_scores(m, probe)[:, KM]
    np.testing.assert_allclose(ours, km.transform(probe).min(axis=1), rtol=0, atol=1e-6)
    # And one row at a time through the streaming detector (only the k-means component on).
    arrays["weights"] = np.array([0.0, 1.0, 0.0, 0.0])
    arrays["divisors"] = np.ones(4)
    # alpha 1: no smoothing; a tiny geometric threshold keeps that smoother out of the minimum.
    meta = art.ArtifactMeta(**{**_meta_fields(m), "threshold": 1.0, "threshold_geo": 1e-12,
                               "ewma_alpha": 1.0})
    det = StreamingDetector(art.build(meta, arrays))
    streamed = np.array([det.score(row)[0] for row in probe])
    np.testing.assert_allclose(streamed, km.transform(probe).min(axis=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("variance", [0.8, 0.95])
def test_pca_reconstruction_equals_sklearn(variance: float) -> None:
    x = _data()
    model = fit_detector(x, NAMES, weights=(0.0, 0.0, 0.0, 1.0), pca_variance=variance,
                         ewma_alpha=1.0, n_clusters=2)
    pca = PCA(n_components=variance, svd_solver="full").fit(x)
    mean, comps = compile_pca(pca)
    np.testing.assert_allclose(model.arrays["pca_mean"], mean, atol=1e-9)
    assert model.arrays["pca_components"].shape == comps.shape
    probe = np.random.default_rng(5).normal(size=(300, 7)) * 2
    expected = ((probe - pca.inverse_transform(pca.transform(probe))) ** 2).sum(axis=1)
    np.testing.assert_allclose(component_scores(model, probe)[:, PCA_COMPONENT], expected, atol=1e-6)
    det = StreamingDetector(art.build(msgspec.structs.replace(model.meta, threshold_geo=1e-12), model.arrays))
    div, thr = model.arrays["divisors"][PCA_COMPONENT], model.meta.threshold
    streamed = np.array([det.score(row)[0] for row in probe]) * thr * div
    np.testing.assert_allclose(streamed, expected, rtol=1e-9, atol=1e-6)


def test_robust_z_matches_definition() -> None:
    x = _data()
    model = fit_detector(x, NAMES, top_k=3, n_clusters=2)
    med = np.median(x, axis=0)
    scale = np.maximum(np.maximum(np.median(np.abs(x - med), axis=0) * 1.4826, 0.2 * x.std(axis=0)), 1e-3)
    probe = _data(50, seed=9)
    z = np.abs(probe - med) / scale
    expected = np.sort(z, axis=1)[:, -3:].mean(axis=1)
    np.testing.assert_allclose(component_scores(model, probe)[:, RZ], expected, atol=1e-9)


def test_threshold_is_label_free_train_quantile() -> None:
    x = _data(3000)
    model = fit_detector(x, NAMES, n_clusters=4)
    raw = combine(model, component_scores(model, x))
    alpha = model.meta.ewma_alpha
    # Default: the arithmetic smoother's threshold is the 99.5th percentile of its value on the
    # training data, the geometric smoother's the 98th (research log #59).
    for smoothed, threshold, share in ((ewma(raw, alpha), model.meta.threshold, 0.005),
                                       (geo_ewma(raw, alpha), model.meta.threshold_geo, 0.02)):
        assert share - 0.001 <= float(np.mean(smoothed >= threshold)) <= share + 0.001
    # The fast channel's: its EWMA's 99.5th percentile x 1.3.
    fast = ewma(raw, model.meta.fast_alpha)
    assert model.meta.fast_alpha == 0.5
    assert model.meta.threshold_fast == pytest.approx(1.3 * float(np.quantile(fast, 0.995)))
    det = StreamingDetector(model)
    alerts = np.array([det.score(row)[1] for row in x])
    # A slow alert needs both (no timestamps: the fast channel never alerts).
    assert alerts.mean() <= 0.006
    margin = fit_detector(x, NAMES, n_clusters=4, threshold_margin=1.5)
    assert margin.meta.threshold == pytest.approx(1.5 * model.meta.threshold)
    assert margin.meta.threshold_geo == pytest.approx(1.5 * model.meta.threshold_geo)
    assert margin.meta.threshold_fast == pytest.approx(1.5 * model.meta.threshold_fast)
    assert fit_detector(x, NAMES, n_clusters=4, fast=False).meta.threshold_fast is None


def test_missing_values_in_training_are_imputed() -> None:
    x = _data()
    x[::7, 2] = np.nan
    x[5] = np.nan
    model = fit_detector(x, NAMES, n_clusters=3)
    assert np.all(np.isfinite(model.arrays["median"]))
    assert model.meta.training.rows == x.shape[0] - 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_clusters": 0}, "n_clusters"),
        ({"top_k": 0}, "top_k"),
        ({"weights": (0.0, 0.0, 0.0, 0.0)}, "weights"),
        ({"ewma_alpha": 0.0}, "ewma_alpha"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_bad_options(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InputError, match=match):
        fit_detector(_data(100), NAMES, **kwargs)


def test_bad_training_data() -> None:
    with pytest.raises(InputError, match="2-D"):
        fit_detector(np.zeros(10), ["a"])
    with pytest.raises(InputError, match="feature names"):
        fit_detector(_data(100), NAMES[:3])
    x = _data(100)
    x[:, 1] = np.nan
    with pytest.raises(InputError, match=r"columns \[1\]"):
        fit_detector(x, NAMES)


def test_fit_in_child_writes_verified_artifact(tmp_path: Path) -> None:
    train = tmp_path / "train.npz"
    np.savez(train, train=_data(), feature_names=np.array(NAMES))
    out = tmp_path / "models" / "anomaly.npz"
    model = fit_in_child(train, out, options={"n_clusters": 4}, timeout_s=120, feature_names=NAMES)
    assert out.is_file()
    assert model.meta.options["n_clusters"] == 4
    assert model.meta.training.source == "train.npz"
    assert art.load(out).sha256 == model.sha256
    assert sorted(p.name for p in out.parent.iterdir()) == ["anomaly.npz"]


def test_fit_in_child_csv(tmp_path: Path) -> None:
    x = _data(300)
    lines = [",".join(NAMES)] + [",".join("" if (i == 3 and j == 2) else f"{v:.6f}" for j, v in enumerate(r))
                                 for i, r in enumerate(x)]
    src = tmp_path / "train.csv"
    src.write_text("\n".join(lines) + "\n")
    data, names, _ = load_training(src)
    assert names == NAMES
    assert np.isnan(data[3, 2])
    model = fit_in_child(src, tmp_path / "m.npz", options={"n_clusters": 3}, timeout_s=120)
    assert model.meta.feature_names == tuple(NAMES)


def test_fit_in_child_bad_input_is_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "train.csv"
    bad.write_text("a,b\n1,x\n")
    with pytest.raises(ModelError, match=r"exit 2.*not a number"):
        fit_in_child(bad, tmp_path / "m.npz", timeout_s=120)
    assert not (tmp_path / "m.npz").exists()


def test_fit_in_child_schema_mismatch(tmp_path: Path) -> None:
    train = tmp_path / "train.npz"
    np.savez(train, train=_data(200))
    with pytest.raises(ModelError, match="schema mismatch"):
        fit_in_child(train, tmp_path / "m.npz", options={"n_clusters": 2}, timeout_s=120,
                     feature_names=["x"] * 7)


def test_fit_in_child_timeout_kills_and_reaps(tmp_path: Path) -> None:
    train = tmp_path / "train.npz"
    np.savez(train, train=_data(200))
    t0 = time.monotonic()
    with pytest.raises(ModelError, match="timed out"):
        fit_in_child(train, tmp_path / "m.npz", timeout_s=0.05)
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "m.npz").exists()


@pytest.mark.parametrize(("before", "after"), [("-900\n", "0\n"), ("-1", "0\n"), ("0\n", "0\n"),
                                               ("300\n", "300\n"), ("junk", "junk")])
def test_leave_oom_protection_only_raises(tmp_path: Path, before: str, after: str) -> None:
    adj = tmp_path / "oom_score_adj"
    adj.write_text(before)
    fit.leave_oom_protection(str(adj))
    assert adj.read_text() == after
    fit.leave_oom_protection(str(tmp_path / "missing"))  # no /proc: ignored


def test_child_main_gives_up_oom_protection_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adj = tmp_path / "oom_score_adj"
    adj.write_text("-900\n")  # what heald.service's OOMScoreAdjust=-900 leaves to the child
    monkeypatch.setattr(fit, "OOM_SCORE_ADJ", str(adj))
    assert main(["model", "train", "--input", str(tmp_path / "missing.npz"),
                 "--output", str(tmp_path / "m.npz")]) == 2
    assert adj.read_text() == "0\n"


def _protect() -> None:
    with open("/proc/self/oom_score_adj", "w") as fh:
        fh.write("-900")


def test_child_entry_raises_real_oom_score_adj(tmp_path: Path) -> None:
    # The real thing: a process started with oom_score_adj -900 (as the daemon's children are)
    # runs the child's main and reads its own value back. Lowering needs CAP_SYS_RESOURCE.
    code = ("import sys; from agent.cli.main import main; "
            "rc = main(['model', 'train', '--input', sys.argv[1], '--output', sys.argv[2]]); "
            "print(rc, open('/proc/self/oom_score_adj').read().strip())")
    argv = [sys.executable, "-c", code, str(tmp_path / "missing.npz"), str(tmp_path / "m.npz")]
    try:
        probe = subprocess.run([sys.executable, "-c", "print(open('/proc/self/oom_score_adj').read())"],
                               preexec_fn=_protect, capture_output=True, text=True, timeout=30, check=True)
    except subprocess.SubprocessError:
        pytest.skip("cannot lower oom_score_adj here (needs CAP_SYS_RESOURCE)")
    assert probe.stdout.strip() == "-900"
    out = subprocess.run(argv, preexec_fn=_protect, capture_output=True, text=True, timeout=60, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == ["2", "0"]


def _meta_fields(m: art.CompiledDetector) -> dict[str, object]:
    return {f: getattr(m.meta, f) for f in m.meta.__struct_fields__}


def test_exclude_leaves_workload_levels_out_of_the_model() -> None:
    """The stage's default fit leaves workload levels, CPU contention and process churn out; the
    rest scores."""
    from agent.features.schema import FeatureSchema  # noqa: PLC0415
    from agent.score.stage import DEFAULT_FIT_OPTIONS  # noqa: PLC0415

    names = list(FeatureSchema().names)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (300, len(names)))
    model = fit_detector(x, names, **DEFAULT_FIT_OPTIONS)
    kept = set(model.meta.feature_names)
    assert "cpu.util_pct:value" not in kept
    assert "proc.top_cpu_pct:ewma" not in kept
    assert "sum(disk.write_bytes_per_s[*]):slope" not in kept
    assert "psi.some_avg10_pct[memory]:value" in kept
    assert "max(disk.write_await_ms[*]):std" in kept
    assert "cpu.steal_pct:ewma" not in kept
    assert "psi.some_avg10_pct[cpu]:value" not in kept
    assert "psi.some_avg10_pct[io]:value" in kept
    assert "proc.zombies:ewma" not in kept  # process churn (a burst's children before the wait)
    assert "proc.blocked:ewma" in kept
    assert "sum(gpu.pcie_replays[*]):value" not in kept  # a GPU counter's level: its rate stays
    assert "sum(gpu.pcie_replays[*]):rate" in kept
    # ten inputs x six transforms, and value + ewma of the nine GPU counters
    assert len(kept) == len(names) - 6 * 10 - 2 * 9
    d = StreamingDetector(model)
    assert np.isfinite(d.score(x[0, [names.index(n) for n in model.meta.feature_names]])[0])
    with pytest.raises(InputError, match="every feature is excluded"):
        fit_detector(x[:, :3], names[:3], exclude=["cpu.util_pct"])  # its first three features
