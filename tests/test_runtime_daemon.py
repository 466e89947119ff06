"""The daemon as systemd runs it: a real `heald run` process, a real sd_notify socket, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.runtime.sdnotify import Notifier

BASE_CONFIG = """
[node]
id = "test-node"
site = "lab"
[paths]
state_dir = "{state}"
[collect.processes]
interval_s = 1.0
[collect.gpu]
enabled = false
"""


class Notify:
    """A NOTIFY_SOCKET that records every datagram the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, text: str, timeout: float = 20.0, after: float = 0.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, msg in list(self.messages):
                if at >= after and text in msg.split("\n"):
                    return at
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} from the daemon; got {self.messages!r}")

    def count(self, text: str, after: float = 0.0) -> int:
        return sum(1 for at, m in list(self.messages) if at >= after and text in m.split("\n"))

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=2)


class Daemon:
    def __init__(self, tmp: Path, config: str) -> None:
        self.config = tmp / "agent.toml"
        self.config.write_text(config)
        self.notify = Notify(tmp / "notify.sock")
        self.log = (tmp / "stdout.log").open("w+")
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify.path), WATCHDOG_USEC="1000000")
        env.pop("WATCHDOG_PID", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        env["WATCHDOG_PID"] = str(self.proc.pid)

    def lines(self) -> list[dict[str, object]]:
        self.log.flush()
        out = []
        for line in Path(self.log.name).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"raw": line})
        return out

    def wait_log(self, event: str, timeout: float = 20.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if line.get("event") == event:
                    return line
            time.sleep(0.1)
        raise AssertionError(f"no log event {event!r}; log: {self.lines()!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.notify.close()
        self.log.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    state = tmp_path / "state"
    d = Daemon(tmp_path, BASE_CONFIG.format(state=state))
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.slow
def test_ready_watchdog_reload_and_clean_stop(daemon: Daemon, tmp_path: Path) -> None:
    ready = daemon.notify.wait_for("READY=1")
    # Watchdog at half of WATCHDOG_USEC while sampling is alive.
    daemon.notify.wait_for("WATCHDOG=1", after=ready)
    time.sleep(1.6)
    assert daemon.notify.count("WATCHDOG=1", after=ready) >= 2

    # Every log line is JSON with the node bound.
    lines = daemon.lines()
    assert lines
    assert all("event" in line for line in lines), lines
    started = daemon.wait_log("heald starting")
    assert started["node"] == "test-node"

    # An invalid config on SIGHUP is refused; the daemon keeps running on the old one.
    daemon.config.write_text(BASE_CONFIG.format(state=tmp_path / "state") + "\n[collect.cpu]\nbogus = 1\n")
    daemon.proc.send_signal(signal.SIGHUP)
    refused = daemon.wait_log("reload refused: invalid configuration, keeping the running one")
    assert any("bogus" in str(p) for p in refused["problems"])  # type: ignore[attr-defined]
    assert daemon.proc.poll() is None
    t = time.monotonic()
    daemon.notify.wait_for("WATCHDOG=1", after=t)

    # A valid one is applied.
    daemon.config.write_text(BASE_CONFIG.format(state=tmp_path / "state").replace("interval_s = 1.0",
                                                                                  "interval_s = 2.0"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("configuration reloaded")
    assert daemon.proc.poll() is None

    # SIGTERM: clean exit well within 5 s.
    t0 = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    code = daemon.proc.wait(timeout=10)
    elapsed = time.monotonic() - t0
    assert code == 0
    assert elapsed < 5.0, elapsed
    daemon.wait_log("heald stopped")
    assert daemon.notify.count("STOPPING=1") == 1


@pytest.mark.slow
def test_sigint_stops_too(daemon: Daemon) -> None:
    daemon.notify.wait_for("READY=1")
    daemon.proc.send_signal(signal.SIGINT)
    # The contract is the unit's TimeoutStopSec=30s (systemd SIGKILLs after it). On a loaded CI
    # run one exit took over 10 s, cause not found (runs here log signal -> "heald stopped" in
    # 17-50 ms); the test allows 25 s and shows the daemon's log, which tells stop from exit.
    try:
        code = daemon.proc.wait(timeout=25)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit 25 s after SIGINT; log: {daemon.lines()!r}")
    assert code == 130, "Ctrl-C: 130 (interrupted), as the README says; SIGTERM is 0"
    daemon.wait_log("heald stopped")


def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    n = Notifier()
    assert not n.enabled
    assert n.notify(READY=1) is False
    assert n.watchdog_interval() is None


def test_watchdog_for_another_pid_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier("").watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier("").watchdog_interval() == 2.0
