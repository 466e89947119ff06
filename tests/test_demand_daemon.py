"""The daemon's demand path: the history (step means, bounded, kept across restarts), the fit in a
child process (``heald model train-demand``), live forecasts in ``Risk.demand`` and the summaries
that ride on the cost message."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent import wire
from agent.features.demand_history import DemandHistory, DemandSettings, load_rows
from agent.score import demand as dm
from agent.score.demand_stage import MODEL_FILE, DemandStage

STEP = 300.0
DAY = 86_400.0


def _cpu(wall: float) -> float:
    """A daily load: 10 % at night, 80 % from 14:00 to 16:00 UTC."""
    h = (wall % DAY) / 3600.0
    return 80.0 if 14.0 <= h < 16.0 else 10.0


def write_history(path: Path, days: float, end: float, *, step: float = STEP, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n = int(days * DAY / step)
    first = (math.floor(end / step) - n) * step
    rows = []
    for i in range(n):
        w = first + i * step
        rows.append([w, {"cpu.util_pct": _cpu(w) + float(rng.normal(0, 2)),
                         "mem.used_pct": 40.0 + float(rng.normal(0, 1)),
                         "net.rx_bytes_per_s[eth9]": 1e6 + float(rng.normal(0, 1e4))}])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": 1, "step_s": step, "rows": rows}))


def test_history_keeps_step_means_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "demand" / "history.json"
    h = DemandHistory(10.0, 2, path)
    t0 = 1_000_000.0
    for i in range(35):  # 3.5 steps of 10 s at 1 Hz
        h.push({"cpu.util_pct": float(i), "mem.used_pct": math.nan, "disk.x": 5.0,
                "net.rx_bytes_per_s[lo]": 1.0, "gpu.util_pct[0]": math.inf}, t0 + i)
    assert [w for w, _ in h.rows] == [t0, t0 + 10, t0 + 20]
    assert h.rows[0][1] == {"cpu.util_pct": 4.5, "net.rx_bytes_per_s[lo]": 1.0}  # NaN, inf, others: out
    assert h.take_period() == {"cpu.util_pct": 17.0, "net.rx_bytes_per_s[lo]": 1.0}
    assert h.take_period() == {}
    h.save()
    again = DemandHistory(10.0, 2, path)
    assert list(again.rows) == list(h.rows)
    # a clock stepping back drops that step rather than breaking the time order
    again.push({"cpu.util_pct": 1.0}, t0 + 5)
    again.push({"cpu.util_pct": 1.0}, t0 + 100)
    assert [w for w, _ in again.rows] == [t0, t0 + 10, t0 + 20]
    # bounded: two days of 10 s steps, and no row older than two days (after a long stop)
    assert again.rows.maxlen == 2 * 8640
    again.push({"cpu.util_pct": 1.0}, t0 + 2 * DAY + 15)
    again.push({"cpu.util_pct": 1.0}, t0 + 2 * DAY + 25)
    assert [w for w, _ in again.rows] == [t0 + 10, t0 + 20, t0 + 100, t0 + 2 * DAY + 10]


def test_a_history_that_is_not_one_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    for junk in (b"{", b"[]", b'{"format": 1, "step_s": 10, "rows": [[1, {}], [0, {}]]}',
                 b'{"format": 1, "step_s": 300, "rows": []}', b'{"format": 1, "step_s": 1e400, "rows": []}'):
        path.write_bytes(junk)
        h = DemandHistory(10.0, 2, path)
        assert not h.rows
    with pytest.raises(ValueError, match="step_s inf"):
        load_rows(path)
    # hostile values inside a good file: NaN/inf and non-numbers are dropped, the row stays
    path.write_text('{"format": 1, "step_s": 10, "rows": [[10, {"a": NaN, "b": "x", "c": 2}]]}')
    assert load_rows(path) == [(10.0, {"c": 2.0})]


def test_history_save_is_atomic_under_kill(tmp_path: Path) -> None:
    """A writer killed with SIGKILL mid-loop leaves a history that loads (the old or the new file)."""
    path = tmp_path / "demand" / "history.json"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from agent.features.demand_history import DemandHistory\n"
        f"h = DemandHistory(1.0, 2, Path({str(path)!r}))\n"
        "t = 1e6\n"
        "while True:\n"
        "    for _ in range(5000):\n"
        "        t += 1\n"
        "        h.push({'cpu.util_pct': 1.0, 'mem.used_pct': 2.0}, t)\n"
        "    h.save()\n"
        "    sys.stdout.write('.'); sys.stdout.flush()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.read(3) == b"..."
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    rows = load_rows(path, 1.0)
    assert len(rows) >= 3 * 5000 - 1


def test_the_daemon_fits_in_a_child_forecasts_and_reloads(tmp_path: Path) -> None:
    now = time.time()
    settings = DemandSettings(step_s=STEP, horizon_s=3 * 3600.0)
    stage = DemandStage(settings, tmp_path)
    assert stage.scorer is None
    assert not stage.fit_due(now)
    write_history(tmp_path / "demand" / "history.json", 2.5, now)
    stage = DemandStage(settings, tmp_path)  # a restart reads it back
    assert stage.history.span_s >= 2 * DAY
    assert stage.fit_due(now)
    assert asyncio.run(stage.refit())
    assert not stage.fit_due(time.time())
    assert (tmp_path / "models" / MODEL_FILE).exists()
    assert not list((tmp_path / "models" / "work").iterdir())
    model = dm.FORMAT.load(tmp_path / "models" / MODEL_FILE)
    assert model.meta.resources == ("cpu.util_pct", "mem.used_pct", "net.rx_bytes_per_s[eth9]")
    assert model.meta.horizon_steps == 36

    again = DemandStage(settings, tmp_path)  # a restart loads the node's own fit
    assert again.model_version == model.version
    # live: the forecast for 14:00-16:00 tomorrow-ish follows the learned peak
    day0 = math.floor(now / DAY) * DAY + DAY
    t = day0 + 12 * 3600.0
    fc: tuple[object, ...] = ()
    for i in range(5):
        fc = again.on_sample({"cpu.util_pct": 10.0, "mem.used_pct": 40.0}, t + i)
    assert again.on_sample({"cpu.util_pct": 10.0}, t + 5) is fc  # the same tuple within a step
    cpu = next(f for f in again.on_sample({"cpu.util_pct": 10.0}, t + 6) if f.resource == "cpu.util_pct")
    peak = cpu.peak(3 * 3600.0)
    assert peak is not None
    assert peak[0] > 60.0
    rise = next(i for i, v in enumerate(cpu.point) if v > 45.0)  # the profile is smoothed over 3 steps
    assert 7200.0 - 2 * STEP <= STEP * (rise + 1) <= 7200.0 + STEP
    assert cpu.peak(3600.0) is not None
    assert cpu.peak(3600.0)[0] < 30.0
    assert all(lo <= p <= hi for lo, p, hi in zip(cpu.lo, cpu.point, cpu.hi, strict=True))


def test_a_bad_fit_keeps_the_model_and_a_pre_fitted_artifact_is_never_refitted(tmp_path: Path) -> None:
    now = time.time()
    write_history(tmp_path / "h" / "demand" / "history.json", 2.2, now)
    settings = DemandSettings(step_s=STEP)
    stage = DemandStage(settings, tmp_path / "h")
    assert asyncio.run(stage.refit())
    version = stage.model_version
    stage.history.rows.clear()  # an empty history: the child refuses it
    assert not asyncio.run(stage.refit())
    assert stage.model_version == version

    art = tmp_path / "h" / "models" / MODEL_FILE
    pre = DemandStage(DemandSettings(model_path=str(art)), tmp_path / "other")
    assert pre.model_version == version
    write_history(tmp_path / "other" / "demand" / "history.json", 3, now)
    assert not DemandStage(DemandSettings(model_path=str(art)), tmp_path / "other").fit_due(now)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an artifact")
    assert DemandStage(DemandSettings(model_path=str(bad)), tmp_path / "x").scorer is None


def test_train_demand_cli_says_one_line_on_bad_input(tmp_path: Path) -> None:
    (tmp_path / "h.json").write_text('{"format": 1, "step_s": 300, "rows": [[0, {"cpu.util_pct": 1}]]}')
    r = subprocess.run([sys.executable, "-m", "agent", "model", "train-demand", "--history",
                        str(tmp_path / "h.json"), "--output", str(tmp_path / "o.npz")],
                       capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "a day of values" in r.stderr
    assert not (tmp_path / "o.npz").exists()


def test_train_demand_cli_names_each_resources_forecast(tmp_path: Path) -> None:
    write_history(tmp_path / "h.json", 3, time.time())
    r = subprocess.run([sys.executable, "-m", "agent", "model", "train-demand", "--history",
                        str(tmp_path / "h.json"), "--output", str(tmp_path / "o.npz")],
                       capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("forecast per resource: "))
    named = dict(part.split(" ") for part in line.removeprefix("forecast per resource: ").split(", "))
    assert {"cpu.util_pct", "mem.used_pct", "net.rx_bytes_per_s[eth9]"} == set(named), line
    assert set(named.values()) <= {"model", "blend", "naive"}, line


def test_summaries_compare_the_last_forecast_with_what_came(tmp_path: Path) -> None:
    now = time.time()
    write_history(tmp_path / "demand" / "history.json", 2.2, now)
    stage = DemandStage(DemandSettings(step_s=STEP), tmp_path)
    assert asyncio.run(stage.refit())
    t = math.floor(now / DAY) * DAY + DAY + 13 * 3600.0  # 13:00: the peak starts within the hour
    for i in range(0, 600, 10):
        stage.on_sample({"cpu.util_pct": 12.0, "mem.used_pct": 41.0}, t + i)
    first = {s.resource: s for s in stage.summaries(t, t + 600)}
    assert first["cpu.util_pct"].actual == pytest.approx(12.0)
    assert first["cpu.util_pct"].predicted is None  # nothing was forecast before
    assert len(first["cpu.util_pct"].point) == 24
    assert first["cpu.util_pct"].step_s == STEP
    for i in range(600, 3900, 10):
        stage.on_sample({"cpu.util_pct": 75.0, "mem.used_pct": 41.0}, t + i)
    second = {s.resource: s for s in stage.summaries(t + 600, t + 3900)}
    assert second["cpu.util_pct"].actual == pytest.approx(75.0)
    predicted = second["cpu.util_pct"].predicted
    assert predicted is not None
    assert 15.0 < predicted < 40.0
    # it goes on the wire with the cost summary, and decodes
    msg = wire.Cost(v=1, node="n1", site="s1", seq=1, ts=now, mono=1.0, start=t, end=t + 3900,
                    demand=list(second.values()))
    back = wire.decode(wire.encode(msg))
    assert isinstance(back, wire.Cost)
    assert back.demand == msg.demand


def test_heald_check_names_a_bad_model_path(tmp_path: Path) -> None:
    bad = tmp_path / "demand.npz"
    bad.write_bytes(b"junk")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n'
                   f'[playbooks]\nload_shipped = false\ndirs = []\n[demand]\nmodel_path = "{bad}"\n')
    r = subprocess.run([sys.executable, "-m", "agent", "check", "--config", str(cfg)], capture_output=True,
                       text=True, check=False, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "demand.model_path" in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_heald_run_fits_the_history_it_finds_and_keeps_it_at_stop(tmp_path: Path) -> None:
    """The real daemon: a state dir holding two days of demand history gets a demand model fitted in
    the fit child by the ``demand`` task, and the history is saved at stop (SIGTERM)."""
    state = tmp_path / "state"
    history = state / "demand" / "history.json"
    write_history(history, 2.2, time.time())
    rows_before = len(load_rows(history))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[node]\nid = "fit-node"\n[paths]\nstate_dir = "{state}"\n'
                   f'runtime_dir = "{tmp_path / "run"}"\n'
                   '[log]\nformat = "json"\n'
                   '[playbooks]\nload_shipped = false\ndirs = []\nforce_mode = "dry-run"\n'
                   '[demand]\nsave_interval_s = 1\n')
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 90
        while not (state / "models" / MODEL_FILE).exists() and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.5)
        assert (state / "models" / MODEL_FILE).exists(), log.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert '"demand model fitted"' in log.read_text()
    model = dm.FORMAT.load(state / "models" / MODEL_FILE)
    assert "cpu.util_pct" in model.meta.resources
    assert len(load_rows(history, STEP)) >= rows_before  # saved at stop, nothing lost
