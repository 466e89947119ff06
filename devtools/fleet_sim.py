"""Simulated nodes speaking the real wire protocol (tests, the ingest benchmark, demos).

A :class:`SimNode` builds real :mod:`agent.wire` messages with its own increasing ``seq``, as
one incarnation of its node (a new ``SimNode`` for the same name is a new incarnation, as an agent
with a fresh state directory would be);
:class:`SimAgent` also listens on the node's command topics, verifies each command with the real
:class:`~agent.wire.signing.CommandVerifier`, acknowledges it, and plays the agent's side of
approvals and leases (an approved or leased remediation runs and reports its outcome).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import WireError
from agent.wire import (
    PROTOCOL_VERSION,
    AckStatus,
    Action,
    Birth,
    Command,
    CommandAck,
    CommandName,
    Contribution,
    Event,
    Forecast,
    Message,
    Metrics,
    MetricSample,
    RequestEvent,
    Risk,
    Status,
    command_topics,
    decode_command,
    delivery_for,
    encode,
    topic_of,
)
from agent.wire.signing import CommandRejected, CommandVerifier


@dataclass
class SimNode:
    node: str
    site: str = "lab"
    labels: dict[str, str] = field(default_factory=dict)
    bdseq: int = 0
    seq: int = 0
    inc: str = field(default_factory=lambda: secrets.token_hex(8))

    def _env(self) -> dict[str, Any]:
        self.seq += 1
        return {
            "v": PROTOCOL_VERSION,
            "node": self.node,
            "site": self.site,
            "seq": self.seq,
            "ts": time.time(),
            "inc": self.inc,
        }

    def birth(self, version: str = "0.1.0") -> Birth:
        self.bdseq += 1
        return Birth(
            **self._env(),
            bdseq=self.bdseq,
            agent_version=version,
            model_version="m1",
            labels=self.labels,
            hostname=f"{self.node}.example",
            collectors=["cpu", "memory"],
        )

    def status(self, state: Literal["online", "offline"] = "online", reason: str = "") -> Status:
        return Status(**self._env(), state=state, bdseq=self.bdseq, reason=reason)

    def metrics(self, n: int = 1, cpu: float | None = None) -> Metrics:
        now = time.time()
        samples = [
            MetricSample(
                seq=self.seq * 10 + i,
                wall=now - (n - 1 - i),
                mono=time.monotonic(),
                metrics={
                    "cpu.util": cpu if cpu is not None else 20 + (i * 7) % 30,
                    "mem.used_pct": 40.0 + i % 5,
                    "disk.root.used_pct": 61.0,
                },
            )
            for i in range(n)
        ]
        return Metrics(**self._env(), samples=samples)

    def risk(self, anomaly: float, alert: bool | None = None) -> Risk:
        alert = anomaly >= 1.0 if alert is None else alert
        return Risk(
            **self._env(),
            sample_seq=self.seq,
            anomaly=anomaly,
            alert=alert,
            cold=False,
            model_version="m1",
            explanation=[Contribution("cpu.util", 0.62), Contribution("mem.used_pct", 0.21)],
            failure={"oom": 0.4} if alert else {},
            forecasts=[Forecast(resource="disk.root", eta_s=7200.0, confidence=0.8, rate_per_s=0.001)],
        )

    def event(
        self, name: str, labels: dict[str, str] | None = None, message: str = "", value: float | None = None
    ) -> Event:
        return Event(
            **self._env(),
            name=name,
            source="sim",
            wall=time.time(),
            labels=labels or {},
            message=message,
            value=value,
        )

    def action(
        self,
        run_id: str,
        playbook: str,
        phase: Literal["started", "finished"],
        outcome: Literal["ok", "failed", "skipped", "timeout", "refused"] | None = None,
        *,
        action: str = "restart_service",
        dry_run: bool = False,
    ) -> Action:
        return Action(
            **self._env(),
            phase=phase,
            run_id=run_id,
            playbook=playbook,
            step="restart",
            action=action,
            dry_run=dry_run,
            outcome=outcome,
            duration_s=0.4 if phase == "finished" else None,
        )

    def ack(self, command_id: str, status: AckStatus, message: str = "") -> CommandAck:
        return CommandAck(**self._env(), command_id=command_id, status=status, message=message)


async def publish(client: aiomqtt.Client, message: Message) -> None:
    d = delivery_for(message)
    await client.publish(topic_of(message), encode(message), qos=d.qos, retain=d.retain)


class SimAgent:
    """A simulated node connected to the broker that verifies and answers commands."""

    def __init__(self, node: SimNode, host: str, port: int, public_key: Ed25519PublicKey) -> None:
        self.node = node
        self.host = host
        self.port = port
        self.verifier = CommandVerifier([public_key], node=node.node, site=node.site)
        self.accepted: list[Command] = []
        self.rejected: list[str] = []
        self.client: aiomqtt.Client | None = None
        self.subscribed = asyncio.Event()

    async def send(self, message: Message) -> None:
        if self.client is None:
            raise RuntimeError("SimAgent.send before run() connected")
        await publish(self.client, message)

    async def run(self) -> None:
        n = self.node
        will_status = Status(
            v=PROTOCOL_VERSION,
            node=n.node,
            site=n.site,
            seq=n.seq + 1,
            ts=time.time(),
            inc=n.inc,
            state="offline",
            bdseq=n.bdseq + 1,
            reason="connection lost",
        )
        n.seq += 1
        will = aiomqtt.Will(topic_of(will_status), encode(will_status), qos=1, retain=True)
        async with aiomqtt.Client(
            self.host, self.port, identifier=f"sim-{n.node}-{secrets.token_hex(3)}", will=will
        ) as client:
            self.client = client
            for topic in command_topics(n.site, n.node):
                await client.subscribe(topic, qos=1)
            self.subscribed.set()
            await self.send(n.birth())
            await self.send(n.status("online"))
            async for msg in client.messages:
                if isinstance(msg.payload, bytes):
                    await self._on_command(msg.payload)

    async def _on_command(self, payload: bytes) -> None:
        try:
            cmd = self.verifier.verify(decode_command(payload))
        except CommandRejected as exc:
            self.rejected.append(exc.reason)
            return
        except WireError:
            self.rejected.append("malformed")
            return
        self.accepted.append(cmd)
        await self.send(self.node.ack(cmd.id, "accepted"))
        if cmd.name in (CommandName.APPROVE, CommandName.LEASE_GRANT):
            run_id = str(cmd.args.get("run_id") or cmd.id)
            playbook = str(cmd.args.get("playbook", "?"))
            await self.send(self.node.action(run_id, playbook, "started"))
            await asyncio.sleep(0.2)
            await self.send(self.node.action(run_id, playbook, "finished", "ok"))
        await self.send(self.node.ack(cmd.id, "done"))

    async def request_approval(self, request_id: str, playbook: str, action: str = "restart_service") -> None:
        await self.send(
            self.node.event(
                RequestEvent.APPROVAL_REQUEST,
                {"request_id": request_id, "run_id": request_id, "playbook": playbook, "action": action},
                message=f"{playbook} wants to {action}",
            )
        )

    async def request_lease(self, request_id: str, playbook: str) -> None:
        await self.send(
            self.node.event(
                RequestEvent.LEASE_REQUEST,
                {"request_id": request_id, "run_id": request_id, "playbook": playbook},
                value=300.0,
            )
        )
