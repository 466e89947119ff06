"""A stop that does not finish is bounded and explained (agent/runtime/stopdeadline.py).

Real daemons (build_daemon, the real signal handlers) in child processes, each given one clean-up
that misbehaves the way a library or a blocked thread can: heald exits on its own, with one error
line that names what was still pending, instead of hanging until systemd's SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

CHILD = Path(__file__).with_name("stop_deadline_child.py")
REPO = Path(__file__).resolve().parent.parent

CONFIG = """
[node]
id = "stop-node"
site = "lab"
[paths]
state_dir = "{state}"
runtime_dir = "{runtime}"
[collect.gpu]
enabled = false
[model]
enabled = false
[playbooks]
load_shipped = false
dirs = []
"""


class Child:
    def __init__(self, tmp_path: Path, kind: str, deadline_s: float) -> None:
        cfg = tmp_path / "agent.toml"
        cfg.write_text(CONFIG.format(state=tmp_path / "state", runtime=tmp_path / "run"))
        self.log = tmp_path / f"{kind}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, str(CHILD), str(cfg), str(deadline_s), kind],
                                         stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while not any(r.get("event") == "heald starting" for r in self.records()):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)
        time.sleep(1.0)  # a few samples: the tasks are all running

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def wait(self, timeout: float) -> tuple[int, float]:
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"still running {timeout} s after the signal:\n{self.log.read_text()[-3000:]}")
        return rc, time.monotonic() - t0

    def gave_up(self) -> dict[str, Any]:
        found = [r for r in self.records() if r.get("event") == "heald did not stop cleanly: exiting now"]
        assert len(found) == 1, self.log.read_text()[-3000:]
        return found[0]


def test_a_clean_up_that_swallows_cancellation_is_cut_off_at_the_deadline(tmp_path: Path) -> None:
    child = Child(tmp_path, "stubborn", deadline_s=3.0)
    t0 = time.monotonic()
    child.proc.send_signal(signal.SIGTERM)
    rc, _ = child.wait(timeout=30)
    took = time.monotonic() - t0
    assert rc == 1
    assert took >= 3.0  # not before the deadline: a slow clean stop gets its time
    record = child.gave_up()
    assert record["level"] == "error"
    assert "3 s after the stop request" in record["reason"]
    stubborn = [t for t in record["pending_tasks"] if t.startswith("stubborn: ")]
    assert stubborn, record
    assert "stop_deadline_child.py" in stubborn[0], stubborn
    assert "in stubborn -> asyncio sleep" in stubborn[0], stubborn
    assert not any(r.get("event") == "heald stopped" for r in child.records())


def test_a_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    child = Child(tmp_path, "stubborn", deadline_s=60.0)
    child.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    child.proc.send_signal(signal.SIGTERM)
    rc, took = child.wait(timeout=20)
    assert rc == 1
    assert took < 20  # far before the 60 s deadline
    assert child.gave_up()["reason"] == "a second SIGTERM while stopping"


def test_a_second_sigint_exits_130(tmp_path: Path) -> None:
    child = Child(tmp_path, "stubborn", deadline_s=60.0)
    child.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    child.proc.send_signal(signal.SIGINT)
    rc, _ = child.wait(timeout=20)
    assert rc == 130
    assert child.gave_up()["reason"] == "a second SIGINT while stopping"


def test_a_thread_blocking_the_interpreters_exit_is_cut_off_too(tmp_path: Path) -> None:
    child = Child(tmp_path, "stuck-thread", deadline_s=3.0)
    child.proc.send_signal(signal.SIGTERM)
    rc, _ = child.wait(timeout=30)
    assert rc == 1
    # The daemon's own stop finished; what hung was the join of the executor's blocked thread.
    assert any(r.get("event") == "heald stopped" for r in child.records())
    threads = child.gave_up()["threads"]
    # The blocked worker (time.sleep is C: its innermost Python frame is the pool's run), and
    # no idle worker.
    assert [t for t in threads if t.startswith("asyncio_") and " in run " in t], threads
    assert not any(t.endswith(" in _worker") for t in threads), threads
