"""CPU collector: utilisation, load, scheduler counters, frequency, throttling, temperature.

Sources: ``/proc/stat`` (utilisation from deltas of the jiffy counters, context switches,
interrupts), ``/proc/loadavg``, ``/sys/devices/system/cpu/cpu*/cpufreq/scaling_cur_freq``
(falling back to ``cpu MHz`` in ``/proc/cpuinfo``), ``/sys/devices/system/cpu/cpu*/thermal_throttle``
and the temperature sensors ``psutil.sensors_temperatures()`` exposes, named as psutil names them
(``/sys/class/hwmon/hwmon*/temp*_input``, else ``/sys/class/thermal/thermal_zone*/temp``). The
sensors are found, and their names and labels read, at start and once a minute; a pass reads only
each sensor's current value (psutil reads five files per sensor and globs sysfs on every call).
Every file is read with ``os.open``/``os.read`` (:mod:`agent.collect.procfs`): no file object per read.

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
``cpu.temp_c[chip/label]``          each sensor psutil exposes, Celsius (absent when none; None
                                    when its value cannot be read this pass)
``cpu.temp_max_c``                  the hottest of those sensors, Celsius
=================================== ===================================================================
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
from dataclasses import dataclass

from agent.collect.base import BaseCollector
from agent.collect.counters import RateTracker
from agent.collect.procfs import read_bytes, read_text
from agent.collect.sample import Metrics, Reading, key
from agent.collect.settings import CpuSettings

# /proc/stat cpu line fields, in order (guest and guest_nice are already counted in user/nice).
_USER, _NICE, _SYSTEM, _IDLE, _IOWAIT, _IRQ, _SOFTIRQ, _STEAL = range(8)
_N_TIMES = 8

SENSOR_RESCAN_S = 60.0  # sensors (hwmon drivers) can come and go: look for them again this often
# Throttle counters: (metric key of the sum, metric key of its rate, RateTracker key) by kind.
_CORE_THROTTLE = ("cpu.core_throttle_count", "cpu.core_throttle_per_s", "core_throttle")
_PACKAGE_THROTTLE = ("cpu.package_throttle_count", "cpu.package_throttle_per_s", "package_throttle")


def _line_value(data: bytes, name: bytes) -> int | None:
    """The first number after ``name`` on the line starting with it (``ctxt 123``), or None."""
    i = data.find(b"\n" + name + b" ")
    if i < 0:
        if not data.startswith(name + b" "):
            return None
        i = -1
    i += len(name) + 2
    end = data.find(b"\n", i)
    if end < 0:
        end = len(data)
    space = data.find(b" ", i, end)
    try:
        return int(data[i : space if space >= 0 else end])
    except ValueError:
        return None


@dataclass(slots=True)
class ProcStat:
    """The parts of /proc/stat the collectors use."""

    cpus: dict[str, tuple[int, ...]]  # "cpu" (total) and "cpuN" -> the first 8 jiffy counters
    ctxt: int | None = None
    intr: int | None = None
    procs_running: int | None = None
    procs_blocked: int | None = None


def parse_proc_stat(text: str | bytes) -> ProcStat:
    """The cpu lines (at the top of the file) and the counters this agent uses, as bytes.

    The long ``intr`` and ``softirq`` lines are not split: only their first number is read.
    """
    data = text.encode("ascii", "replace") if isinstance(text, str) else text
    out = ProcStat(cpus={})
    pos, n = 0, len(data)
    while pos < n and data.startswith(b"cpu", pos):
        end = data.find(b"\n", pos)
        if end < 0:
            end = n
        name, _, rest = data[pos:end].partition(b" ")
        pos = end + 1
        try:
            vals = tuple(map(int, rest.split(None, _N_TIMES)[:_N_TIMES]))
        except ValueError:
            continue
        out.cpus[name.decode("ascii", "replace")] = vals + (0,) * (_N_TIMES - len(vals))
    out.ctxt = _line_value(data, b"ctxt")
    out.intr = _line_value(data, b"intr")
    out.procs_running = _line_value(data, b"procs_running")
    out.procs_blocked = _line_value(data, b"procs_blocked")
    return out


def read_proc_stat(root: str = "/") -> ProcStat | None:
    data = read_bytes(os.path.join(root, "proc/stat"))
    return None if data is None else parse_proc_stat(data)


def _strip_read(path: str) -> str | None:
    text = read_text(path, "utf-8")
    return None if text is None else text.strip()


def _has_value(path: str) -> bool:
    """Whether ``path`` reads as a number now (psutil skips a sensor whose value does not)."""
    data = read_bytes(path)
    if data is None:
        return False
    try:
        float(data)
    except ValueError:
        return False
    return True


def discover_temp_sensors(root: str = "/") -> list[tuple[str, str]]:
    """(``chip/label``, file holding the current millidegrees) of each sensor, named as psutil does.

    psutil.sensors_temperatures(): every ``/sys/class/hwmon/hwmon*[/device]/tempN_*`` (sorted by
    path), its chip from the ``name`` file beside it, its label from ``tempN_label`` or else its
    index among the chip's sensors; only sensors whose value and name read. Without any hwmon
    sensor, ``/sys/class/thermal/thermal_zone*`` (chip from ``type``, no label).
    """
    hwmon = os.path.join(root, "sys/class/hwmon")
    found = glob.glob(os.path.join(hwmon, "hwmon*/temp*_*"))
    found.extend(glob.glob(os.path.join(hwmon, "hwmon*/device/temp*_*")))
    bases = sorted({os.path.join(os.path.dirname(p), os.path.basename(p).split("_")[0]) for p in found})
    sensors: list[tuple[str, str]] = []
    per_chip: dict[str, int] = {}
    for base in bases:
        path = base + "_input"
        chip = _strip_read(os.path.join(os.path.dirname(base), "name"))
        if chip is None or not _has_value(path):
            continue
        i = per_chip.get(chip, 0)
        per_chip[chip] = i + 1
        sensors.append((f"{chip}/{_strip_read(base + '_label') or i}", path))
    if bases:
        return sensors
    for base in sorted(glob.glob(os.path.join(root, "sys/class/thermal/thermal_zone*"))):
        path = os.path.join(base, "temp")
        chip = _strip_read(os.path.join(base, "type"))
        if chip is None or not _has_value(path):
            continue
        i = per_chip.get(chip, 0)
        per_chip[chip] = i + 1
        sensors.append((f"{chip}/{i}", path))
    return sensors


class CpuCollector(BaseCollector[CpuSettings]):
    """See the module docstring for the metrics."""

    name = "cpu"
    inline = True  # /proc and /sys reads only: on the event loop

    def __init__(self, settings: CpuSettings | None = None, *, root: str = "/") -> None:
        super().__init__(settings or CpuSettings(), root=root)
        self._rates = RateTracker()
        self._prev_times: dict[str, tuple[int, ...]] = {}
        self._freq_files: list[str] = []
        # (count key, rate key, RateTracker key, files) of each throttle kind this host has;
        # the package files are one per physical package.
        self._throttle_counters: list[tuple[str, str, str, list[str]]] = []
        self._sensors: list[tuple[str, str]] = []  # (metric key, *_input file)
        self._sensors_at: float | None = None  # monotonic time of the last discovery
        # "cpu" / "cpuN" -> its cpu.util_pct key (built once, not per pass)
        self._util_keys: dict[str, str] = {}

    def start(self) -> None:
        self._require("proc/stat")
        cpu_dir = self._p("sys/devices/system/cpu")
        self._freq_files = sorted(glob.glob(os.path.join(cpu_dir, "cpu[0-9]*/cpufreq/scaling_cur_freq")))
        core_glob = os.path.join(cpu_dir, "cpu[0-9]*/thermal_throttle/core_throttle_count")
        core_files = sorted(glob.glob(core_glob))
        packages: dict[str, str] = {}
        pkg_glob = os.path.join(cpu_dir, "cpu[0-9]*/thermal_throttle/package_throttle_count")
        for path in sorted(glob.glob(pkg_glob)):
            cpu = os.path.dirname(os.path.dirname(path))
            pkg = (read_text(os.path.join(cpu, "topology/physical_package_id")) or cpu).strip()
            packages.setdefault(pkg, path)
        # Kinds without files are left out: their metrics are absent on this host.
        self._throttle_counters = [
            (*keys, files)
            for keys, files in ((_CORE_THROTTLE, core_files), (_PACKAGE_THROTTLE, list(packages.values())))
            if files
        ]
        self._discover_sensors(time.monotonic())

    def _discover_sensors(self, now: float) -> None:
        self._sensors = [(key("cpu.temp_c", label), path) for label, path in discover_temp_sensors(self.root)]
        self._sensors_at = now

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
        self._temperatures(m, now)
        self._rates.sweep()
        return Reading(metrics=m)

    def _utilisation(self, stat: ProcStat, m: Metrics) -> None:
        m["cpu.count"] = float(len(stat.cpus) - ("cpu" in stat.cpus))
        prev = self._prev_times
        keys = self._util_keys
        per_cpu = self.settings.per_cpu
        for name, times in stat.cpus.items():
            if name != "cpu" and not per_cpu:
                continue
            old = prev.get(name)
            prev[name] = times
            util_key = keys.get(name)
            if util_key is None:
                util_key = keys[name] = key("cpu.util_pct", None if name == "cpu" else name)
            # iowait (and on some kernels idle) can go backwards: clamp each delta at 0.
            d = [a - b if a > b else 0 for a, b in zip(times, old, strict=True)] if old is not None else []
            total = sum(d)
            if total <= 0:  # first pass, or no tick elapsed since the last one
                m[util_key] = None
                if name == "cpu":
                    for fam in ("cpu.user_pct", "cpu.system_pct", "cpu.iowait_pct", "cpu.steal_pct"):
                        m[fam] = None
                continue
            busy = total - d[_IDLE] - d[_IOWAIT]
            m[util_key] = 100.0 * busy / total
            if name == "cpu":
                m["cpu.user_pct"] = 100.0 * (d[_USER] + d[_NICE]) / total
                m["cpu.system_pct"] = 100.0 * (d[_SYSTEM] + d[_IRQ] + d[_SOFTIRQ]) / total
                m["cpu.iowait_pct"] = 100.0 * d[_IOWAIT] / total
                m["cpu.steal_pct"] = 100.0 * d[_STEAL] / total
        if len(prev) > len(stat.cpus):  # CPUs went offline
            for gone in [n for n in prev if n not in stat.cpus]:
                del prev[gone]
                keys.pop(gone, None)

    def _load(self, m: Metrics) -> None:
        data = read_bytes(self._p("proc/loadavg"))
        vals: list[float | None] = [None, None, None]
        if data is not None:
            with contextlib.suppress(ValueError):
                vals = [float(v) for v in data.split(None, 3)[:3]]
        m["cpu.load1"], m["cpu.load5"], m["cpu.load15"] = vals

    def _freq(self, m: Metrics) -> None:
        mhz: list[float] = []
        if self._freq_files:
            for path in self._freq_files:
                data = read_bytes(path)
                try:
                    if data is not None:
                        mhz.append(int(data) / 1000.0)  # kHz
                except ValueError:
                    continue
        else:
            data = read_bytes(self._p("proc/cpuinfo"))
            if data is None:
                return
            # "cpu MHz\t\t: 2400.000" lines, found without splitting the whole file into lines.
            pos = 0
            while (i := data.find(b"cpu MHz", pos)) >= 0:
                end = data.find(b"\n", i)
                if end < 0:
                    end = len(data)
                if i == 0 or data[i - 1] == 0x0A:  # at the start of a line
                    with contextlib.suppress(ValueError):
                        mhz.append(float(data[i:end].partition(b":")[2]))
                pos = end
        if mhz:
            m["cpu.freq_mhz"] = sum(mhz) / len(mhz)
            m["cpu.freq_max_mhz"] = max(mhz)
        elif self._freq_files:
            m["cpu.freq_mhz"] = m["cpu.freq_max_mhz"] = None

    def _throttle(self, m: Metrics, now: float) -> None:
        for count_key, rate_key, rate_id, files in self._throttle_counters:
            total: float | None = 0.0
            for path in files:
                data = read_bytes(path)
                try:
                    total = None if data is None or total is None else total + int(data)
                except ValueError:
                    total = None
            m[count_key] = total
            m[rate_key] = self._rates.rate(rate_id, total, now)

    def _temperatures(self, m: Metrics, now: float) -> None:
        if self._sensors_at is None or now - self._sensors_at >= SENSOR_RESCAN_S:
            self._discover_sensors(now)
        hottest: float | None = None
        for metric_key, path in self._sensors:
            data = read_bytes(path)
            try:
                current = None if data is None else float(data) / 1000.0  # millidegrees
            except ValueError:
                current = None
            m[metric_key] = current
            if current is not None and (hottest is None or current > hottest):
                hottest = current
        if hottest is not None:
            m["cpu.temp_max_c"] = hottest
