"""``kill -9`` of a real ``heald run`` inside a verification window (verify.within).

The playbook's step changes nothing by itself (the test plays the job that finishes later: it
frees the space a few seconds after the step), so only a verification that watches for a while
sees the problem end. The daemon is killed right after the step's result is journaled and
started again a few seconds later on the same state directory: the resumed run must give the
uninterrupted run's verdict, never run the step again, and keep the window counted from the
step's end in the journal (a fresh window after the restart would hold the target, and delay the
next step and the escalation, by the whole downtime).

Only the test's own tmpfs can be touched (``mounts: cleanable``, the only clean root).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import heald_kit
import pytest
from heald_kit import Heald, audit, fill_with_stale_files, tmpfs, wait_for

from agent.act.audit import verify

pytestmark = [pytest.mark.slow, pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")]

SETTLE_S, WITHIN_S, DOWN_S = 0.5, 6.0, 3.0

PLAYBOOK = f"""
name: watch-test-mount
description: a step that frees nothing itself; the space comes back a little later
mode: enforce
trigger:
  metric: "disk.used_pct[{{mount}}]"
  op: ">="
  value: 90
  for: 1s
  clear_below: 85
  mounts: cleanable
steps:
  - name: poke
    action: run_command
    params: {{argv: ["{sys.executable}", "-c", "pass"]}}
    timeout: 10s
verify:
  settle: {SETTLE_S}s
  within: {WITHIN_S}s
guards:
  cooldown: 1h
"""


def write_config(tmp: Path, mount: Path) -> Path:
    return heald_kit.write_config(tmp, mount, node="within-kill-test", playbook=("watch.yaml", PLAYBOOK))


def episode(tmp: Path, *, kill: bool, clears_after_s: float | None) -> dict[str, Any]:
    """The step runs; ``clears_after_s`` after its result the test frees the space (None: never).
    With ``kill``: SIGKILL right after the step's result is journaled, restart ``DOWN_S`` later."""
    with tmpfs("20m") as mount:
        fill_with_stale_files(mount)
        cfg = write_config(tmp, mount)
        state, log = tmp / "state", tmp / "heald.log"
        journal = state / "journal"
        daemon = Heald(cfg, log)
        try:
            def step_result() -> float | None:
                for path in journal.glob("*.jsonl") if journal.is_dir() else []:
                    for line in path.read_bytes().splitlines():
                        record = json.loads(line)
                        if record.get("t") == "result":
                            return float(record["wall"])
                return None

            result_wall = wait_for("the step's result in the journal", step_result, 30, daemon, log)
            if kill:
                daemon.kill()
            freed = False

            def ended() -> list[dict[str, Any]]:
                nonlocal freed, daemon
                if kill and daemon.proc.poll() is not None and time.time() >= result_wall + DOWN_S:
                    daemon = Heald(cfg, log)  # the same state dir, the disk as the kill left it
                if clears_after_s is not None and not freed and time.time() >= result_wall + clears_after_s:
                    for f in (mount / "cache").iterdir():
                        f.unlink()
                    freed = True
                return [r for r in audit(state) if r["type"] == "run.end"]

            if kill:
                while time.time() < result_wall + DOWN_S:
                    ended()
                    time.sleep(0.02)
                ended()
            (end,) = wait_for("the run's end", ended, 30, daemon, log)
        finally:
            daemon.stop()
        records = audit(state)
        assert verify(state / "audit.jsonl").ok
        steps = [r for r in records if r["type"] == "step" and r["status"] in ("done", "failed")]
        verifies = [r for r in records if r["type"] == "verify"]
        end_ts = next(e["ts"] for e in map(json.loads, (state / "audit.jsonl").read_text().splitlines())
                  if e["record"]["type"] == "run.end")
        return {"outcome": end["outcome"], "steps": len(steps), "verifies": verifies,
                "end_after_s": end_ts - result_wall,
                "recovered": any(r["type"] == "run.recovered" for r in records)}


CLEARS_S = DOWN_S + 1.5  # after the restart, inside the window (settle + within = 6.5 s)


def test_uninterrupted_run_succeeds_in_the_window(tmp_path: Path) -> None:
    """The baseline: the space comes back 4.5 s after the step; the watching check sees it."""
    baseline = episode(tmp_path, kill=False, clears_after_s=CLEARS_S)
    assert baseline["outcome"] == "succeeded", baseline
    (v,) = baseline["verifies"]
    assert v["checks"] > 1, baseline


def test_kill_9_in_the_window_keeps_the_verdict_and_the_window(tmp_path: Path) -> None:
    got = episode(tmp_path / "killed", kill=True, clears_after_s=CLEARS_S)
    assert got["recovered"], got
    assert got["outcome"] == "succeeded", f"the uninterrupted run's verdict: {got}"
    assert got["steps"] == 1, "the step has a result: it is not run again"
    assert [v["ok"] for v in got["verifies"]] == [True], got

    never = episode(tmp_path / "never", kill=True, clears_after_s=None)
    assert never["outcome"] == "escalated", never
    # the window ends settle + within after the step's result, not after the restart: a fresh
    # window would end at DOWN_S + start-up + settle + within (>= 9.5 s)
    (v,) = never["verifies"]
    assert v["ok"] is False
    assert never["end_after_s"] < SETTLE_S + WITHIN_S + 1.5, never
