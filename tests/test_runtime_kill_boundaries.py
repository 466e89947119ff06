"""``kill -9`` of a real ``heald run`` at every step boundary of a disk-cleaning run (issue 17).

The playbook is the shipped disk-nearly-full's shape on a real tmpfs: step 1 looks for files
older than 30 days (there are none: it frees nothing), step 2 deletes the two-day-old cache
files, step 3 would vacuum the journal. Uninterrupted, the run is verified after step 2 and
succeeds. Then, for each boundary k (the run's journal holding its header and k records:
intents, results, verifications), the daemon is killed with SIGKILL the moment the journal
reaches k, and started again on the same state directory. Each time the run must end with the
same verdict, no step may run twice (the audit log counts executed steps), and the audit chain
must verify.

Only the test's own mount can be touched: the playbook's trigger takes only mounts that hold a
clean root (``mounts: cleanable``) and the only clean root is the test's tmpfs; the shipped
library is not loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import heald_kit
import pytest
from heald_kit import Heald, audit, fill_with_stale_files, tmpfs, wait_for

from agent.act.audit import verify

pytestmark = [pytest.mark.slow, pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")]

PLAYBOOK = """
name: clean-test-mount
description: a disk-cleaning ladder on the test's own tmpfs
mode: enforce
trigger:
  metric: "disk.used_pct[{mount}]"
  op: ">="
  value: 90
  for: 1s
  clear_below: 85
  mounts: cleanable
steps:
  - name: clean-ancient
    action: clean_paths
    params: {on_mount: "{mount}", older_than: 30d, target_used_pct: 80}
    timeout: 1m
  - name: clean-stale
    action: clean_paths
    params: {on_mount: "{mount}", older_than: 1d, target_used_pct: 80}
    timeout: 1m
  - name: vacuum-journal
    action: vacuum_journal
    params: {max_size: 500M}
    timeout: 1m
verify:
  settle: 1s
guards:
  cooldown: 1h
"""


def write_config(tmp: Path, mount: Path) -> Path:
    return heald_kit.write_config(tmp, mount, node="kill-test", playbook=("clean.yaml", PLAYBOOK),
                                 playbooks_extra='journalctl = ["true"]\n')


def run_once(tmp: Path, kill_at: int | None) -> dict[str, Any]:
    """One disk-cleaning episode; with ``kill_at``, SIGKILL when the run's journal holds that many
    records after its header, then a restart. What the audit log says happened."""
    with tmpfs() as mount:
        fill_with_stale_files(mount)
        cfg = write_config(tmp, mount)
        state, log = tmp / "state", tmp / "heald.log"
        journal = state / "journal"
        daemon = Heald(cfg, log)
        killed_at = None
        try:
            if kill_at is not None:
                def journal_records() -> int | str | None:
                    if any(r["type"] == "run.end" for r in audit(state)):
                        return "after the end"  # the last boundary can pass before a poll sees it
                    files = list(journal.glob("*.jsonl")) if journal.is_dir() else []
                    if not files:
                        return None
                    n = len(files[0].read_bytes().splitlines()) - 1  # after the header
                    return n if n >= kill_at else None

                killed_at = wait_for(f"journal record {kill_at}", journal_records, 60, daemon, log)
                daemon.kill()
                daemon = Heald(cfg, log)  # the same state dir, the disk as the kill left it

            def ended() -> list[dict[str, Any]]:
                return [r for r in audit(state) if r["type"] == "run.end"]

            wait_for("the run's end", ended, 60, daemon, log)
        finally:
            daemon.stop()
        records = audit(state)
        starts = [r for r in records if r["type"] == "run.start"]
        assert len(starts) == 1, starts
        run_id = starts[0]["run_id"]
        executed: dict[int, int] = {}
        for r in records:
            if r["type"] == "step" and r["run_id"] == run_id and r["status"] in ("done", "failed"):
                executed[r["step"]] = executed.get(r["step"], 0) + 1
        # A step that ran but has no done/failed record counts once: its result in the journal
        # with its audit record cut off by the kill (run.recovered's completed_steps), or cut off
        # itself (recorded "interrupted") and found done by the resumed run's verification.
        started: set[int] = set()
        for r in records:
            if r["type"] == "run.recovered" and r["run_id"] == run_id:
                started.update(r.get("completed_steps", []))
            if r["type"] == "step" and r["run_id"] == run_id and r["status"] == "interrupted":
                started.add(r["step"])
        for index in started:
            executed.setdefault(index, 1)
        (end,) = [r for r in records if r["type"] == "run.end" and r["run_id"] == run_id]
        assert verify(state / "audit.jsonl").ok, "the audit chain holds across the kill"
        return {"outcome": end["outcome"], "executed": executed, "killed_at": killed_at,
                "used_pct_after": used_after(mount)}


def used_after(mount: Path) -> float:
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) / st.f_blocks * 100


def test_kill_9_at_every_step_boundary_keeps_the_verdict(tmp_path: Path) -> None:
    baseline = run_once(tmp_path / "uninterrupted", None)
    assert baseline["outcome"] == "succeeded"
    assert baseline["executed"] == {0: 1, 1: 1}, "step 1 frees nothing, step 2 cleans, step 3 not needed"
    assert baseline["used_pct_after"] < 85
    # The boundaries of that run: intent 0, result 0, verify 0, intent 1, result 1, verify 1.
    for k in range(1, 7):
        got = run_once(tmp_path / f"kill-{k}", k)
        assert got["outcome"] == baseline["outcome"], (k, got)
        assert all(n == 1 for n in got["executed"].values()), f"a step ran twice (kill at {k}): {got}"
        # ... and none ran that the uninterrupted run did not need (a kill between a step's
        # verification and the run's end once sent the resumed run down the ladder).
        assert got["executed"] == baseline["executed"], f"steps differ (kill at {k}): {got}"
        assert got["used_pct_after"] < 85, (k, got)
