"""``heald model train | info | evaluate`` through the real entry point (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.score import compiled as art
from agent.score.evaluate import DETECTORS, METRICS, metrics, segments

SMD = Path(__file__).resolve().parents[2] / "shared" / "data" / "smd"
REPO = Path(__file__).resolve().parents[1]


def heald(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                          check=False, timeout=timeout, cwd=REPO)


def _dataset(path: Path, seed: int = 0, n: int = 1500) -> None:
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(42).normal(size=(2, 5))
    t = np.arange(2 * n)
    x = np.stack([np.sin(t / 40.0), np.cos(t / 90.0)], axis=1) @ mix + 0.05 * rng.normal(size=(2 * n, 5))
    label = np.zeros(n, dtype=np.uint8)
    for start in (300, 900):
        x[n + start : n + start + 40, seed % 5] += 2.5
        label[start : start + 40] = 1
    np.savez(path, train=x[:n].astype(np.float32), test=x[n:].astype(np.float32), test_label=label)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("data")
    _dataset(d / "a.npz", 0)
    _dataset(d / "b.npz", 1)
    return d


def test_segments_and_metrics() -> None:
    y = np.array([0, 1, 1, 0, 0, 1, 0, 1, 1, 1])
    assert segments(y) == [(1, 3), (5, 6), (7, 10)]
    alerts = np.array([0, 0, 1, 0, 0, 0, 0, 0, 0, 1], dtype=bool)
    m = metrics(np.arange(10.0), alerts, y)
    assert m["event_recall"] == pytest.approx(2 / 3)
    assert m["delay_mean"] == pytest.approx((1 + 2) / 2)
    assert m["f1"] == pytest.approx(2 * 1.0 * (2 / 6) / (1.0 + 2 / 6))


def test_evaluate_json(datasets: Path) -> None:
    proc = heald("model", "evaluate", str(datasets), "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress output when stderr is not a TTY
    result = json.loads(proc.stdout)
    assert set(result) == {"files", "mean"}
    assert set(result["files"]) == {"a", "b"}
    for det in DETECTORS:
        assert set(result["mean"][det]) == set(METRICS)
        for f in ("a", "b"):
            assert set(METRICS) <= set(result["files"][f][det])
    heald_auc = result["mean"]["heald"]["auc_pr"]
    assert heald_auc > 0.5
    assert heald_auc > result["mean"]["random"]["auc_pr"]
    assert result["mean"]["heald"]["event_recall"] == 1.0
    for f in ("a", "b"):  # the share of heald's alerts that its fast channel made alone
        assert 0.0 <= result["files"][f]["heald"]["fast_only"] <= 1.0


def test_evaluate_table(datasets: Path) -> None:
    proc = heald("model", "evaluate", str(datasets), "--max-rows", "1000")
    assert proc.returncode == 0, proc.stderr
    assert "AUC-PR" in proc.stdout
    assert "MEAN" in proc.stdout
    assert "fast channel alone" in proc.stdout
    for det in DETECTORS:
        assert det in proc.stdout


def test_evaluate_interval_is_the_time_between_rows(datasets: Path) -> None:
    """At 1 s a row the fast channel needs 15 rows over its line: it makes no alert alone on the
    40-row anomalies it catches in one 60-s row; nonsense intervals are refused in one line."""
    minute = json.loads(heald("model", "evaluate", str(datasets), "--json").stdout)
    second = heald("model", "evaluate", str(datasets), "--json", "--interval", "1")
    assert second.returncode == 0, second.stderr
    per_s = json.loads(second.stdout)
    assert all(per_s["files"][f]["heald"]["fast_only"] == 0.0 for f in ("a", "b")), per_s
    for det in ("random", "pca", "iforest"):  # only heald depends on the interval
        assert per_s["mean"][det]["auc_pr"] == minute["mean"][det]["auc_pr"]
    for bad in ("0", "-5", "nan", "inf", "1e9"):
        proc = heald("model", "evaluate", str(datasets), "--interval", bad)
        assert proc.returncode == 2, (bad, proc.stderr)
        assert proc.stderr.strip().splitlines() == [
            "heald: --interval: must be a number of seconds in (0, 86400]"]


def test_evaluate_bad_input(tmp_path: Path) -> None:
    proc = heald("model", "evaluate", str(tmp_path / "absent"))
    assert proc.returncode == 2
    assert "not a directory" in proc.stderr
    proc = heald("model", "evaluate", str(tmp_path))
    assert proc.returncode == 2
    assert "no *.npz" in proc.stderr
    (tmp_path / "x.npz").write_bytes(b"junk")
    proc = heald("model", "evaluate", str(tmp_path))
    assert proc.returncode == 2
    assert "x.npz" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_and_info(tmp_path: Path) -> None:
    src = tmp_path / "train.csv"
    rng = np.random.default_rng(0)
    rows = ["cpu,mem,disk"] + [",".join(f"{v:.5f}" for v in r) for r in rng.normal(size=(400, 3))]
    src.write_text("\n".join(rows) + "\n")
    out = tmp_path / "model.npz"
    proc = heald("model", "train", "--input", str(src), "--output", str(out), "--options",
                 '{"n_clusters": 4}')
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    proc = heald("model", "info", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert [f["name"] for f in info["features"]] == ["cpu", "mem", "disk"]
    assert info["training"]["rows"] == 400
    assert info["format_version"] == art.FORMAT_VERSION == 2
    assert info["threshold_geo"] > 0
    assert info["threshold_fast"] > 0
    assert info["fast_min_s"] == 15.0
    assert len(info["sha256"]) == 64
    proc = heald("model", "info", str(out))
    assert proc.returncode == 0
    assert "threshold" in proc.stdout
    assert "alerts when over it for 15 s" in proc.stdout


def test_train_bad_input_and_info_bad_file(tmp_path: Path) -> None:
    proc = heald("model", "train", "--input", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "m"))
    assert proc.returncode == 2
    assert "nope.csv" in proc.stderr
    src = tmp_path / "t.csv"
    src.write_text("a,b\n1,2\n3,4\n5,6\n")
    proc = heald("model", "train", "--input", str(src), "--output", str(tmp_path / "m"),
                 "--options", '{"bogus": 1}')
    assert proc.returncode == 2
    assert "bogus" in proc.stderr
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04garbage")
    proc = heald("model", "info", str(bad))
    assert proc.returncode == 1
    assert "bad.npz" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not SMD.is_dir(), reason=f"SMD data not present at {SMD}")
def test_evaluate_one_smd_file_truncated(tmp_path: Path) -> None:
    (tmp_path / "machine-1-6.npz").symlink_to(SMD / "machine-1-6.npz")
    proc = heald("model", "evaluate", str(tmp_path), "--json", "--max-rows", "6000")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    m = result["files"]["machine-1-6"]
    assert m["heald"]["auc_pr"] > m["random"]["auc_pr"] + 0.2
    assert m["heald"]["us_per_sample"] < 1000


def test_info_reads_the_shipped_classifier_too() -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    path = Path(__file__).resolve().parents[1] / "agent" / "score" / "data" / "default-classifier.npz"
    proc = subprocess.run([sys.executable, "-m", "agent", "model", "info", str(path), "--json"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["kind"] == "heald.classifier"
    assert "disk_full" in info["classes"]
