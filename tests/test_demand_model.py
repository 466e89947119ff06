"""The demand model's out-of-sample choice between the fitted model and seasonal naive
(:func:`agent.score.demand.fit_demand`), what the scorer then forecasts, the bench's vectorised
forecasts against the scorer, and artifacts fitted before the choice."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ModelError
from agent.features.demand_history import DemandSettings
from agent.score import artifact
from agent.score import demand as dm
from agent.score.artifact import TrainingWindow
from agent.score.demand_stage import DemandStage

STEP = 300.0
DAY = round(86_400 / STEP)  # steps a day


def drifting_shape(days: int, seed: int = 3) -> np.ndarray:
    """Each day repeats the day before with a small change at every phase (a random walk across
    days): yesterday's value is the best forecast there is, a profile of medians lags behind."""
    rng = np.random.default_rng(seed)
    shape = rng.normal(0.0, 10.0, DAY)
    out = []
    for _ in range(days):
        out.append(50.0 + shape)
        shape = shape + rng.normal(0.0, 2.0, DAY)
    return np.concatenate(out)


def steady_shape(days: int, seed: int = 4) -> np.ndarray:
    """One daily shape plus independent noise: the profile is right, yesterday carries noise twice."""
    rng = np.random.default_rng(seed)
    phase = np.arange(days * DAY) % DAY
    return 40.0 + 30.0 * np.sin(2 * math.pi * phase / DAY) + rng.normal(0.0, 3.0, phase.size)


def scorer_fed(model: dm.CompiledDemand, y: np.ndarray, key: str = "cpu.util_pct") -> dm.DemandScorer:
    sc = dm.DemandScorer(model)
    for i, v in enumerate(y.tolist()):
        sc.push({key: v}, i * STEP)
    return sc


def test_a_series_seasonal_naive_beats_picks_naive_and_forecasts_yesterday(tmp_path: Path) -> None:
    y = drifting_shape(10)
    wall = np.arange(y.size) * STEP
    model = dm.from_bytes(artifact.to_bytes(dm.fit_demand(y[:, None], wall, ["cpu.util_pct"], step_s=STEP)))
    assert model.meta.choice == ("naive",)
    assert model.naive_weight(0)[:2] == (0.0, DAY)
    h = model.meta.horizon_steps
    # the scorer: the last row's bin is still open, the forecast is for the bins after it
    (fc,) = scorer_fed(model, y).forecast(wall[-1])
    target = y.size + np.arange(h)
    np.testing.assert_allclose(fc.point, y[target - DAY])
    np.testing.assert_allclose(np.array(fc.hi) - fc.point, model.arrays["err_hi"][0])
    # the interval is the naive forecast's own validation errors: it covers about 80% of them
    assert np.all(np.array(fc.lo) < fc.point)
    assert np.all(np.array(fc.hi) > fc.point)
    # the daemon's stage: a model installed on a history gets the last day from it
    stage = DemandStage(DemandSettings(step_s=STEP), tmp_path)
    for w, v in zip(wall.tolist(), y.tolist(), strict=True):
        stage.history.push({"cpu.util_pct": v}, w)
    stage.install(model)
    assert stage.scorer is not None
    (fc2,) = stage.scorer.forecast(wall[-1])
    np.testing.assert_allclose(fc2.point, y[target - 1 - DAY])  # the last sample is not a row yet


def test_a_series_the_model_beats_keeps_the_model() -> None:
    y = steady_shape(10)
    wall = np.arange(y.size) * STEP
    model = dm.fit_demand(y[:, None], wall, ["cpu.util_pct"], step_s=STEP)
    assert model.meta.choice == ("model",)
    assert model.naive_weight(0)[0] == 1.0
    (fc,) = scorer_fed(model, y).forecast(wall[-1])
    naive = y[y.size + np.arange(model.meta.horizon_steps) - DAY]
    truth = 40.0 + 30.0 * np.sin(2 * math.pi * ((y.size + np.arange(model.meta.horizon_steps)) % DAY) / DAY)
    assert np.mean(np.abs(np.array(fc.point) - truth)) < 0.5 * np.mean(np.abs(naive - truth))


def test_the_bench_backtest_is_what_the_scorer_forecasts() -> None:
    """``backtest`` (bench/demand_forecast.py) from origin t, steps 2..h+1 = the scorer once bin t
    has closed (phi = 1 here: the scorer's steps count from the open bin, the backtest's from t)."""
    rng = np.random.default_rng(5)
    bins, h = DAY, 24
    y = steady_shape(4) + rng.normal(0.0, 5.0, 4 * DAY)
    y[300:310] = np.nan  # unread steps: the level, the live profile and naive all skip them
    meta = dm.DemandMeta(format_version=dm.FORMAT_VERSION, kind=dm.KIND, resources=("x",), step_s=STEP,
                         horizon_steps=h, weekly=False, quantiles=(0.1, 0.9),
                         training=TrainingWindow(rows=1), created="", choice=("blend",))
    model = dm.FORMAT.build(meta, {
        "profile": 40.0 + rng.normal(0.0, 5.0, (1, bins)), "alpha": [0.3], "phi": [1.0],
        "err_lo": -np.ones((1, h)), "err_hi": np.ones((1, h)), "weight": [0.25],
        "naive_lag": [float(bins)], "gamma": [0.2]})
    sc = dm.DemandScorer(model)
    wall = np.arange(y.size) * STEP
    point, _, _ = dm.backtest(model, 0, y, wall, steps=list(range(2, h + 2)))
    for t in (DAY - 1, 2 * DAY + 17, y.size - 1):
        sc = dm.DemandScorer(model)
        for i in range(t + 1):
            sc.push({"x": None if math.isnan(y[i]) else float(y[i])}, wall[i])
        sc.push({}, (t + 1) * STEP)  # closes bin t; bin t + 1 is open and empty
        (fc,) = sc.forecast((t + 1) * STEP)
        np.testing.assert_allclose(fc.point, point[t], rtol=1e-9)


def names(r: int) -> tuple[str, ...]:
    return tuple(f"r{i}" for i in range(r))


def with_choice(model: dm.CompiledDemand, choice: tuple[str, ...]) -> dm.DemandMeta:
    m = model.meta
    return dm.DemandMeta(format_version=m.format_version, kind=m.kind, resources=m.resources, step_s=m.step_s,
                         horizon_steps=m.horizon_steps, weekly=m.weekly, quantiles=m.quantiles,
                         training=m.training, created=m.created, choice=choice)


def old_artifact(r: int = 1) -> dm.CompiledDemand:
    """As fitted before the choice: no ``choice`` in the metadata, no weight/naive_lag/gamma."""
    h = 24
    meta = dm.DemandMeta(format_version=dm.FORMAT_VERSION, kind=dm.KIND, resources=names(r),
                         step_s=STEP, horizon_steps=h, weekly=False, quantiles=(0.1, 0.9),
                         training=TrainingWindow(rows=2 * DAY), created="2026-12-01T00:00:00+00:00")
    prof = np.tile(np.linspace(0.0, 10.0, DAY), (r, 1))
    return dm.FORMAT.build(meta, {"profile": prof, "alpha": [0.5] * r, "phi": [0.9] * r,
                                  "err_lo": -np.ones((r, h)), "err_hi": np.ones((r, h))})


def test_an_artifact_without_the_choice_still_loads_and_forecasts_with_the_model() -> None:
    old = old_artifact()
    data = artifact.to_bytes(old)
    assert b"choice" not in data  # the metadata it was written with, byte for byte
    model = dm.from_bytes(data)
    assert model.version == old.version
    assert model.meta.choice == ()
    assert model.naive_weight(0) == (1.0, DAY, 0.0)
    sc = dm.DemandScorer(model)
    sc.push({"r0": 7.0}, 0.0)
    sc.push({"r0": 7.0}, STEP)  # closes bin 0: level 0.5 * 7
    (fc,) = sc.forecast(STEP)
    cols = (2 + np.arange(24)) % DAY
    np.testing.assert_allclose(fc.point, model.arrays["profile"][0, cols] + 3.5 * 0.9 ** np.arange(1, 25))


@pytest.mark.parametrize(("choice", "extra", "message"), [
    (("naive",), {}, "demand arrays"),  # the choice without its arrays
    ((), {"weight": [0.0], "naive_lag": [288.0], "gamma": [0.0]}, "demand arrays"),
    (("model",), {"weight": [0.0], "naive_lag": [288.0], "gamma": [0.0]}, "does not match"),
    (("other",), {"weight": [1.0], "naive_lag": [288.0], "gamma": [0.0]}, "one of"),
    (("naive",), {"weight": [0.0], "naive_lag": [289.0], "gamma": [0.0]}, "naive_lag"),
    (("blend",), {"weight": [0.5], "naive_lag": [288.0], "gamma": [1.5]}, "gamma"),
])
def test_an_inconsistent_choice_is_refused_in_one_line(choice: tuple[str, ...], extra: dict[str, list[float]],
                                                       message: str) -> None:
    old = old_artifact()
    bad = dm.CompiledDemand(with_choice(old, choice), {**old.arrays, **artifact.frozen_arrays(extra)})
    with pytest.raises(ModelError, match=message) as exc:
        dm.from_bytes(artifact.to_bytes(bad), "m.npz")
    assert str(exc.value).startswith("m.npz: ")
    assert "\n" not in str(exc.value)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(dm.WEIGHTS), st.sampled_from((1, 5, DAY)),
                          st.sampled_from(dm.GAMMAS)), min_size=1, max_size=4),
       st.integers(0, 2**31 - 1))
def test_artifacts_round_trip_and_score_alike(per: list[tuple[float, int, float]], seed: int) -> None:
    r, h = len(per), 6
    rng = np.random.default_rng(seed)
    meta = dm.DemandMeta(format_version=dm.FORMAT_VERSION, kind=dm.KIND, resources=names(r),
                         step_s=STEP, horizon_steps=h, weekly=False, quantiles=(0.1, 0.9),
                         training=TrainingWindow(rows=2 * DAY), created="x",
                         choice=tuple(dm._choice(w) for w, _, _ in per))
    model = dm.FORMAT.build(meta, {
        "profile": rng.normal(0.0, 1.0, (r, DAY)), "alpha": rng.uniform(0, 1, r), "phi": rng.uniform(0, 1, r),
        "err_lo": -rng.uniform(0, 1, (r, h)), "err_hi": rng.uniform(0, 1, (r, h)),
        "weight": [w for w, _, _ in per], "naive_lag": [float(lag) for _, lag, _ in per],
        "gamma": [g for _, _, g in per]})
    back = dm.from_bytes(artifact.to_bytes(model))
    assert back.meta == model.meta
    assert back.version == model.version
    a, b = dm.DemandScorer(model), dm.DemandScorer(back)
    for i in range(DAY + 20):
        vals: dict[str, float | None] = {f"r{j}": float(rng.normal()) for j in range(r) if rng.random() < 0.9}
        a.push(vals, i * STEP)
        b.push(vals, i * STEP)
    assert a.forecast(0.0) == b.forecast(0.0)
    for f in a.forecast(0.0):
        assert all(math.isfinite(v) for v in (*f.point, *f.lo, *f.hi))


def test_a_naive_season_shorter_than_the_horizon_reads_only_closed_steps() -> None:
    """naive_lag 1 (the last closed step's mean for every step ahead): never the open bin's."""
    old = old_artifact()
    model = dm.FORMAT.build(with_choice(old, ("naive",)),
                            {**old.arrays, "weight": [0.0], "naive_lag": [1.0], "gamma": [0.0]})
    sc = dm.DemandScorer(model)
    for i, v in enumerate((3.0, 4.0, 5.0)):
        sc.push({"r0": v}, i * STEP)  # bins 0 and 1 closed, bin 2 (5.0) open
    (fc,) = sc.forecast(2 * STEP)
    assert fc.point == (4.0,) * 24
