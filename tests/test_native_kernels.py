"""agent.native: the C kernels give the numpy reference path's results, and are refused cleanly.

Every per-sample step of the score stage runs twice on the same inputs — numpy (``native=False``)
and the C kernel (``native=True``) — and must agree: the feature window and the forecaster bit
for bit (the C code performs the same floating-point operations in the same order), the detector
and the classifier to 1e-12 (their dot products may sum in another order).

CI sets ``HEALD_REQUIRE_KERNELS=1``: there a missing library is a failure, not a skip.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import native
from agent.collect.sample import Sample
from agent.errors import ModelError
from agent.features.schema import FeatureSchema, InputSpec
from agent.features.window import FeatureWindow
from agent.score import classifier as clf
from agent.score.detector import StreamingDetector
from agent.score.fit import fit_detector
from agent.score.forecast import Forecaster, Resource
from agent.score.settings import ModelSettings
from agent.score.stage import RiskStage

ROOT = Path(__file__).resolve().parents[1]
KERNELS = native.kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="native kernels not built (pip install -e .)")


def test_kernels_are_built_where_required() -> None:
    if os.environ.get("HEALD_REQUIRE_KERNELS") == "1":
        assert KERNELS is not None, "HEALD_REQUIRE_KERNELS=1 but agent/native has no usable library"
    else:
        pytest.skip("HEALD_REQUIRE_KERNELS is not set")


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit, NaN where NaN."""
    return bool(np.array_equal(a, b, equal_nan=True))


# ----------------------------------------------------------------------------- feature window
WILD_SCHEMA = FeatureSchema(
    inputs=(InputSpec(key="a"), InputSpec(key="big", scale=1e-9, unit="GB"),
            InputSpec(key="d.used[*]", agg="max"), InputSpec(key="d.used[*]", agg="sum"),
            InputSpec(key="d.free[*]", agg="min", scale=1e-9), InputSpec(key="never")),
    window=7)

value = st.one_of(st.none(), st.floats(-1e12, 1e12), st.sampled_from([math.inf, -math.inf, math.nan]))
labels = st.sampled_from(["/", "/var", "/tmp", "/srv"])
sample_st = st.fixed_dictionaries(
    {}, optional={"a": value, "big": st.one_of(st.none(), st.floats(0, 4e12)),
                  "d.used[/]": value, "d.used[/var]": value, "d.used[/tmp]": value,
                  "d.free[/]": value, "d.free[/srv]": value})


@needs_kernels
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(sample_st, st.floats(0.0, 30.0)), min_size=1, max_size=60),
       st.sampled_from([3, 7, 12]), st.booleans(), st.sampled_from([1, 3, 5, 9]))
def test_feature_window_native_equals_numpy(pushes: list[tuple[dict[str, float | None], float]],
                                            window: int, subset: bool, despike: int) -> None:
    schema = FeatureSchema(inputs=WILD_SCHEMA.inputs, window=window, despike=despike,
                           transforms=("slope", "value", "std") if subset else WILD_SCHEMA.transforms)
    ref, fast = FeatureWindow(schema, native=False), FeatureWindow(schema, native=True)
    assert fast.native
    assert not ref.native
    t = 1000.0
    for i, (metrics, dt) in enumerate(pushes):
        t += dt  # dt = 0 exercises the non-increasing-time guard
        if i == len(pushes) // 2:
            ref.reset()
            fast.reset()
        a = ref.push_metrics(metrics, t).copy()
        b = fast.push_metrics(metrics, t).copy()
        assert same(a, b), (i, metrics, dict(zip(schema.names, zip(a.tolist(), b.tolist(), strict=True),
                                                 strict=True)))


@needs_kernels
def test_feature_window_native_equals_numpy_over_many_rebases() -> None:
    rng = np.random.default_rng(3)
    schema = FeatureSchema(window=20)
    ref, fast = FeatureWindow(schema, native=False), FeatureWindow(schema, native=True)
    keys = ["cpu.util_pct", "mem.available_bytes", "disk.used_pct[/]", "disk.used_pct[/var]",
            "disk.free_bytes[/]", "disk.write_bytes_per_s[/]", "net.rx_errors_per_s[eth0]"]
    for i in range(1500):  # 75 windows: 75 rebases, byte-sized values, mounts coming and going
        m: dict[str, float | None] = {k: float(rng.normal(50, 20)) * (1e9 if "bytes" in k else 1.0)
                                      for k in keys if rng.random() > 0.05}
        if rng.random() < 0.02:
            m["disk.used_pct[/new]"] = 99.0
        t = 10.0 + i * 1.5 + float(rng.random())
        assert same(ref.push_metrics(m, t), fast.push_metrics(m, t)), i


@needs_kernels
def test_feature_window_native_reads_its_buffers_after_replan() -> None:
    """Re-planning reallocates the gather arrays: the kernel must follow them."""
    fw = FeatureWindow(WILD_SCHEMA, native=True)
    ref = FeatureWindow(WILD_SCHEMA, native=False)
    stream = [{"d.used[/]": 1.0}, {"d.used[/]": 2.0, "d.used[/var]": 5.0}, {"d.used[/var]": 7.0},
              {"a": 1.0, "never": 3.0}, {}, {"d.used[/tmp]": 4.0, "d.free[/]": 1e9}]
    for i, m in enumerate(stream * 5):
        assert same(ref.push_metrics(dict(m), float(i)), fw.push_metrics(dict(m), float(i)))


# ----------------------------------------------------------------------------- forecaster
def series(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=float)
    base = {"fill": 5e9 - 2e6 * t, "noise": 5e9 + rng.normal(0, 1e6, n),
            "step": np.where(t < n / 2, 5e9, 4e9), "flat": np.full(n, 7e9),
            "fast": np.maximum(0.0, 1e8 - 1e6 * t)}[kind]
    y = base + rng.normal(0, 1e5, n)
    y[rng.random(n) < 0.05] = np.nan
    return y


@needs_kernels
@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["fill", "noise", "step", "flat", "fast"]), min_size=1, max_size=4),
       st.integers(40, 700), st.integers(0, 2**16), st.sampled_from([10, 3]))
def test_forecaster_native_equals_numpy(kinds: list[str], n: int, seed: int, every: int) -> None:
    resources = (Resource(key="disk.free_bytes[*]"), Resource(key="swap", direction="up", limit=100.0))
    ref = Forecaster(resources, every=every, capacity=300, native=False)
    fast = Forecaster(resources, every=every, capacity=300, native=True)
    cols = {f"disk.free_bytes[/m{i}]": series(k, n, seed + i) for i, k in enumerate(kinds)}
    swap = np.clip(np.arange(n) * 0.2, 0, 100)
    for i in range(n):
        m: dict[str, float | None] = {k: (None if math.isnan(v[i]) else float(v[i])) for k, v in cols.items()}
        m["swap"] = float(swap[i])
        if i == n // 3:
            m["disk.free_bytes[/late]"] = 1e9 - i  # a resource appearing mid-stream
        ref.push(m, 100.0 + i)
        fast.push(m, 100.0 + i)
        assert ref.forecasts == fast.forecasts, i


@needs_kernels
def test_forecaster_native_sees_a_fill_like_numpy() -> None:
    ref, fast = Forecaster(native=False), Forecaster(native=True)
    for i in range(200):
        m = {"disk.free_bytes[/]": 1e9 - 4e6 * i, "mem.available_bytes": 8e9}
        ref.push(m, float(i))
        fast.push(m, float(i))
    f = next(x for x in fast.forecasts if x.resource == "disk.free_bytes[/]")
    assert f.eta_s is not None
    assert f.eta_s == pytest.approx((1e9 - 4e6 * 199) / 4e6, rel=1e-6)
    assert ref.forecasts == fast.forecasts


# ----------------------------------------------------------------------------- detector, classifier
def train_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (n, 3)) @ rng.normal(0, 1, (3, d))
    return base + rng.normal(0, 0.1, (n, d))


@needs_kernels
@pytest.mark.parametrize("options", [{}, {"weights": [1.0, 1.0, 1.0, 1.0]}])
def test_detector_native_equals_numpy(options: dict[str, object]) -> None:
    d = 12
    model = fit_detector(train_rows(400, d), [f"f{i}" for i in range(d)], **options)
    ref, fast = StreamingDetector(model, native=False), StreamingDetector(model, native=True)
    rng = np.random.default_rng(1)
    test = train_rows(300, d, seed=2)
    test[150:170, 3] += 8.0  # an anomaly to explain
    test[rng.random(test.shape) < 0.03] = np.nan
    vec = np.zeros(d + 5)
    idx = np.arange(5, d + 5, dtype=np.intp)[::-1].copy()  # read out of a larger vector, reversed
    fast.bind(vec, idx)
    explained = 0
    for i, row in enumerate(test):
        if i == 200:
            ref.reset()
            fast.reset()
        vec[idx] = row
        a, alert_a = ref.score(row)
        b, alert_b = fast.score_bound(vec, idx)
        assert b == pytest.approx(a, rel=1e-12, abs=1e-12), i
        assert alert_a == alert_b, i
        if a >= 1.0 or i % 50 == 0:
            ea, eb = ref.explain(row), fast.explain_bound(vec, idx)
            assert [c.feature for c in ea] == [c.feature for c in eb], i
            assert [c.share for c in eb] == pytest.approx([c.share for c in ea], rel=1e-9)
            explained += 1
    assert explained > 10
    # the copying entry points too, and their input checks
    fresh = StreamingDetector(model, native=True)
    assert fresh.score(list(test[0]))[0] == pytest.approx(StreamingDetector(model, native=False).score(
        test[0])[0], rel=1e-12)
    with pytest.raises(ModelError):
        fresh.score([1.0, 2.0])
    with pytest.raises(ModelError):
        fresh.bind(np.zeros(3), idx)


@needs_kernels
def test_classifier_native_equals_numpy() -> None:
    model = clf.load(clf.DEFAULT_PATH)
    names = FeatureSchema().names
    ref, fast = clf.Scorer(model, names, native=False), clf.Scorer(model, names, native=True)
    rng = np.random.default_rng(5)
    for i in range(300):
        v = rng.normal(0, 50, len(names))
        v[rng.random(len(names)) < 0.2] = np.nan
        a, b = ref.failure(v.copy()), fast.failure(v)
        assert a.keys() == b.keys()
        assert list(b.values()) == pytest.approx(list(a.values()), rel=1e-12, abs=1e-15), i
    strided = np.zeros(2 * len(names))[::2]
    assert fast.failure(strided) == pytest.approx(ref.failure(strided.copy()))
    with pytest.raises(ModelError):
        fast.failure(np.zeros(3))


@needs_kernels
def test_risk_stage_replay_native_equals_numpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recorded host (real collector output) through the whole stage, both paths."""
    sys.path.insert(0, str(ROOT / "bench" / "faults"))
    try:
        import dataset  # noqa: PLC0415 - the bench's recording loader
    finally:
        sys.path.pop(0)
    rec = dataset.load(ROOT / "bench" / "faults" / "data" / "host1.npz")
    risks = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(native.ENV, mode)
        stage = RiskStage(ModelSettings(), tmp_path / mode, history=False)
        assert (stage.window.native, stage.forecaster.native) == (mode == "1", mode == "1")
        risks[mode] = [stage.on_sample(Sample(node="n", seq=i, wall=1.7e9 + i, mono=float(i), metrics=m))
                       for i, m in enumerate(rec.metrics())]
    for a, b in zip(risks["0"], risks["1"], strict=True):
        assert a.forecasts == b.forecasts
        assert a.failure.keys() == b.failure.keys()
        assert list(b.failure.values()) == pytest.approx(list(a.failure.values()), rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- refusal
def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV, "0")
    assert native.kernels() is None
    assert not FeatureWindow(WILD_SCHEMA).native
    with pytest.raises(ModelError, match="not available"):
        FeatureWindow(WILD_SCHEMA, native=True)
    with pytest.raises(ModelError, match="not available"):
        Forecaster(native=True)


def test_missing_library_is_refused(tmp_path: Path) -> None:
    assert native.load(tmp_path / "libheald_kernels.so") is None


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_stale_or_foreign_library_is_refused(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc") or "cc"
    src = tmp_path / "k.c"
    src.write_text("int heald_kernels_abi(void) { return 999; }\n")
    stale = tmp_path / "stale.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(stale), str(src)], check=True)
    assert native.load(stale) is None
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an ELF file")
    assert native.load(junk) is None
    src.write_text("int something_else(void) { return 1; }\n")
    other = tmp_path / "other.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(other), str(src)], check=True)
    assert native.load(other) is None


def test_build_hook_compiles_the_kernels(tmp_path: Path) -> None:
    """hatch_build.compile_kernels (what pip install runs) builds a library the loader accepts."""
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    (tmp_path / "agent" / "native").mkdir(parents=True)
    for src in (ROOT / "agent" / "native").glob("*.[ch]"):  # the kernels' C files and their header
        shutil.copy(src, tmp_path / "agent" / "native" / src.name)
    code = ("import sys, types; sys.modules['hatchling.builders.hooks.plugin.interface'] = "
            "types.SimpleNamespace(BuildHookInterface=object); import runpy, pathlib; "
            f"ns = runpy.run_path({str(ROOT / 'hatch_build.py')!r}); "
            f"print(ns['compile_kernels'](pathlib.Path({str(tmp_path)!r})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    lib = Path(out.stdout.strip())
    assert lib.is_file()
    assert native.load(lib) is not None
