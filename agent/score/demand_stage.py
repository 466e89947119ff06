"""The daemon's demand forecasts: history, fits in a child, live scoring, summaries for the wire.

:class:`DemandStage` is the score stage's part for ``[demand]`` (:class:`~agent.score.stage.RiskStage`
calls :meth:`DemandStage.on_sample` and puts what it returns in ``Risk.demand``, where the
playbooks' ``demand`` trigger reads it). Per sample it costs the history's sums
(:mod:`agent.features.demand_history`) and the scorer's (:class:`~agent.score.demand.DemandScorer`);
the forecasts are rebuilt only when a step closes, and the same tuple is handed on in between.

The model is, in order of preference: ``[demand] model_path`` (a pre-fitted artifact; the node then
fits none), else ``<state_dir>/models/demand.npz``, the node's own last fit. :meth:`DemandStage.run`
(the daemon's ``demand`` task) saves the history every ``save_interval_s`` and, without a
``model_path``, fits once ``min_history_s`` of history exists and again every ``refit_interval_s``:
the history is saved, ``python -m agent model train-demand`` fits it in a child process
(:func:`agent.score.demand.fit_in_child`, numpy only, never in the daemon), and the verified
artifact replaces the running model, whose level is first brought up to date by replaying the
history's recent rows. A failed fit keeps the previous model (logged once per streak).

:meth:`DemandStage.summaries` is what rides on each cost summary (:class:`agent.wire.DemandSummary`):
the period's actual means, what the forecast sent with the previous summary predicted for the
period, and the current forecast.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from pathlib import Path
from typing import Final

import structlog

from agent import wire
from agent.errors import ModelError, Problem
from agent.features.demand_history import DemandHistory, DemandSettings, Row
from agent.fsutil import FailureStreak
from agent.score import demand as dm
from agent.score.types import DemandForecast
from agent.wire.messages import MAX_DEMAND

log = structlog.get_logger("heald.demand")

MODEL_FILE: Final = "demand.npz"
#: Forecast points per resource on the wire at most (the rest of the horizon is cut).
WIRE_POINTS: Final = 144


class DemandStage:
    def __init__(self, settings: DemandSettings, state_dir: str | os.PathLike[str]) -> None:
        self.settings = settings
        self.state_dir = Path(state_dir)
        self.model_dir = self.state_dir / "models"
        self.history = DemandHistory(settings.step_s, settings.history_days,
                                     self.state_dir / "demand" / "history.json")
        self.scorer: dm.DemandScorer | None = None
        self._fc: tuple[DemandForecast, ...] = ()
        self._fc_bin: int | None = None
        # the start of step 0 of the forecast last sent, and that forecast
        self._sent: tuple[float, tuple[DemandForecast, ...]] | None = None
        self._last_fit: float | None = None  # wall
        self._failures = FailureStreak("demand fit failed; keeping the previous model", log)
        self._save_failures = FailureStreak("demand history not saved", log)
        path = Path(settings.model_path) if settings.model_path else self.model_dir / MODEL_FILE
        if path.exists() or settings.model_path:
            self._load(path)

    # ------------------------------------------------------------------ models
    def _load(self, path: Path) -> bool:
        try:
            model = dm.FORMAT.load(path)
        except ModelError as exc:
            log.error("demand model refused; no demand forecasts until the next fit", path=str(path),
                      error=str(exc))
            return False
        self.install(model)
        self._last_fit = model.meta.training.end
        log.info("demand model loaded", path=str(path), version=model.version,
                 resources=list(model.meta.resources), step_s=model.meta.step_s)
        return True

    def install(self, model: dm.CompiledDemand) -> None:
        """Score with ``model`` from now on; its level (and the seasons seasonal naive reads) start
        from the history's recent rows."""
        scorer = dm.DemandScorer(model)
        if model.meta.step_s == self.history.step_s:
            scorer.warm(list(self.history.rows)[-scorer.warmup_steps:])
        self.scorer = scorer
        self._fc_bin = None

    @property
    def model_version(self) -> str:
        return self.scorer.model.version if self.scorer is not None else "-"

    # ------------------------------------------------------------------ per sample
    def on_sample(self, metrics: dict[str, float | None], wall: float) -> tuple[DemandForecast, ...]:
        self.history.push(metrics, wall)
        sc = self.scorer
        if sc is None or not math.isfinite(wall):
            return ()
        sc.push(metrics, wall)
        b = int(wall // sc.model.meta.step_s)
        if b != self._fc_bin:  # a step closed: the level moved, the forecast starts a step later
            self._fc_bin = b
            self._fc = sc.forecast(wall)
        return self._fc

    # ------------------------------------------------------------------ wire
    def summaries(self, start: float, end: float) -> list[wire.DemandSummary]:
        """The period's demand per resource (see the module docstring); starts the next period."""
        actual = self.history.take_period()
        predicted: dict[str, float] = {}
        if self._sent is not None:
            first, sent = self._sent
            for g in sent:
                pts = [v for i, v in enumerate(g.point)
                       if first + g.step_s * i < end and first + g.step_s * (i + 1) > start]
                if pts:
                    predicted[g.resource] = sum(pts) / len(pts)
        now = self._fc
        # the forecast's step 0 is the step after the one it was made in
        self._sent = ((self._fc_bin + 1) * now[0].step_s, now) if now and self._fc_bin is not None else None
        by_key = {f.resource: f for f in now}
        out: list[wire.DemandSummary] = []
        for key in sorted(set(actual) | set(by_key))[:MAX_DEMAND]:
            f = by_key.get(key)
            a, p = _or_none(actual.get(key)), _or_none(predicted.get(key))
            if f is None:
                out.append(wire.DemandSummary(resource=key, actual=a, predicted=p))
            else:
                out.append(wire.DemandSummary(resource=key, actual=a, predicted=p, step_s=f.step_s,
                                              point=_finite(f.point), lo=_finite(f.lo), hi=_finite(f.hi)))
        return out

    # ------------------------------------------------------------------ the task
    def fit_due(self, now: float) -> bool:
        s = self.settings
        if s.model_path or self.history.span_s < s.min_history_s:
            return False
        return self._last_fit is None or now - self._last_fit >= s.refit_interval_s

    async def refit(self) -> bool:
        """Save the history, fit it in a child, install the artifact if it loads (see the docstring)."""
        self._last_fit = time.time()
        work = self.model_dir / "work"
        tmp = work / MODEL_FILE
        try:
            work.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(self.history.save, self.history.snapshot())
            assert self.history.path is not None  # noqa: S101 - set in __init__
            model = await asyncio.to_thread(dm.fit_in_child, self.history.path, tmp,
                                            horizon_s=self.settings.horizon_s,
                                            timeout_s=self.settings.fit_timeout_s)
            self.install(model)
            os.replace(tmp, self.model_dir / MODEL_FILE)
        except (ModelError, OSError) as exc:
            self._failures.failed(exc, previous=self.model_version)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return False
        self._failures.succeeded()
        log.info("demand model fitted", version=model.version, resources=list(model.meta.resources),
                 rows=model.meta.training.rows, weekly=model.meta.weekly, choice=list(model.meta.choice))
        return True

    def save(self, rows: list[Row] | None = None) -> None:
        try:
            self.history.save(rows)
        except OSError as exc:
            self._save_failures.failed(exc)
        else:
            self._save_failures.succeeded()

    async def run(self, check_every_s: float = 30.0) -> None:
        """Daemon task: save the history every ``save_interval_s`` and at stop; fit when due."""
        last_save = time.monotonic()
        try:
            while True:
                await asyncio.sleep(min(check_every_s, self.settings.save_interval_s))
                if self.fit_due(time.time()):
                    await self.refit()
                    last_save = time.monotonic()
                elif self.history.dirty and time.monotonic() - last_save >= self.settings.save_interval_s:
                    await asyncio.to_thread(self.save, self.history.snapshot())  # taken here, on the loop
                    last_save = time.monotonic()
        except asyncio.CancelledError:
            self.save()
            raise


def _finite(values: tuple[float, ...]) -> list[float]:
    return [v if math.isfinite(v) else 0.0 for v in values[:WIRE_POINTS]]


def _or_none(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def check_demand(settings: DemandSettings, model_enabled: bool = True) -> list[Problem]:
    """For ``heald check``: does ``[demand] model_path`` load as a demand model?"""
    if not settings.enabled or not settings.model_path:
        return []
    problems = []
    if not model_enabled:
        problems.append(Problem(file="agent.toml", key="demand.model_path",
                                message="set, but [model] enabled = false: no demand forecasts are made"))
    try:
        dm.FORMAT.load(Path(settings.model_path))
    except ModelError as exc:
        problems.append(Problem(file=settings.model_path, key="demand.model_path", message=str(exc)))
    return problems
