"""`silence` then `unsilence` into a real `heald run` over a real broker: both acknowledged `done`,
and the node's automatic playbook runs really are held by the one and resume after the other.

The playbook fires as soon as a process of a name only this test starts exists; it touches a
marker file (in the test's own directory), so what it does on the host is nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_runtime_commands import Broker

from agent import wire
from agent.wire import signing

pytestmark = pytest.mark.slow

WORKER = "heald-unsil-wk"  # the process whose appearance triggers the playbook

PLAYBOOK = """
name: worker-appeared
description: touch a marker when the test's worker runs
mode: enforce
trigger:
  metric: "proc.count[{worker}]"
  op: ">="
  value: 1
steps:
  - action: run_command
    params: {{argv: ["/usr/bin/touch", "{marker}"]}}
    timeout: 10s
verify: {{settle: 0s}}
guards: {{cooldown: 1h}}
"""


class MetricsBroker(Broker):
    """The stand-in coordinator of test_runtime_commands, also keeping the node's metric samples."""

    def __init__(self, port: int) -> None:
        self.samples: list[dict[str, float]] = []
        super().__init__(port)

    def _handle(self, msg: mqtt.MQTTMessage) -> None:
        super()._handle(msg)
        try:
            m = wire.decode(msg.payload)
        except wire.WireError:
            return
        if isinstance(m, wire.Metrics):
            with self.lock:
                self.samples.extend(dict(s.metrics) for s in m.samples)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def node(tmp_path: Path, mosquitto: Any) -> Iterator[tuple[signing.CommandSigner, MetricsBroker, Path]]:
    key = Ed25519PrivateKey.generate()
    signer = signing.CommandSigner(key, issuer="test-coordinator")
    marker = tmp_path / "marker"
    pbdir = tmp_path / "playbooks.d"
    pbdir.mkdir()
    (pbdir / "worker.yaml").write_text(PLAYBOOK.format(worker=WORKER, marker=marker))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[node]
id = "n1"
site = "lab"
[paths]
state_dir = "{tmp_path / 'state'}"
[collect.gpu]
enabled = false
[collect.processes]
interval_s = 1.0
watch = ["{WORKER}"]
[mqtt]
enabled = true
port = {mosquitto.port}
metrics_interval_s = 1.0
[playbooks]
dirs = ["{pbdir}"]
load_shipped = false
[coordinator]
public_keys = ["{signing.public_key_text(key.public_key())}"]
""")
    log = (tmp_path / "agent.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    broker = MetricsBroker(mosquitto.port)
    broker.signer = signer  # grants the run_command step's lease
    try:
        deadline = time.monotonic() + 30  # until the agent's command subscription is in place
        probe = signer.make(node="n1", site="lab", name=wire.CommandName.STATUS)
        while time.monotonic() < deadline:
            broker.send(probe)
            with broker.lock:
                if any(a.command_id == probe.id for a in broker.acks):
                    break
            time.sleep(0.5)
        yield signer, broker, marker
    finally:
        broker.close()
        proc.kill()
        proc.wait(timeout=10)
        log.close()


def test_silence_holds_automatic_runs_until_unsilence(
        node: tuple[signing.CommandSigner, MetricsBroker, Path], tmp_path: Path) -> None:
    signer, broker, marker = node
    silence = signer.make(node="n1", site="lab", name=wire.CommandName.SILENCE, args={"duration_s": 600})
    broker.send(silence)
    acks = broker.acks_for(silence.id, n=2)
    assert [a.status for a in acks] == ["accepted", "done"]
    assert acks[1].message.startswith("automatic playbook runs held until")

    exe = tmp_path / WORKER
    exe.symlink_to(sys.executable)
    worker = subprocess.Popen([str(exe), "-c", "import time; time.sleep(120)"])
    try:
        # the trigger holds (the node reports the worker) and yet nothing runs while silenced
        def worker_seen() -> bool:
            with broker.lock:
                return sum(1 for s in broker.samples if s.get(f"proc.count[{WORKER}]", 0) >= 1) >= 3
        wait_for("the node to report the worker", worker_seen)
        time.sleep(1.5)
        assert not marker.exists()
        with broker.lock:
            # (the engine may record the run as held, reason silenced: no run starts either way)
            started = [a for a in broker.actions if a.playbook == "worker-appeared"]
            assert [(a.result.get("type"), a.result.get("reason")) for a in started
                    if a.result.get("type") != "held" or a.result.get("reason") != "silenced"] == []

        unsilence = signer.make(node="n1", site="lab", name=wire.CommandName.UNSILENCE, args={"by": "op"})
        broker.send(unsilence)
        acks = broker.acks_for(unsilence.id, n=2)
        assert [a.status for a in acks] == ["accepted", "done"]
        assert acks[1].message.startswith("silence lifted")
        assert acks[1].result["was_silenced"] is True
        assert acks[1].result["was_until"] > time.time() + 500
        # the hold is gone: the playbook's own trigger starts the run
        wait_for("the automatic run after unsilence", marker.exists)
    finally:
        worker.kill()
        worker.wait(timeout=10)

    # nothing to lift now: still done, and the ack says so
    again = signer.make(node="n1", site="lab", name=wire.CommandName.UNSILENCE)
    broker.send(again)
    acks = broker.acks_for(again.id, n=2)
    assert [a.status for a in acks] == ["accepted", "done"]
    assert acks[1].message == "the node was not silenced: nothing to lift"
    assert acks[1].result == {"was_silenced": False}
