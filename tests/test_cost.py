"""Cost transparency on the node (agent/features/cost.py): idle core-hours against real load
(stress-ng on a known core, checked against the kernel's own /proc/stat over the same window),
idle GPU accounting against FakeNVML with a scripted utilisation profile, hour roll-ups, the
bounded history in the state directory, and the ``cost`` wire message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import msgspec
import pytest

from agent import wire
from agent.collect.cpu import CpuCollector
from agent.collect.gpu import GpuCollector
from agent.collect.sample import Sample
from agent.collect.settings import CpuSettings, GpuSettings
from agent.features.cost import GIB, HISTORY_HOURS, CostMeter, CostSettings
from devtools.fake_nvml import FakeNVML

USER_HZ = os.sysconf("SC_CLK_TCK")


def _sample(seq: int, mono: float, metrics: dict[str, float | None], wall: float | None = None) -> Sample:
    return Sample(node="n1", seq=seq, wall=1_800_000_000.0 + mono if wall is None else wall, mono=mono,
                  metrics=metrics)


def _proc_idle_ticks() -> dict[str, int]:
    """idle + iowait ticks per core (cpuN), as the kernel counts them."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        parts = line.split()
        if parts and parts[0].startswith("cpu") and parts[0] != "cpu":
            out[parts[0]] = int(parts[4]) + int(parts[5])
    return out


@pytest.mark.exclusive  # a quiet host: see tests/exclusive.py
@pytest.mark.slow
def test_idle_core_hours_under_stress_ng_match_proc_stat_within_5_percent() -> None:
    """stress-ng loads cpu0 at 50% for 25 s; the meter, fed by the real cpu collector each second,
    counts each core's idle core-hours; /proc/stat's idle+iowait ticks over the same window are the
    reference (the host is shared: the reference is what the kernel saw, not an ideal 50%)."""
    if shutil.which("stress-ng") is None:
        pytest.skip("stress-ng is not installed")
    if 0 not in os.sched_getaffinity(0):
        pytest.skip("cpu0 is not available to this process")
    collector = CpuCollector(CpuSettings())
    collector.start()
    meter = CostMeter(CostSettings())
    proc = subprocess.Popen(["stress-ng", "--cpu", "1", "--cpu-load", "50", "--taskset", "0", "-t", "40s",
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2.0)  # the worker is up and pinned
        seconds = 25
        first = last = None
        for i in range(seconds + 1):
            reading = collector.collect()
            ticks = _proc_idle_ticks()  # read right after the collector's own read of /proc/stat
            mono = time.monotonic()
            meter.on_sample(_sample(i, mono, reading.metrics))
            if first is None:
                first = (ticks, mono)
            last = (ticks, mono)
            time.sleep(1.0)
        assert proc.poll() is None, "stress-ng ended before the window did"
    finally:
        proc.kill()
        proc.wait()
    assert first is not None
    assert last is not None
    window_s = last[1] - first[1]
    kernel_idle_h = {c: (last[0][c] - first[0][c]) / USER_HZ / 3600.0 for c in last[0]}
    meter_idle_h = {k[13:-1]: v / 3600.0 for k, v in meter.core_idle_s.items()}
    # the loaded core: within 5% of what the kernel counted, and clearly loaded
    assert meter_idle_h["cpu0"] == pytest.approx(kernel_idle_h["cpu0"], rel=0.05)
    assert kernel_idle_h["cpu0"] * 3600.0 < 0.8 * window_s, "cpu0 was not loaded"
    # every core, and the fleet-facing total the period summary carries
    total_kernel = sum(kernel_idle_h.values())
    summary = meter.take_summary()
    assert summary is not None
    assert summary.idle_core_h == pytest.approx(total_kernel, rel=0.05)
    assert summary.core_h == pytest.approx(len(kernel_idle_h) * window_s / 3600.0, rel=0.02)
    print(f"cpu0 idle: meter {meter_idle_h['cpu0'] * 3600:.2f} s, "
          f"/proc/stat {kernel_idle_h['cpu0'] * 3600:.2f} s "
          f"of {window_s:.1f} s; all cores: meter {summary.idle_core_h * 3600:.2f} s, "
          f"/proc/stat {total_kernel * 3600:.2f} s")


def test_gpu_idle_accounting_follows_a_scripted_fakenvml_profile() -> None:
    """Two FakeNVML GPUs, one sample a second for 20 minutes of sample time: GPU 0 idle (2%) for 10
    minutes then busy (90%), GPU 1 idle all along but holding 10 GiB; power 70 W / 300 W."""
    fake = FakeNVML(2)
    gpu = GpuCollector(GpuSettings(), nvml=fake, root="/nonexistent-root")  # type: ignore[arg-type]
    gpu.start()
    meter = CostMeter(CostSettings(gpu_idle_line_pct=5.0, per_gpu_hour=2.0, currency="EUR"))
    g0, g1 = fake.device(0), fake.device(1)
    g1.util_gpu, g1.mem_used, g1.power_mw = 0, 10 * int(GIB), 70_000
    for i in range(1201):  # 1200 one-second intervals; sample i credits the interval before it
        busy = i > 600
        g0.util_gpu = 90 if busy else 2
        g0.mem_used = 40 * int(GIB) if busy else 4 * int(GIB)
        g0.power_mw = 300_000 if busy else 70_000
        metrics = gpu.collect().metrics
        meter.on_sample(_sample(i, 1000.0 + i, metrics))
    gpu.close()
    s = meter.take_summary()
    assert s is not None
    assert s.seconds == pytest.approx(1200.0)
    assert s.gpu_h == pytest.approx(2 * 1200 / 3600)
    assert s.idle_gpu_h == pytest.approx((600 + 1200) / 3600)  # GPU 0's idle half + GPU 1 all along
    assert s.gpu_mem_idle_gib_h == pytest.approx((4 * 600 + 10 * 1200) / 3600)
    assert s.energy_kwh == pytest.approx((70 * 600 + 300 * 600 + 70 * 1200) / 3600 / 1000)
    assert s.money == pytest.approx(2.0 * (600 + 1200) / 3600)  # only the GPU-hour price is set
    assert s.currency == "EUR"


def test_no_cpu_per_core_metrics_falls_back_to_the_total_and_memory_is_stranded() -> None:
    meter = CostMeter(CostSettings(idle_line_pct=30.0))
    for i in range(11):
        meter.on_sample(_sample(i, 100.0 + i * 2.0, {"cpu.count": 4.0, "cpu.util_pct": 25.0,
                                                     "mem.available_bytes": 8 * GIB}))
    s = meter.take_summary()
    assert s is not None
    assert s.core_h == pytest.approx(4 * 20 / 3600)
    assert s.idle_core_h == pytest.approx(4 * 20 * 0.75 / 3600)
    assert s.cores_under_line_h == pytest.approx(4 * 20 / 3600)  # 25% is under a 30% line
    assert s.mem_stranded_gib_h == pytest.approx(8 * 20 / 3600)
    assert meter.take_summary() is None  # the next period has credited nothing yet


def test_gaps_and_hostile_values_are_not_credited() -> None:
    meter = CostMeter(CostSettings(max_gap_s=10))
    meter.on_sample(_sample(0, 0.0, {"cpu.util_pct[cpu0]": 0.0}))
    meter.on_sample(_sample(1, 1.0, {"cpu.util_pct[cpu0]": float("nan")}))  # unreadable: no credit
    meter.on_sample(_sample(2, 2.0, {"cpu.util_pct[cpu0]": 250.0}))  # clamped to 100: no idle
    meter.on_sample(_sample(3, 500.0, {"cpu.util_pct[cpu0]": 0.0}))  # a 498 s stall: not credited
    meter.on_sample(_sample(4, 499.0, {"cpu.util_pct[cpu0]": 0.0}))  # clock went back: not credited
    meter.on_sample(_sample(5, 500.0, {"cpu.util_pct[cpu0]": 0.0, "mem.available_bytes": float("inf"),
                                       "gpu.util_pct[0]": None}))
    s = meter.take_summary()
    assert s is not None
    assert s.seconds == pytest.approx(3.0)  # 1 s nan (time only), 1 s busy, 1 s idle
    assert s.idle_core_h == pytest.approx(1 / 3600)
    assert s.mem_stranded_gib_h == 0
    assert s.gpu_h == 0
    sent = msgspec.structs.replace(s, node="n1", site="s1", seq=1)
    assert wire.decode(wire.encode(sent)) == sent  # what the meter builds is inside the wire's bounds


def test_hours_roll_up_and_the_history_is_bounded_and_kept_across_restarts(tmp_path: Path) -> None:
    hour = 1_800_000_000.0 // 3600 * 3600
    meter = CostMeter(CostSettings(), tmp_path)
    # 3 hours of one sample every 10 s, one idle core and 2 GiB free
    for i in range(3 * 360 + 1):
        meter.on_sample(_sample(i, i * 10.0, {"cpu.util_pct[cpu0]": 0.0, "mem.available_bytes": 2 * GIB},
                               wall=hour + i * 10.0))
    hist = meter.history()
    assert [h["start"] for h in hist] == [hour, hour + 3600, hour + 7200]
    # a sample credits the interval before it: the one at hour + 3600 s closes hour 0
    assert [h["idle_core_h"] for h in hist] == pytest.approx([1.0, 1.0, 1.0])
    assert hist[1]["mem_stranded_gib_h"] == pytest.approx(2.0)
    meter.save()
    saved = json.loads((tmp_path / "cost" / "hours.json").read_text())
    assert len(saved) == 3
    again = CostMeter(CostSettings(), tmp_path)  # a restart keeps the closed hours
    assert [h["start"] for h in again.history()] == [hour, hour + 3600, hour + 7200]
    # bounded: a fortnight and a bit of hours keeps the last HISTORY_HOURS
    many = CostMeter(CostSettings(max_gap_s=3600), tmp_path / "b")
    for i in range(2 * (HISTORY_HOURS + 50)):
        many.on_sample(_sample(i, i * 1800.0, {"cpu.util_pct[cpu0]": 0.0}, wall=hour + i * 1800.0))
    assert len(many.hours) == HISTORY_HOURS
    many.save()
    assert len(json.loads((tmp_path / "b" / "cost" / "hours.json").read_text())) <= HISTORY_HOURS + 1


def test_rapl_energy_is_read_at_each_summary_and_survives_a_counter_wrap(tmp_path: Path) -> None:
    zone = tmp_path / "intel-rapl:0"
    (tmp_path / "intel-rapl:0:0").mkdir(parents=True)  # a sub-zone: counted in its package already
    zone.mkdir()
    (zone / "max_energy_range_uj").write_text("1000000000\n")
    (zone / "energy_uj").write_text("999000000\n")
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("5\n")
    meter = CostMeter(CostSettings(), rapl_root=str(tmp_path))
    meter.on_sample(_sample(0, 0.0, {"cpu.util_pct[cpu0]": 50.0}))
    assert meter.take_summary() is None  # first read: the baseline
    meter.on_sample(_sample(1, 1.0, {"cpu.util_pct[cpu0]": 50.0}))
    (zone / "energy_uj").write_text("2600000\n")  # the counter wrapped at max_energy_range_uj
    s = meter.take_summary()
    assert s is not None
    assert s.energy_kwh == pytest.approx((1_000_000_000 - 999_000_000 + 2_600_000 + 1) / 3.6e12)
