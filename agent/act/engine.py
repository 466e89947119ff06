"""The playbook engine: triggers -> guards -> journaled, audited, verified escalation ladders.

The daemon builds one :class:`Engine`, runs ``await engine.run()`` inside its root TaskGroup
(the engine owns a TaskGroup of its own, where every playbook run and supervisor waiter is a
named task), and calls ``await engine.evaluate(sample, risk)`` once a sample. ``evaluate``
is synchronous work only: it feeds events to the event log, evaluates every trigger, applies
the guards and schedules runs; it never waits for an action.

A run walks the playbook's steps in order. Before each step an ``intent`` is fsync'd to the
journal, after it the ``result``. A successful step is verified: after ``verify.settle`` the
engine waits for a fresh sample and checks that the trigger no longer holds for the run's
bindings (or that ``verify.expect`` holds). Verified: the run succeeded. Not verified, or the
step failed: the next step. Past the last step: an escalation event for humans, and the
failure counts towards backoff and the circuit breaker.

Callbacks (both take a JSON-safe dict; both must be quick and not raise):
``on_action(record)`` gets every audit record (the daemon publishes them as MQTT action
messages); ``on_event(event)`` gets events for humans (escalations, breaker trips, approval
requests, notify actions).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from agent.act import actions as _actions  # registers the implementations
from agent.act.audit import AuditLog
from agent.act.base import REGISTRY, ActionContext, ActionResult
from agent.act.journal import Journal, RunJournal, Unfinished
from agent.act.supervisor import Supervisor
from agent.collect.sample import Event, Sample
from agent.decide.guards import PlaybookState, StateStore, hold_reason, record_end, record_start
from agent.decide.model import PLACEHOLDER, Playbook, Step
from agent.decide.settings import PlaybookSettings
from agent.decide.triggers import (
    EvalContext,
    EventLog,
    Match,
    SampleIndex,
    TriggerEvaluator,
    holds_for,
    worst,
)
from agent.errors import HealdError
from agent.score.types import Risk

Callback = Callable[[dict[str, Any]], None]
# Actions that disrupt workloads: in enforce mode, a connected agent asks the coordinator for a
# fleet lease before each (the blast-radius budget); see LeaseGate.
DISRUPTIVE_ACTIONS = frozenset({
    "restart_unit", "signal_process", "stop_process", "drop_caches", "cgroup_limit", "gpu_reset",
    "gpu_drain", "cordon", "run_command",
})


class LeaseHeld(HealdError):
    """The fleet budget (or the local policy without one) holds this run; not a failure."""


class LeaseGate(Protocol):
    async def acquire(self, pb: Playbook, run_id: str, action: str) -> Callable[[], None]:
        """Wait for a lease; return its release callback, or raise LeaseHeld."""
        ...
FRESH_SAMPLE_TIMEOUT_S = 10.0
_actions.check_registry()


def substitute(value: Any, values: Mapping[str, str], *, argv: bool = False) -> Any:
    """Fill ``{name}`` placeholders. In argv lists only whole elements are replaced (one element
    stays one element: nothing is split or interpreted); elsewhere inside strings too."""
    if isinstance(value, str):
        if argv:
            m = PLACEHOLDER.fullmatch(value)
            if m is None:
                return value
            if m.group(1) not in values:
                raise HealdError(f"'{value}' is not bound for this run")
            return values[m.group(1)]

        def repl(m: Any) -> str:
            if m.group(1) not in values:
                raise HealdError(f"'{{{m.group(1)}}}' is not bound for this run")
            return values[m.group(1)]

        return PLACEHOLDER.sub(repl, value)
    if isinstance(value, Mapping):
        return {k: substitute(v, values, argv=argv or k == "argv") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [substitute(v, values, argv=argv) for v in value]
    return value


@dataclass
class _Run:
    playbook: Playbook
    run_id: str
    match: Match
    dry_run: bool
    trigger: str  # auto | manual | approved | recovered
    approved_by: str = ""
    resume: Unfinished | None = None
    watermark: float = 0.0


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
        self._on_action = on_action or (lambda _r: None)
        self._on_event = on_event or (lambda _e: None)
        self.log = structlog.get_logger("heald.act").bind(node=node)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(self.state_dir)
        self.journal = Journal(self.state_dir / "journal")
        self.audit = AuditLog(self.state_dir / "audit.jsonl")
        self.events = EventLog()
        self.supervisor = Supervisor(self._spawn_task, self._child_exited)
        self.connected = True
        self._playbooks: dict[str, Playbook] = {}
        self._evaluators: dict[str, TriggerEvaluator] = {}
        self._latest: dict[str, list[Match]] = {}
        self._running: dict[str, _Run] = {}
        self._approvals: dict[str, _Approval] = {}
        self._held: dict[str, str] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._index = SampleIndex(None)
        self._risk: Risk | None = None
        self._sample: Sample | None = None
        self._eval_seq = 0
        self._tick: asyncio.Event | None = None
        self.lease_gate: LeaseGate | None = None
        self.reload(playbooks)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Own the TaskGroup of runs until cancelled; resumes unfinished runs from the journal."""
        self._tick = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            try:
                self._recover()
                await asyncio.Future()  # until cancelled
            finally:
                self._tg = None

    def _spawn_task(self, coro: Any, name: str) -> object:
        if self._tg is None:
            coro.close()
            raise HealdError("the engine is not running (call engine.run() first)")
        return self._tg.create_task(coro, name=name)

    def reload(self, playbooks: Iterable[Playbook]) -> None:
        """Swap the playbook set (SIGHUP). Counters, breakers and cooldowns are kept by name;
        trigger timers are kept for playbooks whose trigger did not change; running runs finish
        with the definition they started with."""
        new = {pb.name: pb for pb in playbooks}
        evaluators: dict[str, TriggerEvaluator] = {}
        for name, pb in new.items():
            old = self._playbooks.get(name)
            if (
                old is not None
                and old.raw.get("trigger") == pb.raw.get("trigger")
                and name in self._evaluators
            ):
                evaluators[name] = self._evaluators[name]
            else:
                evaluators[name] = TriggerEvaluator(pb.trigger)
        self._playbooks, self._evaluators = new, evaluators
        for name in list(self._approvals):
            if name not in new:
                del self._approvals[name]
        self.log.info("playbooks loaded", count=len(new), names=sorted(new))

    @property
    def playbooks(self) -> dict[str, Playbook]:
        return dict(self._playbooks)

    def effective_mode(self, pb: Playbook) -> str:
        if pb.mode == "off" or self.settings.force_mode == "off":
            return "off"
        if self.settings.force_mode == "dry-run":
            return "dry-run"
        return pb.mode

    def set_connected(self, connected: bool) -> None:
        """The daemon reports whether the coordinator is reachable (guards.disconnected)."""
        self.connected = connected

    # ------------------------------------------------------------------ evaluation

    async def evaluate(self, sample: Sample, risk: Risk | None) -> None:
        """Called once per sample: cheap, synchronous work; schedules runs, never awaits them."""
        self._sample, self._risk = sample, risk
        self.events.add(sample.events, sample.wall)
        self._index = SampleIndex(sample)
        self._evaluate_all(sample.wall, sample.mono)
        # verification waits for a new sample (not for a fast-path re-evaluation of an old one)
        self._eval_seq += 1
        if self._tick is not None:
            self._tick.set()
            self._tick = asyncio.Event()

    def _evaluate_all(self, wall: float, mono: float) -> None:
        for name, pb in self._playbooks.items():
            st = self.store.get(name)
            run = self._running.get(name)
            ctx = EvalContext(
                self._index,
                self._risk,
                self.events,
                wall,
                mono,
                watermark=max(st.events_watermark, run.watermark if run else 0.0),
            )
            try:
                matches = self._evaluators[name].evaluate(ctx)
            except Exception:  # a bug in one trigger must not stop the others
                self.log.exception("trigger evaluation failed", playbook=name)
                matches = []
            self._latest[name] = matches
            self._consider(pb, st, matches, wall)

    def _hold(self, pb: Playbook, reason: str, matches: list[Match]) -> None:
        if self._held.get(pb.name) == reason:
            return
        self._held[pb.name] = reason
        m = worst(matches)
        self._record(
            {
                "type": "held",
                "playbook": pb.name,
                "reason": reason,
                "bindings": dict(m.bindings),
                "inputs": dict(m.inputs),
                **self._model(),
            }
        )

    def _consider(self, pb: Playbook, st: PlaybookState, matches: list[Match], now: float) -> None:
        mode = self.effective_mode(pb)
        if not matches or mode == "off":
            self._held.pop(pb.name, None)
            if pb.name in self._approvals and not matches:
                del self._approvals[pb.name]
            return
        if pb.name in self._running:
            return
        if pb.model_driven and pb.guards.cold_start == "hold" and (self._risk is None or self._risk.cold):
            self._hold(pb, "cold-start", matches)
            return
        if not self.connected and pb.guards.disconnected == "hold":
            self._hold(pb, "disconnected", matches)
            return
        reason = hold_reason(pb, st, now)
        if reason is not None:
            if reason == "breaker-open" or self._held.get(pb.name) != reason:
                self._hold(pb, reason, matches)
            return
        if len(self._running) >= self.settings.max_concurrent:
            self._hold(pb, "concurrency", matches)
            return
        if self._tg is None:
            return
        self._held.pop(pb.name, None)
        match = worst(matches)
        if mode == "approval":
            ap = self._approvals.get(pb.name)
            if ap is not None and now - ap.requested_wall > self.settings.approval_ttl_s:
                del self._approvals[pb.name]
                ap = None
            if ap is None:
                self._approvals[pb.name] = _Approval(pb.name, now, match)
                self._record(
                    {
                        "type": "approval.requested",
                        "playbook": pb.name,
                        "bindings": dict(match.bindings),
                        "inputs": dict(match.inputs),
                        **self._model(),
                    }
                )
                self._emit(
                    {
                        "kind": "playbook.approval_requested",
                        "severity": "warning",
                        "playbook": pb.name,
                        "message": f"{pb.name}: approval needed to run ({pb.description})",
                        "labels": dict(match.bindings),
                    }
                )
            return
        self._start(_Run(pb, uuid.uuid4().hex[:12], match, mode == "dry-run", "auto"))

    def _model(self) -> dict[str, Any]:
        r = self._risk
        if r is None:
            return {"model_version": None, "anomaly": None, "cold": None}
        return {"model_version": r.model_version, "anomaly": r.anomaly, "cold": r.cold}

    def _start(self, run: _Run) -> None:
        st = self.store.get(run.playbook.name)
        if run.resume is None:
            record_start(st, time.time())
            self.store.save()
        self._running[run.playbook.name] = run
        self._spawn_task(self._run(run), f"playbook:{run.playbook.name}:{run.run_id}")

    # ------------------------------------------------------------------ manual, approvals

    async def trigger_manual(self, name: str, approved_by: str) -> str:
        """Run a playbook now (operator command or approval). Bypasses the trigger, cooldown and
        max-runs; resets an open breaker; respects mode off, one-run-at-a-time and concurrency."""
        pb = self._playbooks.get(name)
        if pb is None:
            raise HealdError(f"no playbook named '{name}'")
        mode = self.effective_mode(pb)
        if mode == "off":
            raise HealdError(f"playbook '{name}' is off")
        if name in self._running:
            raise HealdError(f"playbook '{name}' is already running (run {self._running[name].run_id})")
        if len(self._running) >= self.settings.max_concurrent:
            raise HealdError(
                f"{len(self._running)} playbooks running (playbooks.max_concurrent); try again later"
            )
        if self._tg is None:
            raise HealdError("the engine is not running")
        ap = self._approvals.pop(name, None)
        latest = self._latest.get(name) or []
        match = ap.match if ap is not None else (worst(latest) if latest else Match({}, {}))
        st = self.store.get(name)
        if st.breaker_open_since is not None:
            st.breaker_open_since = None
            st.consecutive_failures = 0
            self._record({"type": "breaker.reset", "playbook": name, "by": approved_by})
        run = _Run(
            pb,
            uuid.uuid4().hex[:12],
            match,
            mode == "dry-run",
            "approved" if ap else "manual",
            approved_by=approved_by,
        )
        self._start(run)
        return run.run_id

    def pending_approvals(self) -> list[dict[str, Any]]:
        now = time.time()
        return [
            {
                "playbook": a.playbook,
                "since": a.requested_wall,
                "bindings": dict(a.match.bindings),
                "inputs": dict(a.match.inputs),
                "description": self._playbooks[a.playbook].description,
            }
            for a in self._approvals.values()
            if now - a.requested_wall <= self.settings.approval_ttl_s and a.playbook in self._playbooks
        ]

    def status(self) -> list[dict[str, Any]]:
        out = []
        for name, pb in sorted(self._playbooks.items()):
            st = self.store.get(name)
            out.append(
                {
                    "playbook": name,
                    "mode": self.effective_mode(pb),
                    "holds": bool(self._latest.get(name)),
                    "running": self._running[name].run_id if name in self._running else None,
                    "held": self._held.get(name),
                    "breaker_open": st.breaker_open_since is not None,
                    "consecutive_failures": st.consecutive_failures,
                    "total_runs": st.total_runs,
                    "last_outcome": st.last_outcome,
                }
            )
        return out

    # ------------------------------------------------------------------ runs

    async def _run(self, run: _Run) -> None:
        pb = run.playbook
        log = self.log.bind(playbook=pb.name, run_id=run.run_id)
        values = {"node": self.node, "playbook": pb.name, "run_id": run.run_id, **run.match.bindings}
        outcome = "failed"
        rj: RunJournal | None = None
        try:
            start = 0
            last_unverified: int | None = None
            if run.resume is not None:
                rj = self.journal.reopen(run.resume)
                start, last_unverified = self._resume_point(run, rj, log)
            else:
                header = {
                    "playbook": pb.name,
                    "bindings": dict(run.match.bindings),
                    "inputs": dict(run.match.inputs),
                    "dry_run": run.dry_run,
                    "trigger": run.trigger,
                    "approved_by": run.approved_by,
                }
                rj = self.journal.open_run(run.run_id, header)
                self._record(
                    {
                        "type": "run.start",
                        "playbook": pb.name,
                        "run_id": run.run_id,
                        "trigger": run.trigger,
                        "approved_by": run.approved_by,
                        "dry_run": run.dry_run,
                        "bindings": dict(run.match.bindings),
                        "inputs": dict(run.match.inputs),
                        **self._model(),
                    }
                )
                log.info(
                    "playbook run started",
                    trigger=run.trigger,
                    dry_run=run.dry_run,
                    bindings=dict(run.match.bindings),
                    inputs=dict(run.match.inputs),
                )
            verified = False
            if last_unverified is not None:
                verified = await self._verify_step(run, rj, last_unverified, log)
                last_unverified = None
            idx = start
            while not verified and idx < len(pb.steps):
                step = pb.steps[idx]
                idx += 1
                if run.dry_run:
                    res = await self._execute(run, step, values, dry_run=True)
                    self._step_record(run, step, res, "dry-run")
                    continue
                rj.intent(step.index, step.action)
                res = await self._execute(run, step, values, dry_run=False)
                status = "done" if res.ok else "failed"
                rj.result(step.index, status, res.as_dict())
                run.watermark = time.time()
                self._step_record(run, step, res, status)
                log.info(
                    "step finished",
                    step=step.name,
                    action=step.action,
                    ok=res.ok,
                    changed=res.changed,
                    detail=res.detail,
                    duration_s=round(res.duration_s, 3),
                )
                if not res.ok:
                    last_unverified = None
                    continue
                if step.verify or idx == len(pb.steps):
                    verified = await self._verify_step(run, rj, step.index, log)
            if run.dry_run:
                outcome = "dry-run"
            elif verified:
                outcome = "succeeded"
            else:
                outcome = "escalated"
                self._escalate(run, values, log)
        except LeaseHeld as exc:
            outcome = "held"
            self._record({"type": "run.held", "playbook": pb.name, "run_id": run.run_id, "reason": str(exc)})
            log.warning("playbook run held by the fleet budget", reason=str(exc))
        except asyncio.CancelledError:
            # Shutdown: the journal keeps the run unfinished; the next start resumes it.
            if rj is not None:
                rj.close()
            self._running.pop(pb.name, None)
            raise
        except Exception as exc:  # a bug must not take the engine down; the run counts as failed
            log.exception("playbook run crashed")
            outcome = "error"
            self._record({"type": "run.error", "playbook": pb.name, "run_id": run.run_id, "error": repr(exc)})
        self._finish(run, outcome, rj, log)

    def _finish(self, run: _Run, outcome: str, rj: RunJournal | None, log: Any) -> None:
        pb = run.playbook
        st = self.store.get(pb.name)
        now = time.time()
        opened = record_end(pb, st, now, outcome, counts=not run.dry_run and outcome != "held")
        self.store.save()
        self._record(
            {
                "type": "run.end",
                "playbook": pb.name,
                "run_id": run.run_id,
                "outcome": outcome,
                "dry_run": run.dry_run,
                "consecutive_failures": st.consecutive_failures,
                "duration_s": round(now - (st.last_start or now), 3) if run.resume is None else None,
            }
        )
        log.info("playbook run finished", outcome=outcome, consecutive_failures=st.consecutive_failures)
        if opened:
            self._record(
                {
                    "type": "breaker.open",
                    "playbook": pb.name,
                    "run_id": run.run_id,
                    "consecutive_failures": st.consecutive_failures,
                }
            )
            self._emit(
                {
                    "kind": "playbook.suspended",
                    "severity": "critical",
                    "playbook": pb.name,
                    "message": f"{pb.name} suspended after {st.consecutive_failures} consecutive failed runs "
                    "(circuit breaker); `heald` operator action needed",
                    "labels": {},
                }
            )
            log.error(
                "circuit breaker open: playbook suspended", consecutive_failures=st.consecutive_failures
            )
        if rj is not None:
            rj.end(outcome)
        self._running.pop(pb.name, None)

    def _resume_point(self, run: _Run, rj: RunJournal, log: Any) -> tuple[int, int | None]:
        u = run.resume
        if u is None:
            return 0, None
        self._record(
            {
                "type": "run.recovered",
                "playbook": run.playbook.name,
                "run_id": run.run_id,
                "completed_steps": sorted(u.done),
                "interrupted_step": u.interrupted,
            }
        )
        log.warning(
            "resuming unfinished run from the journal", completed=sorted(u.done), interrupted=u.interrupted
        )
        if u.interrupted is not None:
            res = ActionResult(ok=False, detail="interrupted by a crash or restart; not re-run")
            rj.result(u.interrupted, "interrupted", res.as_dict())
            step = run.playbook.steps[u.interrupted] if u.interrupted < len(run.playbook.steps) else None
            if step is not None:
                self._step_record(run, step, res, "interrupted")
        last = u.last_step
        if last >= 0 and last not in u.verified:
            return last + 1, last  # verify what the last step (finished or interrupted) achieved
        return last + 1, None

    async def _execute(
        self, run: _Run, step: Step, values: Mapping[str, str], *, dry_run: bool
    ) -> ActionResult:
        ctx = ActionContext(
            settings=self.settings,
            node=self.node,
            playbook=run.playbook.name,
            run_id=run.run_id,
            dry_run=dry_run,
            supervisor=self.supervisor,
            emit=self._emit,
            bindings=dict(run.match.bindings),
            detail=self._sample.detail if self._sample is not None else {},
            log=self.log.bind(playbook=run.playbook.name, run_id=run.run_id, step=step.name),
        )
        release: Callable[[], None] | None = None
        if not dry_run and self.lease_gate is not None and step.action in DISRUPTIVE_ACTIONS:
            release = await self.lease_gate.acquire(run.playbook, run.run_id, step.action)  # or LeaseHeld
        t0 = time.monotonic()
        try:
            params = substitute(step.params, values)
            async with asyncio.timeout(step.timeout_s):
                res = await REGISTRY[step.action](params, ctx)
        except TimeoutError:
            res = ActionResult(ok=False, detail=f"timed out after {step.timeout_s:g}s (cancelled)")
        except HealdError as exc:
            res = ActionResult(ok=False, detail=str(exc))
        except Exception as exc:
            ctx.log.exception("action raised")
            res = ActionResult(ok=False, detail=f"{type(exc).__name__}: {exc}")
        finally:
            if release is not None:
                release()
        res.duration_s = time.monotonic() - t0
        return res

    async def _fresh_evaluation(self, after_seq: int) -> bool:
        deadline = time.monotonic() + FRESH_SAMPLE_TIMEOUT_S
        while self._eval_seq <= after_seq:
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

    async def _verify_step(self, run: _Run, rj: RunJournal, step_index: int, log: Any) -> bool:
        pb = run.playbook
        await asyncio.sleep(pb.verify.settle_s)
        seq = self._eval_seq
        fresh = await self._fresh_evaluation(seq)
        if not fresh:
            ok, why = False, "no fresh sample to verify with"
        elif pb.verify.expect is not None:
            ctx = EvalContext(
                self._index,
                self._risk,
                self.events,
                time.time(),
                time.monotonic(),
                watermark=run.watermark,
                stateless=True,
                bindings=dict(run.match.bindings),
            )
            ok = bool(TriggerEvaluator(pb.verify.expect).evaluate(ctx))
            why = "verify.expect holds" if ok else "verify.expect does not hold"
        else:
            still = holds_for(self._latest.get(pb.name, []), run.match.bindings)
            ok = not still
            why = "trigger no longer holds" if ok else "trigger still holds"
        rj.verify(step_index, ok)
        self._record(
            {
                "type": "verify",
                "playbook": pb.name,
                "run_id": run.run_id,
                "step": step_index,
                "ok": ok,
                "reason": why,
                "inputs": self._current_inputs(pb.name),
            }
        )
        log.info("verification", step=step_index, ok=ok, reason=why)
        return ok

    def _current_inputs(self, name: str) -> dict[str, Any]:
        latest = self._latest.get(name) or []
        return dict(worst(latest).inputs) if latest else {}

    def _step_record(self, run: _Run, step: Step, res: ActionResult, status: str) -> None:
        self._record(
            {
                "type": "step",
                "playbook": run.playbook.name,
                "run_id": run.run_id,
                "step": step.index,
                "step_name": step.name,
                "action": step.action,
                "status": status,
                "dry_run": run.dry_run,
                "ok": res.ok,
                "changed": res.changed,
                "detail": res.detail,
                "duration_s": round(res.duration_s, 4),
                "data": res.data,
            }
        )

    def _escalate(self, run: _Run, values: Mapping[str, str], log: Any) -> None:
        pb = run.playbook
        try:
            message = substitute(pb.escalate.message, values) if pb.escalate.message else ""
        except HealdError:
            message = pb.escalate.message
        message = message or f"{pb.name}: every step ran and the problem persists ({pb.description})"
        event = {
            "kind": pb.escalate.event,
            "severity": pb.escalate.severity,
            "playbook": pb.name,
            "run_id": run.run_id,
            "message": message,
            "labels": dict(run.match.bindings),
            "inputs": self._current_inputs(pb.name),
        }
        self._record({"type": "escalate", **event})
        self._emit(event)
        log.error("escalated to humans", message=message)

    # ------------------------------------------------------------------ recovery, supervisor

    def _recover(self) -> None:
        for u in self.journal.unfinished():
            pb = self._playbooks.get(u.playbook)
            if pb is None or self.effective_mode(pb) == "off" or u.playbook in self._running:
                rj = self.journal.reopen(u)
                if u.interrupted is not None:
                    rj.result(
                        u.interrupted, "interrupted", ActionResult(ok=False, detail="interrupted").as_dict()
                    )
                self._record(
                    {
                        "type": "run.abandoned",
                        "playbook": u.playbook,
                        "run_id": u.run_id,
                        "reason": "playbook no longer loaded or off",
                    }
                )
                rj.end("abandoned")
                continue
            h = u.header
            match = Match(dict(h.get("bindings") or {}), dict(h.get("inputs") or {}))
            self._start(
                _Run(
                    pb, u.run_id, match, bool(h.get("dry_run")), "recovered", resume=u, watermark=time.time()
                )
            )

    def _child_exited(self, name: str, pid: int, returncode: int | None) -> None:
        """Fast path: a supervised process died; evaluate now rather than at the next sample."""
        now = time.time()
        ev = Event(
            kind="proc.exited",
            source="supervisor",
            wall=now,
            labels={"name": name, "pid": str(pid)},
            value=None if returncode is None else float(returncode),
            message=f"{name} (pid {pid}) exited with {returncode}",
        )
        self.events.add([ev], now)
        if self._sample is not None or self._playbooks:
            self._evaluate_all(now, time.monotonic())

    # ------------------------------------------------------------------ records

    def _record(self, record: dict[str, Any]) -> None:
        record = {"node": self.node, **record}
        try:
            entry = self.audit.append(record)
        except OSError:
            self.log.exception("audit append failed", record=record)
            entry = {"record": record, "hash": None, "seq": None}
        try:
            self._on_action({**record, "audit_seq": entry["seq"], "audit_hash": entry["hash"]})
        except Exception:
            self.log.exception("on_action callback failed")

    def _emit(self, event: dict[str, Any]) -> None:
        try:
            self._on_event({"node": self.node, "wall": time.time(), **event})
        except Exception:
            self.log.exception("on_event callback failed")
