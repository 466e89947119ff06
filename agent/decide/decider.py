"""The deciding half of the playbook engine: triggers and guards, per target, to typed decisions.

Once a sample, :meth:`Decider.decide` evaluates every playbook's trigger, splits its matches by
target (:mod:`agent.decide.targets`) and applies, to each target on its own, the holds (mode,
cold start, disconnected, silence) and the guards (breaker, cooldown, runs per window), then the
playbook-wide (``guards.max_parallel``) and node-wide (``max_concurrent``) limits. It returns
what to do as :data:`Decision`\\ s; :class:`agent.act.engine.Engine` carries them out. A hold is
returned once per target and reason (not every sample).

Manual runs, approvals and denials come through here too, so every run starts from a decision
made with the same state.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import structlog

from agent.collect.sample import split_key
from agent.decide.guards import StateStore, TargetState, hold_reason, record_start
from agent.decide.latest import Latest
from agent.decide.model import Playbook
from agent.decide.settings import PlaybookSettings
from agent.decide.targets import Target, target
from agent.decide.triggers import EvalContext, Match, TriggerEvaluator, cleanable_mounts
from agent.errors import HealdError
from agent.score.types import Forecast

log = structlog.get_logger("heald.decide")

Trigger = Literal["auto", "manual", "approved", "recovered"]


class Watermarked(Protocol):
    """A run in progress, as the trigger sees it: events before its watermark are its own."""

    watermark: float


@dataclass(frozen=True, slots=True)
class StartRun:
    """Run the playbook's ladder for this target now."""

    playbook: Playbook
    target: Target
    match: Match
    dry_run: bool
    trigger: Trigger = "auto"
    approved_by: str = ""


@dataclass(frozen=True, slots=True)
class Hold:
    """The trigger holds for this target but it may not run now; ``reason`` says why."""

    playbook: Playbook
    target: Target
    match: Match
    reason: str


@dataclass(frozen=True, slots=True)
class RequestApproval:
    """A playbook in approval mode wants to run for this target: ask an operator."""

    playbook: Playbook
    target: Target
    match: Match
    request_id: str


Decision = StartRun | Hold | RequestApproval


@dataclass
class Approval:
    playbook: str
    target: Target
    match: Match
    request_id: str
    requested_wall: float = field(default_factory=time.time)


class Decider:
    def __init__(self, settings: PlaybookSettings, store: StateStore, latest: Latest, node: str) -> None:
        self.settings = settings
        self.store = store
        self.latest = latest
        self.node = node
        self._playbooks: dict[str, Playbook] = {}
        self._evaluators: dict[str, TriggerEvaluator] = {}
        self.approvals: dict[str, Approval] = {}  # by request id
        self.held: dict[str, str] = {}  # target key -> the reason last returned
        self._clean_roots: tuple[str, ...] = ()
        self._mounts_seen: tuple[str, ...] = ()
        self._cleanable: frozenset[str] = frozenset()

    # ------------------------------------------------------------------ the playbook set

    @property
    def playbooks(self) -> dict[str, Playbook]:
        return dict(self._playbooks)

    def reload(self, playbooks: Iterable[Playbook]) -> None:
        """Swap the playbook set. Trigger timers are kept for playbooks whose trigger did not
        change; guard state is kept by target key; approvals of playbooks that are gone drop."""
        new = {playbook.name: playbook for playbook in playbooks}
        evaluators: dict[str, TriggerEvaluator] = {}
        for name, playbook in new.items():
            old = self._playbooks.get(name)
            same = old is not None and old.raw.get("trigger") == playbook.raw.get("trigger")
            if same and name in self._evaluators:
                evaluators[name] = self._evaluators[name]
            else:
                evaluators[name] = TriggerEvaluator(playbook.trigger)
        self._playbooks, self._evaluators = new, evaluators
        self.approvals = {k: a for k, a in self.approvals.items() if a.playbook in new}

    def effective_mode(self, playbook: Playbook) -> str:
        if playbook.mode == "off" or self.settings.force_mode == "off":
            return "off"
        if self.settings.force_mode == "dry-run":
            return "dry-run"
        return playbook.mode

    def state(self, tgt: Target) -> TargetState:
        return self.store.get(tgt.key, tgt.playbook, tgt.labels)

    def target_of(self, playbook: str, bindings: Mapping[str, str]) -> Target:
        return target(playbook, bindings, self.latest.detail)

    # ------------------------------------------------------------------ once a sample

    def context(self, wall: float, mono: float, **extra: Any) -> EvalContext:
        """An evaluation context over the latest sample (``extra``: EvalContext's options)."""
        latest = self.latest
        return EvalContext(latest.index, latest.risk, latest.events, wall, mono,
                           cleanable_mounts=self._cleanable, **extra)

    def _update_cleanable(self) -> None:
        roots = self.settings.clean_roots
        mounts = tuple(label for label, _ in self.latest.index.family("disk.used_pct") if label is not None)
        if roots != self._clean_roots or mounts != self._mounts_seen:
            self._clean_roots, self._mounts_seen = roots, mounts
            self._cleanable = cleanable_mounts(mounts, roots)

    def evaluate(self, wall: float, mono: float, running: Mapping[str, Watermarked]) -> None:
        """Evaluate every trigger on the latest sample (their matches go to ``latest.matches``).

        A trigger that reads only metrics, forecasts and events, none of which holds its condition
        in this sample, and holds no timer, is not evaluated (:meth:`TriggerEvaluator.quiet`): it
        has no match."""
        self._update_cleanable()
        latest = self.latest
        risk = latest.risk
        forecasts: dict[str, list[Forecast]] = {}
        if risk is not None:
            for f in risk.forecasts:
                forecasts.setdefault(split_key(f.resource)[0], []).append(f)
        ctx = self.context(wall, mono)  # one context, its watermark_of set per playbook
        for name, playbook in self._playbooks.items():
            evaluator = self._evaluators[name]
            if evaluator.quiet(latest.index, forecasts, latest.events):
                latest.matches[name] = []
                continue

            def watermark_of(bindings: Mapping[str, str], name: str = name) -> float:
                tgt = self.target_of(name, bindings)
                run = running.get(tgt.key)
                state = self.store.data.targets.get(tgt.key)
                return max(state.events_watermark if state else 0.0, run.watermark if run else 0.0)

            ctx.watermark_of = watermark_of
            try:
                matches = evaluator.evaluate(ctx)
            except Exception:  # a bug in one trigger must not stop the others
                log.exception("trigger evaluation failed", playbook=playbook.name)
                matches = []
            latest.matches[name] = matches

    def decide(self, wall: float, running: Mapping[str, Watermarked], *, connected: bool = True,
               hold_auto: bool = False, can_start: bool = True) -> list[Decision]:
        """What to do for every playbook's current matches (after :meth:`evaluate`)."""
        out: list[Decision] = []
        starting = 0
        per_playbook: dict[str, int] = {}
        for key in running:
            name = key.split("[", 1)[0]
            per_playbook[name] = per_playbook.get(name, 0) + 1
        for name, playbook in self._playbooks.items():
            matches = self.latest.matches.get(name)
            if not matches:  # the usual case: nothing to start, only holds and approvals to forget
                if self.held or self.approvals:
                    self._forget(name, [])
                continue
            targets = self._targets(name, matches)
            self._forget(name, targets)
            mode = self.effective_mode(playbook)
            if mode == "off":
                continue
            for tgt, match in targets:
                if tgt.key in running:
                    continue
                reason = self._hold_reason(playbook, tgt, wall, connected=connected, hold_auto=hold_auto)
                if reason is None and playbook.guards.max_parallel is not None \
                        and per_playbook.get(name, 0) >= playbook.guards.max_parallel:
                    reason = "max-parallel"
                if reason is None and len(running) + starting >= self.settings.max_concurrent:
                    reason = "concurrency"
                if reason is not None:
                    if self.held.get(tgt.key) != reason:
                        self.held[tgt.key] = reason
                        out.append(Hold(playbook, tgt, match, reason))
                    continue
                if not can_start:
                    continue
                self.held.pop(tgt.key, None)
                if mode == "approval":
                    request = self._request_approval(playbook, tgt, match, wall)
                    if request is not None:
                        out.append(request)
                    continue
                # A dry-run is decided and done on its sample's clock (nothing runs), so its guards
                # count from the sample's wall time and a replay of the samples reproduces them
                # exactly; a real run counts from when it starts.
                record_start(self.state(tgt), wall if mode == "dry-run" else time.time())
                self.store.save()
                starting += 1
                per_playbook[name] = per_playbook.get(name, 0) + 1
                out.append(StartRun(playbook, tgt, match, mode == "dry-run"))
        return out

    def _targets(self, name: str, matches: list[Match]) -> list[tuple[Target, Match]]:
        """One (target, worst match) per distinct binding, worst first."""
        best: dict[str, tuple[Target, Match]] = {}
        for m in matches:
            tgt = self.target_of(name, m.bindings)
            if tgt.key not in best or m.severity > best[tgt.key][1].severity:
                best[tgt.key] = (tgt, m)
        return sorted(best.values(), key=lambda tm: -tm[1].severity)

    def _forget(self, name: str, targets: list[tuple[Target, Match]]) -> None:
        """Targets whose trigger no longer holds: no longer held, their approval requests dropped."""
        live = {t.key for t, _ in targets}
        for key in [k for k in self.held if (k == name or k.startswith(name + "[")) and k not in live]:
            del self.held[key]
        for rid in [r for r, a in self.approvals.items() if a.playbook == name and a.target.key not in live]:
            del self.approvals[rid]

    def _hold_reason(self, playbook: Playbook, tgt: Target, now: float, *, connected: bool,
                     hold_auto: bool) -> str | None:
        if hold_auto:
            return "silenced"
        risk = self.latest.risk
        if playbook.model_driven and playbook.guards.cold_start == "hold" and (risk is None or risk.cold):
            return "cold-start"
        if not connected and playbook.guards.disconnected == "hold":
            return "disconnected"
        return hold_reason(playbook, self.state(tgt), now)

    def _request_approval(self, playbook: Playbook, tgt: Target, match: Match,
                          now: float) -> RequestApproval | None:
        """Ask humans once per approval_ttl_s per target; :meth:`manual` with the request id runs it."""
        for rid, approval in list(self.approvals.items()):
            if approval.target.key == tgt.key:
                if now - approval.requested_wall <= self.settings.approval_ttl_s:
                    return None
                del self.approvals[rid]
        request_id = f"{self.node}-{playbook.name}-{uuid.uuid4().hex[:8]}"
        self.approvals[request_id] = Approval(playbook.name, tgt, match, request_id, now)
        return RequestApproval(playbook, tgt, match, request_id)

    # ------------------------------------------------------------------ operators

    def pending(self, playbook: str, request_id: str = "") -> list[Approval]:
        """Pending approvals of a playbook (the one with ``request_id`` when given), oldest first."""
        now = time.time()
        found = [a for a in self.approvals.values()
                 if a.playbook == playbook and (not request_id or a.request_id == request_id)
                 and now - a.requested_wall <= self.settings.approval_ttl_s]
        return sorted(found, key=lambda a: a.requested_wall)

    def manual(self, name: str, approved_by: str, running: Mapping[str, Watermarked], *,
               request_id: str = "", dry_run: bool = False) -> tuple[StartRun, bool]:
        """A run an operator asked for (a manual run or an approval) and whether it reset an open
        breaker. Bypasses the trigger, cooldown and runs per window, and resets the target's
        breaker (not for a ``dry_run``, which only shows what would be done); respects mode off,
        one run per target and the node-wide limit."""
        playbook = self._playbooks.get(name)
        if playbook is None:
            raise HealdError(f"no playbook named '{name}'")
        mode = self.effective_mode(playbook)
        if mode == "off":
            raise HealdError(f"playbook '{name}' is off")
        approvals = self.pending(name, request_id)
        approval = approvals[0] if approvals else None
        if approval is not None:
            tgt, match = approval.target, approval.match
        else:
            targets = self._targets(name, self.latest.matches.get(name, []))
            tgt, match = targets[0] if targets else (self.target_of(name, {}), Match({}, {}))
        if tgt.key in running:
            raise HealdError(f"playbook '{name}' is already running for {tgt.key}")
        if len(running) >= self.settings.max_concurrent:
            raise HealdError(f"{len(running)} playbooks running (playbooks.max_concurrent); try again later")
        if approval is not None:
            del self.approvals[approval.request_id]
        state = self.state(tgt)
        reset = state.breaker_open_since is not None and not dry_run
        if not dry_run:
            state.breaker_open_since = None
            state.consecutive_failures = 0
        record_start(state, time.time())
        self.store.save()
        self.held.pop(tgt.key, None)
        trigger: Trigger = "approved" if approval else "manual"
        start = StartRun(playbook, tgt, match, dry_run or mode == "dry-run", trigger, approved_by=approved_by)
        return start, reset

    def deny(self, name: str, request_id: str = "") -> list[Approval]:
        """Drop the pending approval(s) of a playbook (the one with ``request_id`` when given)."""
        if name not in self._playbooks:
            raise HealdError(f"no playbook named '{name}'")
        denied = self.pending(name, request_id)
        for approval in denied:
            del self.approvals[approval.request_id]
        return denied
