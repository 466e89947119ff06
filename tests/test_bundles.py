"""Bundles across a fleet (issue 21): publish, shadow, canary, automatic rollback, tampering.

A real mosquitto, a real coordinator process and two real ``heald run`` agents (every playbook
forced to dry-run, so nothing they decide is executed). The coordinator publishes a good playbook
set and makes it live everywhere; a bad candidate (its trigger holds on every sample) is shadowed
on both, then promoted to one node as a canary and rolled back automatically within the window;
both nodes end on the good version and the bad playbook's step never ran. A bundle whose bytes do
not match its signed hash, and one signed by a key the nodes do not trust, are refused.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Broker
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import wire
from agent.wire import bundles
from agent.wire.signing import CommandSigner, load_private_key, public_key_text
from devtools.coordinator_proc import REPO_ROOT, TOKEN, CoordinatorProcess, free_port, write_config

pytestmark = pytest.mark.slow
mqtt = pytest.importorskip("paho.mqtt.client")

RUNS = "SELECT node, dry_run, playbook FROM actions WHERE step != 'control'"  # playbook runs, not commands
ABSENT = "heald-bndl-absent"  # a watched process that never runs: proc.count[...] is 0 throughout
PLAYBOOK = """
name: {name}
description: bundle test playbook
mode: enforce
trigger:
  metric: "proc.count[{absent}]"
  op: "{op}"
  value: {value}
steps:
  - action: run_command
    params: {{argv: ["touch", "{marker}"]}}
    timeout: 5s
guards:
  cooldown: 0s
  max_runs: {{count: 100000, window: 1h}}
  breaker: {{failures: 100000, reset_after: 1h}}
"""


def playbook(name: str, op: str, value: float, marker: Path) -> str:
    return PLAYBOOK.format(name=name, absent=ABSENT, op=op, value=value, marker=marker)


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Agent:
    def __init__(self, directory: Path, node: str, port: int, key: str) -> None:
        self.dir, self.node = directory, node
        playbooks = directory / "playbooks.d"
        playbooks.mkdir(parents=True)
        (playbooks / "quiet.yaml").write_text(playbook("configured-quiet", ">", 5, directory / "never"))
        self.config = directory / "agent.toml"
        self.config.write_text(
            f'[node]\nid = "{node}"\nsite = "lab"\n'
            f'[paths]\nstate_dir = "{directory / "state"}"\nruntime_dir = "{directory / "run"}"\n'
            f'[collect.gpu]\nenabled = false\n[collect.processes]\ninterval_s = 1.0\nwatch = ["{ABSENT}"]\n'
            f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\nmetrics_interval_s = 1.0\n'
            f'[coordinator]\npublic_keys = ["{key}"]\n'
            f'[playbooks]\ndirs = ["{playbooks}"]\nload_shipped = false\nforce_mode = "dry-run"\n'
            '[log]\nformat = "json"\n')
        self.log = directory / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(self.config)], cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def active(self) -> dict[str, str]:
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads((self.dir / "state" / "bundles" / "active.json").read_text()))
        return {}


def rows(c: CoordinatorProcess, sql: str, *params: Any) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(c.config.parent / "state" / "coordinator.db", timeout=10)) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(sql, params)]


def fleet(c: CoordinatorProcess, *argv: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "agent", "fleet", "--url", c.url, f"--token={TOKEN}", "--json", "bundle",
         *argv],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.fixture
def setup(tmp_path: Path, mosquitto: Broker) -> Iterator[tuple[CoordinatorProcess, Agent, Agent]]:
    web_port = free_port()
    config = write_config(tmp_path / "coord", mqtt_port=mosquitto.port, web_port=web_port)
    c = CoordinatorProcess(config, web_port)
    c.start()
    key = public_key_text(load_private_key(c.config.parent / "state" / "command-key.pem").public_key())
    agents = (Agent(tmp_path / "a", "bndl-a", mosquitto.port, key),
              Agent(tmp_path / "b", "bndl-b", mosquitto.port, key))
    try:
        for a in agents:
            a.start()
        wait_until("both nodes online", lambda: {n["node"] for n in c.api("GET", "/api/nodes")[1]["items"]}
                   >= {"bndl-a", "bndl-b"})
        yield c, *agents
    finally:
        for a in agents:
            a.stop()
        c.stop()


def test_publish_shadow_canary_rollback_and_tampering(
        setup: tuple[CoordinatorProcess, Agent, Agent], tmp_path: Path, mosquitto: Broker) -> None:
    c, a, b = setup
    marker = tmp_path / "bad-step-ran"
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "quiet.yaml").write_text(playbook("bundle-quiet", ">", 5, marker))
    (bad / "noisy.yaml").write_text(playbook("bundle-noisy", "<", 1, marker))  # holds on every sample

    # publish + promote to the whole fleet: both nodes switch to good-1 and say so
    meta = fleet(c, "publish", str(good), "--version", "good-1", "--reason", "baseline")
    assert meta["sha256"] == bundles.digest(bundles.pack({"quiet.yaml": (good / "quiet.yaml").read_text()}))
    assert fleet(c, "promote", "good-1")["live"] == "good-1"
    wait_until("good-1 live on both", lambda: a.active().get("live") == b.active().get("live") == "good-1")
    assert fleet(c, "ls")["items"][0]["publisher"].startswith("token:")

    # the bad candidate in shadow on both: its decisions reported, none executed
    fleet(c, "publish", str(bad), "--version", "bad-2", "--reason", "alerts on everything")
    fleet(c, "shadow", "bad-2")
    wait_until("shadow decisions from both nodes", lambda: {r["node"] for r in rows(
        c, "SELECT node FROM events WHERE name = 'bundle.shadow_decision' AND labels LIKE '%bad-2%'")}
        == {"bndl-a", "bndl-b"})
    assert rows(c, RUNS) == []  # the shadow ran nothing, not even in dry-run
    fleet(c, "shadow", "off")
    wait_until("shadow off on both", lambda: a.active().get("shadow") == b.active().get("shadow") == "")

    # canary on one node; the watch rolls it back within the window
    window_s = 45.0
    started = time.time()
    state = fleet(c, "promote", "bad-2", "--node", "bndl-a", "--window", f"{window_s:g}s", "--margin", "5")
    assert state["canary"]["nodes"] == ["bndl-a"]
    auto = "SELECT * FROM audit WHERE action = 'bundle.rollback' AND actor = 'canary-watch'"
    rollback = wait_until("the automatic rollback", lambda: rows(c, auto), timeout=window_s)
    took = time.time() - started
    print(f"canary rolled back {took:.1f} s after the promote (window {window_s:g} s)")
    assert took < window_s
    assert json.loads(rollback[0]["detail"])["to"] == "good-1"
    wait_until("both back on good-1", lambda: a.active().get("live") == b.active().get("live") == "good-1")
    assert fleet(c, "ls")["state"]["canary"] is None
    ran = rows(c, RUNS)
    assert ran
    assert {r["node"] for r in ran} == {"bndl-a"}  # the candidate decided on the canary only ...
    assert all(r["dry_run"] == 1 for r in ran)  # ... in dry-run
    assert not marker.exists()  # and its step never ran
    audit = rows(c, "SELECT * FROM audit WHERE action LIKE 'bundle.%'")
    steps = [json.loads(r["detail"]).get("bundle") for r in audit]
    assert steps.count("bad-2") >= 3  # published, shadowed, canaried, rolled back: each in the audit chain

    # tampering: bytes that do not match the signed hash, and a bundle signed by an untrusted key
    key = load_private_key(c.config.parent / "state" / "command-key.pem")
    signer = CommandSigner(key)
    files = {"evil.yaml": playbook("evil", "<", 1, marker)}
    data = bundles.pack(files)
    sha = bundles.digest(data)
    tampered = bundles.pack({"evil.yaml": files["evil.yaml"].replace("touch", "rm")})
    stranger = Ed25519PrivateKey.generate()
    cases = {"evil-3": (tampered, bundles.sign(key, "evil-3", sha)),
             "evil-4": (data, bundles.sign(stranger, "evil-4", sha))}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    try:
        for version, (payload, signature) in cases.items():
            pieces = bundles.chunks(payload)
            for i, piece in enumerate(pieces):
                cmd = signer.make(node="bndl-b", site="lab", name=wire.CommandName.BUNDLE_CHUNK,
                                  args={"bundle": version, "sha256": sha, "signature": signature,
                                        "total": len(pieces), "index": i, "data": piece})
                client.publish(wire.topic_of(cmd), wire.encode(cmd), qos=1).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()
    acks = wait_until("both refusals", lambda: [r for r in rows(c, "SELECT * FROM acks WHERE node = 'bndl-b'")
                                                if "evil" in r["message"] and r["status"] == "failed"])
    wait_until("both refusals", lambda: len([r for r in rows(c, "SELECT * FROM acks WHERE status = 'failed'")
                                             if "evil-" in r["message"]]) == 2)
    text = " ".join(r["message"] for r in rows(c, "SELECT * FROM acks WHERE status = 'failed'"))
    assert "evil-3: content does not match its sha256" in text
    assert "evil-4: the signature does not verify" in text
    assert acks
    assert sorted(p.name for p in (b.dir / "state" / "bundles" / "versions").iterdir()) == ["bad-2", "good-1"]
    assert b.active()["live"] == "good-1"
