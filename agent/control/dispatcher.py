"""Signed commands from the coordinator: verify, acknowledge, act through the playbook engine.

:meth:`CommandDispatcher.__call__` runs on the event loop for every command the
:class:`~agent.control.receiver.CommandReceiver` lets through. It verifies the signature, the
target, the time window and the nonce (:class:`agent.wire.signing.CommandVerifier`) and answers
at once: a lease answer goes straight to the waiting request, anything else is queued and
acknowledged ``accepted``. :meth:`CommandDispatcher.run` (a task in the daemon's root group)
executes the queue one command at a time and acknowledges each ``done`` or ``failed``: runs,
approvals and status through the engine, ``silence``/``unsilence`` on the node's
:class:`~agent.control.silence.Silence`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol

import structlog

from agent import wire
from agent.act.records import Control
from agent.control.leases import CoordinatorLeases
from agent.control.outbox import Outbox
from agent.control.silence import Silence
from agent.errors import HealdError
from agent.report.build import command_ack, flat_args

if TYPE_CHECKING:
    from agent.wire.signing import CommandVerifier

log = structlog.get_logger("heald.control")


class PlaybookControl(Protocol):
    """What commands may ask of the playbook engine (:class:`agent.act.engine.Engine`)."""

    @property
    def playbooks(self) -> Mapping[str, object]:
        """The loaded playbooks, by name."""
        ...

    async def trigger_manual(self, name: str, approved_by: str, *, request_id: str = "",
                             dry_run: bool = False) -> str:
        """Start a run of playbook ``name`` now (for approval ``request_id`` when given); its run id."""
        ...

    def reset_breaker(self, name: str, by: str, *, target: str = "") -> list[str]:
        """Close the playbook's open breakers (of ``target`` only, when given); the targets reset."""
        ...

    def record_control(self, record: Control) -> None:
        """An operator's command into the audit chain."""
        ...

    def deny(self, name: str, by: str, *, request_id: str = "") -> bool:
        """Refuse a pending approval (``request_id``, or all of the playbook's); False if none."""
        ...

    def status(self) -> list[dict[str, Any]]:
        """Each playbook's state (mode, cooldown, breaker, last run)."""
        ...

    def pending_approvals(self) -> list[dict[str, Any]]:
        """The runs waiting for an operator's approval."""
        ...


Result = tuple[wire.AckStatus, str, dict[str, Any]]


class BundleHandler(Protocol):
    """``bundle_chunk``/``bundle_activate`` (:class:`agent.bundle.control.BundleControl`)."""

    async def handle(self, name: str, args: Mapping[str, Any], by: str) -> Result: ...


BUNDLE_COMMANDS = frozenset({wire.CommandName.BUNDLE_CHUNK, wire.CommandName.BUNDLE_ACTIVATE})
#: Where a command came from: the coordinator (signed, over MQTT) or ``heald`` on the node itself
#: (the local control socket, :mod:`agent.control.local`).
Origin = Literal["coordinator", "local"]
#: Commands only the local channel takes (not on the wire: the coordinator cannot send them).
BREAKER_RESET = "breaker_reset"

#: Rejections answered per second (burst: 4 s' worth). A flood of forged or replayed commands
#: must not turn into a flood of acks queued ahead of the node's real reports: past the rate,
#: rejections are counted (``rejected``, ``rejections_unanswered``) and logged once a minute.
REJECTION_ACKS_PER_S = 5.0


class _Budget:
    """A token bucket without waiting: ``take()`` says whether one more is allowed now."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._stamp = burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class CommandDispatcher:
    """Verify a coordinator command, act on it through the engine, acknowledge it."""

    def __init__(self, verifier: CommandVerifier | None, engine: PlaybookControl | None, outbox: Outbox,
                 *, leases: CoordinatorLeases | None = None, silence: Silence | None = None) -> None:
        self.verifier = verifier
        self.engine = engine
        self.outbox = outbox
        self.leases = leases
        self.silence = silence if silence is not None else Silence()
        self.rejected: dict[str, int] = {}  # why commands were refused (no key, bad signature, ...)
        self.rejections_unanswered = 0  # refused without an ack: past REJECTION_ACKS_PER_S
        self._reject_budget = _Budget(REJECTION_ACKS_PER_S, 4 * REJECTION_ACKS_PER_S)
        self._reject_log_at = 0.0
        self._queue: asyncio.Queue[wire.Command] = asyncio.Queue(maxsize=100)
        self.bundles: BundleHandler | None = None

    def _ack(self, command: wire.Command, status: wire.AckStatus, message: str = "",
             result: dict[str, Any] | None = None) -> None:
        ack = command_ack(command.id, status, message=message[:4096], result=flat_args(result or {}))
        self.outbox.submit(ack)

    def __call__(self, command: wire.Command) -> None:
        from agent.wire.signing import CommandExpired, CommandRejected  # noqa: PLC0415 - cryptography, lazily

        if self.verifier is None:
            self._reject(command, "no_key", "rejected", "this node has no coordinator public key configured")
            return
        try:
            self.verifier.verify(command)
        except CommandRejected as exc:
            self._reject(command, exc.reason, "expired" if isinstance(exc, CommandExpired) else "rejected",
                         str(exc))
            return
        if command.name in wire.LEASE_ANSWERS:
            answered = self.leases is not None and self.leases.resolve(command)
            self._ack(command, "done", "lease answer taken" if answered else "no request waiting")
            return
        try:
            self._queue.put_nowait(command)
        except asyncio.QueueFull:
            self._ack(command, "rejected", "too many commands queued on this node")
            return
        self._ack(command, "accepted")

    def _reject(self, command: wire.Command, reason: str, status: wire.AckStatus, message: str) -> None:
        """Count a refused command; answer and log it while within the rejection budget."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if self._reject_budget.take():
            log.warning("command rejected", command_id=command.id, name=command.name, reason=reason,
                        error=message, rejected_total=sum(self.rejected.values()))
            self._ack(command, status, message)
            return
        self.rejections_unanswered += 1
        now = time.monotonic()
        if now - self._reject_log_at >= 60.0:
            self._reject_log_at = now
            log.warning("commands rejected faster than they are answered; the rest go unanswered",
                        rejected=dict(self.rejected), unanswered=self.rejections_unanswered,
                        acks_per_s=REJECTION_ACKS_PER_S)

    async def run(self) -> None:
        """The command task (in the daemon's root group): one verified command at a time."""
        while True:
            command = await self._queue.get()
            # the operator, as the coordinator names them in the signed args; else the signing key
            by = str(command.args.get("by") or command.issuer or "coordinator")
            status, message, result = await self.execute(command.name, command.args, by=by,
                                                          command_id=command.id)
            self._ack(command, status, message, result)

    async def execute(self, name: str, args: Mapping[str, Any], *, by: str, origin: Origin = "coordinator",
                      uid: int | None = None, command_id: str = "") -> Result:
        """Carry out one command, from the coordinator or the local socket, the same way; every one
        but ``status`` goes into the audit chain with its origin, operator, uid and outcome."""
        try:
            status, message, result = await self._execute(name, args, by, origin)
        except HealdError as exc:
            log.warning("command failed", command_id=command_id, name=name, origin=origin, error=str(exc))
            status, message, result = "failed", str(exc), {}
        if self.engine is not None and name != wire.CommandName.STATUS:
            self.engine.record_control(Control(
                playbook=str(args.get("playbook") or ""), command=name, origin=origin, by=by, uid=uid,
                command_id=command_id, status=status, message=message[:4096],
                args={str(k): v for k, v in args.items()
                      if isinstance(v, str | int | float | bool) and k not in ("data", "signature")}))
        return status, message, result

    async def _execute(self, name: str, args: Mapping[str, Any], by: str, origin: Origin) -> Result:
        if name in BUNDLE_COMMANDS:
            if self.bundles is None or origin != "coordinator":
                return "failed", "bundles are taken from the coordinator only", {}
            return await self.bundles.handle(name, args, by)
        engine = self.engine
        if engine is None:
            return "failed", "playbooks are not loaded on this node", {}
        playbook = str(args.get("playbook", ""))
        names_playbook = {*wire.RUN_COMMANDS, wire.CommandName.DENY, BREAKER_RESET}
        if name in names_playbook and playbook not in engine.playbooks:
            return "rejected", f"no playbook named '{playbook}'", {}
        # An approval names its request (one playbook may wait on several targets at once).
        request_id = str(args.get("request_id") or "") if name != wire.CommandName.RUN else ""
        if name in wire.RUN_COMMANDS:
            dry_run = args.get("dry_run") is True
            run_id = await engine.trigger_manual(playbook, approved_by=by, request_id=request_id,
                                                 dry_run=dry_run)
            return "done", f"{name}: run {run_id} started{' (dry run)' if dry_run else ''}", \
                {"run_id": run_id, "dry_run": dry_run}
        if name == BREAKER_RESET and origin == "local":
            reset = engine.reset_breaker(playbook, by, target=str(args.get("target") or ""))
            message = f"breaker reset: {', '.join(reset)}" if reset else f"no open breaker of {playbook}"
            return "done", message, {"reset": reset}
        if name == wire.CommandName.DENY:
            if not engine.deny(playbook, by, request_id=request_id):
                return "failed", f"no pending approval of {playbook} to deny", {"denied": False}
            return "done", f"approval for {playbook} denied", {"denied": True}
        if name == wire.CommandName.SILENCE:
            return self._silence(args, by)
        if name == wire.CommandName.UNSILENCE:
            return self._unsilence(by)
        if name == wire.CommandName.STATUS:
            return "done", "", {"playbooks": engine.status(), "approvals": engine.pending_approvals()}
        return "failed", f"unknown command '{name}'", {}

    def _silence(self, args: Mapping[str, Any], by: str) -> Result:
        given = args.get("until") or args.get("duration_s") or 0
        if not isinstance(given, int | float):
            return "failed", "silence needs a numeric until or duration_s", {}
        until = float(given) if args.get("until") else time.time() + float(given)
        self.silence.until = until
        log.warning("node silenced: automatic playbook runs held", until=until, by=by)
        return "done", f"automatic playbook runs held until {until:.0f}", {"until": until}

    def _unsilence(self, by: str) -> Result:
        """Lift a silence; ``done`` either way, the message and ``was_silenced`` say whether one held."""
        was = self.silence.until
        active = self.silence.holds(time.time())
        self.silence.until = 0.0
        if not active:
            log.info("unsilence: the node was not silenced", by=by)
            return "done", "the node was not silenced: nothing to lift", {"was_silenced": False}
        log.warning("node unsilenced: automatic playbook runs resume", was_until=was, by=by)
        message = f"silence lifted (it held until {was:.0f}): automatic playbook runs resume"
        return "done", message, {"was_silenced": True, "was_until": was}
