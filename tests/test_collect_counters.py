"""RateTracker: first pass, missing values, resets, 32/64-bit wraps, sweeping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.collect.counters import RateTracker, counter_delta

U32 = 1 << 32
U64 = 1 << 64


def test_first_pass_is_none_then_rate() -> None:
    r = RateTracker()
    assert r.rate("k", 100, now=10.0) is None
    assert r.rate("k", 300, now=12.0) == pytest.approx(100.0)


def test_missing_value_keeps_baseline() -> None:
    r = RateTracker()
    r.rate("k", 100, now=0.0)
    assert r.rate("k", None, now=1.0) is None
    assert r.rate("k", 200, now=2.0) == pytest.approx(50.0)


def test_reset_gives_none_and_rebaselines() -> None:
    r = RateTracker()
    r.rate("k", 1_000_000, now=0.0)
    assert r.rate("k", 10, now=1.0) is None  # interface re-created: counter restarted
    assert r.rate("k", 30, now=2.0) == pytest.approx(20.0)


def test_32bit_wrap() -> None:
    r = RateTracker()
    r.rate("k", U32 - 100, now=0.0)
    assert r.rate("k", 50, now=1.0) == pytest.approx(150.0)
    assert r.delta("d", U32 - 1, now=0.0) is None
    assert r.delta("d", 4, now=1.0) == 5


def test_64bit_wrap_with_explicit_width() -> None:
    assert counter_delta(U64 - 10, 5, bits=64) == pytest.approx(15.0)
    # a 64-bit counter that drops from a small value was reset, not wrapped
    assert counter_delta(1000, 5, bits=64) is None


def test_zero_time_step() -> None:
    r = RateTracker()
    r.rate("k", 1, now=5.0)
    assert r.rate("k", 2, now=5.0) is None


def test_sweep_drops_stale_keys() -> None:
    r = RateTracker()
    r.rate("a", 1, now=0.0)
    r.rate("b", 1, now=0.0)
    r.sweep()
    r.rate("a", 2, now=1.0)
    r.sweep()
    assert "a" in r
    assert "b" not in r
    assert len(r) == 1


@given(
    start=st.integers(min_value=0, max_value=U64 - 1),
    steps=st.lists(
        st.tuples(st.integers(min_value=0, max_value=U64 - 1), st.floats(min_value=1e-3, max_value=60)),
        max_size=20,
    ),
)
def test_never_negative_nor_huge(start: int, steps: list[tuple[int, float]]) -> None:
    """Whatever the counter does (jumps, resets, wraps), a rate is None or within range/dt."""
    r = RateTracker()
    now = 0.0
    r.rate("k", start, now)
    for value, dt in steps:
        now += dt
        got = r.rate("k", value, now)
        assert got is None or 0 <= got <= (U64 / 4 + U64) / dt


@given(
    start=st.integers(min_value=0, max_value=U32 - 1),
    incs=st.lists(st.integers(min_value=0, max_value=U32 // 8), min_size=1, max_size=30),
)
def test_32bit_counter_sequence_recovers_true_increments(start: int, incs: list[int]) -> None:
    """A real 32-bit counter, incremented by plausible amounts, yields exactly those increments."""
    r = RateTracker()
    true = start
    r.delta("k", true % U32, now=0.0, bits=32)
    for i, inc in enumerate(incs, 1):
        true += inc
        assert r.delta("k", true % U32, now=float(i), bits=32) == inc


@given(a=st.integers(min_value=0, max_value=U64 - 1), b=st.integers(min_value=0, max_value=U64 - 1))
def test_counter_delta_monotone(a: int, b: int) -> None:
    d = counter_delta(a, b)
    if b >= a:
        assert d == b - a
    else:
        assert d is None or 0 < d <= U64 / 4


@given(
    values=st.lists(st.one_of(st.none(), st.integers(min_value=0, max_value=U64 - 1)), max_size=20),
    dts=st.lists(st.floats(min_value=-1, max_value=60), min_size=20, max_size=20),
)
def test_rate_is_delta_over_dt(values: list[int | None], dts: list[float]) -> None:
    """rate() (inlined for speed) agrees with delta() / dt on any sequence, None and resets included."""
    rates, deltas = RateTracker(), RateTracker()
    now = 0.0
    last_t: float | None = None
    for value, dt in zip(values, dts, strict=False):
        now += dt
        got, d = rates.rate("k", value, now), deltas.delta("k", value, now)
        step = None if last_t is None or value is None else now - last_t
        if value is not None:
            last_t = now
        if d is None or step is None or step <= 0:
            assert got is None
        else:
            assert got == d / step
