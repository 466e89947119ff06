"""The coordinator process: store + MQTT bus + signer + web server under one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog

from agent.wire.messages import Args, Command
from agent.wire.signing import CommandSigner, key_id, load_or_create_private_key, public_key_text
from coordinator.broker import embedded_broker
from coordinator.config import CoordinatorSettings, parse_listen
from coordinator.errors import BadRequest, NotFound
from coordinator.ingest import Bus
from coordinator.model import (
    APPROVE,
    DENY,
    LEASE_DENY,
    LEASE_GRANT,
    LEASE_REVOKE,
    RUN_PLAYBOOK,
    SILENCE,
    BatchResult,
    Incoming,
)
from coordinator.store import Store, open_store

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
            client_id=settings.mqtt.client_id or f"heald-coordinator-{self.replica}"[:64],
            apply=self._apply,
            after_batch=self._after_batch,
            batch_max=s.batch_max,
            batch_interval_s=s.batch_interval_s,
            queue_max=s.queue_max,
        )
        self.started_at = time.time()
        self.leases_granted = 0
        self.leases_denied = 0

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
                    node=r.node, site=r.site, name=LEASE_GRANT if d.granted else LEASE_DENY, args=args
                )
            )
            log.info("lease decided", node=r.node, playbook=r.playbook, granted=d.granted, reason=d.reason)
        commands.extend(
            self.signer.make(
                node=rv.node,
                site=rv.site,
                name=LEASE_REVOKE,
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
            name=APPROVE if approve else DENY,
            args={
                "request_id": approval_id,
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
        cmd = self.signer.make(node=node, site=site, name=RUN_PLAYBOOK, args=cmd_args)
        await self.store.issue_command(cmd, actor, "run_playbook")
        await self.bus.publish(cmd)
        return cmd

    async def silence(self, node: str, duration_s: float, actor: str) -> Command:
        if not 0 < duration_s <= 30 * 86400:
            raise BadRequest("silence duration must be between 1s and 30d")
        site = await self.store.node_site(node)
        until = time.time() + duration_s
        cmd = self.signer.make(
            node=node, site=site, name=SILENCE, args={"duration_s": duration_s, "until": until, "by": actor}
        )
        await self.store.issue_command(cmd, actor, "silence", silence_until=until)
        await self.bus.publish(cmd)
        return cmd

    async def resolve_escalation(self, escalation_id: int, actor: str) -> None:
        await self.store.resolve_escalation(escalation_id, actor)

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
        }

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


def make_signer(settings: CoordinatorSettings) -> CommandSigner:
    key = load_or_create_private_key(settings.key_path)
    return CommandSigner(key, issuer=key_id(key.public_key()), ttl_s=settings.signing.command_ttl_s)


@contextlib.asynccontextmanager
async def _maybe_embedded(settings: CoordinatorSettings) -> AsyncIterator[tuple[str, int]]:
    if settings.embedded_broker:
        host, port = parse_listen(settings.mqtt.embedded_listen)
        async with embedded_broker(host, port):
            yield host, port
    else:
        yield settings.mqtt.host, settings.mqtt.port


async def serve(settings: CoordinatorSettings) -> None:
    """Run one coordinator replica until cancelled."""
    from coordinator.web.app import run_web  # noqa: PLC0415 - aiohttp only when serving

    signer = make_signer(settings)
    store = await open_store(settings.store_url, settings.store, settings.budget, replica=settings.replica_id)
    try:
        async with _maybe_embedded(settings) as (host, port):
            coord = Coordinator(settings, store, signer, mqtt_host=host, mqtt_port=port)
            log.info(
                "coordinator starting",
                replica=coord.replica,
                store=store.db.dialect.name,
                mqtt=f"{host}:{port}",
                embedded_broker=settings.embedded_broker,
                signing_key_id=signer.issuer,
                public_key=public_key_text(signer.public_key),
            )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(coord.bus.run(), name="mqtt-bus")
                tg.create_task(coord.prune_loop(), name="store-prune")
                if settings.web.enabled:
                    tg.create_task(run_web(coord), name="web")
    finally:
        await store.close()


__all__ = ["Coordinator", "NotFound", "make_signer", "serve"]
