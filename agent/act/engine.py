"""The playbook engine: carries out the decisions of :class:`agent.decide.decider.Decider`.

The daemon builds one :class:`Engine`, runs ``await engine.run()`` inside its root TaskGroup
(the engine owns a TaskGroup of its own, where every playbook run and supervisor waiter is a
named task), and calls ``await engine.evaluate(sample, risk)`` once a sample. ``evaluate`` is
synchronous work only: the decider evaluates the triggers and guards per target and returns
typed decisions (start a run, hold, ask for approval); the engine records them and starts the
runs, and never waits for an action. A run itself (the ladder, the journal, verification,
escalation) is :class:`agent.act.runner.Runner`'s. Runs are keyed by target: one run at a time
per target, any number of targets at once within the playbook's and the node's limits.

A coordinator's silence holds automatic runs only (:meth:`set_auto_hold`): triggers are still
evaluated every sample, so manual and approved runs verify against fresh samples as usual.

Callbacks (both take a JSON-safe dict; both must be quick and not raise):
``on_action(record)`` gets every audit record (:mod:`agent.act.records`; the daemon publishes
them as MQTT action messages); ``on_event(event)`` gets events for humans (escalations, breaker
trips, approval requests, notify actions).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any

import structlog
from structlog.typing import FilteringBoundLogger

from agent.act import records
from agent.act.audit import AuditLog
from agent.act.base import ActionResult
from agent.act.journal import Journal
from agent.act.lease import LeaseGate, LeaseHeld
from agent.act.preview import acts_on
from agent.act.records import Callback, Recorder
from agent.act.runner import Run, Runner
from agent.act.supervisor import Supervisor
from agent.collect.sample import Event, Sample
from agent.decide.decider import Decider, Decision, Hold, RequestApproval, StartRun
from agent.decide.guards import StateStore
from agent.decide.latest import Latest
from agent.decide.model import Playbook
from agent.decide.settings import PlaybookSettings, SecuritySettings
from agent.decide.targets import Target
from agent.decide.triggers import Match
from agent.errors import HealdError
from agent.score.types import Risk

# LeaseGate and LeaseHeld are the engine's interface to the fleet leases (agent/act/lease.py,
# implemented by agent.control.leases); importable from here too.
__all__ = ["Callback", "Engine", "LeaseGate", "LeaseHeld"]


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
        self.decider = Decider(settings, self.store, self._latest, node)
        self.supervisor = Supervisor(self._spawn_task, self._child_exited)
        self.connected = True
        self.auto_hold = False
        self._running: dict[str, Run] = {}  # by target key
        self._runner = Runner(self, self._recorder, self._latest, self._running)
        self._task_group: asyncio.TaskGroup | None = None
        self.lease_gate: LeaseGate | None = None
        # [security] and the broker's host: set by the daemon (and on reload), read by each step
        self.security = SecuritySettings()
        self.protected_hosts: tuple[str, ...] = ()
        self.reload(playbooks)

    @property
    def settings(self) -> PlaybookSettings:
        return self.decider.settings

    @settings.setter
    def settings(self, value: PlaybookSettings) -> None:
        self.decider.settings = value

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
        """Swap the playbook set (SIGHUP). Guard state is kept by target; trigger timers are kept
        for playbooks whose trigger did not change; running runs finish with the definition they
        started with."""
        self.decider.reload(playbooks)
        names = sorted(self.decider.playbooks)
        self.log.info("playbooks loaded", count=len(names), names=names)

    @property
    def playbooks(self) -> dict[str, Playbook]:
        return self.decider.playbooks

    def effective_mode(self, playbook: Playbook) -> str:
        return self.decider.effective_mode(playbook)

    def set_connected(self, connected: bool) -> None:
        """The daemon reports whether the coordinator is reachable (guards.disconnected)."""
        self.connected = connected

    def set_auto_hold(self, held: bool) -> None:
        """A coordinator's silence: automatic runs are held, triggers still evaluated."""
        self.auto_hold = held

    # ------------------------------------------------------------------ evaluation

    async def evaluate(self, sample: Sample, risk: Risk | None) -> None:
        """Called once per sample: cheap, synchronous work; schedules runs, never awaits them."""
        self._latest.take(sample, risk)
        self._recorder.retry()  # audit records held while the state dir was full, if any
        self._evaluate_all(sample.wall, sample.mono)
        # verification waits for a new sample (not for a fast-path re-evaluation of an old one)
        self._latest.evaluated()

    def _evaluate_all(self, wall: float, mono: float) -> None:
        self.decider.evaluate(wall, mono, self._running)
        decisions = self.decider.decide(wall, self._running, connected=self.connected,
                                        hold_auto=self.auto_hold, can_start=self._task_group is not None)
        for decision in decisions:
            self._carry_out(decision)

    def _carry_out(self, decision: Decision) -> None:
        model = self._latest.model()
        if isinstance(decision, Hold):
            self._recorder.record(records.Held(
                playbook=decision.playbook.name, target=decision.target.key, reason=decision.reason,
                bindings=decision.target.labels, inputs=dict(decision.match.inputs), **model))
        elif isinstance(decision, RequestApproval):
            self._request_approval(decision)
        else:
            self._start(decision)

    def _start(self, decision: StartRun, *, run_id: str = "") -> str:
        run = Run(decision.playbook, run_id or uuid.uuid4().hex[:12], decision.match, decision.dry_run,
                  decision.trigger, target=decision.target, approved_by=decision.approved_by)
        self._running[run.target.key] = run
        self._spawn_task(self._runner.run(run), f"playbook:{run.target.key}:{run.run_id}")
        return run.run_id

    # ------------------------------------------------------------------ manual, approvals

    def _request_approval(self, request: RequestApproval) -> None:
        playbook, match = request.playbook, request.match
        self._recorder.record(records.ApprovalRequested(
            playbook=playbook.name, target=request.target.key, request_id=request.request_id,
            bindings=request.target.labels, inputs=dict(match.inputs), **self._latest.model()))
        key = request.target.key
        # what the steps would act on (the process, unit, paths...), from the latest sample
        would = acts_on(playbook, request.target.labels, self._latest.detail)
        self._recorder.emit({
            "kind": "playbook.approval_requested",
            "severity": "warning",
            "playbook": playbook.name,
            "message": f"{playbook.name}: approval needed to run on {key} ({playbook.description})"
                       + (f"; would act on {would}" if would else ""),
            "labels": {**request.target.labels, "request_id": request.request_id, "target": key,
                       **({"acts_on": would} if would else {})},
        })

    async def trigger_manual(self, name: str, approved_by: str, *, request_id: str = "",
                             dry_run: bool = False) -> str:
        """Run a playbook now (operator command or approval): for the target of the approval
        ``request_id`` (or the oldest pending one), else the worst current match, else the
        playbook's unbound target. Bypasses the trigger, cooldown and runs per window; resets an
        open breaker of that target (unless ``dry_run``: then every step is only described);
        respects mode off, one run per target and concurrency."""
        if name not in self.decider.playbooks:
            raise HealdError(f"no playbook named '{name}'")
        if self._task_group is None:
            raise HealdError("the engine is not running")
        start, reset = self.decider.manual(name, approved_by, self._running, request_id=request_id,
                                           dry_run=dry_run)
        if reset:
            reset_record = records.BreakerReset(playbook=name, target=start.target.key, by=approved_by)
            self._recorder.record(reset_record)
        return self._start(start)

    def reset_breaker(self, name: str, by: str, *, target: str = "") -> list[str]:
        """Close the open breakers of a playbook's targets (only ``target`` when given), each a
        ``breaker.reset`` in the audit chain; the targets reset (none: nothing was open)."""
        if name not in self.decider.playbooks:
            raise HealdError(f"no playbook named '{name}'")
        reset = []
        for key, state in sorted(self.store.of_playbook(name).items()):
            if state.breaker_open_since is None or (target and key != target):
                continue
            state.breaker_open_since = None
            state.consecutive_failures = 0
            reset.append(key)
        if reset:
            self.store.save()
        for key in reset:
            self._recorder.record(records.BreakerReset(playbook=name, target=key, by=by))
            self.log.warning("breaker reset", playbook=name, target=key, by=by)
        return reset

    def record_control(self, record: records.Control) -> None:
        """An operator's command (remote or local) into the audit chain."""
        self._recorder.record(record)

    def model(self) -> dict[str, Any]:
        """The model's view at the last sample: version, anomaly, cold (None before the first)."""
        return self._latest.model()

    def deny(self, name: str, by: str, *, request_id: str = "") -> bool:
        """An operator refused the pending approval (``request_id``, or every pending one of the
        playbook): the request ends as denied, in the audit chain. False when none was pending."""
        denied = self.decider.deny(name, request_id)
        for approval in denied:
            self._recorder.record(records.ApprovalDenied(
                playbook=name, target=approval.target.key, request_id=approval.request_id, by=by,
                bindings=approval.target.labels))
            self.log.warning("approval denied", playbook=name, target=approval.target.key, by=by)
        return bool(denied)

    def pending_approvals(self) -> list[dict[str, Any]]:
        playbooks = self.decider.playbooks
        return [
            {
                "playbook": approval.playbook,
                "target": approval.target.key,
                "request_id": approval.request_id,
                "since": approval.requested_wall,
                "bindings": approval.target.labels,
                "inputs": dict(approval.match.inputs),
                "description": playbooks[approval.playbook].description,
            }
            for name in sorted(playbooks)
            for approval in self.decider.pending(name)
        ]

    def status(self) -> list[dict[str, Any]]:
        """One row per playbook, with one row per target it has state for (``targets``)."""
        out = []
        for name, playbook in sorted(self.decider.playbooks.items()):
            targets: list[dict[str, Any]] = []
            for key, state in sorted(self.store.of_playbook(name).items()):
                targets.append({
                    "target": key,
                    "bindings": dict(state.bindings),
                    "running": self._running[key].run_id if key in self._running else None,
                    "held": self.decider.held.get(key),
                    "breaker_open": state.breaker_open_since is not None,
                    "consecutive_failures": state.consecutive_failures,
                    "total_runs": state.total_runs,
                    "last_outcome": state.last_outcome,
                })
            running = [r.run_id for k, r in self._running.items() if r.playbook.name == name]
            out.append({
                "playbook": name,
                "mode": self.effective_mode(playbook),
                "holds": bool(self._latest.matches.get(name)),
                "running": running[0] if running else None,
                "held": next((t["held"] for t in targets if t["held"]), None),
                "breaker_open": any(t["breaker_open"] for t in targets),
                "consecutive_failures": max((t["consecutive_failures"] for t in targets), default=0),
                "total_runs": sum(t["total_runs"] for t in targets),
                "last_outcome": max(((s.last_end or 0.0, s.last_outcome) for s in
                                     self.store.of_playbook(name).values()), default=(0.0, ""))[1],
                "targets": targets,
            })
        return out

    # ------------------------------------------------------------------ recovery, supervisor

    def _recover(self) -> None:
        """Resume every run the journal holds unfinished (a crash or a restart mid-run); runs of a
        playbook that is gone or off are ended as abandoned."""
        playbooks = self.decider.playbooks
        for unfinished in self.journal.unfinished():
            header = unfinished.header
            bindings = {str(k): str(v) for k, v in dict(header.get("bindings") or {}).items()}
            key = str(header.get("target") or self.decider.target_of(unfinished.playbook, bindings).key)
            tgt = Target(unfinished.playbook, tuple(sorted(bindings.items())), key)
            playbook = playbooks.get(unfinished.playbook)
            if playbook is None or self.effective_mode(playbook) == "off" or key in self._running:
                run_journal = self.journal.reopen(unfinished)
                if unfinished.interrupted is not None:
                    run_journal.result(unfinished.interrupted, "interrupted",
                                       ActionResult(ok=False, detail="interrupted").as_dict())
                self._recorder.record(records.RunAbandoned(
                    playbook=unfinished.playbook, run_id=unfinished.run_id,
                    reason="playbook no longer loaded or off"))
                run_journal.end("abandoned")
                continue
            match = Match(bindings, dict(header.get("inputs") or {}))
            run = Run(playbook, unfinished.run_id, match, bool(header.get("dry_run")), "recovered",
                      target=tgt, resume=unfinished, watermark=time.time())
            self._running[key] = run
            self._spawn_task(self._runner.run(run), f"playbook:{key}:{run.run_id}")

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
        if self._latest.sample is not None or self.decider.playbooks:
            self._evaluate_all(now, time.monotonic())
