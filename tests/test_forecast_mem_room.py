"""Memory's forecasts past two thirds of the room (``Resource.min_used``, :meth:`Forecaster._unused`):
no confident forecast of the host's available memory or of a cgroup's headroom while less than
two thirds of the host's memory, or of the cgroup's limit, is in use. Synthetic 1 Hz series
through the daemon's Forecaster (its default windows); the recorded stress-ng --vm ramp is
replayed through RiskStage in tests/test_mem_evidence.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from agent.score.forecast import DEFAULT_RESOURCES, MEM_MIN_USED, Forecaster, Resource

ALERT = (1800.0, 0.5)  # RiskStage.risk_alert's forecast line
TOTAL = 25.2e9
CG = "/job"


def ungated() -> tuple[Resource, ...]:
    return tuple(Resource(key=r.key, direction=r.direction, limit=r.limit, min_fill=r.min_fill)
                 for r in DEFAULT_RESOURCES)


def host(avail: float) -> dict[str, float | None]:
    return {"mem.total_bytes": TOTAL, "mem.available_bytes": avail}


def cgroup(limit: float) -> Callable[[float], dict[str, float | None]]:
    return lambda room: {f"cgroup.mem.limit_bytes[{CG}]": limit, f"cgroup.mem.headroom_bytes[{CG}]": room}


def over(series: list[float], metrics: Callable[[float], dict[str, float | None]], key: str,
         resources: tuple[Resource, ...] = DEFAULT_RESOURCES) -> list[int]:
    """The samples at which the forecast of ``key`` is over the alert line."""
    fc = Forecaster(resources)
    hits = []
    for i, v in enumerate(series):
        fc.push(metrics(v), float(i))
        f = next((x for x in fc.forecasts if x.resource == key), None)
        if f is not None and f.eta_s is not None and f.eta_s <= ALERT[0] and f.confidence >= ALERT[1]:
            hits.append(i)
    return hits


def ramp(start: float, rate: float, secs: int, hold: int = 120, idle: int = 120) -> list[float]:
    """``idle`` s flat at ``start``, a fall at ``rate`` for ``secs`` s, then held."""
    return [start] * idle + [start - rate * k for k in range(1, secs + 1)] + [start - rate * secs] * hold


def leak(start: float, rate: float, idle: int = 120) -> list[float]:
    """``idle`` s flat, then a fall at ``rate`` to 0."""
    return [start] * idle + [max(0.0, start - rate * k) for k in range(1, int(start / rate) + 2)]


@pytest.mark.parametrize(("series", "metrics", "key"), [
    # stress-ng --vm as bench/faultfree_load.py runs it: 6 GB (a quarter of the RAM) in 13 s and held
    (ramp(24e9, 0.3e9, 20), host, "mem.available_bytes"),
    # the same job in its cgroup limited to half the RAM: to 50.7 % of the limit
    (ramp(12.6e9, 0.3e9, 21), cgroup(12.6e9), f"cgroup.mem.headroom_bytes[{CG}]"),
], ids=["host", "cgroup"])
def test_a_job_allocating_its_working_set_is_not_forecast(
        series: list[float], metrics: Callable[[float], dict[str, float | None]], key: str) -> None:
    assert over(series, metrics, key, ungated()), "without the gate the ramp is a confident forecast"
    assert over(series, metrics, key) == []


@pytest.mark.parametrize(("start", "rate", "metrics", "key", "room"), [
    (12e9, 0.1e9, host, "mem.available_bytes", TOTAL),  # from 52 % used, 100 MB/s
    (1.5e9, 40e6, cgroup(1.5e9), f"cgroup.mem.headroom_bytes[{CG}]", 1.5e9),  # as bench/faults
], ids=["host", "cgroup"])
def test_a_leak_is_forecast_past_two_thirds_as_without_the_gate(
        start: float, rate: float, metrics: Callable[[float], dict[str, float | None]], key: str,
        room: float) -> None:
    series = leak(start, rate)
    old = over(series, metrics, key, ungated())
    new = over(series, metrics, key)
    past = next(i for i, v in enumerate(series) if v <= (1 - MEM_MIN_USED) * room)
    assert new, "the leak is forecast"
    assert min(new) >= past
    # past two thirds the gate keeps what the forecaster says, a refit (10 samples) later at most
    assert set(new) >= {i for i in old if i >= past + 10}
    assert min(new) <= max(past, min(old)) + 10
    # the lead: most of the last third's time to the end
    assert len(series) - min(new) >= 0.7 * (1 - MEM_MIN_USED) * room / rate


def test_without_the_total_there_is_no_verdict() -> None:
    """A recording without ``mem.total_bytes`` (or a cgroup without its limit) is forecast as before."""
    s = ramp(24e9, 0.3e9, 20)

    def bare(v: float) -> dict[str, float | None]:
        return {"mem.available_bytes": v}

    assert over(s, bare, "mem.available_bytes") == over(s, bare, "mem.available_bytes", ungated())
    assert over(s, bare, "mem.available_bytes")


def test_two_cgroups_at_once_and_a_hostile_total() -> None:
    """Two limited cgroups in one stream: the one past two thirds is forecast, the ramp that stops
    at half is not; a NaN or infinite limit is no verdict (forecast as without the gate)."""
    fc = Forecaster()
    leak_s, ramp_s = leak(1.5e9, 40e6), ramp(12.6e9, 0.3e9, 21)
    n = min(len(leak_s), len(ramp_s))
    hits: dict[str, int] = {}
    for i in range(n):
        fc.push({"cgroup.mem.limit_bytes[/a]": 1.5e9, "cgroup.mem.headroom_bytes[/a]": leak_s[i],
                 "cgroup.mem.limit_bytes[/b]": 12.6e9, "cgroup.mem.headroom_bytes[/b]": ramp_s[i]}, float(i))
        for f in fc.forecasts:
            if f.eta_s is not None and f.eta_s <= ALERT[0] and f.confidence >= ALERT[1]:
                hits[f.resource] = hits.get(f.resource, 0) + 1
    assert set(hits) == {"cgroup.mem.headroom_bytes[/a]"}
    s = ramp(12.6e9, 0.3e9, 21)
    for bad in (float("nan"), float("inf")):
        m, key = cgroup(bad), f"cgroup.mem.headroom_bytes[{CG}]"
        assert over(s, m, key) == over(s, m, key, ungated())
