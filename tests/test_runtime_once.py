"""`heald once` end to end: a real sample of this host, checked against /proc."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent import __version__


def _once(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("")
    return subprocess.run([sys.executable, "-m", "agent", "once", "--config", str(cfg),
                           "--window", "0.5", *extra],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    proc = _once(tmp_path_factory.mktemp("once"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


def test_every_collector_the_host_has_reports(sample: dict[str, object]) -> None:
    collectors = sample["collectors"]
    assert isinstance(collectors, dict)
    for name in ("cpu", "memory", "disk", "network", "processes"):
        assert collectors[name]["status"] == "ok", collectors[name]
    # No GPU here: the GPU collector says it is absent and why, once.
    assert collectors["gpu"]["status"] == "absent"
    assert "nvml" in collectors["gpu"]["reason"].lower()


def test_values_match_an_independent_reading_of_proc(sample: dict[str, object]) -> None:
    metrics = sample["metrics"]
    assert isinstance(metrics, dict)
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert metrics["mem.total_bytes"] == int(meminfo["MemTotal"].split()[0]) * 1024
    ncpu = sum(1 for line in Path("/proc/stat").read_text().splitlines()
               if line.startswith("cpu") and line[3].isdigit())
    assert metrics["cpu.count"] == ncpu
    assert 0.0 <= metrics["cpu.util_pct"] <= 100.0
    assert "disk.used_pct[/]" in metrics
    assert metrics["net.link_up[lo]"] == 1
    assert metrics["net.rx_bytes_per_s[lo]"] is not None
    assert sample["seq"] == 1
    assert sample["node"]


def test_human_table(tmp_path: Path) -> None:
    proc = _once(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "COLLECTOR" in proc.stdout
    assert "mem.total_bytes" in proc.stdout
    assert "GiB" in proc.stdout


def test_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "agent", "--version"], capture_output=True, text=True,
                          timeout=30, check=True)
    assert proc.stdout.strip() == f"heald {__version__}"
