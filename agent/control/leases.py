"""The agent's side of the fleet blast-radius budget: ask the coordinator before a disruptive step.

:class:`CoordinatorLeases` is the engine's :class:`agent.act.lease.LeaseGate`. Before a
disruptive step in enforce mode it publishes a ``lease_request`` event and waits for the
coordinator's signed ``lease_grant`` / ``lease_deny`` (which the
:class:`~agent.control.dispatcher.CommandDispatcher` hands to :meth:`CoordinatorLeases.resolve`).
Disconnected, or no answer in time: the playbook's local policy (``guards.disconnected``: act
or hold) decides.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import structlog

from agent import wire
from agent.act.lease import LeaseHeld
from agent.control.outbox import Outbox
from agent.decide.model import Playbook
from agent.report.build import envelope

log = structlog.get_logger("heald.control")


class CoordinatorLeases:
    def __init__(self, outbox: Outbox, *, timeout_s: float = 10.0, ttl_s: float = 300.0) -> None:
        self.outbox = outbox
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._waiting: dict[str, asyncio.Future[wire.Command]] = {}

    async def acquire(self, pb: Playbook, run_id: str, action: str) -> Callable[[], None]:
        """Wait for a lease; return its release callback, or raise :class:`LeaseHeld`."""
        policy = pb.guards.disconnected
        if not self.outbox.connected:
            if policy == "hold":
                raise LeaseHeld("coordinator unreachable and the playbook's local policy is hold")
            return _no_release
        request_id = uuid.uuid4().hex[:16]
        fut: asyncio.Future[wire.Command] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = fut
        self.outbox.submit(wire.Event(
            **envelope(), name=wire.RequestEvent.LEASE_REQUEST, source="playbooks", wall=time.time(),
            value=self.ttl_s, labels={"request_id": request_id, "playbook": pb.name, "run_id": run_id,
                                      "action": action}))
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
        if answer.name != wire.CommandName.LEASE_GRANT:
            raise LeaseHeld(f"fleet budget: {answer.args.get('reason', 'denied')}")
        lease_id = str(answer.args.get("lease_id", ""))

        def release() -> None:
            self.outbox.submit(wire.Event(
                **envelope(), name=wire.RequestEvent.LEASE_RELEASE, source="playbooks", wall=time.time(),
                labels={"lease_id": lease_id, "playbook": pb.name}))
        return release

    def resolve(self, command: wire.Command) -> bool:
        """A verified lease answer; True when a request was waiting for it."""
        fut = self._waiting.get(str(command.args.get("request_id", "")))
        if fut is None or fut.done():
            return False
        fut.set_result(command)
        return True


def _no_release() -> None:
    return None
