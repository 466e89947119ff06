"""Drift: a node fed data from another distribution flags it and refits; an unshifted node stays quiet.

Real recordings (bench/faults/data), the real score stage and the real fit (child processes).
Both nodes fit their detector on the same first 10 minutes of a quiet VM's idle phase. Then the
unshifted node sees the next minutes of that idle phase; the shifted node sees a busy VM's idle
phase (other engineers' test suites running there: bench/faults/data/README.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.collect.sample import Sample
from agent.score import compiled as art
from agent.score.drift import BINS, DRIFT_LINE, PSI_MAJOR, DriftMonitor, psi, summarize
from agent.score.settings import ModelSettings
from agent.score.stage import DETECTOR_FILE, RiskStage

DATA = Path(__file__).resolve().parents[1] / "bench" / "faults" / "data"
FIT_ROWS = 600
BLOCK = 500


def idle_samples(name: str, start: int, count: int, mono0: float) -> Iterator[Sample]:
    with np.load(DATA / f"{name}.npz", allow_pickle=False) as z:
        keys = [str(k) for k in z["keys"]]
        idle = np.flatnonzero(z["phase"] == "idle")[start:start + count]
        x, wall = z["X"][idle], z["wall"][idle]
    for i in range(x.shape[0]):
        metrics = {k: (None if v != v else v) for k, v in zip(keys, x[i].tolist(), strict=True)}  # noqa: PLR0124
        yield Sample(node="n", seq=i + 1, wall=float(wall[i]), mono=mono0 + i, metrics=metrics)


def node(tmp: Path) -> RiskStage:
    return RiskStage(ModelSettings(cold_start_s=FIT_ROWS), tmp, drift_every=BLOCK, drift_refit_min_s=0.0)


@pytest.mark.slow
def test_a_shifted_node_flags_drift_and_refits_an_unshifted_one_stays_quiet(tmp_path: Path) -> None:
    nodes = {"unshifted": node(tmp_path / "a"), "shifted": node(tmp_path / "b")}
    later = {"unshifted": idle_samples("faultfree-quiet-71min", FIT_ROWS, BLOCK, FIT_ROWS),
             "shifted": idle_samples("faultfree-71min", 60, BLOCK, FIT_ROWS)}
    scores: dict[str, list[float | None]] = {}
    try:
        for name, stage in nodes.items():
            for s in idle_samples("faultfree-quiet-71min", 0, FIT_ROWS, 0.0):
                stage.on_sample(s)
            assert stage.refit_due()
            assert asyncio.run(stage.refit())
            model = art.load(tmp_path / ("a" if name == "unshifted" else "b") / "models" / DETECTOR_FILE)
            assert model.arrays["drift_edges"].shape == (len(model.meta.features), 9)
            assert stage.drift is not None
            assert not stage.refit_due()
            scores[name] = [stage.on_sample(s).drift for s in later[name]]
        quiet, moved = nodes["unshifted"], nodes["shifted"]
        # one block compared on each: nothing before it, the score after it
        assert scores["unshifted"][:-1] == [None] * (BLOCK - 1) == scores["shifted"][:-1]
        a, b = scores["unshifted"][-1], scores["shifted"][-1]
        assert a is not None
        assert b is not None
        assert a < DRIFT_LINE <= b, (a, b)
        assert quiet.drift is not None
        assert quiet.drift.last is not None
        assert not quiet.drift.last.flagged
        assert not quiet.drift_refit
        assert not quiet.refit_due()
        assert moved.drift_refit
        assert moved.refit_due()
        old = moved.model_version
        assert asyncio.run(moved.refit())
        assert moved.model_version != old
        assert not moved.drift_refit
    finally:
        for stage in nodes.values():
            stage.close()


def test_drift_monitor_psi_on_a_plain_shift() -> None:
    """The monitor alone: the same distribution scores near 0, a shift of 2 sd in every feature 1."""
    rng = np.random.default_rng(7)
    train = rng.normal(size=(2000, 20))
    edges, expected, stable = summarize(train)
    assert stable.all()
    same, moved = DriftMonitor(edges, expected, stable, every=1000), DriftMonitor(edges, expected, every=1000)
    for row in rng.normal(size=(1000, 20)):
        r1 = same.push(row)
        r2 = moved.push(row + 2.0)
    assert r1 is not None
    assert r2 is not None
    assert r1.score < 0.1
    assert not r1.flagged
    assert r2.score == 1.0
    assert r2.flagged
    # features constant, or wandering, in training are not informative: they cannot drift the score
    train[:, 0] = 3.0
    train[:, 1] = np.linspace(0.0, 100.0, train.shape[0])
    edges, expected, stable = summarize(train)
    assert stable[1] == 0.0
    assert stable[2:].all()
    mon = DriftMonitor(edges, expected, stable, every=10)
    report = None
    for row in rng.normal(size=(10, 20)):
        row[0], row[1] = 99.0, 500.0
        report = mon.push(row)
    assert report is not None
    assert {i for i, _ in report.top}.isdisjoint({0, 1})


def test_bulk_binning_counts_as_one_sample_at_a_time() -> None:
    """The monitor bins samples a chunk at a time; the block's report is the one of binning each
    sample as it comes (NaN skipped, values on an edge in the upper bin), at any block length."""
    rng = np.random.default_rng(7)
    d = 12
    edges = np.sort(rng.normal(size=(d, BINS - 1)), axis=1)
    expected = np.full((d, BINS), 1.0 / BINS)
    for every in (1, 63, 64, 150):
        mon = DriftMonitor(edges, expected, every=every, line=0.01)
        for block in range(2):
            ref = np.zeros((d, BINS))
            report = None
            for i in range(every):
                vec = rng.normal(size=d) * (1 + block)
                vec[rng.integers(0, d)] = np.nan
                vec[(i % d)] = edges[i % d, i % (BINS - 1)]  # exactly on an edge
                finite = np.isfinite(vec)
                bins = (vec[:, None] >= edges).sum(axis=1)
                ref[np.arange(d)[finite], bins[finite]] += 1.0
                report = mon.push(vec)
                assert (report is None) == (i < every - 1)
            assert report is not None
            values = psi(ref, expected)
            assert report.score == round(float(np.mean(values >= PSI_MAJOR)), 3)
            order = np.argsort(-values)[:5]
            assert report.top == tuple((int(j), round(float(values[j]), 3)) for j in order)
