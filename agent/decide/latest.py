"""What the decider saw last: the sample, the model's risk, the events and every trigger's matches.

Evaluation (once a sample, or on the supervisor's fast path) writes it; a run reads it to verify
a step, and waits on it for a *new* sample first, so that a step is never judged on data from
before it ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

from agent.collect.sample import Sample
from agent.decide.triggers import EventLog, KeyPlan, Match, SampleIndex, consistent, worst
from agent.score.types import Risk


class Latest:
    def __init__(self) -> None:
        self.events = EventLog()
        self.sample: Sample | None = None
        self.risk: Risk | None = None
        self._plan = KeyPlan()  # where each family's keys are, kept while the keys stay the same
        self.index = SampleIndex(None, self._plan)
        self.matches: dict[str, list[Match]] = {}  # playbook -> the trigger's current matches
        # Samples evaluated so far; a fast-path re-evaluation of the same sample does not count.
        self.seq = 0
        self._tick: asyncio.Event | None = None  # set (and replaced) on each new sample

    def start(self) -> None:
        """From now on, runs may wait for fresh samples (the engine is running)."""
        self._tick = asyncio.Event()

    def take(self, sample: Sample, risk: Risk | None) -> None:
        """A new sample and its risk; its events join the event log."""
        self.sample, self.risk = sample, risk
        self.events.add(sample.events, sample.wall)
        self.index = SampleIndex(sample, self._plan)

    def evaluated(self) -> None:
        """Every trigger has been evaluated on the new sample: wake the runs waiting to verify."""
        self.seq += 1
        if self._tick is not None:
            self._tick.set()
            self._tick = asyncio.Event()

    async def fresh_since(self, seq: int, timeout_s: float) -> bool:
        """Wait until a sample after ``seq`` has been evaluated; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.seq <= seq:
            tick = self._tick
            if tick is None:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await tick.wait()
        return True

    @property
    def detail(self) -> Mapping[str, Any]:
        """The latest sample's per-collector detail (e.g. the GPU device table), for actions."""
        return self.sample.detail if self.sample is not None else {}

    def model(self) -> dict[str, Any]:
        """The model fields every decision record carries."""
        risk = self.risk
        if risk is None:
            return {"model_version": None, "anomaly": None, "cold": None}
        return {"model_version": risk.model_version, "anomaly": risk.anomaly, "cold": risk.cold}

    def current_inputs(self, playbook: str, bindings: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The worst current match's inputs (the metric values that made the trigger hold), of the
        matches consistent with ``bindings`` when given (one target's)."""
        matches = self.matches.get(playbook) or []
        if bindings:
            matches = [m for m in matches if consistent(bindings, m.bindings)]
        return dict(worst(matches).inputs) if matches else {}
