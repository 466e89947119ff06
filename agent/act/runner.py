"""One playbook run: the escalation ladder, journaled before and after every step, and verified.

A run walks the playbook's steps in order. Before each step an ``intent`` is fsync'd to the
journal, after it the ``result``. A successful step is verified: after ``verify.settle`` the
run waits for a fresh sample and checks that the problem is over for the run's target (or that
``verify.expect`` holds). The check reads the condition's current values with no timers (a
restart that restarted a ``for:`` timer must not turn into a success) and past its hysteresis
line (``clear_below``/``clear_above``): "no longer holds" means the value really came back.
Verified: the run succeeded. Not verified, or the step failed: the next step. Past the last
step: an escalation event for humans that says what each step did, and the failure counts
towards the target's backoff and circuit breaker.

With ``verify.within`` the check is repeated on each new sample until it passes on HOLD_CHECKS
samples in a row (verified) or the window (settle + within after the step ended) is over: a
forecast needs minutes of new samples to see that a fill stopped. A check whose forecast says the
failure comes before the window's end sends one ``playbook.verify_at_risk`` event (the humans hear
it now, not after the failure) and the window goes on: the verdict is what happened. A run
resumed in the window goes on with the same window, counted from the step's end in the journal,
not with a fresh one.

A run resumed from the journal after a crash never re-runs a step that has a result, and
never blindly re-runs the step that was interrupted: it verifies what that step achieved and
goes on with the ladder (see :mod:`agent.act.journal`). A run whose last step was verified had
succeeded (the crash only cut off its end): it ends as succeeded, with no further step.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from structlog.typing import FilteringBoundLogger

from agent.act import records
from agent.act.actions import REGISTRY, REPEATABLE, UNTIL_COMMIT
from agent.act.base import ActionContext, ActionResult
from agent.act.journal import Journal, RunJournal, Unfinished
from agent.act.lease import DISRUPTIVE_ACTIONS, LeaseGate, LeaseHeld
from agent.act.records import Recorder
from agent.act.supervisor import Supervisor
from agent.decide.decider import Decider
from agent.decide.guards import StateStore, record_end
from agent.decide.latest import Latest
from agent.decide.model import PLACEHOLDER, Playbook, Step
from agent.decide.settings import PlaybookSettings, SecuritySettings
from agent.decide.targets import Target
from agent.decide.triggers import Match, TriggerEvaluator
from agent.errors import HealdError

# How long verification waits for a sample newer than the step (samples come every second).
FRESH_SAMPLE_TIMEOUT_S = 10.0
#: In a verify.within window a check must pass on this many samples in a row to verify the step:
#: one sample where a forecast's confidence dips, or a value flickers under its line, is not a fix.
HOLD_CHECKS = 3


def substitute(value: Any, values: Mapping[str, str], *, argv: bool = False, url: bool = False) -> Any:
    """Fill ``{name}`` placeholders. In argv lists only whole elements are replaced (one element
    stays one element: nothing is split or interpreted); elsewhere inside strings too. In a
    ``url`` parameter each value is percent-encoded, so a label (a mount ``/a/../b``, a unit with
    ``?`` or ``#``) stays one path segment and can never change the host, the path or the query."""
    if isinstance(value, str):
        if argv:
            whole = PLACEHOLDER.fullmatch(value)
            if whole is None:
                return value
            if whole.group(1) not in values:
                raise HealdError(f"'{value}' is not bound for this run")
            return values[whole.group(1)]

        def replace(placeholder: re.Match[str]) -> str:
            if placeholder.group(1) not in values:
                raise HealdError(f"'{{{placeholder.group(1)}}}' is not bound for this run")
            got = values[placeholder.group(1)]
            return urllib.parse.quote(got, safe="") if url else got

        return PLACEHOLDER.sub(replace, value)
    if isinstance(value, Mapping):
        return {k: substitute(v, values, argv=argv or k == "argv", url=url or k == "url")
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [substitute(v, values, argv=argv, url=url) for v in value]
    return value


@dataclass
class Run:
    playbook: Playbook
    run_id: str
    match: Match
    dry_run: bool
    trigger: str  # auto | manual | approved | recovered
    target: Target = field(default_factory=lambda: Target(""))
    approved_by: str = ""
    resume: Unfinished | None = None
    # events before this wall time were handled by the run (not counted again by the trigger)
    watermark: float = 0.0
    # what each step did ("name (action): detail"), for the escalation
    tried: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.target.key:
            self.target = Target(self.playbook.name, tuple(sorted(self.match.bindings.items())),
                                 self.playbook.name)


class RunHost(Protocol):
    """What a run reads from the engine when it needs it: the daemon replaces ``settings`` on
    reload and sets ``lease_gate`` after building the engine, so neither is copied at start."""

    settings: PlaybookSettings
    lease_gate: LeaseGate | None
    security: SecuritySettings
    protected_hosts: tuple[str, ...]
    node: str
    journal: Journal
    store: StateStore
    decider: Decider
    supervisor: Supervisor
    log: FilteringBoundLogger
    state_dir: Path


class Runner:
    """Executes runs for the engine. ``running`` is the engine's table of runs in progress: a run
    removes itself from it when it ends or is cancelled."""

    def __init__(self, host: RunHost, recorder: Recorder, latest: Latest, running: dict[str, Run]) -> None:
        self._host = host
        self._recorder = recorder
        self._latest = latest
        self._running = running

    async def run(self, run: Run) -> None:
        playbook, tgt = run.playbook, run.target
        log = self._host.log.bind(playbook=playbook.name, run_id=run.run_id, target=tgt.key)
        values = {
            "node": self._host.node, "playbook": playbook.name, "run_id": run.run_id, **run.match.bindings
        }
        outcome = "failed"
        run_journal: RunJournal | None = None
        try:
            start = 0
            last_unverified: int | None = None
            if run.resume is not None:
                run_journal = self._host.journal.reopen(run.resume)
                start, last_unverified = self._resume_point(run, run_journal, log)
            else:
                header = {
                    "playbook": playbook.name,
                    "target": tgt.key,
                    "bindings": dict(run.match.bindings),
                    "inputs": dict(run.match.inputs),
                    "dry_run": run.dry_run,
                    "trigger": run.trigger,
                    "approved_by": run.approved_by,
                }
                run_journal = self._host.journal.open_run(run.run_id, header)
                force = self._host.settings.force_mode
                self._recorder.record(records.RunStart(
                    playbook=playbook.name, run_id=run.run_id, target=tgt.key, trigger=run.trigger,
                    approved_by=run.approved_by, dry_run=run.dry_run, bindings=dict(run.match.bindings),
                    inputs=dict(run.match.inputs), mode_forced=force if force != playbook.mode else "",
                    **self._latest.model()))
                log.info(
                    "playbook run started",
                    trigger=run.trigger,
                    dry_run=run.dry_run,
                    bindings=dict(run.match.bindings),
                    inputs=dict(run.match.inputs),
                )
            # A run whose last step was verified before a crash succeeded: only its end was lost (a
            # kill -9 between the verification and the journal's end record). It must not go on
            # down the ladder (the next step would stop a process, restart a unit, for nothing).
            verified = run.resume is not None and start >= len(playbook.steps) and last_unverified is None \
                and run.resume.verified.get(run.resume.last_step, False)
            if last_unverified is not None:
                ended = run.resume.ended.get(last_unverified) if run.resume is not None else None
                verified = await self._verify_step(run, run_journal, last_unverified, log, ended=ended)
                last_unverified = None
            next_index = start
            while not verified and next_index < len(playbook.steps):
                step = playbook.steps[next_index]
                next_index += 1
                if run.dry_run:
                    result = await self._execute(run, step, values, dry_run=True)
                    self._step_record(run, step, result, "dry-run")
                    continue
                run_journal.intent(step.index, step.action)
                result = await self._execute(run, step, values, dry_run=False,
                                             commit=functools.partial(run_journal.commit, step.index))
                status = "done" if result.ok else "failed"
                run_journal.result(step.index, status, result.as_dict())
                run.watermark = time.time()
                self._step_record(run, step, result, status)
                log.info(
                    "step finished",
                    step=step.name,
                    action=step.action,
                    ok=result.ok,
                    changed=result.changed,
                    detail=result.detail,
                    duration_s=round(result.duration_s, 3),
                )
                if not result.ok:
                    last_unverified = None
                    continue
                if step.verify or next_index == len(playbook.steps):
                    verified = await self._verify_step(run, run_journal, step.index, log)
            if run.dry_run:
                outcome = "dry-run"
            elif verified:
                outcome = "succeeded"
            else:
                outcome = "escalated"
                self._escalate(run, values, log)
        except LeaseHeld as exc:
            outcome = "held"
            self._recorder.record(records.RunHeld(playbook=playbook.name, run_id=run.run_id, target=tgt.key,
                                                  reason=str(exc)))
            log.warning("playbook run held by the fleet budget", reason=str(exc))
        except asyncio.CancelledError:
            # Shutdown: the journal keeps the run unfinished; the next start resumes it.
            if run_journal is not None:
                run_journal.close()
            self._running.pop(tgt.key, None)
            raise
        except Exception as exc:  # a bug must not take the engine down; the run counts as failed
            log.exception("playbook run crashed")
            outcome = "error"
            self._recorder.record(records.RunError(playbook=playbook.name, run_id=run.run_id, target=tgt.key,
                                                   error=repr(exc)))
        self._finish(run, outcome, run_journal, log)

    def _finish(
        self, run: Run, outcome: str, run_journal: RunJournal | None, log: FilteringBoundLogger
    ) -> None:
        playbook, tgt = run.playbook, run.target
        state = self._host.store.get(tgt.key, playbook.name, tgt.labels)
        now = time.time()
        # a dry-run ends where it started, on its sample's clock (Decider.decide): live and replayed
        # dry-runs then count their cooldowns from the same instant
        end = now
        if run.dry_run and run.trigger == "auto" and state.last_start is not None:
            end = state.last_start
        opened = record_end(playbook, state, end, outcome, counts=not run.dry_run and outcome != "held")
        self._host.store.save()
        self._recorder.record(records.RunEnd(
            playbook=playbook.name, run_id=run.run_id, target=tgt.key, outcome=outcome, dry_run=run.dry_run,
            consecutive_failures=state.consecutive_failures,
            duration_s=round(now - (state.last_start or now), 3) if run.resume is None else None,
            journal_complete=run_journal.complete if run_journal is not None else True))
        log.info("playbook run finished", outcome=outcome, consecutive_failures=state.consecutive_failures)
        if opened:
            self._recorder.record(records.BreakerOpen(
                playbook=playbook.name, run_id=run.run_id, target=tgt.key,
                consecutive_failures=state.consecutive_failures))
            self._recorder.emit(
                {
                    "kind": "playbook.suspended",
                    "severity": "critical",
                    "playbook": playbook.name,
                    "message": f"{playbook.name} suspended for {tgt.key} after {state.consecutive_failures} "
                    "consecutive failed runs (circuit breaker); `heald` operator action needed",
                    "labels": {**tgt.labels, "target": tgt.key},
                }
            )
            log.error(
                "circuit breaker open: playbook suspended for this target",
                consecutive_failures=state.consecutive_failures,
            )
        if run_journal is not None:
            run_journal.end(outcome)
        self._running.pop(tgt.key, None)

    def _resume_point(
        self, run: Run, run_journal: RunJournal, log: FilteringBoundLogger
    ) -> tuple[int, int | None]:
        """Where a recovered run goes on: (the next step to execute, the step to verify first)."""
        unfinished = run.resume
        if unfinished is None:
            return 0, None
        self._recorder.record(records.RunRecovered(
            playbook=run.playbook.name, run_id=run.run_id, target=run.target.key,
            completed_steps=sorted(unfinished.done), interrupted_step=unfinished.interrupted))
        log.warning(
            "resuming unfinished run from the journal",
            completed=sorted(unfinished.done),
            interrupted=unfinished.interrupted,
        )
        for index in sorted(unfinished.done):
            if index < len(run.playbook.steps):
                done = run.playbook.steps[index]
                detail = unfinished.details.get(index, unfinished.done[index])
                run.tried.append(f"{done.name} ({done.action}): {detail}")
        steps = run.playbook.steps
        interrupted = unfinished.interrupted
        if interrupted is not None and interrupted < len(steps):
            step = steps[interrupted]
            before_commit = step.action in UNTIL_COMMIT and interrupted not in unfinished.committed
            again = step.action in REPEATABLE or before_commit
            detail = ("interrupted by a crash or restart; run again (repeatable)" if step.action in REPEATABLE
                      else "interrupted by a crash or restart before it changed anything; run again"
                      if before_commit else "interrupted by a crash or restart; not run again")
            result = ActionResult(ok=False, detail=detail)
            run_journal.result(interrupted, "interrupted", result.as_dict())
            self._step_record(run, step, result, "interrupted")
            check = interrupted if step.verify or interrupted == len(steps) - 1 else None
            # A repeatable step goes again, unless the check finds it did its work before the kill;
            # any other goes on with the ladder: what it did (or not) is for the checks to see.
            return (interrupted if again else interrupted + 1), check
        last = unfinished.last_step
        if unfinished.verified.get(last) and last in unfinished.done:
            return len(run.playbook.steps), None  # verified: the run succeeded (see run())
        if last >= 0 and last not in unfinished.verified and last < len(steps) \
                and (steps[last].verify or last == len(steps) - 1):
            return last + 1, last  # verify what the last finished step achieved
        return last + 1, None

    async def _execute(
        self, run: Run, step: Step, values: Mapping[str, str], *, dry_run: bool,
        commit: Callable[[], None] | None = None,
    ) -> ActionResult:
        host = self._host
        ctx = ActionContext(
            settings=host.settings,
            node=host.node,
            playbook=run.playbook.name,
            run_id=run.run_id,
            dry_run=dry_run,
            supervisor=host.supervisor,
            emit=self._recorder.emit,
            bindings=dict(run.match.bindings),
            inputs=dict(run.match.inputs),
            detail=self._latest.detail,
            log=host.log.bind(playbook=run.playbook.name, run_id=run.run_id, step=step.name),
            state_dir=host.state_dir,
            security=host.security,
            protected_hosts=host.protected_hosts,
            commit=commit or (lambda: None),
        )
        release: Callable[[], None] | None = None
        if not dry_run and host.lease_gate is not None and step.action in DISRUPTIVE_ACTIONS:
            release = await host.lease_gate.acquire(run.playbook, run.run_id, step.action)  # or LeaseHeld
        started = time.monotonic()
        try:
            params = substitute(step.params, values)
            async with asyncio.timeout(step.timeout_s):
                result = await REGISTRY[step.action](params, ctx)
        except TimeoutError:
            result = ActionResult(ok=False, detail=f"timed out after {step.timeout_s:g}s (cancelled)")
        except HealdError as exc:
            result = ActionResult(ok=False, detail=str(exc))
        except Exception as exc:
            ctx.log.exception("action raised")
            result = ActionResult(ok=False, detail=f"{type(exc).__name__}: {exc}")
        finally:
            if release is not None:
                release()
        result.duration_s = time.monotonic() - started
        return result

    async def _verify_step(
        self, run: Run, run_journal: RunJournal, step_index: int, log: FilteringBoundLogger,
        *, ended: float | None = None,
    ) -> bool:
        """Check the step after ``verify.settle``, then on each new sample until the check passes
        or ``verify.within`` has passed (the window ends settle + within after the step ended:
        ``ended``, the step's end in the journal for a resumed run, so a restart never opens a
        fresh window). One verdict: one journal record, one audit record, one log line."""
        playbook = run.playbook
        spec = playbook.verify
        latest = self._latest
        now = time.monotonic()
        if ended is None:
            deadline = now + spec.settle_s + spec.within_s
        else:
            deadline = now + (ended + spec.settle_s + spec.within_s - time.time())
        await asyncio.sleep(spec.settle_s)
        seq, wait_s = latest.seq, FRESH_SAMPLE_TIMEOUT_S
        first, checks, passes = time.monotonic(), 0, 0
        warned: float | None = None
        ok, why = False, "no fresh sample to verify with"
        while True:
            # none within FRESH_SAMPLE_TIMEOUT_S for the first check, or before the window's end:
            # the last check's verdict stands
            if not await latest.fresh_since(seq, wait_s):
                break
            checks += 1
            seq = latest.seq
            ok, why, eta = self._check(run)
            passes = passes + 1 if ok else 0
            wait_s = deadline - time.monotonic()
            if wait_s <= 0 or spec.within_s <= 0:
                break
            if passes >= HOLD_CHECKS:  # in a window: passed on consecutive samples, not a flicker
                break
            if eta is not None and eta <= wait_s and warned is None:
                # The failure is forecast before the window ends: the humans hear it now, not after
                # the failure; the window goes on (the writer may stop: a verdict is what happened).
                warned = eta
                self._warn_at_risk(run, step_index, eta, wait_s, log)
        watched = round(time.monotonic() - first, 3)
        if spec.within_s > 0:
            why = f"{why} ({checks} check{'s' if checks != 1 else ''} in {watched:g}s)"
        if warned is not None:
            why = f"{why}; warned: forecast to fail in {warned:.0f}s, before the window's end"
        run_journal.verify(step_index, ok)
        self._recorder.record(records.Verify(
            playbook=playbook.name, run_id=run.run_id, target=run.target.key, step=step_index, ok=ok,
            reason=why, inputs=latest.current_inputs(playbook.name, run.match.bindings), checks=checks,
            watched_s=watched))
        log.info("verification", step=step_index, ok=ok, reason=why, checks=checks, watched_s=watched)
        return ok

    def _warn_at_risk(self, run: Run, step_index: int, eta: float, left_s: float,
                      log: FilteringBoundLogger) -> None:
        """One event while a step is watched: the trigger still holds and its forecast says the
        failure comes before the verify window ends."""
        playbook, key = run.playbook, run.target.key
        message = (f"{playbook.name}: {key} is forecast to fail in {eta:.0f} s while step {step_index} "
                   f"is verified (watching {left_s:.0f} s more: the fix may not have worked)")
        self._recorder.emit({
            "kind": "playbook.verify_at_risk",
            "severity": playbook.escalate.severity,
            "playbook": playbook.name,
            "run_id": run.run_id,
            "message": message,
            "labels": {**run.match.bindings, "target": key},
        })
        log.warning("failure forecast inside the verify window", step=step_index, eta_s=round(eta, 1),
                    window_left_s=round(left_s, 1))

    def _check(self, run: Run) -> tuple[bool, str, float | None]:
        """One check on the latest sample: verify.expect holds, or the trigger's condition is over;
        and, when the trigger still holds on a forecast, its shortest time to failure (seconds)."""
        playbook = run.playbook
        decider = self._host.decider
        if playbook.verify.expect is not None:
            ctx = decider.context(time.time(), time.monotonic(), watermark=run.watermark, stateless=True,
                                  bindings=dict(run.match.bindings))
            ok = bool(TriggerEvaluator(playbook.verify.expect).evaluate(ctx))
            return ok, "verify.expect holds" if ok else "verify.expect does not hold", None
        # The problem's current state, with no timers: a fresh evaluator, the run's bindings.
        ctx = decider.context(time.time(), time.monotonic(), watermark=run.watermark, verify=True,
                              bindings=dict(run.match.bindings))
        still = TriggerEvaluator(playbook.trigger).evaluate(ctx)
        if not still:
            return True, "the trigger's condition is over", None
        etas = [float(v) for m in still for k, v in m.inputs.items()
                if k.startswith("forecast[") and k.endswith("].eta_s") and isinstance(v, int | float)]
        return False, "the trigger's condition still holds", min(etas) if etas else None

    def _step_record(self, run: Run, step: Step, result: ActionResult, status: str) -> None:
        run.tried.append(f"{step.name} ({step.action}): {result.detail or status}")
        self._recorder.record(records.Step(
            playbook=run.playbook.name, run_id=run.run_id, target=run.target.key, step=step.index,
            step_name=step.name, action=step.action, status=status, dry_run=run.dry_run, ok=result.ok,
            changed=result.changed, detail=result.detail, duration_s=round(result.duration_s, 4),
            data=result.data))

    def _escalate(self, run: Run, values: Mapping[str, str], log: FilteringBoundLogger) -> None:
        """One escalation, saying what was tried: the playbook's message, then each step's result."""
        playbook = run.playbook
        try:
            message = substitute(playbook.escalate.message, values) if playbook.escalate.message else ""
        except HealdError:
            message = playbook.escalate.message
        message = message or (
            f"{playbook.name}: every step ran and the problem persists ({playbook.description})"
        )
        tried = list(run.tried)
        if tried:
            message = f"{message}. Tried: " + "; ".join(tried)
        inputs = self._latest.current_inputs(playbook.name, run.match.bindings)
        self._recorder.record(records.Escalate(
            playbook=playbook.name, run_id=run.run_id, target=run.target.key, kind=playbook.escalate.event,
            severity=playbook.escalate.severity, message=message, labels=dict(run.match.bindings),
            inputs=inputs, tried=tried))
        self._recorder.emit({
            "kind": playbook.escalate.event,
            "severity": playbook.escalate.severity,
            "playbook": playbook.name,
            "run_id": run.run_id,
            "message": message,
            "labels": {**run.match.bindings, "target": run.target.key},
            "inputs": inputs,
        })
        log.error("escalated to humans", message=message)
