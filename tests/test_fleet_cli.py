"""``heald fleet`` against a real coordinator process, a real mosquitto and a simulated node that
verifies the signed commands: exit codes of ``fleet run`` (the node's answer decides them), the
help of ``fleet silence``, open escalations and stale nodes in ``fleet ls``, an approval's target in
``fleet show``, and error lines with one program prefix."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import Broker

from agent.wire import CommandName, RequestEvent
from agent.wire.signing import CommandRejected, load_private_key
from devtools.coordinator_proc import REPO_ROOT, TOKEN, CoordinatorProcess, free_port, write_config
from devtools.fleet_sim import SimAgent, SimNode

pytestmark = pytest.mark.slow

#: The playbooks the simulated node has; anything else it answers as the real dispatcher does.
PLAYBOOKS = frozenset({"restart-nginx"})


class PlaybookAgent(SimAgent):
    """A simulated node that knows its playbooks: an unknown one is answered like
    ``agent.control.dispatcher`` answers it (``rejected: no playbook named '...'``)."""

    async def _on_command(self, payload: bytes) -> None:
        from agent.wire import decode_command  # noqa: PLC0415

        try:
            cmd = self.verifier.verify(decode_command(payload))
        except CommandRejected as exc:
            self.rejected.append(exc.reason)
            return
        playbook = str(cmd.args.get("playbook", ""))
        if cmd.name == CommandName.RUN_PLAYBOOK and playbook not in PLAYBOOKS:
            await self.send(self.node.ack(cmd.id, "rejected", f"no playbook named '{playbook}'"))
            return
        self.accepted.append(cmd)
        await self.send(self.node.ack(cmd.id, "accepted"))
        await self.send(self.node.ack(cmd.id, "done", f"{cmd.name}: run r-1 started"))


@pytest.fixture
def coord(mosquitto: Broker, tmp_path: Path) -> Iterator[CoordinatorProcess]:
    port = free_port()
    proc = CoordinatorProcess(write_config(tmp_path, mqtt_port=mosquitto.port, web_port=port), port)
    proc.start()
    yield proc
    proc.stop()


def fleet(coord: CoordinatorProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HEALD_COORDINATOR_URL=coord.url,
               HEALD_COORDINATOR_TOKEN=TOKEN)
    return subprocess.run([sys.executable, "-m", "agent", "fleet", *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=90, check=False)


async def _in_thread(coord: CoordinatorProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(fleet, coord, *args)


def test_silence_help_says_it_pauses_all_automatic_remediation() -> None:
    help_text = subprocess.run([sys.executable, "-m", "agent", "fleet", "silence", "--help"],
                               capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=True).stdout
    flat = " ".join(help_text.split())
    assert "pause ALL automatic remediation" in flat
    assert "escalation" not in flat.lower()


def test_error_lines_have_one_program_prefix() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEALD_COORDINATOR")}
    bad = subprocess.run([sys.executable, "-m", "agent", "fleet", "--fleet-config", "/dev/null", "ls"],
                         capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=60, check=False)
    assert bad.returncode == 2
    assert bad.stderr.startswith("heald: fleet: [--token] no API token"), bad.stderr
    assert "heald: heald" not in bad.stderr


@pytest.mark.asyncio
async def test_fleet_run_ls_show(coord: CoordinatorProcess, mosquitto: Broker) -> None:
    key = load_private_key(coord.config.parent / "state" / "command-key.pem").public_key()
    web = PlaybookAgent(SimNode("cli-web", site="lab"), "127.0.0.1", mosquitto.port, key)
    old = SimAgent(SimNode("cli-old", site="lab"), "127.0.0.1", mosquitto.port, key)
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(a.run(), name=f"sim-{a.node.node}") for a in (web, old)]
        try:
            for a in (web, old):
                await asyncio.wait_for(a.subscribed.wait(), 10)
            # run: the node's answer decides the exit code
            unknown = await _in_thread(coord, "run", "cli-web", "no-such-playbook")
            assert unknown.returncode == 2, (unknown.stdout, unknown.stderr)
            assert "no-such-playbook" in unknown.stderr
            assert "cli-web" in unknown.stderr
            assert unknown.stderr.count("heald:") == 1
            assert "heald: heald" not in unknown.stderr
            known = await _in_thread(coord, "--json", "run", "cli-web", "restart-nginx")
            assert known.returncode == 0, known.stderr
            assert json.loads(known.stdout)["status"] == "done"
            await old.send(old.node.risk(1.6))
            await old.send(old.node.status("offline", "connection lost"))
            silent = PlaybookAgent(SimNode("cli-gone", site="lab"), "127.0.0.1", mosquitto.port, key)
            t0 = time.monotonic()
            # a node that never answers (it never connected): exit 1 after --wait, not a silent 0
            await coord_node(coord, web, silent)
            no_answer = await _in_thread(coord, "run", "cli-gone", "restart-nginx", "--wait", "2")
            assert no_answer.returncode == 1, no_answer.stderr
            assert "no answer from cli-gone within 2s" in no_answer.stderr
            assert time.monotonic() - t0 < 30
            fire_and_forget = await _in_thread(coord, "run", "cli-gone", "restart-nginx", "--wait", "0")
            assert fire_and_forget.returncode == 0, fire_and_forget.stderr

            # open escalations and the approval's target
            await web.send(web.node.event("playbook.escalated",
                                          {"playbook": "restart-nginx", "run_id": "r-9"},
                                          message="restart-nginx gave up after 3 tries"))
            await web.send(web.node.event(
                RequestEvent.APPROVAL_REQUEST,
                {"request_id": "ap-1", "run_id": "ap-1", "playbook": "kill-runaway", "action": "stop_process",
                 "target": "kill-runaway[name=stress-ng,pid=4242]", "name": "stress-ng", "pid": "4242"},
                message="kill-runaway: approval needed"))
            await asyncio.to_thread(coord.wait_for,
                                    lambda c: c.api("GET", "/api/approvals")[1]["items"]
                                    and c.api("GET", "/api/escalations")[1]["items"]
                                    and not c.api("GET", "/api/nodes/cli-old")[1]["online"], 20)
            ls = await _in_thread(coord, "ls")
            assert ls.returncode == 0, ls.stderr
            lines = ls.stdout.splitlines()
            assert "ESCALATIONS" in lines[0].split()
            web_line = next(line for line in lines if line.startswith("cli-web"))
            assert "1: restart-nginx gave up after 3 tries" in web_line
            old_line = next(line for line in lines if line.startswith("cli-old"))
            assert "stale since" in old_line, old_line
            assert "ALERT" not in old_line, old_line
            assert "0 at risk, 1 open escalations" in ls.stdout
            as_json = json.loads((await _in_thread(coord, "--json", "ls")).stdout)
            by_node = {n["node"]: n for n in as_json["items"]}
            assert by_node["cli-web"]["open_escalations"] == 1
            assert by_node["cli-old"]["open_escalations"] == 0
            show = await _in_thread(coord, "show", "cli-web")
            assert show.returncode == 0, show.stderr
            assert "kill-runaway[name=stress-ng,pid=4242]" in show.stdout
            assert "open escalations:" in show.stdout
            old_show = await _in_thread(coord, "show", "cli-old")
            assert "stale since" in old_show.stdout
            assert "ALERT" not in old_show.stdout
        finally:
            for t in tasks:
                t.cancel()
    await asyncio.sleep(0.1)


async def coord_node(coord: CoordinatorProcess, *agents: SimAgent) -> None:
    """Make the coordinator know each agent's node (its birth) without connecting it."""
    sender = agents[0]
    for a in agents[1:]:
        await sender.send(a.node.birth())
        await sender.send(a.node.status("online"))

    def known(c: CoordinatorProcess) -> bool:
        return all(c.api("GET", f"/api/nodes/{a.node.node}")[0] == 200 for a in agents[1:])

    await asyncio.to_thread(coord.wait_for, known, 20)
