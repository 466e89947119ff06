"""The per-sample pipeline: collect -> features/score -> decide/act -> report, in that order.

The daemon calls :meth:`Pipeline.process` once per sample on the event loop. Every stage here is
optional (a build or config without MQTT has no reporter) and every stage call is cheap: the
expensive work (fitting, actions, network) runs in the stages' own tasks, which the daemon
starts in its root TaskGroup through :meth:`Pipeline.tasks`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import structlog

from agent.collect.sample import Sample
from agent.score.types import Risk

log = structlog.get_logger("heald.pipeline")


class RiskScorer(Protocol):
    @property
    def model_version(self) -> str: ...

    def on_sample(self, sample: Sample) -> Risk: ...


class Decider(Protocol):
    async def evaluate(self, sample: Sample, risk: Risk | None) -> None: ...


class Pipeline:
    def __init__(self, *, scorer: RiskScorer | None = None, decider: Decider | None = None,
                 reporter: Any | None = None, exposition: Any | None = None) -> None:
        self.scorer = scorer
        self.decider = decider
        self.reporter = reporter  # agent.report.transport.Reporter (imported lazily by the daemon)
        self.exposition = exposition  # agent.runtime.prometheus.Exposition
        self.last_risk: Risk | None = None
        # Wall time until which automatic playbook runs are held (a coordinator `silence`).
        self.hold_until: Callable[[], float] = lambda: 0.0
        self._tasks: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = []

    def add_task(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._tasks.append((name, factory))

    def tasks(self) -> list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        return list(self._tasks)

    async def process(self, sample: Sample) -> None:
        risk = None
        if self.scorer is not None:
            try:
                risk = self.scorer.on_sample(sample)
            except Exception:  # scoring trouble falls back to rules, never stops healing
                log.exception("scoring failed; rules only for this sample", seq=sample.seq)
        self.last_risk = risk
        if self.exposition is not None:
            self.exposition.update_sample(sample)
            if risk is not None:
                self.exposition.update_risk(risk)
        if self.decider is not None and sample.wall >= self.hold_until():
            if self.reporter is not None and hasattr(self.decider, "set_connected"):
                self.decider.set_connected(self.reporter.connected)
            try:
                await self.decider.evaluate(sample, risk)
            except Exception:  # a playbook bug must not stop sampling or reporting
                log.exception("playbook evaluation failed", seq=sample.seq)
        if self.reporter is not None:
            self.reporter.submit_sample(sample)
            for event in sample.events:
                self.reporter.submit_event(event)
            if risk is not None:
                self.reporter.submit_risk(risk)
            if self.exposition is not None:
                spool = self.reporter.spool
                self.exposition.set_report_state(self.reporter.connected, spool.used_bytes, spool.pending)
