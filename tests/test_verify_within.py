"""verify.within: the check is repeated on each new sample until it passes or the window is over.

A forecast needs minutes of new samples to see that a fill stopped (bench/predictive_heal.py's
disk row: healed, yet escalated by a single check a minute after the cleanup). The verdict must
be right both ways: succeeded as soon as a check passes in the window, escalated when none does,
one verify record per step either way; ``within: 0`` is the single check of before; two targets
watch their own windows; a shutdown in the window does not wait for it; a run resumed from its
journal keeps the window counted from the step's end (tests/test_verify_within_kill.py kills a
real daemon in it).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from playbook_kit import drive, make_engine, playbook, running, sample

from agent.act.journal import Journal
from agent.decide.conform import conforms
from agent.decide.loader import parse_playbook
from agent.decide.model import MAX_VERIFY_WITHIN_S

PY = sys.executable


def ladder(marker: Path, *, within: str, steps: int = 1, label: bool = False) -> str:
    code = f"open({str(marker)!r}, 'a').write('-'.join(__import__('sys').argv[1:]) + '\\n')"
    svc = ", '{svc}'" if label else ""
    body = "".join(
        f"  - action: run_command\n    params: {{argv: [{PY!r}, '-c', {code!r}, 'step{i}'{svc}]}}\n"
        "    timeout: 5s\n"
        for i in range(steps)
    )
    key = "app.bad[{svc}]" if label else "app.bad"
    return (
        f"name: fix\ndescription: test ladder\nmode: enforce\ntrigger:\n  metric: '{key}'\n  op: '>='\n"
        f"  value: 1\nsteps:\n{body}verify:\n  settle: 50ms\n  within: {within}\nguards:\n  cooldown: 1h\n"
        "escalate:\n  event: app.unfixed\n"
    )


def lines(p: Path) -> list[str]:
    return p.read_text().split() if p.exists() else []


async def fix_later(
    tmp_path: Path, within: str, clears_after_s: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """The problem clears ``clears_after_s`` after the step ran; the verify and run.end records,
    and the seconds from the step to the run's end."""
    marker = tmp_path / "m"
    eng, rec = make_engine(tmp_path, [playbook(ladder(marker, within=within))])
    fixed_at: list[float] = []

    def bad() -> dict[str, float | None]:
        if marker.exists() and not fixed_at:
            fixed_at.append(time.monotonic())
        return {"app.bad": 0.0 if fixed_at and time.monotonic() - fixed_at[0] >= clears_after_s else 1.0}

    async with running(eng):
        await drive(eng, bad, lambda: bool(rec.of("run.end")), limit_s=15)
        took = time.monotonic() - fixed_at[0]
    return rec.of("verify"), rec.of("run.end"), took


@pytest.mark.asyncio
async def test_condition_clears_in_the_window_succeeds_with_one_verify_record(tmp_path: Path) -> None:
    verifies, ends, took = await fix_later(tmp_path, "3s", clears_after_s=0.6)
    assert [e["outcome"] for e in ends] == ["succeeded"]
    assert len(verifies) == 1, "one verify record per step, not one per sample"
    (v,) = verifies
    assert v["ok"] is True
    assert v["checks"] > 1, v
    assert "the trigger's condition is over" in v["reason"]
    assert took < 2.5, "succeeded at the first passing check, not at the window's end"


@pytest.mark.asyncio
async def test_condition_never_clears_escalates_after_the_window(tmp_path: Path) -> None:
    verifies, ends, took = await fix_later(tmp_path, "800ms", clears_after_s=60)
    assert [e["outcome"] for e in ends] == ["escalated"]
    (v,) = verifies
    assert v["ok"] is False
    assert v["checks"] > 3, v
    assert 0.7 <= v["watched_s"] <= 2.0, v
    assert "still holds" in v["reason"]
    assert 0.8 <= took < 4.0


@pytest.mark.asyncio
async def test_within_zero_is_the_single_check_of_before(tmp_path: Path) -> None:
    verifies, ends, _ = await fix_later(tmp_path, "0s", clears_after_s=0.6)
    assert [e["outcome"] for e in ends] == ["escalated"], "one check, before the problem cleared"
    (v,) = verifies
    assert v["checks"] == 1
    assert v["reason"] == "the trigger's condition still holds", "no window wording without within"
    pb = playbook(ladder(Path("/nonexistent"), within="0s").replace("  within: 0s\n", ""))
    assert pb.verify.within_s == 0.0


@pytest.mark.asyncio
async def test_two_targets_each_get_their_own_verdict(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    eng, rec = make_engine(tmp_path, [playbook(ladder(marker, within="2s", label=True))])
    done_at: dict[str, float] = {}

    def bad() -> dict[str, float | None]:
        for svc in ("a", "b"):
            if f"step0-{svc}" in lines(marker):
                done_at.setdefault(svc, time.monotonic())
        a_fixed = "a" in done_at and time.monotonic() - done_at["a"] >= 0.3
        return {"app.bad[a]": 0.0 if a_fixed else 1.0, "app.bad[b]": 1.0}

    ended: dict[str, float] = {}

    def both() -> bool:
        for e in rec.of("run.end"):
            ended.setdefault(e["target"], time.monotonic())
        return len(ended) == 2

    async with running(eng):
        await drive(eng, bad, both, limit_s=15)
    outcome = {e["target"]: e["outcome"] for e in rec.of("run.end")}
    ta = next(t for t in outcome if "svc=a" in t or t.endswith("a"))
    tb = next(t for t in outcome if t != ta)
    assert outcome == {ta: "succeeded", tb: "escalated"}, outcome
    assert ended[ta] < ended[tb] - 1.0, "a's verdict did not wait for b's window"
    assert len(rec.of("verify")) == 2


@pytest.mark.asyncio
async def test_shutdown_in_the_window_does_not_wait_for_it(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    eng, rec = make_engine(tmp_path, [playbook(ladder(marker, within="1h"))])
    task = asyncio.create_task(eng.run())
    await asyncio.sleep(0)
    try:
        await drive(eng, lambda: {"app.bad": 1.0}, marker.exists)
        for _ in range(10):  # into the window
            await eng.evaluate(sample({"app.bad": 1.0}), None)
            await asyncio.sleep(0.05)
    finally:
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stopped = time.monotonic() - t0
        await eng.supervisor.terminate_all()
    assert stopped < 1.0
    assert not rec.of("run.end")
    assert not rec.of("verify")
    (unfinished,) = Journal(tmp_path / "state" / "journal").unfinished()
    assert unfinished.done == {0: "done"}, "the run stays in the journal, to be resumed"
    assert time.time() - 5 < unfinished.ended[0] <= time.time()


def test_resumed_window_counts_from_the_steps_end_in_the_journal(tmp_path: Path) -> None:
    jdir = tmp_path / "journal"
    jdir.mkdir()
    rec = [{"t": "run", "run_id": "r1", "playbook": "fix", "wall": 100.0},
           {"t": "intent", "step": 0, "action": "x", "wall": 101.0},
           {"t": "result", "step": 0, "status": "done", "result": {}, "wall": 105.0},
           {"t": "intent", "step": 1, "action": "x", "wall": 110.0},
           # a resume marked step 1 interrupted (at 300): its window still counts from its intent
           {"t": "result", "step": 1, "status": "interrupted", "result": {}, "wall": 300.0}]
    (jdir / "r1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rec))
    (u,) = Journal(jdir).unfinished()
    assert u.ended == {0: 105.0, 1: 110.0}


@pytest.mark.asyncio
async def test_resumed_run_past_its_window_checks_once(tmp_path: Path) -> None:
    """A step that ended long ago (its window is over): the resumed run checks once after settle
    and decides, it does not open a fresh window."""
    marker = tmp_path / "m"
    pb = playbook(ladder(marker, within="1h"))
    jdir = tmp_path / "state" / "journal"
    jdir.mkdir(parents=True)
    old = time.time() - 7200
    rec = [{"t": "run", "run_id": "r1", "playbook": "fix", "target": "fix", "bindings": {}, "inputs": {},
            "dry_run": False, "trigger": "auto", "approved_by": "", "wall": old},
           {"t": "intent", "step": 0, "action": "run_command", "wall": old},
           {"t": "result", "step": 0, "status": "done", "result": {"ok": True}, "wall": old + 1}]
    (jdir / "r1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rec))
    eng, recorder = make_engine(tmp_path, [pb])
    async with running(eng):
        took = await drive(eng, lambda: {"app.bad": 1.0}, lambda: bool(recorder.of("run.end")), limit_s=10)
    assert [e["outcome"] for e in recorder.of("run.end")] == ["escalated"]
    (v,) = recorder.of("verify")
    assert v["checks"] == 1
    assert took < 3
    assert not marker.exists(), "the step that has a result is not run again"


def test_within_is_in_the_schema_and_bounded() -> None:
    text = ladder(Path("/x"), within="90s")
    pb, problems = parse_playbook(text, "t.yaml", None)
    assert pb is not None, problems
    assert pb.verify.within_s == 90.0
    import yaml  # noqa: PLC0415

    from agent.decide import schema as schema_mod  # noqa: PLC0415

    assert conforms(yaml.safe_load(text), schema_mod.schema())
    too_long = ladder(Path("/x"), within=f"{MAX_VERIFY_WITHIN_S + 1:g}s")
    pb, problems = parse_playbook(too_long, "t.yaml", None)
    assert pb is None
    assert any("within is at most 1h" in str(p) for p in problems), [str(p) for p in problems]
    pb, problems = parse_playbook(text.replace("within: 90s", "within: soon"), "t.yaml", None)
    assert pb is None


@pytest.mark.asyncio
async def test_a_one_sample_flicker_in_the_window_is_not_a_fix(tmp_path: Path) -> None:
    """The value dips under its line for one sample now and then (a forecast's confidence, a
    bursty writer) while the problem goes on: the window must not take one passing check for a
    fix; a real fix (three passing samples in a row) verifies."""
    marker = tmp_path / "m"
    eng, rec = make_engine(tmp_path, [playbook(ladder(marker, within="2s"))])
    n = [0]

    def bad() -> dict[str, float | None]:
        if not marker.exists():
            return {"app.bad": 1.0}
        n[0] += 1
        return {"app.bad": 0.0 if n[0] % 3 == 0 else 1.0}  # every third sample under the line

    async with running(eng):
        await drive(eng, bad, lambda: bool(rec.of("run.end")), limit_s=15)
    (v,) = rec.of("verify")
    assert v["ok"] is False, v
    assert [e["outcome"] for e in rec.of("run.end")] == ["escalated"]


def forecast_ladder(marker: Path) -> str:
    code = f"open({str(marker)!r}, 'a').write('x')"
    return (
        "name: fill\ndescription: test forecast ladder\nmode: enforce\ntrigger:\n"
        "  forecast: 'disk.free_bytes[/data]'\n  eta_below: 15m\n  min_confidence: 0.6\nsteps:\n"
        f"  - action: run_command\n    params: {{argv: [{PY!r}, '-c', {code!r}]}}\n    timeout: 5s\n"
        "verify:\n  settle: 50ms\n  within: 1h\nguards:\n  cooldown: 1h\nescalate:\n  event: fill.unfixed\n"
    )


@pytest.mark.asyncio
async def test_a_failure_forecast_inside_the_window_warns_at_once_and_keeps_watching(tmp_path: Path) -> None:
    """Watching 3 s (in the field: minutes) for a fill to stop while the forecast says full in 5
    minutes sooner than that: one playbook.verify_at_risk event at the first check, not the news
    after the failure; the window goes on (the writer may stop) and the verdict is the checks'."""
    from playbook_kit import risk  # noqa: PLC0415

    from agent.score.types import Forecast  # noqa: PLC0415 - only this test builds a Risk

    marker = tmp_path / "m"
    eng, rec = make_engine(tmp_path, [playbook(forecast_ladder(marker).replace("within: 1h", "within: 3s"))])
    eta = [2.0]
    stop_at: list[float] = []

    def forecast() -> Any:
        if marker.exists() and not stop_at:
            stop_at.append(time.monotonic())
        ok = bool(stop_at) and time.monotonic() - stop_at[0] > 1.5  # the writer stopped 1.5 s later
        return risk(forecasts=[Forecast(resource="disk.free_bytes[/data]", eta_s=None if ok else eta[0],
                                        confidence=0.9, rate_per_s=0.0 if ok else -1e6)])

    async with running(eng):
        await drive(eng, lambda: {"disk.free_bytes[/data]": 1e9}, lambda: bool(rec.of("run.end")),
                    limit_s=15, risk_fn=forecast)
    warned = [e for e in rec.events if e["kind"] == "playbook.verify_at_risk"]
    assert len(warned) == 1, rec.events
    assert "forecast to fail in 2 s" in warned[0]["message"]
    (v,) = rec.of("verify")
    assert v["ok"] is True, v  # the fill stopped inside the window: succeeded, after the warning
    assert "warned: forecast to fail in 2s" in v["reason"], v
    assert [e["outcome"] for e in rec.of("run.end")] == ["succeeded"]
