"""The playbook engine: triggers -> guards -> journaled, audited, verified escalation ladders.

The daemon builds one :class:`Engine`, runs ``await engine.run()`` inside its root TaskGroup
(the engine owns a TaskGroup of its own, where every playbook run and supervisor waiter is a
named task), and calls ``await engine.evaluate(sample, risk)`` once a sample. ``evaluate``
is synchronous work only: it feeds events to the event log, evaluates every trigger, applies
the guards and schedules runs; it never waits for an action. A run itself (the ladder, the
journal, verification, escalation) is :class:`agent.act.runner.Runner`'s.

Callbacks (both take a JSON-safe dict; both must be quick and not raise):
``on_action(record)`` gets every audit record (the daemon publishes them as MQTT action
messages); ``on_event(event)`` gets events for humans (escalations, breaker trips, approval
requests, notify actions).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from structlog.typing import FilteringBoundLogger

from agent.act.audit import AuditLog
from agent.act.base import ActionResult
from agent.act.journal import Journal
from agent.act.latest import Latest
from agent.act.lease import LeaseGate, LeaseHeld
from agent.act.records import Callback, Recorder
from agent.act.runner import Run, Runner
from agent.act.supervisor import Supervisor
from agent.collect.sample import Event, Sample
from agent.decide.guards import PlaybookState, StateStore, hold_reason, record_start
from agent.decide.model import Playbook
from agent.decide.settings import PlaybookSettings
from agent.decide.triggers import EvalContext, Match, TriggerEvaluator, worst
from agent.errors import HealdError
from agent.score.types import Risk

# LeaseGate and LeaseHeld are the engine's interface to the fleet leases (agent/act/lease.py,
# implemented by agent.control.leases); importable from here too.
__all__ = ["Callback", "Engine", "LeaseGate", "LeaseHeld"]


@dataclass
class _Approval:
    playbook: str
    since: float
    match: Match
    requested_wall: float = field(default_factory=time.time)


class Engine:
    def __init__(  # noqa: PLR0917 - the daemon's documented positional call
        self,
        settings: PlaybookSettings,
        state_dir: Path,
        node: str,
        playbooks: Iterable[Playbook],
        on_action: Callback | None = None,
        on_event: Callback | None = None,
    ) -> None:
        self.settings = settings
        self.state_dir = Path(state_dir)
        self.node = node
        self.log: FilteringBoundLogger = structlog.get_logger("heald.act").bind(node=node)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(self.state_dir)
        self.journal = Journal(self.state_dir / "journal")
        self.audit = AuditLog(self.state_dir / "audit.jsonl")
        self._recorder = Recorder(node, self.audit, self.log, on_action, on_event)
        self._latest = Latest()
        self.events = self._latest.events
        self.supervisor = Supervisor(self._spawn_task, self._child_exited)
        self.connected = True
        self._playbooks: dict[str, Playbook] = {}
        self._evaluators: dict[str, TriggerEvaluator] = {}
        self._running: dict[str, Run] = {}
        self._runner = Runner(self, self._recorder, self._latest, self._running)
        self._approvals: dict[str, _Approval] = {}
        self._held: dict[str, str] = {}  # playbook -> why it is held (recorded once per reason)
        self._task_group: asyncio.TaskGroup | None = None
        self.lease_gate: LeaseGate | None = None
        self.reload(playbooks)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Own the TaskGroup of runs until cancelled; resumes unfinished runs from the journal."""
        self._latest.start()
        async with asyncio.TaskGroup() as task_group:
            self._task_group = task_group
            try:
                self._recover()
                await asyncio.Future()  # until cancelled
            finally:
                self._task_group = None

    def _spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> object:
        if self._task_group is None:
            coro.close()
            raise HealdError("the engine is not running (call engine.run() first)")
        return self._task_group.create_task(coro, name=name)

    def reload(self, playbooks: Iterable[Playbook]) -> None:
        """Swap the playbook set (SIGHUP). Counters, breakers and cooldowns are kept by name;
        trigger timers are kept for playbooks whose trigger did not change; running runs finish
        with the definition they started with."""
        new = {playbook.name: playbook for playbook in playbooks}
        evaluators: dict[str, TriggerEvaluator] = {}
        for name, playbook in new.items():
            old = self._playbooks.get(name)
            if (
                old is not None
                and old.raw.get("trigger") == playbook.raw.get("trigger")
                and name in self._evaluators
            ):
                evaluators[name] = self._evaluators[name]
            else:
                evaluators[name] = TriggerEvaluator(playbook.trigger)
        self._playbooks, self._evaluators = new, evaluators
        for name in list(self._approvals):
            if name not in new:
                del self._approvals[name]
        self.log.info("playbooks loaded", count=len(new), names=sorted(new))

    @property
    def playbooks(self) -> dict[str, Playbook]:
        return dict(self._playbooks)

    def effective_mode(self, playbook: Playbook) -> str:
        if playbook.mode == "off" or self.settings.force_mode == "off":
            return "off"
        if self.settings.force_mode == "dry-run":
            return "dry-run"
        return playbook.mode

    def set_connected(self, connected: bool) -> None:
        """The daemon reports whether the coordinator is reachable (guards.disconnected)."""
        self.connected = connected

    # ------------------------------------------------------------------ evaluation

    async def evaluate(self, sample: Sample, risk: Risk | None) -> None:
        """Called once per sample: cheap, synchronous work; schedules runs, never awaits them."""
        self._latest.take(sample, risk)
        self._evaluate_all(sample.wall, sample.mono)
        # verification waits for a new sample (not for a fast-path re-evaluation of an old one)
        self._latest.evaluated()

    def _evaluate_all(self, wall: float, mono: float) -> None:
        latest = self._latest
        for name, playbook in self._playbooks.items():
            state = self.store.get(name)
            run = self._running.get(name)
            ctx = EvalContext(
                latest.index,
                latest.risk,
                latest.events,
                wall,
                mono,
                watermark=max(state.events_watermark, run.watermark if run else 0.0),
            )
            try:
                matches = self._evaluators[name].evaluate(ctx)
            except Exception:  # a bug in one trigger must not stop the others
                self.log.exception("trigger evaluation failed", playbook=name)
                matches = []
            latest.matches[name] = matches
            self._consider(playbook, state, matches, wall)

    def _hold(self, playbook: Playbook, reason: str, matches: list[Match]) -> None:
        if self._held.get(playbook.name) == reason:
            return
        self._held[playbook.name] = reason
        match = worst(matches)
        self._recorder.record(
            {
                "type": "held",
                "playbook": playbook.name,
                "reason": reason,
                "bindings": dict(match.bindings),
                "inputs": dict(match.inputs),
                **self._latest.model(),
            }
        )

    def _consider(self, playbook: Playbook, state: PlaybookState, matches: list[Match], now: float) -> None:
        mode = self.effective_mode(playbook)
        name = playbook.name
        if not matches or mode == "off":
            self._held.pop(name, None)
            if name in self._approvals and not matches:
                del self._approvals[name]
            return
        if name in self._running:
            return
        risk = self._latest.risk
        if playbook.model_driven and playbook.guards.cold_start == "hold" and (risk is None or risk.cold):
            self._hold(playbook, "cold-start", matches)
            return
        if not self.connected and playbook.guards.disconnected == "hold":
            self._hold(playbook, "disconnected", matches)
            return
        reason = hold_reason(playbook, state, now)
        if reason is not None:
            if reason == "breaker-open" or self._held.get(name) != reason:
                self._hold(playbook, reason, matches)
            return
        if len(self._running) >= self.settings.max_concurrent:
            self._hold(playbook, "concurrency", matches)
            return
        if self._task_group is None:
            return
        self._held.pop(name, None)
        match = worst(matches)
        if mode == "approval":
            self._request_approval(playbook, match, now)
            return
        self._start(Run(playbook, uuid.uuid4().hex[:12], match, mode == "dry-run", "auto"))

    def _start(self, run: Run) -> None:
        state = self.store.get(run.playbook.name)
        if run.resume is None:
            record_start(state, time.time())
            self.store.save()
        self._running[run.playbook.name] = run
        self._spawn_task(self._runner.run(run), f"playbook:{run.playbook.name}:{run.run_id}")

    # ------------------------------------------------------------------ manual, approvals

    def _request_approval(self, playbook: Playbook, match: Match, now: float) -> None:
        """Ask humans once per approval_ttl_s; trigger_manual (an approval) runs it."""
        approval = self._approvals.get(playbook.name)
        if approval is not None and now - approval.requested_wall > self.settings.approval_ttl_s:
            del self._approvals[playbook.name]
            approval = None
        if approval is not None:
            return
        self._approvals[playbook.name] = _Approval(playbook.name, now, match)
        self._recorder.record(
            {
                "type": "approval.requested",
                "playbook": playbook.name,
                "bindings": dict(match.bindings),
                "inputs": dict(match.inputs),
                **self._latest.model(),
            }
        )
        self._recorder.emit(
            {
                "kind": "playbook.approval_requested",
                "severity": "warning",
                "playbook": playbook.name,
                "message": f"{playbook.name}: approval needed to run ({playbook.description})",
                "labels": dict(match.bindings),
            }
        )

    async def trigger_manual(self, name: str, approved_by: str) -> str:
        """Run a playbook now (operator command or approval). Bypasses the trigger, cooldown and
        max-runs; resets an open breaker; respects mode off, one-run-at-a-time and concurrency."""
        playbook = self._playbooks.get(name)
        if playbook is None:
            raise HealdError(f"no playbook named '{name}'")
        mode = self.effective_mode(playbook)
        if mode == "off":
            raise HealdError(f"playbook '{name}' is off")
        if name in self._running:
            raise HealdError(f"playbook '{name}' is already running (run {self._running[name].run_id})")
        if len(self._running) >= self.settings.max_concurrent:
            raise HealdError(
                f"{len(self._running)} playbooks running (playbooks.max_concurrent); try again later"
            )
        if self._task_group is None:
            raise HealdError("the engine is not running")
        approval = self._approvals.pop(name, None)
        latest = self._latest.matches.get(name) or []
        match = approval.match if approval is not None else (worst(latest) if latest else Match({}, {}))
        state = self.store.get(name)
        if state.breaker_open_since is not None:
            state.breaker_open_since = None
            state.consecutive_failures = 0
            self._recorder.record({"type": "breaker.reset", "playbook": name, "by": approved_by})
        run = Run(
            playbook,
            uuid.uuid4().hex[:12],
            match,
            mode == "dry-run",
            "approved" if approval else "manual",
            approved_by=approved_by,
        )
        self._start(run)
        return run.run_id

    def pending_approvals(self) -> list[dict[str, Any]]:
        now = time.time()
        return [
            {
                "playbook": approval.playbook,
                "since": approval.requested_wall,
                "bindings": dict(approval.match.bindings),
                "inputs": dict(approval.match.inputs),
                "description": self._playbooks[approval.playbook].description,
            }
            for approval in self._approvals.values()
            if now - approval.requested_wall <= self.settings.approval_ttl_s
            and approval.playbook in self._playbooks
        ]

    def status(self) -> list[dict[str, Any]]:
        out = []
        for name, playbook in sorted(self._playbooks.items()):
            state = self.store.get(name)
            out.append(
                {
                    "playbook": name,
                    "mode": self.effective_mode(playbook),
                    "holds": bool(self._latest.matches.get(name)),
                    "running": self._running[name].run_id if name in self._running else None,
                    "held": self._held.get(name),
                    "breaker_open": state.breaker_open_since is not None,
                    "consecutive_failures": state.consecutive_failures,
                    "total_runs": state.total_runs,
                    "last_outcome": state.last_outcome,
                }
            )
        return out

    # ------------------------------------------------------------------ recovery, supervisor

    def _recover(self) -> None:
        """Resume every run the journal holds unfinished (a crash or a restart mid-run); runs of a
        playbook that is gone or off are ended as abandoned."""
        for unfinished in self.journal.unfinished():
            playbook = self._playbooks.get(unfinished.playbook)
            if (
                playbook is None
                or self.effective_mode(playbook) == "off"
                or unfinished.playbook in self._running
            ):
                run_journal = self.journal.reopen(unfinished)
                if unfinished.interrupted is not None:
                    run_journal.result(
                        unfinished.interrupted,
                        "interrupted",
                        ActionResult(ok=False, detail="interrupted").as_dict(),
                    )
                self._recorder.record(
                    {
                        "type": "run.abandoned",
                        "playbook": unfinished.playbook,
                        "run_id": unfinished.run_id,
                        "reason": "playbook no longer loaded or off",
                    }
                )
                run_journal.end("abandoned")
                continue
            header = unfinished.header
            match = Match(dict(header.get("bindings") or {}), dict(header.get("inputs") or {}))
            self._start(
                Run(
                    playbook,
                    unfinished.run_id,
                    match,
                    bool(header.get("dry_run")),
                    "recovered",
                    resume=unfinished,
                    watermark=time.time(),
                )
            )

    def _child_exited(self, name: str, pid: int, returncode: int | None) -> None:
        """Fast path: a supervised process died; evaluate now rather than at the next sample."""
        now = time.time()
        event = Event(
            kind="proc.exited",
            source="supervisor",
            wall=now,
            labels={"name": name, "pid": str(pid)},
            value=None if returncode is None else float(returncode),
            message=f"{name} (pid {pid}) exited with {returncode}",
        )
        self._latest.events.add([event], now)
        if self._latest.sample is not None or self._playbooks:
            self._evaluate_all(now, time.monotonic())
