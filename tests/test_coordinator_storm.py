"""Remediation storm: 100 simulated agents (real wire messages over mosquitto) ask for the same
playbook at once. At most the budget gets a lease, every answer is a correctly signed command for
its own node, and exactly one fleet-level escalation is raised."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from broker import Broker

from agent.wire import Command, decode_command
from agent.wire.signing import CommandVerifier, load_private_key
from devtools.coordinator_proc import CoordinatorProcess, free_port, write_config
from devtools.fleet_sim import SimNode, publish

pytestmark = pytest.mark.slow

NODES = 100
BUDGET = {
    "max_nodes": 3,
    "max_percent": 10.0,
    "storm_share": 0.2,
    "storm_min_nodes": 3,
    "storm_window_s": 300.0,
    "lease_ttl_s": 120.0,
}


@pytest.fixture
def coord(mosquitto: Broker, tmp_path: Path) -> Iterator[CoordinatorProcess]:
    port = free_port()
    proc = CoordinatorProcess(
        write_config(tmp_path, mqtt_port=mosquitto.port, web_port=port, budget=BUDGET), port
    )
    proc.start()
    yield proc
    proc.stop()


async def storm(port: int, nodes: list[SimNode], coord: CoordinatorProcess) -> list[Command]:
    received: list[Command] = []
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe("heald/v1/storm/+/cmd", qos=1)
        for n in nodes:
            await publish(client, n.birth())
            await publish(client, n.status())
        await asyncio.to_thread(coord.wait_for, lambda c: c.api("GET", "/api/nodes")[1]["total"] == NODES)
        # every node detects the same symptom at the same moment
        await asyncio.gather(
            *(
                publish(
                    client,
                    n.event(
                        "lease_request",
                        {
                            "request_id": f"req-{n.node}",
                            "run_id": f"run-{n.node}",
                            "playbook": "restart-nginx",
                        },
                        value=60.0,
                    ),
                )
                for n in nodes
            )
        )
        async with asyncio.timeout(30):
            async for msg in client.messages:
                received.append(decode_command(msg.payload))  # type: ignore[arg-type]
                answered = {c.node for c in received if c.name in ("lease_grant", "lease_deny")}
                if len(answered) == NODES:
                    break
        # the nodes that were granted a lease act (and report it)
        for cmd in received:
            if cmd.name == "lease_grant":
                n = next(x for x in nodes if x.node == cmd.node)
                await publish(client, n.action(str(cmd.args["run_id"]), "restart-nginx", "started"))
                await publish(client, n.action(str(cmd.args["run_id"]), "restart-nginx", "finished", "ok"))
    await asyncio.sleep(0.1)
    return received


def test_storm_is_held_to_the_budget(coord: CoordinatorProcess, mosquitto: Broker) -> None:
    nodes = [SimNode(f"n{i:03d}", site="storm") for i in range(NODES)]
    commands = asyncio.run(storm(mosquitto.port, nodes, coord))
    key = load_private_key(coord.config.parent / "state" / "command-key.pem").public_key()
    for cmd in commands:  # each answer verifies for its own node (and would be refused by any other)
        CommandVerifier([key], node=cmd.node, site="storm").verify(cmd)
    decisions = {c.node: c for c in commands if c.name in ("lease_grant", "lease_deny")}
    assert len(decisions) == NODES
    granted = [c for c in decisions.values() if c.name == "lease_grant"]
    budget = min(BUDGET["max_nodes"], int(BUDGET["max_percent"] / 100 * NODES))
    assert 1 <= len(granted) <= budget
    denied = [c for c in decisions.values() if c.name == "lease_deny"]
    reasons = {str(c.args["reason"]).split(":")[0] for c in denied}
    assert reasons <= {"budget", "storm", "held"}
    assert "storm" in reasons
    assert sum(str(c.args["reason"]).startswith("held") for c in denied) >= NODES - 25

    escalations = coord.api("GET", "/api/escalations")[1]["items"]
    fleet = [e for e in escalations if e["scope"] == "fleet"]
    assert len(fleet) == 1
    assert fleet[0]["grp"] == "site:storm"
    assert fleet[0]["playbook"] == "restart-nginx"
    assert {c.args.get("escalation_id") for c in denied if "escalation_id" in c.args} == {fleet[0]["id"]}

    # no more than the budget acted
    def acted(c: CoordinatorProcess) -> object:
        rows = [c.api("GET", f"/api/nodes/{g.node}")[1] for g in granted]
        return all(r["actions"] for r in rows) and rows

    acted_nodes = coord.wait_for(acted)
    assert len(acted_nodes) <= budget
    total_actions = sum(len(coord.api("GET", f"/api/nodes/{n.node}/actions")[1]["items"]) for n in nodes)
    assert total_actions == 2 * len(granted)
    info = coord.api("GET", "/api/info")[1]
    assert info["leases"] == {"granted": len(granted), "denied": NODES - len(granted)}
