"""Crash safety: kill -9 mid-playbook, restart, and no step runs twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.act.audit import verify
from agent.act.journal import Journal

PY = sys.executable

DRIVER = textwrap.dedent("""
    import asyncio, os, sys, time
    from pathlib import Path
    from agent.act.engine import Engine
    from agent.collect.sample import Sample
    from agent.decide.loader import load_playbooks
    from agent.decide.settings import PlaybookSettings

    state, pbdir, flag = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

    async def main():
        settings = PlaybookSettings(dirs=(pbdir,), load_shipped=False)
        eng = Engine(settings, state, "n1", load_playbooks(settings), None, None)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(eng.run(), name="engine")
            seq = 0
            while True:
                seq += 1
                s = Sample(node="n1", seq=seq, wall=time.time(), mono=time.monotonic(),
                           metrics={"app.bad": 1.0 if flag.exists() else 0.0})
                await eng.evaluate(s, None)
                await asyncio.sleep(0.1)

    asyncio.run(main())
""")


def playbook(marker: Path) -> str:
    def step(tag: str, sleep: float) -> str:
        code = f"import time; open({str(marker)!r}, 'a').write('{tag}\\n'); time.sleep({sleep})"
        return f"  - action: run_command\n    params: {{argv: [{PY!r}, '-c', {code!r}]}}\n    timeout: 30s\n"

    return (
        "name: crashy\ndescription: slow ladder\ntrigger: {metric: app.bad, op: '>=', value: 1}\n"
        f"steps:\n{step('step0', 5)}{step('step1', 0)}"
        "verify: {settle: 200ms}\nguards: {cooldown: 1h}\n"
    )


def start(tmp: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    with (tmp / "driver.log").open("ab") as log:
        return subprocess.Popen(
            [PY, str(tmp / "driver.py"), str(tmp / "state"), str(tmp / "pb"), str(tmp / "flag")],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def wait_for(cond, limit_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > limit_s:
            raise AssertionError("timed out")
        time.sleep(0.05)


def marks(p: Path) -> list[str]:
    return p.read_text().split() if p.exists() else []


def audit_records(tmp: Path) -> list[dict[str, object]]:
    path = tmp / "state" / "audit.jsonl"
    return [json.loads(x)["record"] for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_kill_9_mid_step_then_restart_runs_no_step_twice(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    (tmp_path / "pb").mkdir()
    (tmp_path / "pb" / "crashy.yaml").write_text(playbook(marker))
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "flag").touch()

    proc = start(tmp_path)
    try:
        wait_for(lambda: marks(marker) == ["step0"])  # step 0 is running (it sleeps 5 s)
        os.killpg(proc.pid, signal.SIGKILL)  # the engine and its step, mid-playbook
    finally:
        proc.wait()
    unfinished = Journal(tmp_path / "state" / "journal").unfinished()
    assert len(unfinished) == 1
    assert unfinished[0].interrupted == 0
    assert unfinished[0].done == {}

    proc = start(tmp_path)
    try:
        # recovery: step 0 is marked interrupted (not re-run), verification finds the problem
        # still there, so step 1 runs; then the problem goes away and the run is verified.
        wait_for(lambda: "step1" in marks(marker))
        (tmp_path / "flag").unlink()
        wait_for(lambda: any(r.get("type") == "run.end" for r in audit_records(tmp_path)))
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    assert marks(marker) == ["step0", "step1"], "no step ran twice"
    recs = audit_records(tmp_path)
    types = [r["type"] for r in recs]
    assert "run.recovered" in types
    steps = [(r["step"], r["status"]) for r in recs if r["type"] == "step"]
    assert steps == [(0, "interrupted"), (1, "done")]
    verifies = [r["ok"] for r in recs if r["type"] == "verify"]
    assert verifies == [False, True]
    assert [r["outcome"] for r in recs if r["type"] == "run.end"] == ["succeeded"]
    assert Journal(tmp_path / "state" / "journal").unfinished() == []
    assert verify(tmp_path / "state" / "audit.jsonl").ok


@pytest.mark.parametrize("wall", ["NaN", "Infinity", "1e18", "true", "\"x\""])
def test_a_damaged_or_future_wall_does_not_stretch_a_resumed_window(tmp_path: Path, wall: str) -> None:
    """A resumed verification's window counts from the step's end in the journal: a line whose
    wall is not a finite time in the past (a damaged file, a clock step) counts as now."""
    d = tmp_path / "journal"
    d.mkdir()
    (d / "r1.jsonl").write_text(
        '{"t": "run", "run_id": "r1", "wall": 1.0}\n'
        f'{{"t": "intent", "step": 0, "action": "run_command", "wall": {wall}}}\n'
        f'{{"t": "result", "step": 0, "status": "done", "result": {{}}, "wall": {wall}}}\n')
    before = time.time()
    (run,) = Journal(d).unfinished()
    assert before <= run.ended[0] <= time.time()


def test_a_commit_record_marks_a_step_that_began_to_change_the_host(tmp_path: Path) -> None:
    """stop_leaker / stop_process write ``commit`` right before they signal: a step with an intent
    and no commit changed nothing (resume runs it again), one with a commit did (never again); a
    step started again (a second intent) is uncommitted until it commits anew."""
    from agent.act.actions import REPEATABLE, UNTIL_COMMIT  # noqa: PLC0415
    from agent.act.journal import RunJournal  # noqa: PLC0415

    assert {"stop_leaker", "stop_process"} <= UNTIL_COMMIT
    assert not UNTIL_COMMIT & REPEATABLE
    j = Journal(tmp_path / "journal")
    for run_id, records in (("a", [("intent", 0)]), ("b", [("intent", 0), ("commit", 0)]),
                            ("c", [("intent", 0), ("commit", 0), ("intent", 0)])):
        rj: RunJournal = j.open_run(run_id, {"playbook": "p"})
        for kind, step in records:
            rj.write({"t": kind, "step": step, "action": "stop_leaker"})
        rj.close()
    got = {u.run_id: (u.interrupted, u.committed) for u in j.unfinished()}
    assert got == {"a": (0, set()), "b": (0, {0}), "c": (0, set())}
