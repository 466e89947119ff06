"""`heald run` reporting to a real mosquitto: birth, retained online status, metrics, and the will."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent import wire

pytestmark = pytest.mark.slow


class Subscriber:
    """A plain paho client recording every decoded message on heald/v1/#."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, bool, Any]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.suppress_exceptions = True  # a bug in a callback must not kill paho's thread
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("heald/v1/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bool(msg.retain), wire.decode(msg.payload)))

    def wait(self, pred: Any, timeout: float = 30.0) -> tuple[str, bool, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for m in self.messages:
                    if pred(m):
                        return m
            time.sleep(0.05)
        seen = [(t, type(p).__name__) for t, _, p in self.messages]
        raise AssertionError(f"not seen in {timeout}s; got {seen}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def agent_proc(tmp_path: Path, mosquitto: Any) -> Iterator[subprocess.Popen[bytes]]:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[node]
id = "n1"
site = "lab"
labels = {{ rack = "r7" }}
[paths]
state_dir = "{tmp_path / 'state'}"
[collect.gpu]
enabled = false
[mqtt]
enabled = true
host = "127.0.0.1"
port = {mosquitto.port}
metrics_interval_s = 1.0
""")
    log = (tmp_path / "agent.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        log.close()


def test_birth_online_metrics_then_will_on_sigkill(mosquitto: Any,
                                                   agent_proc: subprocess.Popen[bytes]) -> None:
    sub = Subscriber(mosquitto.port)
    try:
        _, _, birth = sub.wait(lambda m: isinstance(m[2], wire.Birth))
        assert birth.node == "n1"
        assert birth.site == "lab"
        assert birth.labels == {"rack": "r7"}
        assert "cpu" in birth.collectors
        topic, _, online = sub.wait(lambda m: isinstance(m[2], wire.Status) and m[2].state == "online")
        assert topic == "heald/v1/lab/n1/status"
        _, _, metrics = sub.wait(lambda m: isinstance(m[2], wire.Metrics))
        assert metrics.samples
        assert metrics.samples[0].metrics["mem.total_bytes"] > 0
        # A late subscriber gets the retained online status.
        late = Subscriber(mosquitto.port)
        try:
            _, retained, status = late.wait(lambda m: isinstance(m[2], wire.Status))
            assert retained
            assert status.state == "online"
        finally:
            late.close()

        agent_proc.send_signal(signal.SIGKILL)
        agent_proc.wait(timeout=10)
        _, _, offline = sub.wait(lambda m: isinstance(m[2], wire.Status) and m[2].state == "offline")
        assert offline.bdseq == online.bdseq  # the will matches the birth it follows
        late = Subscriber(mosquitto.port)
        try:
            _, retained, status = late.wait(lambda m: isinstance(m[2], wire.Status))
            assert retained
            assert status.state == "offline"
        finally:
            late.close()
    finally:
        sub.close()
