"""Signed commands into a real `heald run` over a real broker: accepted, acted on, and refused."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import wire
from agent.wire import signing

pytestmark = pytest.mark.slow

PLAYBOOK = """
name: touch-marker
description: touch a marker file (manual runs only)
mode: enforce
trigger:
  metric: "cpu.util_pct"
  op: ">"
  value: 1000
steps:
  - action: run_command
    params: {{argv: ["/usr/bin/touch", "{marker}"]}}
    timeout: 10s
verify: {{settle: 0s}}
"""


class Broker:
    def __init__(self, port: int) -> None:
        self.acks: list[wire.CommandAck] = []
        self.actions: list[wire.Action] = []
        self.events: list[wire.Event] = []
        # How this stand-in coordinator answers lease requests: "grant", "deny" or None (silence).
        self.lease_answer: str | None = "grant"
        self.signer: signing.CommandSigner | None = None
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on
        self.client.suppress_exceptions = True  # a bug in _on must not kill paho's network thread
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("heald/v1/#", qos=1)
        self.client.loop_start()

    def _on(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handle(msg)
        except Exception as exc:  # noqa: BLE001 - kept for the test's own assertion message
            self.errors.append(f"{msg.topic}: {type(exc).__name__}: {exc}")

    def _handle(self, msg: mqtt.MQTTMessage) -> None:
        try:
            m = wire.decode(msg.payload)
        except wire.WireError:
            return
        with self.lock:
            if isinstance(m, wire.CommandAck):
                self.acks.append(m)
            elif isinstance(m, wire.Action):
                self.actions.append(m)
            elif isinstance(m, wire.Event):
                self.events.append(m)
                if m.name == "lease_request" and self.lease_answer and self.signer is not None:
                    args: dict[str, Any] = {"request_id": m.labels["request_id"],
                                            "playbook": m.labels["playbook"], "reason": "test"}
                    if self.lease_answer == "grant":
                        args["lease_id"] = "L1"
                    answer = self.signer.make(node=m.node, site=m.site, name=f"lease_{self.lease_answer}",
                                              args=args)
                    topic = wire.topic_for(m.site, m.node, "command")
                    self.client.publish(topic, wire.encode(answer), qos=1)

    def send(self, cmd: wire.Command) -> None:
        topic = wire.topic_for(cmd.site, cmd.node, "command")
        self.client.publish(topic, wire.encode(cmd), qos=1).wait_for_publish(timeout=10)

    def acks_for(self, command_id: str, timeout: float = 20.0, n: int = 1) -> list[wire.CommandAck]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                got = [a for a in self.acks if a.command_id == command_id]
            if len(got) >= n:
                return got
            time.sleep(0.05)
        raise AssertionError(f"no ack for {command_id}: {self.acks}; callback errors: {self.errors}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def setup(tmp_path: Path, mosquitto: Any) -> Iterator[tuple[signing.CommandSigner, Broker, Path]]:
    key = Ed25519PrivateKey.generate()
    signer = signing.CommandSigner(key, issuer="test-coordinator")
    marker = tmp_path / "marker"
    pbdir = tmp_path / "playbooks.d"
    pbdir.mkdir()
    (pbdir / "touch.yaml").write_text(PLAYBOOK.format(marker=marker))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[node]
id = "n1"
site = "lab"
[paths]
state_dir = "{tmp_path / 'state'}"
[collect.gpu]
enabled = false
[mqtt]
enabled = true
port = {mosquitto.port}
[playbooks]
dirs = ["{pbdir}"]
load_shipped = false
[coordinator]
public_keys = ["{signing.public_key_text(key.public_key())}"]
""")
    log = (tmp_path / "agent.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    broker = Broker(mosquitto.port)
    broker.signer = signer
    try:
        # Wait for the agent's birth so its command subscription is in place.
        deadline = time.monotonic() + 30
        probe = signer.make(node="n1", site="lab", name="status")
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


def test_signed_run_is_executed_and_everything_else_refused(
        setup: tuple[signing.CommandSigner, Broker, Path]) -> None:
    signer, broker, marker = setup
    cmd = signer.make(node="n1", site="lab", name="run_playbook", args={"playbook": "touch-marker"})
    broker.send(cmd)
    acks = broker.acks_for(cmd.id, n=2)
    assert [a.status for a in acks] == ["accepted", "done"]
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with broker.lock:
            if any(a.playbook == "touch-marker" and a.phase == "finished" for a in broker.actions):
                break
        time.sleep(0.1)
    else:
        raise AssertionError(f"no finished action message: {broker.actions}")

    # A playbook the node does not have: the node's answer says so (heald fleet run exits 2 on
    # it: the coordinator does not know the node's playbooks)
    unknown = signer.make(node="n1", site="lab", name="run_playbook", args={"playbook": "no-such-playbook"})
    broker.send(unknown)
    last = broker.acks_for(unknown.id, n=2)[-1]
    assert (last.status, last.message) == ("rejected", "no playbook named 'no-such-playbook'")

    # Replayed: the same signed bytes again.
    marker.unlink()
    broker.send(cmd)
    time.sleep(1.0)
    acks = broker.acks_for(cmd.id, n=3)
    assert acks[-1].status == "rejected"
    assert "replay" in acks[-1].message

    # Unsigned, tampered, expired, other node (sent to this node's topic), wrong key.
    unsigned = msgspec.structs.replace(
        signer.make(node="n1", site="lab", name="run_playbook", args={"playbook": "touch-marker"}),
        signature=b"")
    tampered = msgspec.structs.replace(
        signer.make(node="n1", site="lab", name="run_playbook", args={"playbook": "touch-marker"}),
        args={"playbook": "something-else"})
    old = signing.CommandSigner(signer.private_key, issuer="test-coordinator", ttl_s=1.0,
                                clock=lambda: time.time() - 120)
    expired = old.make(node="n1", site="lab", name="run_playbook", args={"playbook": "touch-marker"})
    other = signing.CommandSigner(Ed25519PrivateKey.generate(), issuer="intruder").make(
        node="n1", site="lab", name="run_playbook", args={"playbook": "touch-marker"})
    for bad, status in ((unsigned, "rejected"), (tampered, "rejected"), (expired, "expired"),
                        (other, "rejected")):
        broker.send(bad)
        (ack,) = broker.acks_for(bad.id)
        assert ack.status == status, (bad.id, ack)
    time.sleep(1.0)
    assert not marker.exists()  # nothing ran


def test_disruptive_step_waits_for_the_fleet_lease(setup: tuple[signing.CommandSigner, Broker, Path]) -> None:
    signer, broker, marker = setup
    # Denied: the run is held, the step never runs, and it is not counted as a failure.
    broker.lease_answer = "deny"
    cmd = signer.make(node="n1", site="lab", name="run_playbook", args={"playbook": "touch-marker"})
    broker.send(cmd)
    assert [a.status for a in broker.acks_for(cmd.id, n=2)] == ["accepted", "done"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with broker.lock:
            held = [a for a in broker.actions if a.result.get("type") == "run.held"]
        if held:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"run not held: {broker.actions}")
    assert not marker.exists()
    with broker.lock:
        assert any(e.name == "lease_request" and e.labels["action"] == "run_command" for e in broker.events)

    # Granted: the step runs, then the lease is released.
    broker.lease_answer = "grant"
    cmd = signer.make(node="n1", site="lab", name="run_playbook", args={"playbook": "touch-marker"})
    broker.send(cmd)
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with broker.lock:
            if any(e.name == "lease_release" and e.labels["lease_id"] == "L1" for e in broker.events):
                return
        time.sleep(0.1)
    raise AssertionError("lease not released")
