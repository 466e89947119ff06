"""Shadow: a candidate playbook set evaluated beside the live one, never executed.

:class:`Shadowed` stands where the pipeline expects the decider (:class:`agent.act.engine.Engine`):
each sample goes to the engine first, as before, then to a second
:class:`~agent.decide.decider.Decider` holding the candidate set, with its own view of the latest
sample and its own guard state (``<state_dir>/bundles/shadow-state``). Its decisions are only
counted and reported (a ``bundle.shadow_decision`` event per playbook and target, at most once a
:data:`REPORT_EVERY_S`), never carried out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import structlog

from agent.act.engine import Engine
from agent.collect.sample import Sample
from agent.decide.decider import Decider, Hold
from agent.decide.guards import StateStore
from agent.decide.latest import Latest
from agent.decide.model import Playbook
from agent.score.types import Risk

log = structlog.get_logger("heald.bundle")

REPORT_EVERY_S = 5.0


class Shadowed:
    def __init__(self, engine: Engine, state_dir: Path, node: str,
                 report: Callable[[dict[str, Any]], None]) -> None:
        self.engine = engine
        self.node = node
        self.report = report
        self.state_dir = Path(state_dir)
        self.version = ""
        self.decisions = 0  # the shadow set's decisions to run, since it was set
        self._decider: Decider | None = None
        self._latest = Latest()
        self._reported: dict[tuple[str, str], float] = {}

    def set_shadow(self, version: str, playbooks: Iterable[Playbook] | None) -> None:
        """Evaluate ``playbooks`` (bundle ``version``) beside the live set; None stops the shadow."""
        self.version, self.decisions, self._reported = version, 0, {}
        if playbooks is None:
            self._decider = None
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        decider = Decider(self.engine.settings, StateStore(self.state_dir), self._latest, self.node)
        decider.reload(playbooks)
        self._decider = decider
        log.info("shadow playbook set", bundle=version, playbooks=sorted(decider.playbooks))

    def __getattr__(self, name: str) -> Any:
        """Everything else is the engine's (the pipeline's decider is the engine to its other readers)."""
        return getattr(self.engine, name)

    def set_connected(self, connected: bool) -> None:
        self.engine.set_connected(connected)

    def set_auto_hold(self, held: bool) -> None:
        self.engine.set_auto_hold(held)

    async def evaluate(self, sample: Sample, risk: Risk | None) -> None:
        await self.engine.evaluate(sample, risk)
        decider = self._decider
        if decider is None:
            return
        try:
            self._latest.take(sample, risk)
            decider.evaluate(sample.wall, sample.mono, {})
            decisions = decider.decide(sample.wall, {}, connected=True, hold_auto=False, can_start=True)
            self._latest.evaluated()
        except Exception:  # a shadow must never take the live pipeline down
            log.exception("shadow evaluation failed; the shadow is stopped", bundle=self.version)
            self._decider = None
            return
        now = time.monotonic()
        for decision in decisions:
            if isinstance(decision, Hold):
                continue
            self.decisions += 1
            key = (decision.playbook.name, decision.target.key)
            if now - self._reported.get(key, -REPORT_EVERY_S) < REPORT_EVERY_S:
                continue
            self._reported[key] = now
            self.report({
                "kind": "bundle.shadow_decision", "wall": sample.wall, "playbook": decision.playbook.name,
                "labels": {"bundle": self.version, "role": "shadow", "target": decision.target.key,
                           "decisions": str(self.decisions)},
                "message": f"shadow bundle {self.version} would run {decision.playbook.name} "
                           f"on {decision.target.key or self.node} (not executed)",
            })
