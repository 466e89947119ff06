"""stop_leaker through the root helper (heald-action@leakscan-conntrack) at its edges: the engine
killed with SIGKILL between the helper's two scans, and two leakers at once, one that may be
stopped and one that may not (a protected process).

Each case runs tests/leak_scan_namespace.py in a private PID + mount namespace: the agent as
heald.service runs it (user nobody, CAP_DAC_OVERRIDE and CAP_KILL, no CAP_SYS_PTRACE: it cannot
read a root process's socket links, so every scan is the helper's), the real packaging/heald-action
run as root by a broker that plays systemd, a fixture conntrack table that counts the leakers'
sockets, and root leakers the test starts. The engine runs a one-step playbook: stop_leaker
(a 1.5 s window), then a verify that the table stopped growing.
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

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("leak_scan_namespace.py")
ROOT = os.geteuid() == 0
HELPER = "start heald-action@leakscan-conntrack.service"

pytestmark = [
    pytest.mark.root, pytest.mark.slow,
    pytest.mark.skipif(not ROOT or shutil.which("unshare") is None or shutil.which("setpriv") is None
                       or not Path("/proc/sys/net/netfilter").is_dir() or Path("/usr/bin/heald").exists(),
                       reason="needs root, unshare, setpriv, /proc/sys/net/netfilter and no /usr/bin/heald "
                              "(the helper would take that installation)"),
]


def case(tmp_path: Path, leakers: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    d = tmp_path / "case"
    d.mkdir()
    spec = {"dir": str(d), "engine": True, "limit": 2000, "base": 1100, "leakers": leakers, "seconds": 25,
            "linger_s": 0.5, **kw}
    (d / "spec.json").write_text(json.dumps(spec))
    argv = ["unshare", "--pid", "--kill-child", "--mount", "--mount-proc", "--propagation", "private",
            sys.executable, str(SCRIPT), str(d / "spec.json")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    log = (d / "agent.log").read_text()[-3000:] if (d / "agent.log").exists() else ""
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:] + log
    out: dict[str, Any] = json.loads((d / "out.json").read_text())
    assert out["ended_at"] is not None, out
    return out


def of(out: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for r in out["records"] if r["type"] == kind]


LEAK = {"rate": 40, "argv0": "heald-test-leak"}
PROTECTED = {"rate": 40, "argv0": "heald-test-protected"}


@pytest.mark.parametrize("kill", [False, True], ids=["uninterrupted", "killed"])
@pytest.mark.parametrize("leaker", ["healable", "protected"])
def test_a_kill_9_between_the_helpers_two_scans(tmp_path: Path, leaker: str, kill: bool) -> None:
    """The agent killed -9 inside the step's window, after the helper's first scan and before its
    second, started again on the same state dir. The kill came before the step's commit (the
    journal record stop_leaker writes right before it signals or restarts): it had changed
    nothing, so the resumed run checks, then runs the step again from its first scan.

    The verdict is the uninterrupted run's: a healable leaker is TERMed and the run succeeds; a
    protected one is found, not stopped, and the run escalates. Old: stop_leaker was never run
    again after a kill, so the killed healable case escalated (a human called for a leak heald
    could heal) where the uninterrupted one succeeded."""
    out = case(tmp_path, [LEAK if leaker == "healable" else PROTECTED], kill=kill,
               protect=[PROTECTED["argv0"]])
    steps = of(out, "step")
    ends = [(e["outcome"], e["agent"]) for e in of(out, "run.end")]
    last = out["agents"][-1]
    if kill:
        assert out["killed_at"] is not None
        assert out["scans_at_kill"] == 1, "killed between the helper's two scans"
        first, second = out["agents"]
        assert last == second
        (recovered,) = of(out, "run.recovered")
        assert recovered["agent"] == second
        assert recovered["interrupted_step"] == 0
        interrupted, steps = steps[0], steps[1:]
        assert (interrupted["action"], interrupted["status"], interrupted["agent"]) == \
            ("stop_leaker", "interrupted", second)
        assert "before it changed anything; run again" in interrupted["detail"]
        assert of(out, "verify")[0]["ok"] is False, "the check before the step goes again"
        assert [s["agent"] for s in steps] == [second]
        assert not [r for r in out["records"] if r["agent"] == first and r["type"] in ("step", "run.end")]
    assert [r.split()[:2] for r in out["helper_runs"]][-2:] == [["leakscan-conntrack:", "0"]] * 2, out
    assert out["systemctl"] == [HELPER] * (3 if kill else 2)  # a kill: one scan, then two again
    (step,) = steps
    assert step["data"]["helper"] == "heald-action@leakscan-conntrack.service", step
    assert step["data"]["pids"] == out["leak_pids"], step
    assert step["data"]["share_pct"] >= 50, step
    if leaker == "healable":
        assert step["status"] == "done", step
        assert out["leaks"] == [-signal.SIGTERM]
        assert ends == [("succeeded", last)], ends
    else:
        assert step["status"] == "failed", step
        assert "protected process" in step["detail"], step
        assert out["leaks"] == [None], "never signalled"
        assert ends == [("escalated", last)], ends


def test_two_leakers_at_once_the_healable_one_is_stopped_the_protected_one_is_not(tmp_path: Path) -> None:
    """A leaker and a protected leaker, both root's (every count is the helper's): the leaker grows
    the table three times as fast, explains most of it and is TERMed; the protected one is left
    running and the table still grows, so the verify fails and the run escalates."""
    out = case(tmp_path, [{**LEAK, "rate": 60}, {**PROTECTED, "rate": 20}], protect=[PROTECTED["argv0"]])
    (step,) = of(out, "step")
    assert step["status"] == "done", step
    assert step["data"]["helper"] == "heald-action@leakscan-conntrack.service", step
    assert step["data"]["pids"] == [out["leak_pids"][0]], step
    assert step["data"]["share_pct"] >= 50, step
    growers = {g["group"]: g["growth"] for g in step["data"]["top"]}
    assert set(growers) >= {f"pid:{p}" for p in out["leak_pids"]}, "both seen through the helper"
    assert out["systemctl"] == [HELPER] * 2
    assert out["leaks"] == [-signal.SIGTERM, None], "the healable one TERMed, the protected one running"
    (verify,) = of(out, "verify")
    assert verify["ok"] is False, verify
    assert [e["outcome"] for e in of(out, "run.end")] == ["escalated"]


def test_two_leakers_at_once_the_protected_one_growing_most_stops_neither(tmp_path: Path) -> None:
    """The protected leaker grows the table three times as fast: it explains most of the growth but
    is protected, and the other one explains too little to be stopped instead: nothing is
    signalled, the step fails, the run escalates."""
    out = case(tmp_path, [{**LEAK, "rate": 20}, {**PROTECTED, "rate": 60}], protect=[PROTECTED["argv0"]])
    (step,) = of(out, "step")
    assert step["status"] == "failed", step
    assert step["data"]["pids"] == [out["leak_pids"][1]], step
    assert "protected process" in step["detail"], step
    growers = {g["group"]: g["growth"] for g in step["data"]["top"]}
    assert set(growers) >= {f"pid:{p}" for p in out["leak_pids"]}, "both seen through the helper"
    assert out["systemctl"] == [HELPER] * 2
    assert out["leaks"] == [None, None], "neither signalled"
    assert [e["outcome"] for e in of(out, "run.end")] == ["escalated"]
