"""Host memory heading for exhaustion is healed before the OOM kill and before the 95 % line
(issue 20: memory-exhaustion-predicted, as shipped).

Each case runs tests/memory_predicted_namespace.py in a private PID + mount namespace: a scaled
host (a fixture /proc/meminfo driven by the workload's real resident memory), a real process
allocating memory at a set rate, the real memory collector, the daemon's forecaster and the
engine with the shipped memory playbooks, stop_process sending real signals. See that script for
why the host is scaled: filling this machine's memory would hurt everyone else on it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a private PID namespace)"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)"),
]

SCRIPT = Path(__file__).with_name("memory_predicted_namespace.py")
TOTAL, BASE = 4096, 600  # MiB of the scaled host; the workload is 10 % of it at 410 MiB


def run_case(tmp_path: Path, *, rate: float, cap: int, seconds: float) -> dict[str, Any]:
    spec = {"out": str(tmp_path / "out.json"), "state": str(tmp_path / "state"), "rate_mib_s": rate,
            "cap_mib": cap, "total_mib": TOTAL, "base_mib": BASE, "seconds": seconds}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    argv = ["unshare", "--pid", "--kill-child", "--mount", "--mount-proc", sys.executable, str(SCRIPT),
            str(tmp_path / "spec.json")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 90, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result: dict[str, Any] = json.loads((tmp_path / "out.json").read_text())
    return result


def of(result: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for r in result["records"] if r["type"] == kind]


def static_line_at(series: list[dict[str, Any]]) -> float | None:
    """When memory-exhaustion's 95 % line would first have held its 10 s (None: never)."""
    since = None
    for s in series:
        if s["alive"] and (s["used_pct"] or 0) >= 95:
            since = s["t"] if since is None else since
            if s["t"] - since >= 10:
                return float(s["t"])
        else:
            since = None
    return None


def test_a_host_memory_leak_is_stopped_before_the_oom_kill(tmp_path: Path) -> None:
    """50 MiB/s into 3.5 GiB of free memory: over 85 % after about 58 s, out of memory after
    about 70 s. The predictive line stops the leak gently (TERM) in between; the 95 % line would
    have needed until after the OOM kill (it must hold 10 s)."""
    # the leak would take the scaled host to 4 GiB used (cap 3.6 GiB + 600 MiB): out of memory
    result = run_case(tmp_path, rate=50, cap=3600, seconds=110)
    assert result["oom_at"] is None, "the scaled host ran out of memory before heald acted"
    assert result["returncode"] == -signal.SIGTERM, "stopped by heald's TERM"
    (start,) = of(result, "run.start")
    assert start["playbook"] == "memory-exhaustion-predicted"
    assert start["inputs"]["mem.used_pct"] >= 85
    step = of(result, "step")[0]
    assert step["ok"] is True
    assert step["data"]["pids"] == [result["pid"]]
    assert [r["outcome"] for r in of(result, "run.end")] == ["succeeded"]
    series = result["series"]
    acted = next(s["t"] for s in reversed(series) if s["alive"])
    # where the leak was headed: the time free memory would have reached 0 at the rate it grew
    used_then = max(s["used_pct"] or 0 for s in series)
    left_s = (100 - used_then) / 100 * TOTAL / 50
    assert left_s >= 5, f"acted with only {left_s:.1f} s of memory left"
    static = static_line_at(series)
    assert static is None, f"the 95 % line held at {static} s: the leak was not stopped early"
    print(f"acted at {acted:.0f} s, {used_then:.1f}% used, {left_s:.0f} s before the scaled host's OOM")


def test_a_workload_that_levels_off_below_85_percent_is_left_alone(tmp_path: Path) -> None:
    """A big compile or a cache warming up: grows fast (60 MiB/s), then holds 80 % of memory.
    The ETA is short while it grows, but it never reaches the 85 % floor: no action."""
    result = run_case(tmp_path, rate=60, cap=int(0.80 * TOTAL) - BASE, seconds=60)
    assert result["oom_at"] is None
    assert of(result, "run.start") == []
    peak = max(s["used_pct"] or 0 for s in result["series"])
    assert 78 <= peak < 85, peak
    fast = [s for s in result["series"] if (s["eta_s"] or 1e9) < 60]
    assert fast, "the growth was never fast enough to matter"
