"""What one coordinator replica runs: the ingest hooks, the operator actions, the retention loop.

:class:`Coordinator` ties the store, the MQTT bus and the command signer together. After each
committed batch it decides the batch's lease requests and publishes the signed answers. The web
layer calls its operator methods: approving, denying, running a playbook, silencing and unsilencing
each record a signed command in the store before publishing it; resolving an escalation changes the store
only. Starting it (and the web server beside it) is :func:`coordinator.service.serve`'s job.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from agent.wire import CommandName
from agent.wire.messages import ID_PATTERN, Args, Command
from agent.wire.signing import CommandSigner, public_key_text
from coordinator.config import CoordinatorSettings
from coordinator.errors import BadRequest
from coordinator.ingest import Bus
from coordinator.model import BatchResult, Incoming
from coordinator.store import Store

ID_RE = re.compile(ID_PATTERN)
log = structlog.get_logger("coordinator")

PLAYBOOK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class Coordinator:
    """Everything one replica runs. The web layer calls the operator methods."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        store: Store,
        signer: CommandSigner,
        *,
        mqtt_host: str,
        mqtt_port: int,
    ) -> None:
        self.settings = settings
        self.store = store
        self.signer = signer
        self.replica = settings.replica_id
        s = settings.store
        self.bus = Bus(
            settings.mqtt,
            host=mqtt_host,
            port=mqtt_port,
            client_id=settings.mqtt_client_id,
            apply=self._apply,
            after_batch=self._after_batch,
            batch_max=s.batch_max,
            batch_interval_s=s.batch_interval_s,
            queue_max=s.queue_max,
            writers=store.db.writers,
        )
        self.started_at = time.time()
        self.leases_granted = 0
        self.leases_denied = 0
        # more sections of info(), from parts started beside this one (the notifier)
        self.extra_info: dict[str, Callable[[], Any]] = {}

    # ------------------------------------------------------------------ ingest hooks

    async def _apply(self, batch: list[Incoming]) -> BatchResult:
        return await self.store.apply(batch)

    async def _after_batch(self, result: BatchResult) -> None:
        if not result.lease_requests:
            return
        outcome = await self.store.decide_leases(result.lease_requests)
        commands: list[Command] = []
        for d in outcome.decisions:
            r = d.request
            args: Args = {
                "request_id": r.request_id,
                "playbook": r.playbook,
                "run_id": r.run_id,
                "reason": d.reason,
                "group": d.group,
            }
            if d.granted:
                args |= {"lease_id": d.lease_id, "expires_at": d.expires_at}
                self.leases_granted += 1
            else:
                self.leases_denied += 1
                if d.escalation_id is not None:
                    args["escalation_id"] = d.escalation_id
            commands.append(
                self.signer.make(
                    node=r.node,
                    site=r.site,
                    name=CommandName.LEASE_GRANT if d.granted else CommandName.LEASE_DENY,
                    args=args,
                )
            )
            log.info("lease decided", node=r.node, playbook=r.playbook, granted=d.granted, reason=d.reason)
        commands.extend(
            self.signer.make(
                node=rv.node,
                site=rv.site,
                name=CommandName.LEASE_REVOKE,
                args={"lease_id": rv.lease_id, "playbook": rv.playbook, "reason": rv.reason},
            )
            for rv in outcome.revocations
        )
        for esc in outcome.escalations_raised:
            log.warning("fleet escalation raised", escalation=esc)
        await self.store.record_commands(commands, "coordinator")
        for cmd in commands:
            await self.bus.publish(cmd)

    # ------------------------------------------------------------------ operator actions

    async def decide_approval(self, approval_id: str, approve: bool, actor: str) -> Command:
        approval = await self.store.get_approval(approval_id)
        cmd = self.signer.make(
            node=approval["node"],
            site=approval["site"],
            name=CommandName.APPROVE if approve else CommandName.DENY,
            args={
                # the node's own name for the request (the approval's id may be namespaced)
                "request_id": approval["request_id"] or approval_id,
                "run_id": approval["run_id"],
                "playbook": approval["playbook"],
                "action": approval["action"],
                "by": actor,
            },
        )
        await self.store.decide_approval(approval_id, approve, actor, cmd)
        await self.bus.publish(cmd)
        return cmd

    async def run_playbook(self, node: str, playbook: str, actor: str, args: Args | None = None) -> Command:
        if not PLAYBOOK_RE.match(playbook):
            raise BadRequest(f"invalid playbook name {playbook!r}")
        site = await self.store.node_site(node)
        cmd_args: Args = {"playbook": playbook, "by": actor}
        for k, v in (args or {}).items():
            cmd_args[f"arg.{k}"] = v
        try:  # the wire's bounds (finite numbers, bounded strings): a node would refuse it otherwise
            msgspec.convert(cmd_args, type=Args)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"args: {exc}") from None
        cmd = self.signer.make(node=node, site=site, name=CommandName.RUN_PLAYBOOK, args=cmd_args)
        await self.store.issue_command(cmd, actor, "run_playbook")
        await self.bus.publish(cmd)
        return cmd

    async def silence(self, node: str, duration_s: float, actor: str) -> Command:
        if not 0 < duration_s <= 30 * 86400:
            raise BadRequest("silence duration must be between 1s and 30d")
        site = await self.store.node_site(node)
        until = time.time() + duration_s
        cmd = self.signer.make(
            node=node,
            site=site,
            name=CommandName.SILENCE,
            args={"duration_s": duration_s, "until": until, "by": actor},
        )
        await self.store.issue_command(cmd, actor, "silence", silence_until=until)
        await self.bus.publish(cmd)
        return cmd

    async def unsilence(self, node: str, actor: str) -> Command:
        """Lift a node's silence: ``silenced_until`` back to 0 and a signed ``unsilence`` command.

        Sent whether or not the store has the node silenced: a silence the node holds is lifted
        either way, and the node's ack says whether one was active.
        """
        site = await self.store.node_site(node)
        cmd = self.signer.make(node=node, site=site, name=CommandName.UNSILENCE, args={"by": actor})
        await self.store.issue_command(cmd, actor, "unsilence", silence_until=0.0)
        await self.bus.publish(cmd)
        return cmd

    async def resolve_escalation(self, escalation_id: int, actor: str) -> None:
        await self.store.resolve_escalation(escalation_id, actor)

    async def set_site(self, node: str, site: str, actor: str) -> str:
        """Move a node to another site (and so another blast-radius group): the operator's call."""
        if not ID_RE.match(site):
            raise BadRequest(f"invalid site {site!r}")
        return await self.store.set_site(node, site, actor)

    def info(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "started_at": self.started_at,
            "store": self.store.db.dialect.name,
            "share_group": self.settings.mqtt.share_group or None,
            "signing_key_id": self.signer.issuer,
            "public_key": public_key_text(self.signer.public_key),
            "ingest": self.bus.stats.as_dict(self.bus.queue.qsize()),
            "leases": {"granted": self.leases_granted, "denied": self.leases_denied},
        } | {name: part() for name, part in self.extra_info.items()}

    # ------------------------------------------------------------------ background

    async def prune_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.store.prune_interval_s)
            try:
                removed = await self.store.prune()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retention must not stop the coordinator
                log.error("prune failed", error=str(exc))
                continue
            if any(removed.values()):
                log.info("pruned history", **removed)
