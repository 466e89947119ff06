"""Persistent sessions and broker persistence (issue 18, item 3), end to end and counted at the store.

A real mosquitto with the persistence docs/mqtt-tls-acl.md tells operators to enable, a real
coordinator process and a real ``heald run`` agent, both with their default ``[mqtt]`` settings.
The agent reports QoS 1 all the time: risk about every second, and the actions and escalation
events of a playbook that keeps restarting a worker which exits after two seconds. The broker is restarted
several times under it, then the coordinator is stopped for a while and started again.

What the broker acknowledged to the agent is read from the agent's own spool (every record it
ever submitted, and the cursor of what the broker acknowledged); what the coordinator stored is
read from its SQLite database. With persistent sessions, nothing acknowledged is missing from the
store and nothing is stored twice. The old default (clean sessions) loses what the agent sends
while the coordinator is away.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from broker import Broker, BrokerFactory, default_config

from agent.report.segment import scan
from devtools.coordinator_proc import REPO_ROOT, CoordinatorProcess, free_port, write_config

pytestmark = pytest.mark.slow

NODE = "sess-a"
WORKER = "heald-sess-wk"  # exits after 2 s; the agent's playbook starts it again, every time
PLAYBOOK = """
name: keep-worker
description: keep the worker running
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
    params: {{name: {worker}, argv: ["{exe}", "2"]}}
    timeout: 10s
verify:  # never holds: every run is escalated, so each restart also sends an escalation event
  settle: 0s
  expect: {{metric: "proc.count[{worker}]", op: "<", value: 0}}
guards:
  cooldown: 0s
  max_runs: {{count: 10000, window: 1h}}
  breaker: {{failures: 10000, reset_after: 1h}}
escalate: {{event: sess.worker.escalated, severity: info, message: "worker restarted"}}
"""
#: The QoS 1 kinds the agent spools, and the coordinator's table for each (keyed by node, seq).
TABLES = {"risk": "risk", "event": "events", "action": "actions", "command_ack": "acks"}


@dataclass
class Count:
    acknowledged: int  # QoS 1 reports the broker acknowledged to the agent
    stored: int  # ... of which the coordinator stored
    lost: list[tuple[str, int]]  # (kind, seq) acknowledged but not stored
    duplicates: int  # rows stored more than once for one (node, seq)
    by_kind: dict[str, int]


def agent_config(directory: Path, port: int) -> Path:
    playbooks = directory / "playbooks.d"
    playbooks.mkdir(parents=True)
    exe = directory / WORKER
    exe.symlink_to("/bin/sleep")
    (playbooks / "keep-worker.yaml").write_text(PLAYBOOK.format(worker=WORKER, exe=exe))
    path = directory / "agent.toml"
    path.write_text(
        f'[node]\nid = "{NODE}"\nsite = "lab"\n'
        f'[paths]\nstate_dir = "{directory / "state"}"\nruntime_dir = "{directory / "run"}"\n'
        f'[collect.gpu]\nenabled = false\n[collect.processes]\ninterval_s = 1.0\nwatch = ["{WORKER}"]\n'
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\nmetrics_interval_s = 1.0\n'
        f'[playbooks]\ndirs = ["{playbooks}"]\nload_shipped = false\n[log]\nformat = "json"\n'
    )
    return path


@contextlib.contextmanager
def heald_run(config: Path, log_path: Path,
              env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO_ROOT,
                                env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)) | (env or {}))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(15)
        for entry in Path("/proc").iterdir():  # the worker, if the agent left one running
            with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
                if (entry / "cmdline").read_bytes().split(b"\0")[0].decode() == str(config.parent / WORKER):
                    os.kill(int(entry.name), signal.SIGKILL)


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the agent did not stop on SIGTERM") from None


def acknowledged(state_dir: Path) -> dict[str, set[int]]:
    """The QoS 1 reports the broker acknowledged to the (stopped) agent: every spooled record up to
    the spool's cursor."""
    spool = state_dir / "spool"
    acked = int(json.loads((spool / "cursor").read_text())["acked_seq"])
    out: dict[str, set[int]] = {kind: set() for kind in TABLES}
    for segment in sorted(spool.glob("*.seg")):
        for _, seq, kind, _ in scan(segment.read_bytes()).records:
            if kind in TABLES and seq <= acked:
                out[kind].add(seq)
    return out


def stored(db: Path) -> tuple[dict[str, set[int]], int]:
    """(node, seq) rows per kind in the coordinator's store, and how many are there twice."""
    out: dict[str, set[int]] = {}
    duplicates = 0
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for kind, table in TABLES.items():
            rows = [r[0] for r in conn.execute(f"SELECT seq FROM {table} WHERE node = ?", (NODE,))]  # noqa: S608 - our table names
            out[kind] = set(rows)
            duplicates += len(rows) - len(out[kind])
    return out, duplicates


def count(state_dir: Path, db: Path, *, settle_s: float) -> Count:
    """Compare, waiting up to ``settle_s`` for the coordinator to store what it still has queued."""
    want = acknowledged(state_dir)
    deadline = time.monotonic() + settle_s
    while True:
        have, duplicates = stored(db)
        lost = sorted((kind, seq) for kind, seqs in want.items() for seq in seqs - have[kind])
        if not lost or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    total = sum(len(s) for s in want.values())
    return Count(total, total - len(lost), lost, duplicates, {k: len(v) for k, v in want.items()})


def online(c: CoordinatorProcess) -> object:
    status, body = c.api("GET", f"/api/nodes/{NODE}")
    return status == 200 and body.get("online")


def scenario(broker: Broker, tmp_path: Path, *, clean: bool) -> Count:
    """Four broker restarts (SIGTERM: a persistent mosquitto saves its sessions and queues), then
    the coordinator away for five seconds, while the agent reports; counted once it has stopped."""
    web = free_port()
    config = write_config(tmp_path / "coord", mqtt_port=broker.port, web_port=web)
    if clean:
        config.write_text(config.read_text().replace("[mqtt]\n", "[mqtt]\nclean_start = true\n"))
    coord = CoordinatorProcess(config, web)
    coord.start()
    try:
        cfg = agent_config(tmp_path / "agent", broker.port)
        with heald_run(cfg, tmp_path / "agent.log", {"HEALD_MQTT__CLEAN_START": "true"} if clean else None) \
                as agent:
            coord.wait_for(online, timeout=60)
            for _ in range(4):
                time.sleep(4)
                broker.stop()
                time.sleep(1)
                broker.start()
            time.sleep(4)
            coord.stop()
            time.sleep(5)
            coord.start()
            time.sleep(4)
            stop_agent(agent)
        return count(tmp_path / "agent" / "state", tmp_path / "coord" / "state" / "coordinator.db",
                     settle_s=5 if clean else 30)
    finally:
        coord.stop()


@pytest.mark.exclusive  # a quiet host: see tests/exclusive.py
def test_persistent_sessions_lose_nothing_across_broker_and_coordinator_restarts(
        mosquitto_factory: BrokerFactory, tmp_path: Path) -> None:
    """The defaults: persistent sessions on both sides, and a broker with persistence."""
    broker = mosquitto_factory(default_config(persistence=True))
    result = scenario(broker, tmp_path, clean=False)
    print(f"persistent sessions: {result}")  # the figures for the record (pytest -s)
    assert result.acknowledged > 40, result
    assert result.by_kind["event"] > 5, result
    assert result.by_kind["action"] > 5, result
    assert result.lost == [], f"{len(result.lost)} of {result.acknowledged} lost: {result.lost[:20]}"
    assert result.duplicates == 0
    log = broker.log_text()
    # both connect with MQTT 5 (p5) and without clean start (c0): persistent sessions
    assert f"as heald-lab-{NODE} (p5, c0, k30)" in log
    assert "as heald-coordinator-r1 (p5, c0, k30)" in log
    assert broker.starts == 5


@pytest.mark.exclusive  # a quiet host: see tests/exclusive.py
def test_clean_sessions_lose_reports(mosquitto: Broker, tmp_path: Path) -> None:
    """The old default, for contrast, in the same scenario: clean sessions and a broker without
    persistence. At least what the broker acknowledged while the coordinator was away (five
    seconds of risk, actions and events) went nowhere."""
    result = scenario(mosquitto, tmp_path, clean=True)
    print(f"clean sessions: {result}")  # the figures for the record (pytest -s)
    assert len(result.lost) >= 3, result
    assert result.duplicates == 0
    assert "as heald-coordinator-r1 (p5, c1, k30)" in mosquitto.log_text()
