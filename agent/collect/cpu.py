"""CPU collector: utilisation, load, scheduler counters, frequency, throttling, temperature.

Sources: ``/proc/stat`` (utilisation from deltas of the jiffy counters, context switches,
interrupts), ``/proc/loadavg``, ``/sys/devices/system/cpu/cpu*/cpufreq/scaling_cur_freq``
(falling back to ``cpu MHz`` in ``/proc/cpuinfo``), ``/sys/devices/system/cpu/cpu*/thermal_throttle``
and ``psutil.sensors_temperatures()``.

Metrics (``None`` on the first pass for anything computed from deltas):

=================================== ===================================================================
``cpu.util_pct``                    busy share of all CPUs, % (busy = everything but idle and iowait)
``cpu.util_pct[cpuN]``              the same per CPU (when ``per_cpu``)
``cpu.user_pct``                    user + nice time, % of all CPU time
``cpu.system_pct``                  system + irq + softirq time, %
``cpu.iowait_pct``                  iowait time, %
``cpu.steal_pct``                   time stolen by the hypervisor, %
``cpu.count``                       online CPUs (the ``cpuN`` lines of /proc/stat)
``cpu.load1`` ``cpu.load5``         load averages (runnable + uninterruptible tasks), unitless
``cpu.load15``
``cpu.ctx_switches_per_s``          context switches per second
``cpu.interrupts_per_s``            interrupts per second
``cpu.freq_mhz``                    mean current frequency over CPUs, MHz (absent when unknown)
``cpu.freq_max_mhz``                highest current frequency of any CPU, MHz (absent when unknown)
``cpu.core_throttle_count``         thermal throttle events, summed over CPUs (absent w/o the files)
``cpu.core_throttle_per_s``         the same as a rate, events/s
``cpu.package_throttle_count``      package throttle events, summed over physical packages
``cpu.package_throttle_per_s``      the same as a rate, events/s
``cpu.temp_c[chip/label]``          each sensor psutil exposes, Celsius (absent when none)
``cpu.temp_max_c``                  the hottest of those sensors, Celsius
=================================== ===================================================================
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
from dataclasses import dataclass

import psutil

from agent.collect.counters import RateTracker
from agent.collect.sample import Metrics, Reading, key
from agent.collect.settings import CpuSettings
from agent.errors import CollectorUnavailable

# /proc/stat cpu line fields, in order (guest and guest_nice are already counted in user/nice).
_USER, _NICE, _SYSTEM, _IDLE, _IOWAIT, _IRQ, _SOFTIRQ, _STEAL = range(8)
_N_TIMES = 8


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


@dataclass(slots=True)
class ProcStat:
    """The parts of /proc/stat the collectors use."""

    cpus: dict[str, tuple[int, ...]]  # "cpu" (total) and "cpuN" -> the first 8 jiffy counters
    ctxt: int | None = None
    intr: int | None = None
    procs_running: int | None = None
    procs_blocked: int | None = None


def parse_proc_stat(text: str) -> ProcStat:
    out = ProcStat(cpus={})
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu"):
            fields = rest.split()
            try:
                vals = tuple(int(v) for v in fields[:_N_TIMES])
            except ValueError:
                continue
            out.cpus[name] = vals + (0,) * (_N_TIMES - len(vals))
            continue
        first = rest.split(" ", 1)[0].strip() if rest else ""
        try:
            if name == "ctxt":
                out.ctxt = int(first)
            elif name == "intr":
                out.intr = int(first)
            elif name == "procs_running":
                out.procs_running = int(first)
            elif name == "procs_blocked":
                out.procs_blocked = int(first)
        except ValueError:
            continue
    return out


def read_proc_stat(root: str = "/") -> ProcStat | None:
    text = _read(os.path.join(root, "proc/stat"))
    return None if text is None else parse_proc_stat(text)


class CpuCollector:
    """See the module docstring for the metrics."""

    name = "cpu"

    def __init__(self, settings: CpuSettings | None = None, *, root: str = "/") -> None:
        self.settings = settings or CpuSettings()
        self.interval_s = self.settings.interval_s
        self.timeout_s = self.settings.timeout_s
        self.root = root
        self._rates = RateTracker()
        self._prev_times: dict[str, tuple[int, ...]] = {}
        self._freq_files: list[str] = []
        self._core_throttle_files: list[str] = []
        self._pkg_throttle_files: list[str] = []  # one per physical package
        self._temps = True

    def _p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def start(self) -> None:
        if read_proc_stat(self.root) is None:
            raise CollectorUnavailable(f"cannot read {self._p('proc/stat')}")
        cpu_dir = self._p("sys/devices/system/cpu")
        self._freq_files = sorted(glob.glob(os.path.join(cpu_dir, "cpu[0-9]*/cpufreq/scaling_cur_freq")))
        self._core_throttle_files = sorted(
            glob.glob(os.path.join(cpu_dir, "cpu[0-9]*/thermal_throttle/core_throttle_count"))
        )
        packages: dict[str, str] = {}
        pkg_glob = os.path.join(cpu_dir, "cpu[0-9]*/thermal_throttle/package_throttle_count")
        for path in sorted(glob.glob(pkg_glob)):
            cpu = os.path.dirname(os.path.dirname(path))
            pkg = (_read(os.path.join(cpu, "topology/physical_package_id")) or cpu).strip()
            packages.setdefault(pkg, path)
        self._pkg_throttle_files = list(packages.values())
        # Only the real host's sensors are read through psutil; a fixture root has none.
        self._temps = self.root == "/"

    def close(self) -> None:
        self._prev_times.clear()

    def collect(self) -> Reading:
        now = time.monotonic()
        m: Metrics = {}
        stat = read_proc_stat(self.root)
        if stat is not None:
            self._utilisation(stat, m)
            m["cpu.ctx_switches_per_s"] = self._rates.rate("ctxt", stat.ctxt, now)
            m["cpu.interrupts_per_s"] = self._rates.rate("intr", stat.intr, now)
        else:
            for k in ("cpu.util_pct", "cpu.ctx_switches_per_s", "cpu.interrupts_per_s"):
                m[k] = None
        self._load(m)
        self._freq(m)
        self._throttle(m, now)
        if self._temps:
            self._temperatures(m)
        self._rates.sweep()
        return Reading(metrics=m)

    def _utilisation(self, stat: ProcStat, m: Metrics) -> None:
        m["cpu.count"] = float(sum(1 for n in stat.cpus if n != "cpu"))
        prev = self._prev_times
        for name, times in stat.cpus.items():
            if name != "cpu" and not self.settings.per_cpu:
                continue
            old = prev.get(name)
            prev[name] = times
            label = None if name == "cpu" else name
            # iowait (and on some kernels idle) can go backwards: clamp each delta at 0.
            d = [max(0, a - b) for a, b in zip(times, old, strict=True)] if old is not None else []
            total = sum(d)
            if total <= 0:  # first pass, or no tick elapsed since the last one
                m[key("cpu.util_pct", label)] = None
                if label is None:
                    for fam in ("cpu.user_pct", "cpu.system_pct", "cpu.iowait_pct", "cpu.steal_pct"):
                        m[fam] = None
                continue
            busy = total - d[_IDLE] - d[_IOWAIT]
            m[key("cpu.util_pct", label)] = 100.0 * busy / total
            if label is None:
                m["cpu.user_pct"] = 100.0 * (d[_USER] + d[_NICE]) / total
                m["cpu.system_pct"] = 100.0 * (d[_SYSTEM] + d[_IRQ] + d[_SOFTIRQ]) / total
                m["cpu.iowait_pct"] = 100.0 * d[_IOWAIT] / total
                m["cpu.steal_pct"] = 100.0 * d[_STEAL] / total
        if len(prev) > len(stat.cpus):  # CPUs went offline
            for gone in [n for n in prev if n not in stat.cpus]:
                del prev[gone]

    def _load(self, m: Metrics) -> None:
        text = _read(self._p("proc/loadavg"))
        vals: list[float | None] = [None, None, None]
        if text is not None:
            with contextlib.suppress(ValueError):
                vals = [float(v) for v in text.split()[:3]]
        m["cpu.load1"], m["cpu.load5"], m["cpu.load15"] = vals

    def _freq(self, m: Metrics) -> None:
        mhz: list[float] = []
        if self._freq_files:
            for path in self._freq_files:
                text = _read(path)
                try:
                    if text is not None:
                        mhz.append(int(text) / 1000.0)  # kHz
                except ValueError:
                    continue
        else:
            text = _read(self._p("proc/cpuinfo"))
            if text is None:
                return
            for line in text.splitlines():
                if line.startswith("cpu MHz"):
                    try:
                        mhz.append(float(line.partition(":")[2]))
                    except ValueError:
                        continue
        if mhz:
            m["cpu.freq_mhz"] = sum(mhz) / len(mhz)
            m["cpu.freq_max_mhz"] = max(mhz)
        elif self._freq_files:
            m["cpu.freq_mhz"] = m["cpu.freq_max_mhz"] = None

    def _throttle(self, m: Metrics, now: float) -> None:
        for fam, files in (("core", self._core_throttle_files), ("package", self._pkg_throttle_files)):
            if not files:
                continue
            total: float | None = 0.0
            for path in files:
                text = _read(path)
                try:
                    total = None if text is None or total is None else total + int(text)
                except ValueError:
                    total = None
            m[f"cpu.{fam}_throttle_count"] = total
            m[f"cpu.{fam}_throttle_per_s"] = self._rates.rate(f"{fam}_throttle", total, now)

    def _temperatures(self, m: Metrics) -> None:
        try:
            sensors = psutil.sensors_temperatures()
        except (OSError, psutil.Error, AttributeError):  # AttributeError: platform without sensors
            return
        hottest: float | None = None
        for chip, entries in sensors.items():
            for i, entry in enumerate(entries):
                label = f"{chip}/{entry.label or i}"
                m[key("cpu.temp_c", label)] = entry.current
                if entry.current is not None and (hottest is None or entry.current > hottest):
                    hottest = entry.current
        if hottest is not None:
            m["cpu.temp_max_c"] = hottest
