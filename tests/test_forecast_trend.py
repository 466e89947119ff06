"""Exhaustion forecaster on synthetic series: linear fill, noisy fill, step cleanup, flat."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.score.forecast import Forecaster, Resource, robust_trend, soonest
from agent.score.types import Forecast

KEY = "disk.free_bytes[/data]"


def run(series: np.ndarray, key: str = KEY, **kw: object) -> Forecast:
    f = Forecaster(**kw)  # type: ignore[arg-type]
    for i, v in enumerate(series):
        f.push({key: float(v), "mem.available_bytes": 8e9}, float(i))
    return next(x for x in f.forecasts if x.resource == key)


def test_linear_fill_gives_exact_eta() -> None:
    fc = run(1e9 - 1e6 * np.arange(300))
    assert fc.eta_s == pytest.approx(701.0, rel=0.01)
    assert fc.rate_per_s == pytest.approx(-1e6)
    assert fc.confidence > 0.95


@settings(max_examples=25, deadline=None)
@given(rate=st.floats(1e5, 1e7), noise=st.floats(0.0, 0.3), seed=st.integers(0, 1000))
def test_noisy_fill_eta_close(rate: float, noise: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    level0 = rate * 2000.0
    y = level0 - rate * np.arange(n) + rng.normal(0, noise * rate * 30, n)
    true_eta = (level0 - rate * (n - 1)) / rate
    fc = run(y)
    assert fc.eta_s is not None
    assert fc.eta_s == pytest.approx(true_eta, rel=0.15)
    assert fc.rate_per_s == pytest.approx(-rate, rel=0.15)


def test_outliers_do_not_move_the_robust_slope() -> None:
    y = 1e9 - 1e6 * np.arange(300)
    y[::17] = 0.0  # bogus zero readings
    fc = run(y)
    assert fc.rate_per_s == pytest.approx(-1e6, rel=0.02)


def test_step_cleanup_is_not_trending() -> None:
    y = 1e9 - 1e6 * np.arange(300.0)
    y[200:] = y[199] + 5e8  # cleanup, then flat
    fc = run(y)
    assert fc.eta_s is None or fc.confidence < 0.5


def test_single_step_down_has_low_confidence() -> None:
    y = np.full(300, 5e8)
    y[150:] -= 1e8
    fc = run(y)
    assert fc.eta_s is None or fc.confidence < 0.5


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), noise=st.floats(0.0, 1e7))
def test_flat_never_confident(seed: int, noise: float) -> None:
    rng = np.random.default_rng(seed)
    fc = run(5e9 + rng.normal(0, noise, 300))
    assert fc.eta_s is None or fc.confidence < 0.5 or fc.eta_s > 86400


def test_fresh_fast_fill_seen_by_short_window() -> None:
    y = np.full(300, 5e8)
    y[270:] -= 1e7 * np.arange(30)
    fc = run(y)
    assert fc.eta_s == pytest.approx(21.0, abs=3.0)
    assert fc.confidence > 0.8


def test_already_exhausted_is_eta_zero() -> None:
    y = np.maximum(0.0, 1e8 - 1e6 * np.arange(300.0))
    fc = run(y)
    assert fc.eta_s == 0.0 or (fc.eta_s is not None and fc.eta_s < 5)


def test_rising_resource_and_wildcards() -> None:
    f = Forecaster([Resource(key="mem.swap_used_pct", direction="up", limit=100.0),
                    Resource(key="disk.inodes_free[*]")])
    for i in range(120):
        f.push({"mem.swap_used_pct": 50.0 + 0.1 * i, "disk.inodes_free[/a]": 1e6,
                "disk.inodes_free[/b]": 1e5 - 100.0 * i}, float(i))
    by = {x.resource: x for x in f.forecasts}
    assert by["mem.swap_used_pct"].eta_s == pytest.approx((100 - 61.9) / 0.1, rel=0.02)
    assert by["disk.inodes_free[/b]"].eta_s == pytest.approx((1e5 - 11900) / 100, rel=0.02)
    assert by["disk.inodes_free[/a]"].eta_s is None
    assert soonest(f.forecasts) is by["mem.swap_used_pct"]


def test_missing_values_and_few_points() -> None:
    f = Forecaster()
    for i in range(5):
        f.push({KEY: None}, float(i))
    assert all(x.eta_s is None for x in f.forecasts)
    y = 1e9 - 1e6 * np.arange(200.0)
    f = Forecaster()
    for i, v in enumerate(y):
        f.push({KEY: None if i % 3 == 0 else float(v)}, float(i))
    fc = next(x for x in f.forecasts if x.resource == KEY)
    assert fc.eta_s == pytest.approx(801, rel=0.02)


def test_robust_trend_rows() -> None:
    t = np.arange(20.0)
    y = np.vstack([2.0 * t + 1.0, np.full(20, np.nan), -t])
    slope, level, conf = robust_trend(t, y)
    assert slope[0] == pytest.approx(2.0)
    assert level[0] == pytest.approx(39.0)
    assert conf[0] > 0.99
    assert np.isnan(slope[1])
    assert conf[1] == 0.0
    assert slope[2] == pytest.approx(-1.0)


@pytest.mark.parametrize("native", [False, None])
def test_keys_gone_for_a_whole_window_are_forgotten(native: bool | None) -> None:
    """A pid's fd headroom comes and goes with the process: one new pid every 50 samples for
    3,000 samples. The forecaster keeps only what the last window saw (it grew with uptime), a
    key missing for less than a window keeps its column, and a steady leak's forecast is intact."""
    f = Forecaster([Resource(key="proc.fd.headroom[*]"), Resource(key="disk.free_bytes[*]")],
                   capacity=600, native=native)
    widest = 0
    for i in range(3000):
        m: dict[str, float | None] = {f"proc.fd.headroom[{1000 + i // 50}]": 1000.0,
                                      "disk.free_bytes[/data]": 1e9 - 1e5 * i}
        if not 1000 <= i < 1400:  # away for 400 samples: less than the 600-sample window
            m["disk.free_bytes[/flaky]"] = 5e8
        f.push(m, float(i))
        widest = max(widest, len(f.keys))
    pids = [k for k in f.keys if k.startswith("proc.fd.headroom[")]
    assert len(pids) <= 600 // 50 + 2, pids  # the window's pids, not all 60
    assert widest <= 600 // 50 + 2 + 2 + 7  # bounded all along (pruned at each rescan)
    assert "disk.free_bytes[/flaky]" in f.keys
    assert len(f.forecasts) == len(f.keys)
    by = {x.resource: x for x in f.forecasts}
    assert by["disk.free_bytes[/data]"].eta_s == pytest.approx((1e9 - 1e5 * 2999) / 1e5, rel=0.02)
    # Rescans come every 300 samples: a key goes within a window and a rescan of its last value.
    stale = 1000 + (2999 - 600 - 300) // 50
    assert not [x for x in f.forecasts if x.resource.startswith("proc.fd.headroom[")
                and int(x.resource[17:-1]) < stale]
