"""Glue between the stages that the stages themselves must not know about.

- playbook decisions (audit records) -> MQTT ``action`` messages, escalations -> ``event``s;
- signed commands from the coordinator -> verified -> the playbook engine -> ``command_ack``;
- SIGHUP -> the playbook engine reloads its playbooks (an invalid set keeps the old one).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import structlog

from agent import wire
from agent.errors import HealdError, InputError
from agent.report import build

if TYPE_CHECKING:
    from agent.act.engine import Engine
    from agent.report.transport import Reporter
    from agent.runtime.config import Settings
    from agent.wire.signing import CommandVerifier

log = structlog.get_logger("heald.wiring")
AckStatus = Literal["accepted", "rejected", "done", "failed", "expired"]

_OUTCOMES: dict[str, Literal["ok", "failed", "skipped", "timeout", "refused"]] = {
    "ok": "ok", "succeeded": "ok", "verified": "ok", "done": "ok", "dry-run": "ok",
    "failed": "failed", "escalated": "failed", "interrupted": "failed", "abandoned": "skipped",
    "skipped": "skipped", "held": "refused", "refused": "refused", "timeout": "timeout",
}


def _clean(value: dict[str, Any], prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Audit records -> wire ``Args``, which are flat (a scalar or a list of scalars per key):
    nested mappings become dotted keys, anything else that is not a scalar becomes JSON text."""
    out = {} if out is None else out
    for k, v in value.items():
        key = f"{prefix}{k}"
        if v is None or isinstance(v, str | bool | int | float):
            out[key] = v[:4096] if isinstance(v, str) else v
        elif isinstance(v, dict):
            _clean(v, key + ".", out)
        elif isinstance(v, list | tuple) and all(x is None or isinstance(x, str | bool | int | float)
                                                 for x in v):
            out[key] = list(v)
        else:
            out[key] = msgspec.json.encode(v, enc_hook=str).decode()[:4096]
    return out


def action_message(record: dict[str, Any]) -> wire.Action | wire.Event:
    """One engine audit record as a wire message (decisions are published as actions)."""
    kind = str(record.get("type", "decision"))
    env = build._env()  # same envelope rules as every other report
    playbook = str(record.get("playbook") or "-")
    run_id = str(record.get("run_id") or "-")
    if kind == "escalate":
        labels = {str(k): str(v) for k, v in dict(record.get("labels") or {}).items()}
        labels.update(playbook=playbook, run_id=run_id, severity=str(record.get("severity", "")))
        return wire.Event(**env, name=str(record.get("kind") or "playbook.escalated"), source="playbooks",
                          wall=time.time(), labels=labels, message=str(record.get("message", ""))[:4096])
    status = str(record.get("status") or record.get("outcome") or "")
    finished = kind == "step" and status not in ("intent", "started", "")
    finished = finished or kind in ("run.end", "run.finished", "run.abandoned")
    outcome = None
    if finished:
        ok = record.get("ok")
        outcome = _OUTCOMES.get(status, "ok" if ok is True else "failed")
    result = {k: v for k, v in record.items()
              if k not in ("node", "playbook", "run_id", "action", "dry_run", "duration_s", "type")}
    return wire.Action(
        **env, phase="finished" if finished else "started", run_id=run_id[:128] or "-",
        playbook=playbook[:128] or "-", step=str(record.get("step_name") or record.get("step") or kind),
        action=str(record.get("action") or kind), dry_run=bool(record.get("dry_run", False)),
        outcome=outcome, result=_clean({"type": kind, **result}),
        error=str(record.get("detail", ""))[:4096] if outcome == "failed" else "",
        duration_s=record.get("duration_s") if isinstance(record.get("duration_s"), int | float) else None,
    )


def event_message(event: dict[str, Any]) -> wire.Event:
    """An engine event for humans (escalation, approval request, breaker trip) as a wire event.

    Approval requests go out as ``approval_request`` events, the name the coordinator queues for
    an operator's signed approve/deny.
    """
    env = build._env()
    kind = str(event.get("kind") or "playbook.event")
    playbook = str(event.get("playbook") or "")
    labels = {str(k): str(v) for k, v in dict(event.get("labels") or {}).items()}
    labels.update({k: str(event[k]) for k in ("playbook", "run_id", "severity") if event.get(k)})
    if kind == "playbook.approval_requested":
        kind = "approval_request"
        labels["request_id"] = f"{event.get('node', '')}-{playbook}-{int(float(event.get('wall', 0)))}"
        labels.setdefault("action", str(event.get("action") or "playbook"))
    wall = float(event.get("wall") or time.time())
    return wire.Event(**env, name=kind[:128], source="playbooks", wall=wall, labels=labels,
                      message=str(event.get("message", ""))[:4096])


class CoordinatorLeases:
    """The agent's side of the fleet blast-radius budget (an :class:`agent.act.engine.LeaseGate`).

    Before a disruptive step in enforce mode: publish a ``lease_request`` event and wait for the
    coordinator's signed ``lease_grant`` / ``lease_deny``. Disconnected, or no answer in time: the
    playbook's local policy (``guards.disconnected``: act or hold) decides.
    """

    def __init__(self, reporter: Reporter, *, timeout_s: float = 10.0, ttl_s: float = 300.0) -> None:
        self.reporter = reporter
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._waiting: dict[str, asyncio.Future[wire.Command]] = {}

    async def acquire(self, pb: Any, run_id: str, action: str) -> Callable[[], None]:
        from agent.act.engine import LeaseHeld  # noqa: PLC0415

        policy = pb.guards.disconnected
        if not self.reporter.connected:
            if policy == "hold":
                raise LeaseHeld("coordinator unreachable and the playbook's local policy is hold")
            return _no_release
        request_id = uuid.uuid4().hex[:16]
        fut: asyncio.Future[wire.Command] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = fut
        self.reporter.submit(wire.Event(
            **build._env(), name="lease_request", source="playbooks", wall=time.time(), value=self.ttl_s,
            labels={"request_id": request_id, "playbook": pb.name, "run_id": run_id, "action": action}))
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await fut
        except TimeoutError:
            if policy == "hold":
                raise LeaseHeld(f"no lease answer within {self.timeout_s:g}s; local policy is hold") from None
            log.warning("no lease answer from the coordinator; local policy acts", playbook=pb.name,
                        run_id=run_id, action=action)
            return _no_release
        finally:
            self._waiting.pop(request_id, None)
        if answer.name != "lease_grant":
            raise LeaseHeld(f"fleet budget: {answer.args.get('reason', 'denied')}")
        lease_id = str(answer.args.get("lease_id", ""))

        def release() -> None:
            self.reporter.submit(wire.Event(**build._env(), name="lease_release", source="playbooks",
                                            wall=time.time(), labels={"lease_id": lease_id,
                                                                      "playbook": pb.name}))
        return release

    def resolve(self, command: wire.Command) -> bool:
        fut = self._waiting.get(str(command.args.get("request_id", "")))
        if fut is None or fut.done():
            return False
        fut.set_result(command)
        return True


def _no_release() -> None:
    return None


class CommandDispatcher:
    """Verify a coordinator command, act on it through the engine, acknowledge it."""

    def __init__(self, verifier: CommandVerifier | None, engine: Engine | None,
                 reporter: Reporter) -> None:
        self.verifier = verifier
        self.engine = engine
        self.reporter = reporter
        # `silence NODE DURATION`: automatic playbook runs are held until then (manual runs and
        # approvals still work); sampling and reporting go on.
        self.silenced_until = 0.0
        self.leases: CoordinatorLeases | None = None
        self.rejected: dict[str, int] = {}
        self._queue: asyncio.Queue[wire.Command] = asyncio.Queue(maxsize=100)

    def _ack(self, command: wire.Command, status: AckStatus, message: str = "",
             result: dict[str, Any] | None = None) -> None:
        env = build._env()
        self.reporter.submit(wire.CommandAck(**env, command_id=command.id, status=status,
                                             message=message[:4096], result=_clean(result or {})))

    def __call__(self, command: wire.Command) -> None:
        from agent.wire.signing import CommandExpired, CommandRejected  # noqa: PLC0415

        if self.verifier is None:
            self.rejected["no_key"] = self.rejected.get("no_key", 0) + 1
            log.warning("command rejected: no coordinator public key configured", command_id=command.id,
                        name=command.name)
            self._ack(command, "rejected", "this node has no coordinator public key configured")
            return
        try:
            self.verifier.verify(command)
        except CommandRejected as exc:
            reason = getattr(exc, "reason", type(exc).__name__)
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
            log.warning("command rejected", command_id=command.id, name=command.name, reason=reason,
                        error=str(exc), rejected_total=sum(self.rejected.values()))
            self._ack(command, "expired" if isinstance(exc, CommandExpired) else "rejected", str(exc))
            return
        if command.name in ("lease_grant", "lease_deny", "lease_revoke"):
            answered = self.leases is not None and self.leases.resolve(command)
            self._ack(command, "done", "lease answer taken" if answered else "no request waiting")
            return
        try:
            self._queue.put_nowait(command)
        except asyncio.QueueFull:
            self._ack(command, "rejected", "too many commands queued on this node")
            return
        self._ack(command, "accepted")

    async def run(self) -> None:
        """The command task (in the daemon's root group): one verified command at a time."""
        while True:
            command = await self._queue.get()
            try:
                status, message, result = await self._execute(command)
            except HealdError as exc:
                log.warning("command failed", command_id=command.id, name=command.name, error=str(exc))
                status, message, result = "failed", str(exc), {}
            self._ack(command, status, message, result)

    async def _execute(self, command: wire.Command) -> tuple[AckStatus, str, dict[str, Any]]:
        engine = self.engine
        if engine is None:
            return "failed", "playbooks are not loaded on this node", {}
        playbook = str(command.args.get("playbook", ""))
        by = command.issuer or "coordinator"
        if command.name in ("run", "run_playbook", "approve"):
            run_id = await engine.trigger_manual(playbook, approved_by=by)
            return "done", f"{command.name}: run {run_id} started", {"run_id": run_id}
        if command.name == "deny":
            deny = getattr(engine, "deny", None)
            denied = bool(deny(playbook, by)) if deny is not None else False
            return "done", f"approval for {playbook} denied", {"denied": denied}
        if command.name == "silence":
            given = command.args.get("until") or command.args.get("duration_s") or 0
            if not isinstance(given, int | float):
                return "failed", "silence needs a numeric until or duration_s", {}
            until = float(given) if command.args.get("until") else time.time() + float(given)
            self.silenced_until = until
            log.warning("node silenced: automatic playbook runs held", until=until, by=by)
            return "done", f"automatic playbook runs held until {until:.0f}", {"until": until}
        if command.name == "status":
            return "done", "", {"playbooks": engine.status(), "approvals": engine.pending_approvals()}
        return "failed", f"unknown command '{command.name}'", {}


class PlaybookReloader:
    """On SIGHUP: load the playbooks again; an invalid set is refused and the running one kept."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def reload(self, settings: Settings) -> None:
        from agent.decide.loader import load_playbooks  # noqa: PLC0415

        try:
            playbooks = load_playbooks(settings.playbooks)
        except InputError as exc:
            log.error("playbook reload refused, keeping the running set",
                      problems=[str(p) for p in exc.problems])
            return
        self.engine.settings = settings.playbooks
        self.engine.reload(playbooks)
        log.info("playbooks reloaded", count=len(playbooks))


def build_verifier(settings: Settings, state_dir: Path) -> CommandVerifier | None:
    """The command verifier from ``[coordinator]`` keys; None when no key is configured."""
    from agent.wire import signing  # noqa: PLC0415 - cryptography only when commands are in use

    c = settings.coordinator
    keys = [signing.parse_public_key(k) for k in c.public_keys]
    keys += [signing.load_public_key(Path(p)) for p in c.public_key_files]
    if not keys:
        return None
    (state_dir / "report").mkdir(parents=True, exist_ok=True)
    return signing.CommandVerifier(keys, node=settings.node.id, site=settings.node.site,
                                   nonces=signing.NonceCache(state_dir / "report" / "nonces.msgpack"),
                                   max_skew_s=c.max_clock_skew_s)
