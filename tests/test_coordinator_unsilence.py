"""Silence and unsilence a node through the JSON API and `heald fleet`, against a real coordinator
process and a real broker: the signed commands reach the node's topic in order, the store's
``silenced_until`` goes back to 0 and the node list no longer shows the node silenced."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import urllib.request
from collections.abc import Iterator

import aiomqtt
import pytest
from broker import Broker, default_config
from test_coordinator_api import fleet, login, post

from agent.wire import Command, CommandName, decode_command
from agent.wire.signing import CommandVerifier, load_private_key
from devtools.coordinator_proc import CoordinatorProcess, free_port, write_config
from devtools.fleet_sim import SimNode, publish

pytestmark = pytest.mark.slow

NODE_B = "/api/nodes/us-b"


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(default_config(), tmp_path_factory.mktemp("mosq"), free_port())
    b.start()
    yield b
    b.kill()


@pytest.fixture(scope="module")
def coordinator(
    module_broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CoordinatorProcess]:
    port = free_port()
    config = write_config(tmp_path_factory.mktemp("coord"), mqtt_port=module_broker.port, web_port=port)
    proc = CoordinatorProcess(config, port)
    proc.start()
    asyncio.run(seed(module_broker.port))
    proc.wait_for(lambda c: c.api("GET", "/api/nodes")[1]["total"] == 2, timeout=20)
    yield proc
    proc.stop()


async def seed(port: int) -> None:
    async with aiomqtt.Client("127.0.0.1", port) as client:
        for n in (SimNode("us-a", site="lab"), SimNode("us-b", site="edge")):
            for m in (n.birth(), n.status(), n.risk(0.2)):
                await publish(client, m)
    await asyncio.sleep(0.1)  # let paho close its socket before asyncio.run() closes the loop


def stored_silence(c: CoordinatorProcess, node: str) -> float:
    """``nodes.silenced_until`` as the database holds it (not as the API renders it)."""
    with sqlite3.connect(c.config.parent / "state" / "coordinator.db") as db:
        (until,) = db.execute("SELECT silenced_until FROM nodes WHERE node = ?", (node,)).fetchone()
    return float(until)


def silenced_nodes(c: CoordinatorProcess) -> list[str]:
    status, body = c.api("GET", "/api/nodes?state=silenced")
    assert status == 200, body
    return [n["node"] for n in body["items"]]


def test_silence_then_unsilence_through_the_api(
    coordinator: CoordinatorProcess, module_broker: Broker
) -> None:
    c = coordinator
    key = load_private_key(c.config.parent / "state" / "command-key.pem").public_key()

    async def operate_and_receive() -> list[Command]:
        got: list[Command] = []
        async with aiomqtt.Client("127.0.0.1", module_broker.port) as client:
            await client.subscribe("heald/v1/edge/us-b/cmd", qos=1)
            status, body = await asyncio.to_thread(c.api, "POST", f"{NODE_B}/silence", {"duration_s": 900})
            assert status == 200, body
            assert body["until"] > time.time() + 800
            assert await asyncio.to_thread(silenced_nodes, c) == ["us-b"]
            assert (await asyncio.to_thread(c.api, "GET", NODE_B))[1]["silenced_until"] == body["until"]
            status, body = await asyncio.to_thread(c.api, "POST", f"{NODE_B}/unsilence")
            assert status == 200, body
            assert set(body) == {"ok", "command_id", "node"}
            assert body["node"] == "us-b"
            async with asyncio.timeout(10):
                async for msg in client.messages:
                    assert isinstance(msg.payload, bytes)
                    got.append(decode_command(msg.payload))
                    if len(got) == 2:
                        break
        await asyncio.sleep(0.1)  # let paho close its socket before asyncio.run() closes the loop
        return got

    silence, unsilence = asyncio.run(operate_and_receive())
    verifier = CommandVerifier([key], node="us-b", site="edge")
    for cmd in (silence, unsilence):
        verifier.verify(cmd)  # signed by the coordinator, for this node, fresh, not replayed
    assert (silence.name, unsilence.name) == (CommandName.SILENCE, CommandName.UNSILENCE)
    assert unsilence.args["by"] == silence.args["by"]
    assert unsilence.args["by"].startswith("token:")

    assert stored_silence(c, "us-b") == 0.0
    assert c.api("GET", "/api/nodes/us-b")[1]["silenced_until"] == 0.0
    assert silenced_nodes(c) == []
    commands = c.api("GET", "/api/nodes/us-b/commands")[1]["items"]
    assert [x["name"] for x in commands][:2] == ["unsilence", "silence"]  # newest first
    assert commands[0]["id"] == unsilence.id
    audit = c.api("GET", "/api/nodes/us-b/audit")[1]["items"]
    assert [a["action"] for a in audit][:2] == ["unsilence", "silence"]
    assert audit[0]["detail"]["command"] == unsilence.id

    # a node that is not silenced can be unsilenced (the node's ack says there was nothing to lift)
    assert c.api("POST", "/api/nodes/us-b/unsilence")[0] == 200
    assert stored_silence(c, "us-b") == 0.0
    # an unknown node, no credentials, a session without its CSRF token
    assert c.api("POST", "/api/nodes/nope/unsilence")[0] == 404
    assert c.api("POST", "/api/nodes/us-b/unsilence", token=None)[0] == 401
    opener, csrf = login(c)
    assert post(opener, c.url + "/api/nodes/us-b/unsilence", {}) == 403
    assert post(opener, c.url + "/api/nodes/us-b/unsilence", {"X-CSRF-Token": csrf}) == 200
    with opener.open(urllib.request.Request(c.url + "/api/audit")) as resp:  # noqa: S310 - local test URL
        actors = [a["actor"] for a in json.loads(resp.read())["items"] if a["action"] == "unsilence"]
    assert actors[0].startswith("operator@")


def test_silence_then_unsilence_through_heald_fleet(coordinator: CoordinatorProcess) -> None:
    c = coordinator
    silenced = fleet(c, "silence", "us-a", "15m")
    assert silenced.returncode == 0, silenced.stderr
    assert silenced.stdout.startswith("silenced us-a until ")
    assert stored_silence(c, "us-a") > time.time() + 800
    assert "us-a" in silenced_nodes(c)
    show = fleet(c, "show", "us-a")
    line = next(x for x in show.stdout.splitlines() if x.startswith("silenced until"))
    assert line.split(maxsplit=2)[2][:2] == "20"  # a date, e.g. 2026-12-05 10:00:00

    lifted = fleet(c, "unsilence", "us-a")
    assert lifted.returncode == 0, lifted.stderr
    assert lifted.stdout.startswith("lifted the silence on us-a: signed command ")
    assert stored_silence(c, "us-a") == 0.0
    assert "us-a" not in silenced_nodes(c)
    show = fleet(c, "show", "us-a")
    assert next(x for x in show.stdout.splitlines() if x.startswith("silenced until")).split()[-1] == "-"
    as_json = fleet(c, "--json", "unsilence", "us-a")
    assert as_json.returncode == 0, as_json.stderr
    body = json.loads(as_json.stdout)
    assert body["ok"] is True
    assert body["node"] == "us-a"
    assert json.loads(fleet(c, "unsilence", "us-a", "--json").stdout)["command_id"] != body["command_id"]
    missing = fleet(c, "unsilence", "nope")
    assert missing.returncode == 2
    assert "no node 'nope'" in missing.stderr
    assert fleet(c, "unsilence").returncode == 2  # NODE is required

    helped = " ".join(fleet(c, "--help").stdout.split())
    assert "silence pause ALL automatic remediation on a node for DURATION (90s, 15m, 2h, 1d)" in helped
    assert "unsilence lift a node's silence" in helped
    assert "escalations" not in helped
    assert "pause ALL automatic remediation" in " ".join(fleet(c, "silence", "--help").stdout.split())

