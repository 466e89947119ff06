"""The missing edge siblings of the predictive remediations (CONTRIBUTING: "the daemon kill -9'd and
restarted mid-run, the agent's own disk full").

* memory-exhaustion-predicted, as shipped, on a scaled host in a private PID + mount namespace
  (tests/predictive_edges_namespace.py): the agent (a separate process running the engine, the real
  memory collector and the forecaster) is killed with SIGKILL while its TERM step waits for the
  workload to exit, and started again on the same state dir; and, in another run, its state dir
  fills up just before the trigger.
* raise_limit through the root helper (packaging/heald-action, run by a recording systemctl in a
  private mount namespace over a fixture file-max, as in tests/test_kernel_limits.py): the agent
  killed between starting the helper and reading the value back; and a full state dir.
* the demand history (agent/features/demand_history.py) on a full state dir.

Each test acts only on what it made: its own processes, tmpfs mounts and fixture files.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from test_degraded_storage import Tmpfs, errors, mount_tmpfs, unmount
from test_demand_daemon import write_history

from agent.features.demand_history import DemandSettings, load_rows
from agent.score.demand_stage import DemandStage

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (tmpfs mounts, namespaces)")
REPO = Path(__file__).resolve().parents[1]
STEP = 300.0


# --------------------------------------------------------------------------- the demand history


@pytest.mark.root
@needs_root
def test_demand_history_on_a_full_state_dir_fails_cleanly_forecasts_on_and_saves_again(
        tmp_path: Path) -> None:
    """Old: the save fell back to an in-place overwrite on a full disk (write_small_state); a
    history longer than the file it replaced was cut short mid-JSON, and the next start threw
    the whole history away ("demand history ignored; starting a new one")."""
    mnt = tmp_path / "state"
    mount_tmpfs(mnt, "4m")
    try:
        fs = Tmpfs(mnt)
        path = mnt / "demand" / "history.json"
        now = time.time()
        write_history(path, 2.2, now)
        stage = DemandStage(DemandSettings(step_s=STEP, horizon_s=3 * 3600.0, save_interval_s=1), mnt)
        assert asyncio.run(stage.refit())  # a model of the node's own, before the disk fills
        saved = path.read_bytes()
        rows_saved = len(load_rows(path, STEP))
        fs.fill()
        t = (now // STEP + 1) * STEP
        forecasts: list[tuple[Any, ...]] = []

        async def feed(steps: int) -> None:
            nonlocal t
            for _ in range(steps):  # a step a push: each push closes a row
                t += STEP
                forecasts.append(stage.on_sample({"cpu.util_pct": 30.0, "mem.used_pct": 41.0}, t))
                await asyncio.sleep(0.1)

        async def scenario() -> None:
            task = asyncio.create_task(stage.run(check_every_s=0.2), name="demand")
            try:
                await feed(30)  # 3 s: the task tries to save three times or so
                assert not task.done()
                assert path.read_bytes() == saved, "a failed save changed the file"
                fs.free()
                await feed(20)
                for _ in range(50):  # the task saves again within its interval
                    if len(load_rows(path, STEP)) >= rows_saved + 45:
                        break
                    await asyncio.sleep(0.1)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        with structlog.testing.capture_logs() as logs:
            asyncio.run(scenario())
        assert errors(logs, "demand history not saved") == 1, "one line per streak"
        recovered = [e["what"] for e in logs if e["event"] == "state write recovered"]
        assert recovered == ["demand history not saved"]
        # forecasting went on from memory all along: a forecast at every step, each a step later
        assert all(f for f in forecasts)
        assert len({f[0].point for f in forecasts}) > 1
        # the stop saved everything the node saw, the full-disk stretch included
        rows = load_rows(path, STEP)
        assert len(rows) == len(stage.history.rows) == rows_saved + 50 - 1  # the open step is not a row
        assert sorted(p.name for p in path.parent.iterdir()) == ["history.json"], "no temporary left"
    finally:
        unmount(mnt)


def py_spy(pid: int) -> str:
    """The stacks of a process that does not stop, for the failure message."""
    try:
        got = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(py-spy: {exc})"
    return got.stdout + got.stderr


@pytest.mark.root
@pytest.mark.slow
@needs_root
def test_heald_run_keeps_its_demand_history_through_a_full_state_dir_and_stops_on_sigterm(
        tmp_path: Path) -> None:
    """The real daemon, one-second demand steps: the state dir fills while it runs (one error line,
    the saved file stays whole, the daemon goes on), saving resumes once there is room, and a
    SIGTERM with the disk full again stops it (the history kept from the last save that fit)."""
    mnt = tmp_path / "state"
    mount_tmpfs(mnt, "8m")
    log = tmp_path / "agent.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        fs = Tmpfs(mnt)
        history = mnt / "demand" / "history.json"
        cfg = tmp_path / "agent.toml"
        cfg.write_text(f'[node]\nid = "demand-full"\n[paths]\nstate_dir = "{mnt}"\n'
                       f'runtime_dir = "{tmp_path / "run"}"\n[log]\nformat = "json"\n'
                       '[collect.gpu]\nenabled = false\n'
                       '[playbooks]\nload_shipped = false\ndirs = []\nforce_mode = "dry-run"\n'
                       '[demand]\nstep_s = 1\nsave_interval_s = 1\n')

        def rows() -> int:
            try:
                return len(load_rows(history, 1.0))
            except (OSError, ValueError):
                return 0

        def lines(event: str) -> list[dict[str, Any]]:
            out = []
            for raw in log.read_text(errors="replace").splitlines():
                try:
                    e = json.loads(raw)
                except ValueError:
                    continue
                if e.get("event") == event or e.get("what") == event:
                    out.append(e)
            return out

        def wait(what: str, cond: Any, within: float = 30.0) -> None:
            deadline = time.monotonic() + within
            while not cond():
                assert proc is not None
                assert proc.poll() is None, f"heald exited waiting for {what}:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, \
                    f"{what} not seen in {within}s:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)

        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=REPO,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        wait("a first save", lambda: rows() >= 2, 60)
        fs.fill()
        full_at = rows()
        saved = history.read_bytes()
        wait("the failed save's line", lambda: bool(lines("demand history not saved")))
        time.sleep(3)  # three more intervals, three more failed saves
        assert history.read_bytes() == saved, "a failed save changed the file"
        assert len([e for e in lines("demand history not saved") if e.get("level") == "error"]) == 1
        fs.free()
        wait("saving again", lambda: rows() >= full_at + 4)
        assert lines("state write recovered")
        fs.fill()
        before_stop = rows()
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            rc = proc.wait(30)
            print(f"heald run stopped {time.monotonic() - sent:.2f} s after SIGTERM, state dir full")
        except subprocess.TimeoutExpired:
            stacks = py_spy(proc.pid)
            raise AssertionError(f"heald did not stop on SIGTERM with a full state dir:\n{stacks}\n"
                                 f"{log.read_text()[-3000:]}") from None
        assert rc == 0, log.read_text()[-3000:]
        assert rows() >= before_stop, "the history on disk went back"
        assert "Traceback" not in log.read_text()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        unmount(mnt)


# --------------------------------------------------------------------------- memory-exhaustion-predicted

NAMESPACE = Path(__file__).with_name("predictive_edges_namespace.py")
# A scaled host of 2 GiB with 1000 MiB used by others; the workload grows 40 MiB/s: 85 % used at
# about 19 s, out of memory at about 26 s. Its clean shutdown after a TERM takes 8 s, inside the
# step's 10 s grace.
HOST = {"total_mib": 2048, "base_mib": 1000, "rate_mib_s": 40, "term_exit_s": 8.0}


def memory_case(tmp_path: Path, mode: str, **extra: Any) -> dict[str, Any]:
    if not ROOT or subprocess.run(["which", "unshare"], capture_output=True, check=False).returncode:
        pytest.skip("needs root and unshare (a private PID and mount namespace)")
    d = tmp_path / mode
    d.mkdir()
    spec = {"dir": str(d), "mode": mode, "seconds": 55, "kill_after_term_s": 1.0, "fill_at_pct": 80.0,
            **HOST, **extra}
    (d / "spec.json").write_text(json.dumps(spec))
    argv = ["unshare", "--pid", "--kill-child", "--mount", "--mount-proc", "--propagation", "private",
            sys.executable, str(NAMESPACE), str(d / "spec.json")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, cwd=REPO)
    log = (d / "agent.log").read_text()[-3000:] if (d / "agent.log").exists() else ""
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:] + log
    result: dict[str, Any] = json.loads((d / "out.json").read_text())
    result["log"] = (d / "agent.log").read_text()
    return result


def of(result: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for r in result["records"] if r["type"] == kind]


def assert_healed_once(result: dict[str, Any]) -> None:
    """The verdict of the uninterrupted run: one run, stopped by one TERM in its first step, verified."""
    assert result["oom_at"] is None, "the scaled host ran out of memory before heald acted"
    assert len(result["terms"]) == 1, f"TERM sent {len(result['terms'])} times"
    assert result["returncode"] == -signal.SIGTERM, "it died of its TERM after its clean shutdown (no KILL)"
    (start,) = of(result, "run.start")
    assert start["playbook"] == "memory-exhaustion-predicted"
    assert [r["outcome"] for r in of(result, "run.end")] == ["succeeded"]
    assert {r["step"] for r in of(result, "step")} == {0}, "the ladder never went on to step 2"
    assert [r["ok"] for r in of(result, "verify")] == [True]
    assert result["journal"] == [], "the run is finished in the journal"


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["uninterrupted", "kill-in-grace", "kill-before-verify"])
def test_memory_predicted_keeps_its_verdict_across_a_kill_9(tmp_path: Path, mode: str) -> None:
    """The agent killed with SIGKILL while its TERM step waits out the grace (the journal holds
    the step's intent, not its result), or after the step's result before its verification, then
    started again on the same state dir: the same one run, one TERM, succeeded, as uninterrupted."""
    extra = {"kill-in-grace": {"kill_after_term_s": 1.0}, "kill-before-verify": {"kill_after_term_s": 10.0}}
    result = memory_case(tmp_path, "plain" if mode == "uninterrupted" else "kill", **extra.get(mode, {}))
    assert_healed_once(result)
    assert result["audit_ok"] is True
    assert [r["type"] for r in result["audit"]] == [r["type"] for r in result["records"]], \
        "every record handed on is in the audit chain"
    if mode == "uninterrupted":
        assert result["killed_at"] is None
        assert [r["status"] for r in of(result, "step")] == ["done"]
        return
    first, second = result["agents"]
    assert result["killed_at"] is not None
    assert [r["agent"] for r in of(result, "run.start")] == [first]
    (recovered,) = of(result, "run.recovered")
    assert recovered["agent"] == second
    if mode == "kill-in-grace":
        assert recovered["interrupted_step"] == 0
        assert [(r["status"], r["agent"]) for r in of(result, "step")] == [("interrupted", second)]
    else:
        assert recovered["interrupted_step"] is None
        assert recovered["completed_steps"] == [0]
        assert [(r["status"], r["agent"]) for r in of(result, "step")] == [("done", first)]
    assert [r["agent"] for r in of(result, "verify")] == [second]


@pytest.mark.root
@pytest.mark.slow
def test_memory_predicted_acts_with_its_state_dir_full(tmp_path: Path) -> None:
    """The agent's state dir (a 2 MiB tmpfs) filled to the last byte at 80 % used, before the
    trigger: the run still starts, TERMs and verifies; nothing reaches the disk, so the run ends
    with journal_complete false, every record is still handed on (what the coordinator gets), the
    chain on disk stays valid, and each kind of failed write is logged once as an error."""
    result = memory_case(tmp_path, "full")
    assert result["filled_at"] is not None
    assert result["filled_at"] < result["series"][-1]["t"]
    assert_healed_once(result)
    assert of(result, "run.end")[0]["journal_complete"] is False
    assert result["audit_ok"] is True
    assert result["audit"] == [], "nothing fits on the full disk"
    assert [r["type"] for r in result["records"]] == ["run.start", "step", "verify", "run.end"]
    logged = [json.loads(line) for line in result["log"].splitlines() if line.startswith("{")]
    assert sorted(e["event"] for e in logged if e["level"] == "error") == [
        "audit append failed; records go on unchained", "journal write failed; the run goes on unjournaled",
        "playbook state not saved (state dir full or read-only); guards go on from memory"]


# --------------------------------------------------------------------------- raise_limit through the helper

RAISE = Path(__file__).with_name("raise_limit_namespace.py")


def raise_case(tmp_path: Path, mode: str) -> dict[str, Any]:
    if not ROOT or subprocess.run(["which", "unshare"], capture_output=True, check=False).returncode:
        pytest.skip("needs root and unshare (private PID and mount namespaces)")
    d = tmp_path / mode
    d.mkdir()
    (d / "spec.json").write_text(json.dumps({"dir": str(d), "mode": mode, "seconds": 50,
                                             "release_after_s": 4.0, "linger_s": 3.0}))
    argv = ["unshare", "--pid", "--kill-child", "--mount", "--mount-proc", "--propagation", "private",
            sys.executable, str(RAISE), str(d / "spec.json")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, cwd=REPO)
    log = (d / "agent.log").read_text()[-3000:] if (d / "agent.log").exists() else ""
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:] + log
    result: dict[str, Any] = json.loads((d / "out.json").read_text())
    assert result["ended_at"] is not None, result
    return result


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "kill-before-write", "kill-after-write", "full", "full-kill"])
def test_raise_limit_through_the_helper_keeps_its_verdict_and_never_raises_twice(
        tmp_path: Path, mode: str) -> None:
    """file-table-full as shipped, its raise through the real root helper: uninterrupted; the agent
    killed while its systemctl waits before or after the helper (the unit runs on, as systemd's
    does), then restarted; its state dir full; both. Each time fs.file-max goes from 1000 to 2000
    once (never lowered, never doubled twice) and the verdict is succeeded.

    Old (full-kill): with nothing on disk the restarted agent does not know the killed run and
    starts its own; when the killed run's unit raised the table first, the helper refused the
    second (never lowers: "2000 would not raise it"), the step failed on the helper's exit code
    although the table read back at its value, and the run escalated."""
    result = raise_case(tmp_path, mode)
    assert result["file_max"] == [1000, 2000], "raised once to 2000, never lowered, never doubled again"
    helper = [line for line in result["systemctl"] if line.startswith("helper ")]
    assert helper[0] == "helper sysctl-file-max-2000 0"
    assert sum(line.endswith(" 0") for line in helper) == 1, "the helper wrote once"
    ends = [r for r in result["records"] if r["type"] == "run.end"]
    assert [r["outcome"] for r in ends] == ["succeeded"]
    assert not [r for r in result["records"] if r["type"] == "escalate"]
    assert result["audit_ok"] is True
    assert result["journal"] == []
    starts = [line for line in result["systemctl"] if line.startswith("start ")]
    steps = [r for r in result["records"] if r["type"] == "step"]
    if mode in ("plain", "full"):
        assert len(starts) == 1
        assert [(s["status"], s["data"]["read_back"]) for s in steps] == [("done", 2000)]
    if mode in ("kill-before-write", "kill-after-write"):
        assert len(starts) == 1, "the interrupted raise is not started again"
        first, second = result["agents"]
        (recovered,) = [r for r in result["records"] if r["type"] == "run.recovered"]
        assert recovered["agent"] == second
        assert recovered["interrupted_step"] == 0
        assert [(s["status"], s["agent"]) for s in steps] == [("interrupted", second)]
        assert [r["type"] for r in result["audit"]] == \
            ["run.start", "run.recovered", "step", "verify", "run.end"]
    if mode.startswith("full"):
        assert ends[0]["journal_complete"] is False
        assert result["audit"] == []
        logged = [json.loads(line) for line in result["log"].splitlines() if line.startswith("{")]
        errors_logged = [e["event"] for e in logged if e["level"] == "error"]
        per_writer = 1 if mode == "full" else 2  # full-kill: two agent processes, one log
        assert all(errors_logged.count(e) == per_writer for e in errors_logged), errors_logged
        assert len(set(errors_logged)) == 3, errors_logged  # audit, journal, guard state
    if mode == "full-kill":
        # nothing of the first run was on disk: the restarted agent runs the step itself; the
        # killed run's unit raised the table first and the helper refused the second raise
        first, second = result["agents"]
        assert [r["agent"] for r in result["records"] if r["type"] == "run.start"] == [first, second]
        assert len(starts) == 2
        assert "never lowers" in " ".join(result["helper_err"])
        (step,) = steps
        assert step["ok"] is True
        assert step["changed"] is False
        assert step["data"]["read_back"] == 2000


# --------------------------------------------------------------- a verified run cut off before its end


@pytest.mark.asyncio
async def test_a_run_verified_before_a_kill_9_ends_as_succeeded_without_the_next_step(tmp_path: Path) -> None:
    """The journal as a kill -9 between a step's verification and the run's end leaves it (the
    end is handed on and audited first, then written to the journal: a window of two fsyncs and
    the guard state's save). Old: the restart resumed the run after its verified step and ran the
    next one: for memory-exhaustion-predicted, a TERM to the next largest process, after the
    leak had already been stopped."""
    from playbook_kit import idle, make_engine, playbook, running, sample  # noqa: PLC0415

    from agent.act.journal import Journal  # noqa: PLC0415

    marks = tmp_path / "marks"

    def step(tag: str) -> str:
        code = f"open({str(marks)!r}, 'a').write('{tag} ')"
        return f"  - action: run_command\n    params: {{argv: [{sys.executable!r}, '-c', {code!r}]}}\n"

    pb = playbook("name: ladder\ndescription: a gentle step, then a forceful one\n"
                  "trigger: {metric: app.bad, op: '>=', value: 1}\n"
                  f"steps:\n{step('gentle')}{step('forceful')}verify: {{settle: 100ms}}\n")
    header = {"playbook": "ladder", "target": "ladder", "bindings": {}, "inputs": {}, "dry_run": False,
              "trigger": "auto"}
    journal = Journal(tmp_path / "state" / "journal")
    cut = journal.open_run("cut0ff", header)
    cut.intent(0, "run_command")
    cut.result(0, "done", {"ok": True, "changed": True, "detail": "ran"})
    cut.verify(0, True)
    cut.close()
    # and a repeatable step verified as not enough, started again and cut off: that stale
    # verification must not count as a success
    again = journal.open_run("again1", {**header, "playbook": "ladder", "target": "other"})
    again.intent(0, "clean_paths")
    again.result(0, "done", {"ok": True})
    again.verify(0, False)
    again.intent(0, "clean_paths")
    again.close()
    (unfinished,) = [u for u in journal.unfinished() if u.run_id == "again1"]
    assert unfinished.verified == {}
    assert unfinished.interrupted == 0
    (tmp_path / "state" / "journal" / "again1.jsonl").unlink()

    eng, rec = make_engine(tmp_path, [pb])
    async with running(eng):
        for _ in range(10):
            await eng.evaluate(sample({"app.bad": 0.0}), None)
            await asyncio.sleep(0.05)
        await idle(eng)
    assert [(r["type"], r.get("outcome")) for r in rec.actions] == [("run.recovered", None),
                                                                     ("run.end", "succeeded")]
    assert not marks.exists(), "no step ran after the verified one"
    assert journal.unfinished() == []
