"""The per-sample pipeline: collect -> features/score -> decide/act -> report, in that order.

The daemon calls :meth:`Pipeline.process` once per sample on the event loop. Every stage here is
optional (a build or config without MQTT has no reporter) and every stage call is cheap: the
expensive work (fitting, actions, network) runs in the stages' own tasks, which the daemon runs
in its root TaskGroup. The stages are seen through the Protocols below, so the composition root
(:func:`agent.runtime.daemon.build_daemon`) can plug in each stage's class without this module
importing them (and their dependencies: numpy, aiomqtt, prometheus_client).
"""

from __future__ import annotations

import time
from array import array
from typing import Final, Protocol

import structlog

from agent.collect.sample import Event, Sample
from agent.score.types import Risk

log = structlog.get_logger("heald.pipeline")


class RiskScorer(Protocol):
    """The score stage (:class:`agent.score.stage.RiskStage`)."""

    @property
    def model_version(self) -> str: ...

    def on_sample(self, sample: Sample) -> Risk: ...


class Decider(Protocol):
    """The decide/act stages (:class:`agent.act.engine.Engine`)."""

    def set_connected(self, connected: bool) -> None:
        """Whether the coordinator is reachable (playbooks' ``guards.disconnected`` policy)."""
        ...

    def set_auto_hold(self, held: bool) -> None:
        """Whether automatic runs are held (a coordinator's silence); triggers are still evaluated."""
        ...

    async def evaluate(self, sample: Sample, risk: Risk | None) -> None: ...


class SpoolState(Protocol):
    @property
    def used_bytes(self) -> int: ...

    @property
    def pending(self) -> int: ...


class ReportSink(Protocol):
    """The report stage (:class:`agent.report.transport.Reporter`)."""

    @property
    def connected(self) -> bool: ...

    @property
    def spool(self) -> SpoolState: ...

    def submit_sample(self, sample: Sample) -> None: ...

    def submit_event(self, event: Event) -> None: ...

    def submit_risk(self, risk: Risk) -> bool: ...


class Exposition(Protocol):
    """The ``/metrics`` endpoint's state (:class:`agent.runtime.prometheus.Exposition`)."""

    def update_sample(self, sample: Sample) -> None: ...

    def update_risk(self, risk: Risk) -> None: ...

    def set_report_state(self, connected: bool, spool_bytes: int, spool_records: int) -> None: ...

    def update_stage_cost(self, cost: StageCost) -> None: ...


class Hold(Protocol):
    """Holds automatic playbook runs (a coordinator's ``silence``: :class:`agent.control.silence.Silence`)."""

    def holds(self, wall: float) -> bool: ...


class CostSink(Protocol):
    """The idle-resource accounting (:class:`agent.features.cost.CostMeter`)."""

    def on_sample(self, sample: Sample) -> None: ...


class StageCost:
    """What the score stage and the playbook evaluation cost the daemon, per sample: the event
    loop thread's CPU time (``time.thread_time_ns``, three reads a sample) around
    ``scorer.on_sample`` and around the decider's part (hold, connected, ``evaluate``).

    Totals since start, and the last :data:`WINDOW` samples' own values for quantiles; written on
    the event loop, read by ``/metrics`` scrapes (``heald_pipeline_cpu_seconds``, docs/metrics.md).
    """

    WINDOW: Final = 1024

    def __init__(self) -> None:
        self.samples = 0
        self.score_ns = 0
        self.decide_ns = 0
        self._score = array("q", bytes(8 * self.WINDOW))
        self._decide = array("q", bytes(8 * self.WINDOW))

    def add(self, score_ns: int, decide_ns: int) -> None:
        i = self.samples % self.WINDOW
        self._score[i] = score_ns
        self._decide[i] = decide_ns
        self.score_ns += score_ns
        self.decide_ns += decide_ns
        self.samples += 1

    def recent(self) -> tuple[list[int], list[int]]:
        """The last samples' (score, decide) nanoseconds, at most :data:`WINDOW`, in no order."""
        n = min(self.samples, self.WINDOW)
        return self._score.tolist()[:n], self._decide.tolist()[:n]


class Pipeline:
    def __init__(self, *, scorer: RiskScorer | None = None, decider: Decider | None = None,
                 reporter: ReportSink | None = None, exposition: Exposition | None = None,
                 hold: Hold | None = None, cost: CostSink | None = None) -> None:
        self.cost = cost
        self.scorer = scorer
        self.decider = decider
        self.reporter = reporter
        self.exposition = exposition
        self.hold = hold
        self.last_risk: Risk | None = None
        self.stage_cost = StageCost()

    async def process_fast(self, sample: Sample) -> None:
        """The fast path's sample (:meth:`agent.runtime.sampler.Sampler.fast_pass`): the playbooks
        only, with the last sample's risk; nothing is scored, counted or reported (the next
        sample carries the same readings)."""
        if self.decider is None:
            return
        self.decider.set_auto_hold(self.hold is not None and self.hold.holds(sample.wall))
        if self.reporter is not None:
            self.decider.set_connected(self.reporter.connected)
        try:
            await self.decider.evaluate(sample, self.last_risk)
        except Exception:  # a playbook bug must not stop sampling or reporting
            log.exception("playbook evaluation failed on the fast path", seq=sample.seq)

    async def process(self, sample: Sample) -> None:
        if self.cost is not None:
            try:
                self.cost.on_sample(sample)
            except Exception:  # accounting trouble never stops healing
                log.exception("cost accounting failed", seq=sample.seq)
        risk = None
        t0 = time.thread_time_ns()
        if self.scorer is not None:
            try:
                risk = self.scorer.on_sample(sample)
            except Exception:  # scoring trouble falls back to rules, never stops healing
                log.exception("scoring failed; rules only for this sample", seq=sample.seq)
        self.last_risk = risk
        t1 = time.thread_time_ns()
        if self.decider is not None:
            # A silence holds automatic runs only: the decider still sees every sample, so manual
            # and approved runs verify against fresh data.
            self.decider.set_auto_hold(self.hold is not None and self.hold.holds(sample.wall))
            if self.reporter is not None:
                self.decider.set_connected(self.reporter.connected)
            try:
                await self.decider.evaluate(sample, risk)
            except Exception:  # a playbook bug must not stop sampling or reporting
                log.exception("playbook evaluation failed", seq=sample.seq)
        t2 = time.thread_time_ns()
        self.stage_cost.add(t1 - t0, t2 - t1)
        if self.exposition is not None:
            self.exposition.update_sample(sample)
            if risk is not None:
                self.exposition.update_risk(risk)
            self.exposition.update_stage_cost(self.stage_cost)
        if self.reporter is not None:
            self.reporter.submit_sample(sample)
            for event in sample.events:
                self.reporter.submit_event(event)
            if risk is not None:
                self.reporter.submit_risk(risk)
            if self.exposition is not None:
                spool = self.reporter.spool
                self.exposition.set_report_state(self.reporter.connected, spool.used_bytes, spool.pending)
