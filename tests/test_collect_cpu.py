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


def _hwmon(root: Path, n: int, chip: str, temps: dict[int, tuple[int, str | None]], *,
           device: bool = False) -> None:
    d = root / f"sys/class/hwmon/hwmon{n}"
    d.mkdir(parents=True)
    (d / "name").write_text(f"{chip}\n")
    if device:
        d = d / "device"
        d.mkdir()
        (d / "name").write_text(f"{chip}\n")
    for i, (milli, label) in temps.items():
        (d / f"temp{i}_input").write_text(f"{milli}\n")
        (d / f"temp{i}_max").write_text("100000\n")
        if label is not None:
            (d / f"temp{i}_label").write_text(f"{label}\n")


def test_temperatures_named_as_psutil_and_read_each_pass(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    _hwmon(root, 0, "coretemp", {1: (45000, "Package id 0"), 2: (47000, "Core 0"), 10: (52500, "Core 8")})
    _hwmon(root, 1, "nvme", {1: (38850, None), 2: (40850, None)})
    _hwmon(root, 2, "acpitz", {1: (27800, None)}, device=True)
    c = CpuCollector(root=str(root))
    c.start()
    temps = {k: v for k, v in c.collect().metrics.items() if k.startswith("cpu.temp")}
    assert temps == {
        "cpu.temp_c[coretemp/Package id 0]": 45.0,
        "cpu.temp_c[coretemp/Core 8]": 52.5,  # temp10 sorts before temp2, as in psutil
        "cpu.temp_c[coretemp/Core 0]": 47.0,
        "cpu.temp_c[nvme/0]": pytest.approx(38.85),
        "cpu.temp_c[nvme/1]": pytest.approx(40.85),
        "cpu.temp_c[acpitz/0]": pytest.approx(27.8),
        "cpu.temp_max_c": 52.5,
    }
    (root / "sys/class/hwmon/hwmon0/temp2_input").write_text("90000\n")
    (root / "sys/class/hwmon/hwmon1/temp1_input").unlink()  # unreadable this pass: None, not absent
    m = c.collect().metrics
    assert m["cpu.temp_c[coretemp/Core 0]"] == 90.0
    assert m["cpu.temp_max_c"] == 90.0
    assert m["cpu.temp_c[nvme/0]"] is None


def test_temperatures_from_thermal_zones_without_hwmon(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    for i, (kind, milli) in enumerate([("x86_pkg_temp", 51000), ("acpitz", 30000)]):
        z = root / f"sys/class/thermal/thermal_zone{i}"
        z.mkdir(parents=True)
        (z / "type").write_text(f"{kind}\n")
        (z / "temp").write_text(f"{milli}\n")
    c = CpuCollector(root=str(root))
    c.start()
    m = c.collect().metrics
    assert m["cpu.temp_c[x86_pkg_temp/0]"] == 51.0
    assert m["cpu.temp_c[acpitz/0]"] == 30.0
    assert m["cpu.temp_max_c"] == 51.0


def test_freq_from_cpuinfo_without_cpufreq(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/stat").write_text(STAT1)
    (tmp_path / "proc/cpuinfo").write_text(
        "processor\t: 0\ncpu MHz\t\t: 2000.000\nflags\t\t: fpu\n\n"
        "processor\t: 1\ncpu MHz\t\t: 3000.500\nflags\t\t: fpu\n"
    )
    c = CpuCollector(root=str(tmp_path))
    c.start()
    m = c.collect().metrics
    assert m["cpu.freq_mhz"] == pytest.approx(2500.25)
    assert m["cpu.freq_max_mhz"] == pytest.approx(3000.5)


def test_parse_proc_stat_reads_first_numbers_of_long_lines() -> None:
    s = parse_proc_stat(STAT2.encode())
    assert (s.intr, s.ctxt, s.procs_running, s.procs_blocked) == (3000, 9000, 5, 0)
    assert s.cpus["cpu1"] == (50, 0, 25, 550, 55, 0, 0, 20)
    assert parse_proc_stat("cpu 1 2 3\n").cpus["cpu"] == (1, 2, 3, 0, 0, 0, 0, 0)  # old kernels: 4 fields
