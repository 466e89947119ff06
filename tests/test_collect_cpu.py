"""CPU collector against a fixture /proc + /sys tree and against this host."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent.collect.cpu import CpuCollector, parse_proc_stat
from agent.collect.settings import CpuSettings

STAT1 = """cpu  100 0 50 800 50 0 0 0 0 0
cpu0 50 0 25 400 25 0 0 0 0 0
cpu1 50 0 25 400 25 0 0 0 0 0
intr 1000 1 2 3
ctxt 5000
btime 1700000000
processes 300
procs_running 3
procs_blocked 1
"""
# +200 jiffies per CPU: cpu0 all busy (user), cpu1 idle 150 + iowait 30 + steal 20
STAT2 = """cpu  300 0 50 950 80 0 0 20 0 0
cpu0 250 0 25 400 25 0 0 0 0 0
cpu1 50 0 25 550 55 0 0 20 0 0
intr 3000 1 2 3
ctxt 9000
btime 1700000000
processes 300
procs_running 5
procs_blocked 0
"""


def _tree(tmp_path: Path) -> Path:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/stat").write_text(STAT1)
    (tmp_path / "proc/loadavg").write_text("0.50 0.25 0.10 1/100 4242\n")
    for cpu in (0, 1):
        d = tmp_path / f"sys/devices/system/cpu/cpu{cpu}"
        (d / "thermal_throttle").mkdir(parents=True)
        (d / "thermal_throttle/core_throttle_count").write_text("2\n")
        (d / "thermal_throttle/package_throttle_count").write_text("7\n")  # same package: counted once
        (d / "topology").mkdir()
        (d / "topology/physical_package_id").write_text("0\n")
        (d / "cpufreq").mkdir()
        (d / "cpufreq/scaling_cur_freq").write_text(f"{2_000_000 + cpu * 1_000_000}\n")  # kHz
    return tmp_path


def test_utilisation_rates_and_sysfs_from_fixture(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    c = CpuCollector(CpuSettings(), root=str(root))
    c.start()
    first = c.collect().metrics
    assert first["cpu.util_pct"] is None
    assert first["cpu.ctx_switches_per_s"] is None
    assert first["cpu.count"] == 2
    assert (first["cpu.load1"], first["cpu.load5"], first["cpu.load15"]) == (0.5, 0.25, 0.1)
    assert first["cpu.freq_mhz"] == pytest.approx(2500.0)
    assert first["cpu.freq_max_mhz"] == pytest.approx(3000.0)
    assert first["cpu.core_throttle_count"] == 4
    assert first["cpu.package_throttle_count"] == 7
    assert "cpu.temp_max_c" not in first  # a fixture root has no sensors: absent

    (root / "proc/stat").write_text(STAT2)
    for cpu in (0, 1):
        (root / f"sys/devices/system/cpu/cpu{cpu}/thermal_throttle/core_throttle_count").write_text("5\n")
    time.sleep(0.05)
    m = c.collect().metrics
    # total: +400 jiffies, busy = 200 (user); idle 150, iowait 30, steal 20
    assert m["cpu.util_pct"] == pytest.approx(100 * 220 / 400)
    assert m["cpu.user_pct"] == pytest.approx(50.0)
    assert m["cpu.iowait_pct"] == pytest.approx(100 * 30 / 400)
    assert m["cpu.steal_pct"] == pytest.approx(100 * 20 / 400)
    assert m["cpu.util_pct[cpu0]"] == pytest.approx(100.0)
    assert m["cpu.util_pct[cpu1]"] == pytest.approx(100 * 20 / 200)
    assert m["cpu.ctx_switches_per_s"] is not None
    assert m["cpu.ctx_switches_per_s"] > 0
    assert m["cpu.core_throttle_count"] == 10
    assert m["cpu.core_throttle_per_s"] is not None
    assert m["cpu.core_throttle_per_s"] > 0
    c.close()


def test_per_cpu_off(tmp_path: Path) -> None:
    c = CpuCollector(CpuSettings(per_cpu=False), root=str(_tree(tmp_path)))
    c.start()
    assert not any(k.startswith("cpu.util_pct[") for k in c.collect().metrics)


def test_no_throttle_files_means_absent(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/stat").write_text(STAT1)
    c = CpuCollector(root=str(tmp_path))
    c.start()
    m = c.collect().metrics
    assert "cpu.core_throttle_count" not in m
    assert "cpu.freq_mhz" not in m
    assert m["cpu.load1"] is None  # the file is missing: unreadable this pass


def test_parse_proc_stat_counts() -> None:
    s = parse_proc_stat(STAT1)
    assert s.ctxt == 5000
    assert s.intr == 1000
    assert (s.procs_running, s.procs_blocked) == (3, 1)
    assert set(s.cpus) == {"cpu", "cpu0", "cpu1"}


def test_real_host() -> None:
    c = CpuCollector()
    c.start()
    c.collect()
    time.sleep(0.2)
    m = c.collect().metrics
    lines = Path("/proc/stat").read_text().splitlines()
    online = sum(1 for line in lines if line[:3] == "cpu" and line[3].isdigit())
    assert m["cpu.count"] == online
    util = m["cpu.util_pct"]
    assert util is not None
    assert 0.0 <= util <= 100.0
    assert m["cpu.load1"] == pytest.approx(os.getloadavg()[0], abs=1.0)
    assert m["cpu.interrupts_per_s"] is not None
    c.close()
