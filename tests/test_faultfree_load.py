"""bench/faultfree_load.py: the fault-free bench under benign loads (issue 20).

The smoke run (each of the eight loads 12 s) must print one row per load, every load having run,
the agent's audit log holding no enforced run, and nothing written to bench/results/; a SIGTERM
mid-run must stop the loads, the agent and the namespace and remove the bench's cgroup and files.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import faultfree_load as ffl  # noqa: E402
import healdbench as hb  # noqa: E402

NEEDS = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ffl.TOOLS) or not Path(hb.MOSQUITTO).exists(),
    reason="needs root, stress-ng, gcc, make, tar, unshare and mosquitto")


def bench_env(audits: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{hb.AUDIT_COPY_ENV: str(audits)})
    env.pop(hb.NS_ENV, None)
    return env


def cgroups_of(pid: int) -> list[Path]:
    name = f"heald-ffload-{pid}"
    return [p for p in (Path("/sys/fs/cgroup") / name, Path("/sys/fs/cgroup/memory") / name,
                        Path("/sys/fs/cgroup/pids") / name) if p.exists()]


def test_episodes_merge_gaps_under_30s() -> None:
    samples = [(100.0, ["anomaly"]), (101.0, []), (120.0, ["failure[x]"]), (149.9, ["anomaly"]),
               (180.0, ["forecast[mem.used_pct]"]), (300.0, [])]
    eps = ffl.episodes(samples)
    assert [(e["start"], e["end"], e["samples"]) for e in eps] == [(100.0, 149.9, 3), (180.0, 180.0, 1)]
    assert eps[0]["reasons"] == {"anomaly": 2, "failure[x]": 1}


def fake_run(start: float, product: str, *, acts: int, alert_at: list[float]) -> dict[str, object]:
    """A kept run as keep_run writes it: settle 60 s, `compile` 600 s, a gap of 60 s."""
    phases = [{"name": "settle", "start": start, "end": start + 60, "runs": 0, "failed": 0, "note": "",
               "load": False},
              {"name": "compile", "start": start + 60, "end": start + 660, "runs": 7, "failed": 0, "note": "",
               "load": True},
              {"name": ffl.GAP, "start": start + 660, "end": start + 720, "runs": 0, "failed": 0, "note": "",
               "load": False}]
    audit = [{"ts": start + 100 + i, "type": "run.start", "playbook": "x", "target": "x[]", "dry_run": True}
             for i in range(acts)]
    risk = [[start + t, ["anomaly"] if t in alert_at else []] for t in range(720)]
    return {"phases": phases, "audit": audit, "risk": risk, "model_loaded": True, "started": start,
            "alert_lines": [0.5, 1800.0, 0.5], "product": product,
            "checked": {"playbooks": 25, "audit_records": 10, "dry_runs": acts, "enforced_runs": 0},
            "argv": {"minutes_per_load": 10.0, "loads": ["compile"], "gap_s": 60.0, "settle_s": 60.0},
            "machine": {"node": "vm", "cpus": 2, "release": "6.x", "mem_gib": 23.5}}


def test_combine_adds_up_the_runs_of_one_product_tree_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Two 10-minute runs of tree A (one alert episode, 2 would-be actions in the second) make one
    20-minute compile row; a run of tree B (5 would-be actions) is left out; a checkout with
    uncommitted product changes combines nothing."""
    import gzip  # noqa: PLC0415

    monkeypatch.setattr(ffl, "RUNS", tmp_path)
    a, b, day = "aaaaaaaaaaaa", "bbbbbbbbbbbb", 86400
    for start, product, acts, alerts in ((1.0e9, a, 0, []), (1.0e9 + day, a, 2, [200.0]),
                                         (1.0e9 + 2 * day, b, 5, [])):
        run = fake_run(start, product, acts=acts, alert_at=alerts)
        (tmp_path / f"{int(start)}-{product}.json.gz").write_bytes(gzip.compress(json.dumps(run).encode()))
    assert ffl.combine("aaaaaaaaaaaa") == 0
    out = capsys.readouterr().out
    assert "2 run(s) of product tree aaaaaaaaaaaa" in out
    row = next(line for line in out.splitlines() if line.startswith("| compile |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # minutes, iterations, would-be actions, approval requests, episodes, episodes per 3 h
    assert cells[1:7] == ["20.0", "14 (0)", "2", "0", "1", "9.0"]
    assert "enforced runs: 0" in out
    monkeypatch.setattr(ffl, "product_tree", lambda: "aaaaaaaaaaaa-dirty")
    assert ffl.combine(None) == 2
    assert ffl.combine("cccccccccccc") == 1


def test_combine_adds_up_only_the_runs_fitted_on_one_recording(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Runs of one product tree whose detector was fitted on different recordings are different
    nodes: a run kept without a fit source (the default recording) and one fitted on a varied-load
    recording (--fit-from) are never added together."""
    import gzip  # noqa: PLC0415

    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    monkeypatch.setattr(ffl, "RUNS", runs_dir)
    varied = tmp_path / "varied.jsonl"
    varied.write_text('{"seq": 1, "wall": 1.0, "mono": 1.0, "metrics": {}}\n')
    a, day = "aaaaaaaaaaaa", 86400
    old = fake_run(1.0e9, a, acts=3, alert_at=[])  # kept before fit sources were recorded
    new = fake_run(1.0e9 + day, a, acts=0, alert_at=[100.0])
    new["fit"] = ffl.fit_source([varied])
    for run in (old, new):
        (runs_dir / f"{int(run['started'])}-{a}.json.gz").write_bytes(gzip.compress(json.dumps(run).encode()))
    assert ffl.combine(a, [varied]) == 0
    out = capsys.readouterr().out
    assert f"1 run(s) of product tree {a}, detector fitted on {varied}" in out
    assert "the history seeded with it" in out
    row = next(ln for ln in out.splitlines() if ln.startswith("| compile |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[2:8] == ["10.0", "7 (0)", "0", "0", "1", "18.0"]
    assert ffl.combine(a) == 0  # the default recording: the old run alone
    out = capsys.readouterr().out
    assert "1 run(s) of product tree" in out
    assert "faultfree-71min.npz" in out
    assert "| compile | 10.0 | 7 (0) | 3 |" in out
    assert ffl.combine(a, [varied, varied]) == 1  # a node that lived through it twice: another node
    varied.write_text("another recording\n")
    assert ffl.combine(a, [varied]) == 1


def test_several_fit_from_recordings_are_one_history_in_the_order_given(tmp_path: Path) -> None:
    """--fit-from twice: the node lived through both, the first first; the joined recording
    numbers the samples in that order (each run starts at seq 1, and the features are built in
    seq order), and its fit source names both, its hash depending on the order."""
    import gzip  # noqa: PLC0415

    def rec(name: str, t0: float, n: int) -> Path:
        lines = [json.dumps({"seq": i + 1, "wall": t0 + i, "mono": t0 + i,
                             "metrics": {"mem.used_pct": t0 + i, "cpu.load1": 1.0}}) for i in range(n)]
        path = tmp_path / name
        data = ("\n".join(lines) + "\n").encode()
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        return path

    first, second = rec("a.jsonl.gz", 1000.0, 5), rec("b.jsonl", 5000.0, 3)
    assert ffl.join_recordings([first], tmp_path / "j.jsonl") == first.resolve()  # one: as it is
    joined = ffl.join_recordings([first, second], tmp_path / "j.jsonl")
    rows = [json.loads(ln) for ln in joined.read_text().splitlines()]
    assert [r["seq"] for r in rows] == list(range(1, 9))
    assert [r["wall"] for r in rows] == [1000.0, 1001.0, 1002.0, 1003.0, 1004.0, 5000.0, 5001.0, 5002.0]
    _x, wall = hb.recording_features(joined)
    assert wall.tolist() == [r["wall"] for r in rows]
    one, two = ffl.fit_source([first, second]), ffl.fit_source([second, first])
    assert one["source"] == f"{first} + {second}"
    assert one["sha256"] != two["sha256"]
    assert len(one["sha256"]) == 12
    assert ffl.fit_source([first])["sha256"] == ffl.file_sha(first)  # one recording: its own hash, as before
    proc = subprocess.run([sys.executable, str(BENCH / "faultfree_load.py"), "--fit-from", str(first),
                           "--fit-from", str(tmp_path / "x.npz"), "--combine"], capture_output=True,
                          text=True, timeout=60, check=False, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2
    assert "no such file" in proc.stderr
    (tmp_path / "x.npz").write_bytes(b"")
    proc = subprocess.run([sys.executable, str(BENCH / "faultfree_load.py"), "--fit-from", str(first),
                           "--fit-from", str(tmp_path / "x.npz"), "--combine"], capture_output=True,
                          text=True, timeout=60, check=False, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2
    assert "joined only as .jsonl" in proc.stderr


def test_seeded_history_is_the_daemons_own_and_ends_before_the_start(tmp_path: Path) -> None:
    """--fit-from seeds the node's feature history with the recording, in the daemon's format and
    feature schema, re-timed to end a second before the start with its spacing kept: the score
    stage counts the rows, is due a refit at start, and its export reads them back."""
    import numpy as np  # noqa: PLC0415

    from agent.features.history import read  # noqa: PLC0415
    from agent.features.schema import FeatureSchema  # noqa: PLC0415
    from agent.score.settings import ModelSettings  # noqa: PLC0415
    from agent.score.stage import RiskStage  # noqa: PLC0415

    rec = tmp_path / "rec.jsonl"
    with rec.open("w") as f:  # 700 samples, 1 s apart, a day ago; counters rising
        for i in range(700):
            metrics = {"cpu.util_pct": 10.0 + i % 7, "mem.used_pct": 20.0 + i * 0.001,
                       "net.rx_bytes[eth0]": 1000.0 * i, "proc.count": None}
            f.write(json.dumps({"seq": i, "wall": 1.7e9 + i, "mono": 50.0 + i, "metrics": metrics}) + "\n")
    state = tmp_path / "state"
    end = 1.8e9
    assert hb.seed_history(state, rec, end_wall=end) == 700
    schema = FeatureSchema()
    wall, x = read(state / "history", schema.digest)
    assert wall.size == 700
    assert x.shape == (700, schema.dim)
    assert wall[-1] == pytest.approx(end - 1.0)
    assert np.diff(wall) == pytest.approx(np.ones(699))
    want, _ = hb.recording_features(rec)
    assert np.allclose(x, want, equal_nan=True)
    stage = RiskStage(ModelSettings(), state)
    try:
        assert stage.history_rows() == 700
        assert stage.refit_due()  # 700 s of history >= cold_start_s: the daemon fits on it at start
    finally:
        stage.close()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_seeding_a_full_state_dir_says_so(tmp_path: Path) -> None:
    """A state dir too small for the recording (a real 64 KiB tmpfs) fails the seed with one line
    naming the history dir, instead of starting a node with a part of its past."""
    from heald_kit import tmpfs  # noqa: PLC0415

    rec = tmp_path / "rec.jsonl"
    with rec.open("w") as f:
        for i in range(700):
            f.write(json.dumps({"seq": i, "wall": 1.7e9 + i, "mono": 50.0 + i,
                                "metrics": {"cpu.util_pct": 10.0 + i % 7}}) + "\n")
    with tmpfs("64k") as state, \
            pytest.raises(SystemExit, match=r"feature history in .*/history took \d+ of 700 rows"):
        hb.seed_history(state, rec, end_wall=1.8e9)


@pytest.mark.parametrize(("content", "says"), [
    (None, "no such file"),
    (b"", "no samples"),
    (b'{"seq": 1, "wall": 1.0, "mono": 1.0, "metrics": {}}\n{"seq": 2, "wall": "x"}\n', ":2: "),
    (b'{"seq": 1, "wall": NaN, "mono": 1.0, "metrics": {}}\n', "wall and mono must be finite"),
    (b"\x1f\x8b\x08 truncated", "--fit-from"),
])
def test_a_bad_fit_from_recording_is_one_line_and_exit_2(
        tmp_path: Path, content: bytes | None, says: str) -> None:
    """Checked before anything starts (also for --combine): a missing, empty, malformed (with its
    line), non-finite or broken gzip recording is one line on stderr and exit 2, no traceback."""
    rec = tmp_path / ("rec.jsonl.gz" if content and content.startswith(b"\x1f") else "rec.jsonl")
    if content is not None:
        rec.write_bytes(content)
    for extra in ([], ["--combine"]):
        argv = [sys.executable, str(BENCH / "faultfree_load.py"), "--fit-from", str(rec), *extra]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 2, proc.stderr
        assert says in proc.stderr
        assert "Traceback" not in proc.stderr


def test_the_product_tree_names_committed_product_paths() -> None:
    tree = ffl.product_tree()
    assert tree.removesuffix("-dirty") != "unknown"
    assert len(tree.removesuffix("-dirty")) == 12


def test_faultfree_replay_of_a_bad_run_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A kept run that is not one (not gzip, gzip of garbage) or whose samples are malformed:
    one line on stderr and exit 2, no traceback."""
    import gzip  # noqa: PLC0415

    good = json.dumps({"phases": [], "fit": {"source": "x", "sha256": "0", "seeded": False}}).encode()
    for meta, samples, says in ((b"not gzip", b"", "not a kept run"),
                                (gzip.compress(b"[1, 2"), b"", "not a kept run"),
                                (gzip.compress(good), gzip.compress(b'{"seq": 1, "wall": "x"}\n'), ":1: ")):
        (tmp_path / "r.json.gz").write_bytes(meta)
        (tmp_path / "r.samples.jsonl.gz").write_bytes(samples)
        argv = [sys.executable, str(BENCH / "faultfree_replay.py"), str(tmp_path / "r.json.gz"),
                "--fit-from", str(tmp_path / "r.samples.jsonl.gz")]
        proc = subprocess.run(argv,
                              capture_output=True, text=True, timeout=120, check=False,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 2, proc.stderr
        assert says in proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_process_churn_is_not_an_anomaly_on_the_recorded_proc_burst() -> None:
    """bench/faultfree_replay.py on the kept 18:44 run: the node's detector, fitted as the daemon
    fits it on what a node seeded from the 15:07 run had seen when proc-burst began, scores the
    16 min of proc-burst (and the idle minute after it): with process churn left out (the shipped
    options), no alert. With ``proc.zombies`` put back (the options before), the same fit alerts
    there, on zombie features only: that run's 4 live proc-burst episodes were these (a burst's
    children are zombies until the parent waits for them)."""
    def replay(*extra: str) -> list[str]:
        argv = [sys.executable, str(BENCH / "faultfree_replay.py"), "20261206T184422Z-f8622b19f5d6",
                "--fit-from", "bench/results/faultfree_load/20261206T150750Z-297288f851e6.samples.jsonl.gz",
                "--loads", "proc-burst", *extra]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 0, proc.stderr
        row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("| proc-burst |"))
        return [c.strip() for c in row.split("|")[1:-1]]

    _, past, top, samples, eps, lead = replay()
    assert int(past) > 8000 + 5 * 900  # the 15:07 run, then 18:44's first five loads
    assert float(top) < 1.0
    assert (samples, eps, lead) == ("0", "0", "-")
    _, past, top, samples, eps, lead = replay("--keep", "proc.zombies")
    assert float(top) > 1.0
    assert int(samples) > 10
    assert int(eps.split()[0]) >= 2
    assert all(f.split()[0].startswith("proc.zombies:") for f in lead.split(", ")), lead


@pytest.mark.slow
@pytest.mark.root
@NEEDS
def test_smoke_every_load_runs_nothing_enforced(tmp_path: Path) -> None:
    result = ffl.RESULT  # the one file this bench writes (others may write bench/results/ meanwhile)
    before = result.stat().st_mtime_ns if result.exists() else None
    work, audits = tmp_path / "work", tmp_path / "audits"
    work.mkdir()
    kept = tmp_path / "samples.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH / "faultfree_load.py"), "--smoke", "--dir", str(work),
                           "--samples", str(kept)],
                          cwd=ROOT, env=bench_env(audits), capture_output=True, text=True, timeout=280,
                          check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    header = ("| phase | minutes | iterations (failed) | would-be actions | approval requests "
              "| alert episodes | per 3 h | alert samples (anomaly / classifier / forecast) | risk samples "
              "| notes |")
    assert header in proc.stdout, out[-4000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| phase")}
    assert set(rows) == {*ffl.LOADS, "settle", "idle gap"}, rows
    for name in ffl.LOADS:
        cells = rows[name]
        assert len(cells) == 9, (name, cells)
        assert 0.15 <= float(cells[0]) <= 1.0, (name, cells)  # minutes: 12 s, stopped on time
        runs, failed = cells[1].replace("(", "").replace(")", "").split()
        assert int(runs) >= 1, (name, cells)  # every load ran
        assert int(failed) == 0, (name, cells)
        assert int(cells[7]) >= 5, (name, cells)  # the node's risk reports arrived during the load
    assert "enforced runs: 0" in proc.stdout
    assert "loaded: True" in proc.stdout  # the detector was fitted before the start
    # the node's raw samples, as `heald replay` reads them: one a second through the whole run
    from agent.decide.replay import samples  # noqa: PLC0415

    got = list(samples(kept))
    assert len(got) >= 100, len(got)
    assert all(b.seq > a.seq and b.mono > a.mono for a, b in itertools.pairwise(got))
    assert all("mem.available_bytes" in s.metrics for s in got)
    logs = sorted(audits.glob("*-audit.jsonl"))
    assert logs, "the bench did not hand over its audit log"
    entries = [json.loads(line)["record"] for log in logs for line in log.read_text().splitlines()]
    assert not [r for r in entries if r.get("type") == "run.start" and r.get("dry_run") is not True]
    after = result.stat().st_mtime_ns if result.exists() else None
    assert after == before, f"a --smoke run must not write {result}"
    assert list(work.iterdir()) == [], "the bench left files behind"


@pytest.mark.slow
@pytest.mark.root
@NEEDS
def test_sigterm_stops_loads_and_cleans_up(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, str(BENCH / "faultfree_load.py"), "--smoke", "--dir", str(work),
                             "--loads", "stress-cpu", "--minutes-per-load", "3"], cwd=ROOT,
                            env=bench_env(tmp_path / "audits"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 90
    for line in proc.stdout:
        seen.append(line)
        if "stress-cpu for" in line or time.monotonic() > deadline:
            break
    assert any("stress-cpu for" in s for s in seen), "".join(seen)[-3000:]
    time.sleep(3)
    groups = cgroups_of(proc.pid)
    assert groups, "the loads' cgroup should exist while the bench runs"
    loads = {int(x) for x in (groups[0] / "cgroup.procs").read_text().split()}
    stress = [pid for pid in loads if b"stress-ng" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert stress, "stress-ng should be running in the bench's cgroup"
    proc.send_signal(signal.SIGTERM)
    try:  # at once, not at the end of the load's 3 minutes
        rest, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=200)
        raise
    assert proc.returncode != 0, "".join(seen) + rest
    assert cgroups_of(proc.pid) == [], "the cgroup was left behind"
    assert list(work.iterdir()) == [], "the bench left files behind"
    for pid in loads:  # every process of the loads is gone
        assert not Path(f"/proc/{pid}").exists(), pid
