"""The detector's fast channel (research log #61): an alert needs the fast EWMA over its line for
``fast_min_s`` seconds of the samples' own timestamps; older artifacts without it score as before."""

from __future__ import annotations

import io
import json
import math

import msgspec
import numpy as np
import pytest

from agent import native
from agent.score import artifact
from agent.score import compiled as art
from agent.score.detector import StreamingDetector, combine, component_scores, ewma, geo_ewma, smoothed_scores
from agent.score.fit import fit_detector

NAMES = [f"f{i}" for i in range(7)]
KERNELS = native.kernels()
PATHS = [False, *([True] if KERNELS is not None else [])]


def _data(n: int = 1500, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 3)) @ rng.normal(size=(3, 7))
    return base + 0.1 * rng.normal(size=(n, 7))


def _controlled() -> tuple[art.CompiledDetector, np.ndarray, np.ndarray]:
    """A model whose slow channel never alerts and whose fast EWMA is the raw score (alpha 1), its
    fast line half-way to a deviated row's raw score: (model, normal row, deviated row)."""
    fitted = fit_detector(_data(), NAMES, n_clusters=4, weights=(1.0, 1.0, 0.0, 0.0))
    normal = fitted.arrays["median"].copy()
    deviated = normal + 40.0 * fitted.arrays["scale"]
    raw = combine(fitted, component_scores(fitted, np.stack([normal, deviated])))
    assert raw[1] > 4 * raw[0]
    meta = msgspec.structs.replace(fitted.meta, threshold=1e12, threshold_geo=1e12, fast_alpha=1.0,
                                   threshold_fast=float(raw[1] / 2), fast_min_s=15.0)
    return art.build(meta, fitted.arrays), normal, deviated


def _run(det: StreamingDetector, rows: list[np.ndarray], times: list[float | None],
         ) -> tuple[list[bool], list[str]]:
    alerts, channels = [], []
    for x, t in zip(rows, times, strict=True):
        score, alert = det.score(x, t)
        assert alert == (score >= 1.0)
        alerts.append(alert)
        channels.append(det.channel)
    return alerts, channels


@pytest.mark.parametrize("use_native", PATHS)
def test_a_3s_burst_at_1hz_does_not_alert_the_same_deviation_for_15s_does(use_native: bool) -> None:
    model, normal, dev = _controlled()
    det = StreamingDetector(model, native=use_native)
    burst = [normal] * 5 + [dev] * 3 + [normal] * 10
    alerts, _ = _run(det, burst, [float(t) for t in range(len(burst))])
    assert not any(alerts)
    det.reset()
    held = [normal] * 5 + [dev] * 20
    alerts, channels = _run(det, held, [1000.0 + t for t in range(len(held))])
    # the first deviated sample (t = 5) spans 1 s: 15 of them span 15 s
    assert alerts.index(True) == 5 + 14
    assert all(alerts[19:])
    assert set(channels[19:]) == {"fast"}


@pytest.mark.parametrize("use_native", PATHS)
def test_one_60s_sample_over_the_line_alerts(use_native: bool) -> None:
    model, normal, dev = _controlled()
    det = StreamingDetector(model, native=use_native)
    alerts, channels = _run(det, [normal] * 4 + [dev, normal], [60.0 * i for i in range(6)])
    assert alerts == [False] * 4 + [True, False]
    assert channels[4] == "fast"


def test_a_stalled_sampler_does_not_turn_one_sample_into_a_long_deviation() -> None:
    """The daemon bounds one sample's span at twice its interval: after a 20-s stall (the host
    too busy to sample) one deviated sample counts 2 s, not 20; without the bound it alerts."""
    model, normal, dev = _controlled()
    rows = [normal] * 3 + [dev]
    times = [0.0, 1.0, 2.0, 22.0]
    assert _run(StreamingDetector(model), rows, list(times))[0][-1] is True  # unbounded: 20 s
    bounded = StreamingDetector(model, max_span_s=2.0)
    alerts, _ = _run(bounded, rows, list(times))
    assert alerts == [False] * 4
    more = [dev] * 13  # 2 s + 13 x 1 s = 15 s over the line: now it alerts
    alerts, _ = _run(bounded, more, [22.0 + i + 1 for i in range(13)])
    assert alerts[-1] is True
    assert not any(alerts[:-1])


def test_the_duration_is_judged_by_irregular_timestamps() -> None:
    model, normal, dev = _controlled()
    det = StreamingDetector(model, native=False)
    # spans of the deviated samples: 1, 0.5, 8, 0.5, 6.5 (16.5 s), then a normal sample resets
    times = [0.0, 1.0, 1.5, 9.5, 10.0, 16.5, 17.0, 18.0, 33.0]
    rows = [normal, dev, dev, dev, dev, dev, normal, dev, dev]
    alerts, _ = _run(det, rows, times)
    assert alerts == [False] * 5 + [True] + [False, False, True]
    # time going backwards, NaN or inf, or no time at all: the sample spans 0 s
    det.reset()
    alerts, _ = _run(det, [normal, dev, dev, dev, dev, dev],
                     [100.0, 90.0, math.nan, math.inf, None, 101.0])
    assert not any(alerts)
    det.reset()
    alerts, _ = _run(det, [normal] + [dev] * 30, [None] * 31)
    assert not any(alerts)  # without timestamps the fast channel cannot tell a burst from a fault


def test_nan_and_inf_inputs_score_finite_and_keep_the_run() -> None:
    model, normal, dev = _controlled()
    det = StreamingDetector(model, native=False)
    holey = dev.copy()
    holey[0], holey[1] = math.nan, math.inf  # imputed with the median: still far off on the rest
    rows = [normal, dev, holey, [None, *dev[1:].tolist()], dev]
    scores = []
    for i, x in enumerate(rows):
        s, a = det.score(x, 10.0 * i)  # type: ignore[arg-type]
        assert math.isfinite(s)
        scores.append((s, a))
    assert [a for _, a in scores] == [False, False, True, True, True]


@pytest.mark.parametrize("use_native", PATHS)
def test_streaming_agrees_with_the_vectorised_reference(use_native: bool) -> None:
    x = _data(3000)
    model = fit_detector(x[:1500], NAMES, n_clusters=4, fast_min_s=5.0)
    test = x[1500:].copy()
    test[200:260] += 3.0  # a sustained shift
    test[600] += 6.0  # a short burst (samples 0.5-2 s apart)
    test[900] += 6.0  # one sample after a minute's gap
    dts = np.tile([0.5, 1.0, 2.0, 1.0], test.shape[0] // 4 + 1)[: test.shape[0]]
    dts[900] = 60.0
    times = np.cumsum(dts)
    raw = combine(model, component_scores(model, test))
    expected = smoothed_scores(model, raw, times)
    det = StreamingDetector(model, native=use_native)
    got = det.score_many(test, times)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    fr = ewma(raw, model.meta.fast_alpha) / model.meta.threshold_fast
    slow = np.minimum(ewma(raw, model.meta.ewma_alpha) / model.meta.threshold,
                      geo_ewma(raw, model.meta.ewma_alpha) / model.meta.threshold_geo)
    assert np.any((got >= 1) & (slow < 1))
    assert np.any((fr >= 1) & (got < 1))


def _old_artifact(model: art.CompiledDetector) -> bytes:
    """The bytes of ``model`` as heald wrote them before the fast channel (no such metadata)."""
    meta = json.loads(artifact.meta_json(model.meta))
    for key in ("threshold_fast", "fast_alpha", "fast_power", "fast_min_s"):
        del meta[key]
    mj = msgspec.json.encode(meta, order="sorted")
    buf = io.BytesIO()
    np.savez(buf, **model.arrays, **{artifact.META_ENTRY: np.frombuffer(mj, dtype=np.uint8),
                                     artifact.HASH_ENTRY: np.frombuffer(
                                         artifact.content_hash(model.arrays, mj).encode(), dtype=np.uint8)})
    return buf.getvalue()


def test_an_artifact_without_the_fast_channel_loads_and_scores_as_before() -> None:
    x = _data(3000)
    model = fit_detector(x[:1500], NAMES, n_clusters=4)
    old = art.from_bytes(_old_artifact(model))
    assert old.meta.threshold_fast is None
    assert old.meta.threshold == model.meta.threshold
    test = x[1500:].copy()
    test[100:400] += 3.0
    times = np.arange(test.shape[0]) * 60.0
    raw = combine(old, component_scores(old, test))
    before = np.minimum(ewma(raw, old.meta.ewma_alpha) / old.meta.threshold,
                        geo_ewma(raw, old.meta.ewma_alpha) / old.meta.threshold_geo)
    for use_native in PATHS:
        det = StreamingDetector(old, native=use_native)
        got = det.score_many(test, times)
        np.testing.assert_allclose(got, before, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(smoothed_scores(old, raw, times), before, rtol=1e-12)


def test_a_fitted_artifact_round_trips_its_fast_channel(tmp_path: object) -> None:
    model = fit_detector(_data(), NAMES, n_clusters=4, fast_min_s=12.5)
    back = art.from_bytes(art.to_bytes(model))
    assert back.meta.threshold_fast == model.meta.threshold_fast
    assert back.meta.fast_min_s == 12.5
    bad = msgspec.structs.replace(model.meta, threshold_fast=-1.0)
    with pytest.raises(art.ModelError, match="threshold_fast"):
        art.build(bad, model.arrays)
