"""bench/same_behaviour.py: two commits of the product shown to behave alike, or not (issue 20).

A temporary git repository holds this checkout's product paths as committed (commit A); commits
on top of it change a comment in agent/score/forecast.py (same behaviour), the rate every forecast
reports (different: the first differing sample is named), and a playbook the score stage never
loads (not shown). ``faultfree_load.py --combine`` counts an old tree's runs with a new one's only
through a kept record with the verdict that replayed those runs.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import faultfree_load as ffl  # noqa: E402
import same_behaviour as sb  # noqa: E402

KEPT = "20261207T020140Z-d2e1e949f7ce"
LIMIT = 200


def git(repo: Path, *a: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def commit(repo: Path, msg: str) -> str:
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", msg)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q")
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD", *ffl.PRODUCT_PATHS],
                         capture_output=True, check=True, timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(r)], input=tar, check=True, timeout=60)
    commit(r, "A")
    return r


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_the_tree_is_the_one_faultfree_load_names() -> None:
    head = git(ROOT, "rev-parse", "HEAD")
    assert sb.tree_of(ROOT, head) == ffl.product_tree().removesuffix("-dirty")


def test_a_comment_is_the_same_a_rate_is_not_a_playbook_is_not_shown(repo: Path) -> None:
    runs = sb.kept_runs([KEPT])
    a = git(repo, "rev-parse", "HEAD")
    forecast = repo / "agent" / "score" / "forecast.py"
    edit(forecast, '"""``total``, or for', '"""(a comment only) ``total``, or for')
    b = commit(repo, "B: a docstring")
    rec = sb.compare(repo, a, b, runs, limit=LIMIT, progress=False)
    assert rec["changed"] == ["agent/score/forecast.py"]
    assert rec["old"]["tree"] != rec["new"]["tree"]
    assert rec["runs"][0]["samples"] == LIMIT
    paths = rec["runs"][0]["paths"]
    assert set(paths) == ({"native", "numpy"} if (ROOT / sb.LIB).is_file() else {"numpy"})
    assert all(p["same"] for p in paths.values())
    assert rec["same"]
    assert rec["first_difference"] is None
    assert rec["not_loaded"] == []
    assert "SAME BEHAVIOUR" in sb.table(rec)

    edit(forecast, "rate_per_s=rt)", "rate_per_s=rt * 1.000001)")
    c = commit(repo, "C: the rate")
    rec = sb.compare(repo, b, c, runs, limit=LIMIT, progress=False)
    assert not rec["same"]
    assert not any(p["same"] for p in rec["runs"][0]["paths"].values())
    diff = rec["first_difference"]
    assert diff["run"] == KEPT
    assert isinstance(diff["seq"], int)
    assert "DIFFERENT" in sb.table(rec)
    assert f"sample seq {diff['seq']}" in sb.table(rec)

    playbook = min((repo / "remediations").glob("*.yaml"))
    playbook.write_text(playbook.read_text() + "\n# a comment\n")
    d = commit(repo, "D: a playbook")
    rec = sb.compare(repo, c, d, runs, limit=LIMIT, progress=False)
    assert all(p["same"] for p in rec["runs"][0]["paths"].values())  # the score stage cannot see it
    assert rec["not_loaded"] == [str(playbook.relative_to(repo))]
    assert not rec["same"]
    assert rec["first_difference"] is None
    assert "NOT SHOWN" in sb.table(rec)


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for argv in (["HEAD", "no-such-commit-xyz"], ["--run", str(tmp_path / "x.json.gz")]):
        proc = subprocess.run([sys.executable, str(BENCH / "same_behaviour.py"), *argv], capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("same_behaviour: "), proc.stderr
        assert "Traceback" not in proc.stderr


def fake_run(start: float, product: str, fit: dict[str, object], acts: int, note: str) -> dict[str, object]:
    phases = [{"name": "compile", "start": start, "end": start + 600, "runs": 7, "failed": 0, "note": note,
               "load": True}]
    audit = [{"ts": start + 1 + i, "type": "run.start", "playbook": "x", "target": "x[]", "dry_run": True}
             for i in range(acts)]
    return {"phases": phases, "audit": audit, "risk": [[start + t, []] for t in range(600)],
            "model_loaded": True, "started": start, "alert_lines": [0.5, 1800.0, 0.5], "product": product,
            "checked": {"playbooks": 25, "audit_records": acts, "dry_runs": acts, "enforced_runs": 0},
            "argv": {"minutes_per_load": 10.0, "loads": ["compile"], "gap_s": 60.0, "settle_s": 60.0},
            "machine": {"node": "vm", "cpus": 2, "release": "6.x", "mem_gib": 23.5}, "fit": fit}


def test_combine_counts_an_old_trees_runs_only_through_a_record_that_replayed_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Tree O's run r1 was replayed by the record O -> N (same): it counts with N's run. O's run r2
    was not replayed by it, and tree X's record says different: neither counts."""
    runs_dir = tmp_path / "runs"
    (runs_dir / "same").mkdir(parents=True)
    monkeypatch.setattr(ffl, "RUNS", runs_dir)
    varied = tmp_path / "varied.jsonl"
    varied.write_text('{"seq": 1, "wall": 1.0, "mono": 1.0, "metrics": {}}\n')
    fit = ffl.fit_source([varied])
    o, n, x, day = "oooooooooooo", "nnnnnnnnnnnn", "xxxxxxxxxxxx", 86400
    names = {}
    for k, (tree, acts) in enumerate(((o, 0), (o, 3), (n, 0), (x, 5))):
        run = fake_run(1.0e9 + k * day, tree, fit, acts, f"{100 + k % 2} process starts")
        names[k] = f"{int(run['started'])}-{tree}"  # type: ignore[call-overload]
        (runs_dir / f"{names[k]}.json.gz").write_bytes(gzip.compress(json.dumps(run).encode()))

    def record(old: str, same: bool, replayed: list[str]) -> None:
        rec = {"when": "2026-12-07 05:00 UTC", "old": {"commit": "a" * 40, "tree": old},
               "new": {"commit": "b" * 40, "tree": n}, "changed": ["agent/score/forecast.py"], "limit": 0,
               "native": True, "not_loaded": [], "first_difference": None if same else {"run": "r", "seq": 1},
               "same": same, "runs": [{"run": r, "samples": 600, "paths": {}} for r in replayed]}
        (runs_dir / "same" / f"{old}-{n}.json").write_text(json.dumps(rec))

    assert ffl.combine(n, [varied]) == 0
    assert "1 run(s) of product tree" in capsys.readouterr().out
    record(o, True, [names[0]])
    record(x, False, [names[3]])
    assert ffl.combine(n, [varied]) == 0
    out = capsys.readouterr().out
    assert f"2 run(s) of product tree {n}" in out
    assert f"[product tree {o}]" in out
    assert f"runs of product tree {o} count with {n}: same behaviour" in out
    assert x not in out
    assert "| compile | 20.0 | 14 (0) | 0 |" in out  # r2's 3 and X's 5 would-be actions are not in it
    assert "| 100 process starts |" in out  # the same note once
    run = json.loads(gzip.decompress((runs_dir / f"{names[2]}.json.gz").read_bytes()))
    run["phases"][0]["note"] = "101 process starts"
    (runs_dir / f"{names[2]}.json.gz").write_bytes(gzip.compress(json.dumps(run).encode()))
    assert ffl.combine(n, [varied]) == 0
    assert "| 100 process starts; 101 process starts |" in capsys.readouterr().out  # each run's own
    (runs_dir / "same" / f"{o}-{n}.json").write_text("{not json")
    assert ffl.combine(n, [varied]) == 0
    assert "1 run(s) of product tree" in capsys.readouterr().out
    shutil.rmtree(runs_dir / "same")
