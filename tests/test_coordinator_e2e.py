"""End to end: a real mosquitto, a real coordinator process and two real agents (`python -m agent run`).

Real faults on one agent: its supervised worker is SIGKILLed and the agent's own playbook restarts
it (the action and its outcome reach the coordinator from the agent); then, once that agent's
anomaly model is fitted on its own history (cold start shortened to 20 s), CPU hogs make its real
risk reports alert. A simulated node identity additionally publishes a known risk/action pair so
that exact values (anomaly 2.4, the explanation, incident counts) can be asserted on the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from broker import Broker

from devtools.coordinator_proc import PASSWORD, REPO_ROOT, CoordinatorProcess, free_port, write_config
from devtools.fleet_sim import SimNode, publish

pytestmark = pytest.mark.slow


WORKER = "heald-e2e-wk"  # a service the agent supervises (non-systemd); killed to inject a fault

PLAYBOOK = """
name: keep-worker
description: keep the e2e worker running
mode: enforce
trigger:
  any:
    - event: proc.exited
      labels: {{name: {worker}}}
      within: 1m
    - metric: "proc.count[{worker}]"
      op: "<"
      value: 1
steps:
  - action: restart_process
    params: {{name: {worker}, argv: ["{exe}", "-c", "import time; time.sleep(3600)"]}}
    timeout: 10s
verify: {{settle: 0s}}
guards: {{cooldown: 0s, max_runs: {{count: 100, window: 1h}}}}
"""


def agent_config(directory: Path, node: str, port: int, *, supervise: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "agent.toml"
    common = (
        f'[node]\nid = "{node}"\nsite = "lab"\nlabels = {{ rack = "r1", role = "web" }}\n'
        f'[paths]\nstate_dir = "{directory / "state"}"\nruntime_dir = "{directory / "run"}"\n'
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\nmetrics_interval_s = 1.0\n'
        '[log]\nformat = "json"\n'
    )
    if not supervise:
        path.write_text(common)
        return path
    playbooks = directory / "playbooks.d"
    playbooks.mkdir(exist_ok=True)
    exe = directory / WORKER
    if not exe.exists():
        exe.symlink_to(sys.executable)
    (playbooks / "keep-worker.yaml").write_text(PLAYBOOK.format(worker=WORKER, exe=exe))
    path.write_text(
        common + f'[collect.processes]\ninterval_s = 1.0\nwatch = ["{WORKER}"]\n'
        f'[playbooks]\ndirs = ["{playbooks}"]\nload_shipped = false\n'
        # A short cold start so that the anomaly model is fitted (in a child process) within the test.
        '[model]\ncold_start_s = 20\n'
    )
    return path


def worker_pids(agent_pid: int) -> list[int]:
    """The agent's supervised worker (its child), not the other agent's."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if comm == WORKER and fields[0] != "Z" and int(fields[1]) == agent_pid:
            out.append(int(entry.name))
    return out


@pytest.fixture
def coordinator_proc(mosquitto: Broker, tmp_path: Path) -> Iterator[CoordinatorProcess]:
    port = free_port()
    proc = CoordinatorProcess(write_config(tmp_path / "coord", mqtt_port=mosquitto.port, web_port=port), port)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def agents(mosquitto: Broker, tmp_path: Path) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    procs = []
    names = ["e2e-a", "e2e-b"]
    for name in names:
        cfg = agent_config(tmp_path / name, name, mosquitto.port, supervise=name == "e2e-a")
        log = (tmp_path / f"{name}.log").open("wb")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    cwd=REPO_ROOT,
                ),
                log,
            )
        )
    yield {name: proc for name, (proc, _) in zip(names, procs, strict=True)}
    for proc, log in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
    # heald leaves the services it supervises running when it stops (an agent restart must not
    # take the workload down); the test's own worker goes with the test.
    for entry in Path("/proc").iterdir():
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, UnicodeDecodeError):
            continue
        if argv0.startswith(str(tmp_path)) and argv0.endswith(WORKER):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


async def inject_fault(port: int, node: str) -> None:
    sim = SimNode(node, site="lab")
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await publish(client, sim.risk(2.4))
        await publish(client, sim.action("fault-run-1", "restart-nginx", "started"))
        await publish(client, sim.action("fault-run-1", "restart-nginx", "finished", "ok"))
    await asyncio.sleep(0.1)  # let paho close its socket before asyncio.run() closes the loop


@pytest.mark.exclusive  # a quiet host: see tests/exclusive.py
def test_two_real_agents_and_a_fault(
    coordinator_proc: CoordinatorProcess,
    agents: dict[str, subprocess.Popen[bytes]],
    mosquitto: Broker,
    tmp_path: Path,
) -> None:
    c = coordinator_proc

    def both_online(c: CoordinatorProcess) -> object:
        status, body = c.api("GET", "/api/nodes?state=online")
        return status == 200 and {n["node"] for n in body["items"]} >= set(agents) and body

    listing = c.wait_for(both_online, timeout=60)
    row = next(n for n in listing["items"] if n["node"] == "e2e-a")
    assert row["labels"] == {"rack": "r1", "role": "web"}
    assert row["agent_version"]

    # metrics from the real agents reach the store
    c.wait_for(lambda c: c.api("GET", "/api/nodes/e2e-a/metrics?since=0")[1]["samples"], timeout=30)

    # the store itself (SQLite under the state dir)
    db = tmp_path / "coord" / "state" / "coordinator.db"
    with sqlite3.connect(db) as conn:
        stored = {r[0]: r[1] for r in conn.execute("SELECT node, online FROM nodes")}
    assert stored.get("e2e-a") == 1
    assert stored.get("e2e-b") == 1

    # the page: log in like a browser, get the dashboard and the data it renders
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    resp = opener.open(c.url + "/login", data=urllib.parse.urlencode({"secret": PASSWORD}).encode())
    page = resp.read().decode()
    assert resp.url.rstrip("/") == c.url
    assert "heald coordinator" in page
    assert "/static/app.js" in page
    nodes = json.loads(opener.open(c.url + "/api/nodes").read())
    assert {"e2e-a", "e2e-b"} <= {n["node"] for n in nodes["items"]}

    # inject a fault on a simulated third node: risk, an action and its outcome become visible
    # everywhere. (Not in a real agent's name: a report claiming e2e-a with a seq far ahead of
    # e2e-a's is quarantined, as a forged one must be: tests/test_fleet_ownership.py.)
    asyncio.run(inject_fault(mosquitto.port, "e2e-sim"))

    def fault_seen(c: CoordinatorProcess) -> object:
        status, node = c.api("GET", "/api/nodes/e2e-sim")
        return status == 200 and node["alert"] and node["actions"] and node["actions"][0]["outcome"] == "ok" \
            and node

    node = c.wait_for(fault_seen, timeout=20)
    assert node["anomaly"] == 2.4
    assert node["open_incidents"] == 1
    assert node["explanation"][0]["feature"] == "cpu.util"
    assert node["last_action"] == "restart-nginx/restart_service: ok"
    assert not c.api("GET", "/api/nodes/e2e-b")[1]["alert"]
    with sqlite3.connect(db) as conn:
        outcomes = [
            r[0] for r in conn.execute("SELECT outcome FROM actions WHERE node = 'e2e-sim' "
                                       "AND run_id = 'fault-run-1' ORDER BY id")
        ]
        risk = conn.execute("SELECT max(anomaly) FROM risk WHERE node = 'e2e-sim'").fetchone()[0]
    assert outcomes == [None, "ok"]
    assert risk == 2.4
    page_view = json.loads(opener.open(c.url + "/api/nodes?state=alert").read())
    assert [n["node"] for n in page_view["items"]] == ["e2e-sim"]

    # a real fault on the real agent: its supervised worker dies; the agent's own playbook restarts
    # it, and the decision and its outcome reach the coordinator as action messages.
    deadline = c.wait_for(lambda c: worker_pids(agents["e2e-a"].pid), timeout=30)
    (worker,) = deadline
    os.kill(worker, signal.SIGKILL)

    def real_action(c: CoordinatorProcess) -> object:
        acts = c.api("GET", "/api/nodes/e2e-a/actions")[1]
        items = acts["items"] if isinstance(acts, dict) else acts
        done = [a for a in items if a.get("playbook") == "keep-worker" and a.get("outcome") == "ok"]
        return len(done) >= 2 and done  # the start-up run and the restart after the kill

    c.wait_for(real_action, timeout=30)
    c.wait_for(lambda c: [p for p in worker_pids(agents["e2e-a"].pid) if p != worker], timeout=30)
    with sqlite3.connect(db) as conn:
        real = conn.execute("SELECT count(*) FROM actions WHERE node = 'e2e-a' "
                            "AND playbook = 'keep-worker' AND outcome = 'ok'").fetchone()[0]
        risk_rows = conn.execute("SELECT count(*) FROM risk WHERE node = 'e2e-a'").fetchone()[0]
    assert real >= 2
    assert risk_rows >= 2  # the agent's own risk reports (cold model: forecasts and probabilities)

    # a second real fault, for the model: once e2e-a's anomaly detector is fitted on its own short
    # history, CPU hogs make its real risk reports alert, with an explanation.
    def warm(c: CoordinatorProcess) -> object:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT count(*) FROM risk WHERE node = 'e2e-a' AND cold = 0 "
                                "AND model_version != 'm1'").fetchone()[0]  # m1: the simulated one

    c.wait_for(warm, timeout=120)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        def real_alert(c: CoordinatorProcess) -> object:
            with sqlite3.connect(db) as conn:
                return conn.execute("SELECT anomaly FROM risk WHERE node = 'e2e-a' AND alert = 1 "
                                    "AND cold = 0 AND model_version != 'm1'").fetchone()

        (anomaly,) = c.wait_for(real_alert, timeout=60)
        assert anomaly >= 1.0
    finally:
        for h in hogs:
            h.kill()
            h.wait()

    info = c.api("GET", "/api/info")[1]
    assert info["ingest"]["malformed_total"] == 0
    assert info["ingest"]["processed"] > 4

    # an agent that is killed goes offline through its MQTT will
    agents["e2e-b"].kill()
    agents["e2e-b"].wait()
    c.wait_for(lambda c: not c.api("GET", "/api/nodes/e2e-b")[1]["online"], timeout=90)
