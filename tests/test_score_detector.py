"""StreamingDetector: streaming equals batch, missing values, explanations, numpy-only imports."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from agent.errors import ModelError
from agent.score.compiled import CompiledDetector
from agent.score.detector import GEO_EPS, StreamingDetector, combine, component_scores, ewma, smoothed_scores
from agent.score.fit import fit_detector
from agent.score.types import Contribution

D = 6
NAMES = [f"m{i}" for i in range(D)]


def synthetic(n: int, seed: int = 0) -> np.ndarray:
    """Correlated, slowly varying metrics (a few latent factors plus noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) + 1000 * seed
    latent = np.stack([np.sin(t / 50.0), np.cos(t / 130.0)], axis=1)
    mix = np.random.default_rng(42).normal(size=(2, D))
    return latent @ mix + 0.05 * rng.normal(size=(n, D)) + 1.0


@pytest.fixture(scope="module")
def model() -> CompiledDetector:
    return fit_detector(synthetic(3000), NAMES, n_clusters=8, top_k=2)


def test_streaming_equals_batch(model: CompiledDetector) -> None:
    x = synthetic(500, seed=1)
    x[200:220, 3] += 2.0
    det = StreamingDetector(model)
    streamed = det.score_many(x)
    raw = combine(model, component_scores(model, x))
    batch = smoothed_scores(model, raw)
    np.testing.assert_allclose(streamed, batch, rtol=1e-9, atol=1e-12)
    # The score is the smaller of the two smoothers over their thresholds.
    alpha = model.meta.ewma_alpha
    arith = ewma(raw, alpha) / model.meta.threshold
    geo = np.exp(ewma(np.log(raw + GEO_EPS), alpha)) / model.meta.threshold_geo
    np.testing.assert_allclose(batch, np.minimum(arith, geo), rtol=1e-12)
    assert det.samples_seen == 500


def test_anomaly_alerts_and_normal_mostly_quiet(model: CompiledDetector) -> None:
    x = synthetic(1200, seed=2)
    x[800:860, 1] += 3.0
    det = StreamingDetector(model)
    results = [det.score(row) for row in x]
    alerts = np.array([a for _, a in results])
    scores = np.array([s for s, _ in results])
    assert alerts[800:860].any()
    assert alerts[:700].mean() < 0.05
    assert all(a == (s >= 1.0) for s, a in results)
    assert scores[800:860].max() > scores[:700].max()


def test_a_short_burst_does_not_alert_a_sustained_shift_does() -> None:
    """A program starting on a quiet node: one sample about nine times the threshold, then back
    to normal. The arithmetic EWMA alone alerts on it for seconds; the geometric one needs the
    deviation to last. A smaller shift that lasts alerts within seconds."""
    model = fit_detector(synthetic(3000), NAMES, n_clusters=8, top_k=2, threshold_margin=1.5)
    x = synthetic(400, seed=7)
    burst = x.copy()
    burst[300:302, 2] += 1.5
    raw = combine(model, component_scores(model, burst))
    assert raw[300] / model.meta.threshold > 5.0
    arith = ewma(raw, model.meta.ewma_alpha) / model.meta.threshold
    assert (arith[300:320] >= 1.0).sum() >= 5  # the arithmetic smoother alone: an alert
    det = StreamingDetector(model)
    results = [det.score(row) for row in burst]
    assert not any(a for _, a in results)  # the detector: none
    assert max(s for s, _ in results) < 0.9
    shifted = x.copy()
    shifted[300:360, 2] += 2.0  # the first sample is the burst above, then a lasting shift
    det = StreamingDetector(model)
    alerts = np.array([det.score(row)[1] for row in shifted])
    assert not alerts[:300].any()
    assert alerts[300:360].any()
    assert int(np.argmax(alerts[300:360])) <= 15  # within 15 s of the shift


def test_missing_values_are_imputed(model: CompiledDetector) -> None:
    det = StreamingDetector(model)
    x = synthetic(10, seed=3)
    for row in x[:5]:
        det.score(row)
    values: list[float | None] = [float(v) for v in x[5]]
    values[2] = None
    values[4] = math.nan
    s, _ = det.score(values)
    assert math.isfinite(s)
    s, _ = det.score(np.full(D, np.nan))
    assert math.isfinite(s)
    s, _ = det.score([math.inf, -math.inf, None, None, None, None])
    assert math.isfinite(s)
    # The median sample itself is as normal as it gets: only the raw EWMA history remains.
    fresh = StreamingDetector(model)
    s, alert = fresh.score([None] * D)
    assert math.isfinite(s)
    assert not alert


def test_missing_metric_does_not_fake_a_change(model: CompiledDetector) -> None:
    det = StreamingDetector(model)
    x = synthetic(3, seed=4)
    det.score(x[0])
    partial = x[1].copy()
    partial[0] = np.nan
    det.score(partial)
    # Delta against the last real value of m0, not against the imputed median.
    det.score(x[2])
    ref = StreamingDetector(model)
    ref.score(x[0])
    ref.score(x[1])
    ref.score(x[2])
    assert det.samples_seen == ref.samples_seen == 3


@pytest.mark.parametrize("bad", [[1.0, 2.0], np.zeros(D + 1), np.zeros((2, D)), ["a"] * D, 3.0])
def test_wrong_shape_or_type_is_model_error(model: CompiledDetector, bad: object) -> None:
    det = StreamingDetector(model)
    with pytest.raises(ModelError):
        det.score(bad)  # type: ignore[arg-type]


def test_explain_names_the_shifted_feature(model: CompiledDetector) -> None:
    det = StreamingDetector(model)
    x = synthetic(300, seed=5)
    for row in x[:-1]:
        det.score(row)
    row = x[-1].copy()
    row[4] += 5.0
    det.score(row)
    top = det.explain(row, top_k=3)
    assert all(isinstance(c, Contribution) for c in top)
    assert top[0].feature == "m4"
    assert 0 < sum(c.share for c in top) <= 1.0 + 1e-9
    assert [c.share for c in top] == sorted((c.share for c in top), reverse=True)
    assert len(det.explain(row, top_k=1)) == 1


def test_reset_forgets_state(model: CompiledDetector) -> None:
    det = StreamingDetector(model)
    x = synthetic(50, seed=6)
    first = det.score(x[0])
    det.score_many(x[1:])
    det.reset()
    assert det.score(x[0]) == first


def test_detector_and_compiled_do_not_import_sklearn() -> None:
    code = (
        "import sys\n"
        "import agent.score.detector, agent.score.compiled, agent.cli.model\n"
        "bad = sorted(m for m in sys.modules if m == 'sklearn' or m.startswith('sklearn.'))\n"
        "assert not bad, bad\n"
        "assert 'scipy' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_cli_module_import_is_lazy() -> None:
    code = (
        "import sys\n"
        "import agent.cli.model\n"
        "assert 'numpy' not in sys.modules, 'numpy imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
