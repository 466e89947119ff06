"""Engine: ladder, verification, escalation, backoff, breaker, dry-run, approval, reload, restart."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from playbook_kit import drive, idle, make_engine, playbook, risk, running, sample

from agent.act.audit import verify
from agent.decide.settings import PlaybookSettings
from agent.errors import HealdError

PY = sys.executable


def ladder(
    marker: Path,
    *,
    name: str = "fix",
    mode: str = "enforce",
    steps: int = 2,
    guards: str = "",
    fail: bool = False,
    trigger: str | None = None,
) -> str:
    code = (
        f"open({str(marker)!r}, 'a').write('{{}}\\n'.format(__import__('sys').argv[1])); "
        f"raise SystemExit({int(fail)})"
    )
    body = "".join(
        f"  - action: run_command\n    params: {{argv: [{PY!r}, '-c', {code!r}, 'step{i}']}}\n"
        "    timeout: 5s\n"
        for i in range(steps)
    )
    trig = trigger or "  metric: app.bad\n  op: '>='\n  value: 1\n"
    return (
        f"name: {name}\ndescription: test ladder\nmode: {mode}\ntrigger:\n{trig}steps:\n{body}"
        f"verify:\n  settle: 50ms\nguards:\n{guards or '  cooldown: 0s'}\n"
        "escalate:\n  event: app.unfixed\n  message: 'app still bad on {node}'\n"
    )


def lines(p: Path) -> list[str]:
    return p.read_text().split() if p.exists() else []


@pytest.mark.asyncio
async def test_first_step_fixes_it(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    eng, rec = make_engine(tmp_path, [playbook(ladder(marker))])
    state = {"bad": 1.0}
    async with running(eng):
        await drive(eng, lambda: {"app.bad": state["bad"]}, marker.exists)
        state["bad"] = 0.0
        await drive(eng, lambda: {"app.bad": state["bad"]}, lambda: bool(rec.of("run.end")))
    assert lines(marker) == ["step0"]
    assert rec.of("run.end")[0]["outcome"] == "succeeded"
    assert rec.of("verify")[0]["ok"] is True
    start = rec.of("run.start")[0]
    assert start["inputs"] == {"app.bad": 1.0}
    assert start["dry_run"] is False
    assert verify(tmp_path / "state" / "audit.jsonl").ok
    assert not rec.events


@pytest.mark.asyncio
async def test_ladder_escalates_backs_off_and_trips_breaker_without_looping(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    guards = "  cooldown: 200ms\n  backoff: 2\n  max_cooldown: 10s\n  breaker: {failures: 3}\n"
    eng, rec = make_engine(tmp_path, [playbook(ladder(marker, guards=guards))])
    async with running(eng):
        # the problem never goes away; feed samples for a while
        t = await drive(eng, lambda: {"app.bad": 1.0}, lambda: bool(rec.of("breaker.open")), limit_s=20)
        for _ in range(30):  # keep it failing: nothing more may run while the breaker is open
            await eng.evaluate(sample({"app.bad": 1.0}), None)
            await asyncio.sleep(0.05)
    ends = rec.of("run.end")
    assert [e["outcome"] for e in ends] == ["escalated"] * 3
    assert lines(marker) == ["step0", "step1"] * 3, "each run walks the ladder once; no loop"
    starts = [r["audit_seq"] for r in rec.of("run.start")]
    assert len(starts) == 3
    esc = [e for e in rec.events if e["kind"] == "app.unfixed"]
    assert len(esc) == 3
    # the playbook's message, then what each step did
    assert esc[0]["message"].startswith("app still bad on n1. Tried: 1-run_command (run_command): ")
    assert "step1 exited 0" in esc[0]["message"]
    assert [e["kind"] for e in rec.events].count("playbook.suspended") == 1
    held = [r["reason"] for r in rec.of("held")]
    assert "cooldown" in held
    assert held[-1] == "breaker-open"
    st = eng.store.get("fix")
    assert st.breaker_open_since is not None
    assert st.consecutive_failures == 3
    assert t > 0.2 + 0.4, "backed-off cooldowns (200ms, 400ms) separate the runs"


@pytest.mark.asyncio
async def test_failed_step_goes_to_next_step(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    eng, rec = make_engine(tmp_path, [playbook(ladder(marker, fail=True))])
    async with running(eng):
        await drive(eng, lambda: {"app.bad": 1.0}, lambda: bool(rec.of("run.end")))
    steps = rec.of("step")
    assert [s["status"] for s in steps] == ["failed", "failed"]
    assert not rec.of("verify"), "failed steps are not verified"
    assert rec.of("run.end")[0]["outcome"] == "escalated"


@pytest.mark.asyncio
async def test_dry_run_and_force_mode(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    eng, rec = make_engine(tmp_path, [playbook(ladder(marker, mode="dry-run"))])
    async with running(eng):
        await drive(eng, lambda: {"app.bad": 1.0}, lambda: bool(rec.of("run.end")))
    assert not marker.exists()
    assert [s["status"] for s in rec.of("step")] == ["dry-run", "dry-run"]
    assert rec.of("step")[0]["detail"].startswith("would run: ")
    assert rec.of("run.end")[0]["outcome"] == "dry-run"
    assert eng.store.get("fix").consecutive_failures == 0

    forced = PlaybookSettings(load_shipped=False, dirs=(), force_mode="dry-run")
    eng2, rec2 = make_engine(tmp_path / "2", [playbook(ladder(marker))], forced)
    async with running(eng2):
        await drive(eng2, lambda: {"app.bad": 1.0}, lambda: bool(rec2.of("run.end")))
    assert not marker.exists()
    assert rec2.of("run.end")[0]["outcome"] == "dry-run"


@pytest.mark.asyncio
async def test_off_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    eng, rec = make_engine(tmp_path, [playbook(ladder(marker, mode="off"))])
    async with running(eng):
        for _ in range(10):
            await eng.evaluate(sample({"app.bad": 1.0}), None)
            await asyncio.sleep(0.01)
    assert not rec.actions
    assert not marker.exists()


@pytest.mark.asyncio
async def test_approval_mode(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    eng, rec = make_engine(tmp_path, [playbook(ladder(marker, mode="approval"))])
    state = {"bad": 1.0}
    async with running(eng):
        for _ in range(5):
            await eng.evaluate(sample({"app.bad": 1.0}), None)
        pend = eng.pending_approvals()
        assert [p["playbook"] for p in pend] == ["fix"]
        assert pend[0]["inputs"] == {"app.bad": 1.0}
        assert [e["kind"] for e in rec.events] == ["playbook.approval_requested"]
        assert not marker.exists()
        run_id = await eng.trigger_manual("fix", approved_by="alice")
        with pytest.raises(HealdError, match="already running"):
            await eng.trigger_manual("fix", approved_by="bob")
        await drive(eng, lambda: {"app.bad": state["bad"]}, marker.exists)
        state["bad"] = 0.0
        await drive(eng, lambda: {"app.bad": state["bad"]}, lambda: bool(rec.of("run.end")))
    start = rec.of("run.start")[0]
    assert start["run_id"] == run_id
    assert start["approved_by"] == "alice"
    assert start["trigger"] == "approved"
    assert eng.pending_approvals() == []
    with pytest.raises(HealdError, match="no playbook"):
        await eng.trigger_manual("nope", approved_by="x")


@pytest.mark.asyncio
async def test_cold_start_hold_for_model_driven_triggers(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    trig = "  risk: anomaly\n  above: 1.0\n"
    eng, rec = make_engine(tmp_path, [playbook(ladder(marker, trigger=trig, steps=1))])
    async with running(eng):
        for _ in range(5):
            await eng.evaluate(sample({}), risk(anomaly=3.0, cold=True))
        assert [r["reason"] for r in rec.of("held")] == ["cold-start"]
        assert not rec.of("run.start")
        await drive(eng, dict, lambda: bool(rec.of("run.start")), risk_fn=lambda: risk(anomaly=3.0))
    assert rec.of("run.start")[0]["model_version"] == "test-1"
    assert rec.of("run.start")[0]["anomaly"] == 3.0


@pytest.mark.asyncio
async def test_disconnected_hold(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    eng, rec = make_engine(tmp_path, [playbook(ladder(marker, steps=1, guards="  disconnected: hold"))])
    async with running(eng):
        eng.set_connected(False)
        await eng.evaluate(sample({"app.bad": 1.0}), None)
        assert rec.of("held")[0]["reason"] == "disconnected"
        eng.set_connected(True)
        await drive(eng, lambda: {"app.bad": 1.0}, lambda: bool(rec.of("run.start")))


@pytest.mark.asyncio
async def test_max_runs_window_and_global_concurrency(tmp_path: Path) -> None:
    m1, m2 = tmp_path / "a", tmp_path / "b"
    slow = "  metric: app.bad\n  op: '>='\n  value: 1\n"
    g = "  cooldown: 0s\n  max_runs: {count: 2, window: 1h}\n  breaker: {failures: 100}"
    pbs = [
        playbook(ladder(m1, name="a", steps=1, guards=g, trigger=slow)),
        playbook(ladder(m2, name="b", steps=1, guards=g, trigger=slow)),
    ]
    settings = PlaybookSettings(load_shipped=False, dirs=(), max_concurrent=1)
    eng, rec = make_engine(tmp_path, pbs, settings)
    async with running(eng):
        await drive(eng, lambda: {"app.bad": 1.0}, lambda: len(rec.of("run.end")) >= 4, limit_s=20)
        for _ in range(20):
            await eng.evaluate(sample({"app.bad": 1.0}), None)
            await asyncio.sleep(0.02)
        await idle(eng)
    assert len(lines(m1)) == 2, "max_runs: 2 per window each"
    assert len(lines(m2)) == 2
    assert "max-runs" in [r["reason"] for r in rec.of("held")]
    assert "concurrency" in [r["reason"] for r in rec.of("held")]
    # never more than one run at a time
    depth = 0
    for r in rec.actions:
        depth += {"run.start": 1, "run.end": -1}.get(r["type"], 0)
        assert depth <= 1


@pytest.mark.asyncio
async def test_state_survives_reload_and_restart(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    guards = "  cooldown: 1h\n  breaker: {failures: 1}\n"
    pb = playbook(ladder(marker, steps=1, guards=guards))
    eng, rec = make_engine(tmp_path, [pb])
    async with running(eng):
        await drive(eng, lambda: {"app.bad": 1.0}, lambda: bool(rec.of("breaker.open")))
        eng.reload([playbook(ladder(marker, steps=1, guards=guards).replace("test ladder", "edited"))])
        await eng.evaluate(sample({"app.bad": 1.0}), None)
        assert eng.status()[0]["breaker_open"] is True
    saved = json.loads((tmp_path / "state" / "playbooks.json").read_text())
    assert saved["version"] == 2
    assert saved["targets"]["fix"]["breaker_open_since"] is not None
    eng2, rec2 = make_engine(tmp_path, [pb])
    async with running(eng2):
        for _ in range(10):
            await eng2.evaluate(sample({"app.bad": 1.0}), None)
        assert not rec2.of("run.start")
        assert rec2.of("held")[0]["reason"] == "breaker-open"
        await eng2.trigger_manual("fix", approved_by="ops")  # an operator resets the breaker
        await drive(eng2, lambda: {"app.bad": 1.0}, lambda: bool(rec2.of("run.end")))
    assert rec2.of("breaker.reset")[0]["by"] == "ops"
    assert len(lines(marker)) == 2
    assert verify(tmp_path / "state" / "audit.jsonl").ok, "the chain continues across restarts"


@pytest.mark.asyncio
async def test_event_trigger_verification_ignores_handled_events(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    trig = "  event: app.crash\n  within: 10m\n"
    eng, rec = make_engine(tmp_path, [playbook(ladder(marker, trigger=trig, steps=2))])
    from agent.collect.sample import Event  # noqa: PLC0415

    crash = [Event(kind="app.crash", source="t", wall=__import__("time").time())]
    async with running(eng):
        await eng.evaluate(sample({}, crash), None)
        await drive(eng, dict, lambda: bool(rec.of("run.end")))
        for _ in range(10):  # the crash is still inside the 10 minute window, but it was handled
            await eng.evaluate(sample({}), None)
            await asyncio.sleep(0.01)
    assert rec.of("run.end")[0]["outcome"] == "succeeded"
    assert lines(marker) == ["step0"]
    assert len(rec.of("run.start")) == 1


@pytest.mark.asyncio
async def test_step_timeout_kills_the_command(tmp_path: Path) -> None:
    text = (
        "name: slow\ndescription: d\ntrigger: {metric: app.bad, op: '>=', value: 1}\n"
        "steps:\n  - action: run_command\n"
        f"    params: {{argv: [{PY!r}, '-c', 'import time; time.sleep(30)']}}\n"
        "    timeout: 300ms\nverify: {settle: 10ms}\n"
    )
    eng, rec = make_engine(tmp_path, [playbook(text)])
    async with running(eng):
        await drive(eng, lambda: {"app.bad": 1.0}, lambda: bool(rec.of("run.end")))
    step = rec.of("step")[0]
    assert step["ok"] is False
    assert "timed out" in step["detail"]
    assert step["duration_s"] < 5
