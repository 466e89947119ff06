"""Issue 17, item 5, "Done when": the state dir on a 2 MiB tmpfs filled to 100% while the broker is
down. For ``HEALD_TEST_DEGRADED_S`` seconds (default 60; the issue's 5 minutes is 300) a real
``heald run`` keeps running, a supervised worker killed in that window is restarted, the shed count
reaches the coordinator's broker once it is back, and a restart with the disk still full comes up.

The daemon acts in enforce mode only on the worker this test starts (a unique process name, the
shipped library off). The unit-level tests of each writer: tests/test_degraded_storage.py.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt
import psutil
import pytest
from broker import BrokerFactory, default_config
from test_degraded_storage import Tmpfs, mount_tmpfs, unmount

from agent import wire

DEGRADED_S = float(os.environ.get("HEALD_TEST_DEGRADED_S", "60"))

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.timeout(DEGRADED_S + 300)]

# The worker says it started (a marker named by its pid, outside the full tmpfs), then idles.
WORKER = ("import os, sys, time; open(os.path.join(sys.argv[1], str(os.getpid())), 'w').close(); "
          "time.sleep(3600)")


class Agent:
    """One `heald run` process, its log in a file outside the state dir."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log_path = log
        self._log: TextIO = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def lines(self) -> list[dict[str, Any]]:
        self._log.flush()
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"event": "(not json)", "raw": line, "level": "error"})
        return out

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=10)
        self._log.close()
        return rc


class Coordinator:
    """Stands in for the coordinator's subscription: a persistent MQTT session (QoS 1, clean session
    off) on a broker with persistence, so what the agent publishes while this client is not
    (re)connected yet is queued for it and nothing depends on who connects first."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, bool, Any]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"coord-{secrets.token_hex(4)}",
                                  clean_session=False, protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe("heald/v1/#", qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.suppress_exceptions = True  # a bug in a callback must not kill paho's thread
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bool(msg.retain), wire.decode(msg.payload)))

    def wait(self, pred: Callable[[Any], bool], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for _, _, m in self.messages:
                    if pred(m):
                        return m
            time.sleep(0.05)
        with self.lock:
            seen = [type(m).__name__ for _, _, m in self.messages]
        raise AssertionError(f"not seen in {timeout}s; got {seen}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_until(what: str, predicate: Callable[[], bool], within: float, agent: Agent | None = None) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if agent is not None and not agent.alive():
            raise AssertionError(f"heald exited (rc {agent.proc.returncode}) waiting for {what}:\n"
                                 f"{agent.tail()}")
        if time.monotonic() > deadline:
            extra = f"\n{agent.tail()}" if agent is not None else ""
            raise AssertionError(f"timed out after {within}s waiting for {what}{extra}")
        time.sleep(0.1)


def workers(marks: Path) -> list[int]:
    return sorted(int(p.name) for p in marks.iterdir())


def kill_workers(marks: Path) -> None:
    """Only the processes this test's worker started (their command line names our marker dir)."""
    for pid in workers(marks):
        try:
            proc = psutil.Process(pid)
            if str(marks) in proc.cmdline():
                proc.kill()
        except psutil.Error:
            continue


def playbook(name: str, exe: Path, marks: Path) -> str:
    return f"""
name: worker-supervised
description: keep this test's worker running (non-systemd supervision)
mode: enforce
trigger:
  any:
    - event: proc.exited
      labels: {{name: {name}}}
      within: 1m
    - metric: "proc.count[{name}]"
      op: "<"
      value: 1
steps:
  - action: restart_process
    params: {{name: {name}, argv: [{str(exe)!r}, "-c", {WORKER!r}, {str(marks)!r}]}}
    timeout: 10s
verify: {{settle: 100ms}}
guards: {{cooldown: 0s, max_runs: {{count: 1000, window: 1h}}}}
"""


def config(state: Path, pbdir: Path, name: str, port: int) -> str:
    return f"""
[node]
id = "n1"
site = "lab"
[paths]
state_dir = "{state}"
[collect.gpu]
enabled = false
[collect.processes]
interval_s = 1.0
watch = ["{name}"]
[mqtt]
enabled = true
host = "127.0.0.1"
port = {port}
metrics_interval_s = 1.0
backoff_initial_s = 0.5
backoff_max_s = 3.0
[mqtt.spool]
quota_bytes = 1073741824  # more than the disk: the disk runs out first
segment_bytes = 16384
[playbooks]
dirs = ["{pbdir}"]
load_shipped = false
[model]
enabled = false
"""


def test_full_state_dir_daemon_heals_reports_the_loss_and_restarts(tmp_path: Path,
                                                                   mosquitto_factory: BrokerFactory) -> None:
    name = f"hw-{secrets.token_hex(3)}"  # no other process on the host has this name
    marks = tmp_path / "marks"
    marks.mkdir()
    exe = tmp_path / name
    exe.symlink_to(sys.executable)  # comm becomes the unique name
    pbdir = tmp_path / "playbooks"
    pbdir.mkdir()
    (pbdir / "worker.yaml").write_text(playbook(name, exe, marks))
    broker = mosquitto_factory(default_config(
        "persistence true\npersistence_location {dir}/\nautosave_interval 1\n"
        "queue_qos0_messages true\nmax_queued_messages 100000\n"))
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config(state, pbdir, name, broker.port))
    agents: list[Agent] = []
    sub: Coordinator | None = None
    mount_tmpfs(state)
    try:
        disk = Tmpfs(state)
        sub = Coordinator(broker.port)  # its session (and subscription) outlives the outage
        assert sub.subscribed.wait(10), "the coordinator's subscription"
        broker.stop()  # the broker is down, before the agent ever reaches it
        first = Agent(cfg, tmp_path / "agent-1.log")
        agents.append(first)
        wait_until("the supervisor to start the worker", lambda: bool(workers(marks)), 30, first)
        wait_until("reports spooled while the broker is down",
                   lambda: sum(p.stat().st_size for p in (state / "spool").glob("*.seg")) > 30_000, 60, first)

        # ------------------------------------------------------------ the disk full, the broker down
        disk.fill()
        start = time.monotonic()
        killed_at: float | None = None
        restart_s = float("inf")
        victim = workers(marks)[-1]
        restarted: int | None = None
        last_fill = start
        while time.monotonic() - start < DEGRADED_S:
            assert first.alive(), f"heald exited (rc {first.proc.returncode}), disk full:\n{first.tail()}"
            now = time.monotonic()
            if killed_at is None and now - start >= DEGRADED_S / 3:
                os.kill(victim, signal.SIGKILL)
                killed_at = now
            if killed_at is not None and restarted is None:
                new = [pid for pid in workers(marks) if pid != victim and pid > 0 and psutil.pid_exists(pid)]
                if new:
                    restarted = new[-1]
                    restart_s = now - killed_at
            if now - last_fill >= 5:  # what the spool freed by shedding and did not use, the filler takes
                disk.fill()
                last_fill = now
            time.sleep(0.2)
        assert restarted is not None, f"the killed worker was not restarted:\n{first.tail()}"
        assert restart_s < 15
        assert disk.avail() < 64 * 1024
        lines = first.lines()
        assert not [x for x in lines if x["event"] == "(not json)"], "a traceback or a stray line"
        errors: dict[str, int] = {}
        for x in lines:
            if x.get("level") == "error":
                errors[x["event"]] = errors.get(x["event"], 0) + 1
        # One error a failure streak, not one a sample (issue 17: 610 identical lines).
        assert all(n <= 3 for n in errors.values()), errors
        assert sum(errors.values()) < 30, errors

        # ------------------------------------------------------------ the broker is back, disk still full
        broker.start()
        status = sub.wait(lambda m: isinstance(m, wire.Status) and m.state == "online", timeout=30)
        assert status.dropped_metrics + status.dropped_other > 0, status
        dropped = sub.wait(lambda m: isinstance(m, wire.Event) and m.name == "report.spool_dropped")
        assert dropped.value is not None
        assert dropped.value > 0
        assert int(dropped.labels["metrics"]) + int(dropped.labels["other"]) == dropped.value
        assert dropped.value <= status.dropped_metrics + status.dropped_other
        back = time.time()
        sub.wait(lambda m: isinstance(m, wire.Metrics) and m.ts > back)  # reporting goes on, disk full
        assert first.alive()

        # ------------------------------------------------------------ kill -9, restart, the disk still full
        first.stop(signal.SIGKILL)
        disk.fill()
        restart_wall = time.time()
        second = Agent(cfg, tmp_path / "agent-2.log")
        agents.append(second)
        sub.wait(lambda m: isinstance(m, wire.Birth) and m.bdseq > status.bdseq)
        sub.wait(lambda m: isinstance(m, wire.Metrics) and m.samples and m.samples[0].wall > restart_wall)
        time.sleep(10)
        assert second.alive(), f"heald exited after a restart with the disk full:\n{second.tail()}"
        assert any(x["event"] == "heald starting" for x in second.lines())
        assert sum(1 for x in second.lines() if x.get("level") == "error") < 10, second.tail()
        assert disk.avail() < 64 * 1024
        assert second.stop(signal.SIGTERM) == 0, second.tail()

        audit = state / "audit.jsonl"
        if audit.exists():  # the chain is intact: entries that could not be written were not appended
            r = subprocess.run([sys.executable, "-m", "agent", "audit", "verify", str(audit)],
                               capture_output=True, text=True, check=False, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
    finally:
        if sub is not None:
            sub.close()
        for agent in agents:
            agent.stop()
        kill_workers(marks)
        unmount(state)
