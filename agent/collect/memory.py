"""Memory collector: capacity, swap, page faults, pressure stall information, OOM kills.

Sources: ``/proc/meminfo``, ``/proc/vmstat`` and ``/proc/pressure/{memory,cpu,io}``. A pass looks
up only the fields it reports (vmstat has ~180 lines, meminfo ~55), with os.open/os.read
(:mod:`agent.collect.procfs`).

Metrics:

================================== =====================================================================
``mem.total_bytes``                MemTotal, bytes
``mem.available_bytes``            MemAvailable, bytes
``mem.used_bytes``                 total - available, bytes
``mem.used_pct``                   (total - available) / total, %
``mem.growth_bytes_per_s``         least-squares growth of mem.used_bytes over the last
                                   ``slope_window_s`` (8 s), bytes/s
``mem.eta_s``                      available / growth while used memory grows: seconds until
                                   MemAvailable reaches 0 at that rate (absent otherwise)
``mem.swap_total_bytes``           SwapTotal, bytes (0 without swap)
``mem.swap_used_pct``              (SwapTotal - SwapFree) / SwapTotal, % (absent without swap)
``mem.page_faults_per_s``          pgfault rate (minor + major), faults/s
``mem.major_faults_per_s``         pgmajfault rate, faults/s
``mem.oom_kills``                  oom_kill counter since boot (absent on kernels < 4.13)
``psi.some_avg10_pct[RES]``        PSI "some" 10 s average for RES in memory, cpu, io, %
``psi.some_avg60_pct[RES]``        PSI "some" 60 s average, %
``psi.full_avg10_pct[RES]``        PSI "full" 10 s average, % (cpu "full" only on kernels >= 5.13)
``psi.full_avg60_pct[RES]``        PSI "full" 60 s average, %
================================== =====================================================================

The ``psi.*`` metrics are absent when the kernel has no PSI (no ``/proc/pressure`` or ``psi=0``).

Events: ``mem.oom_kill`` when the oom_kill counter increases; ``value`` is the number of new kills.
"""

from __future__ import annotations

import time
from collections import deque

from agent.collect.base import BaseCollector
from agent.collect.counters import RateTracker, growth
from agent.collect.procfs import read_bytes
from agent.collect.sample import Event, Metrics, Reading, key
from agent.collect.settings import MemorySettings

PSI_RESOURCES = ("memory", "cpu", "io")
_VMSTAT_KEYS = frozenset({b"pgfault", b"pgmajfault", b"oom_kill"})
_MEMINFO_KEYS = (b"MemTotal", b"MemAvailable", b"MemFree", b"Buffers", b"Cached", b"SwapTotal", b"SwapFree")


def _find_line(data: bytes, name: bytes) -> bytes | None:
    """The rest of the line that starts with ``name`` (``name`` includes its separator), or None."""
    if data.startswith(name):
        i = 0
    else:
        i = data.find(b"\n" + name)
        if i < 0:
            return None
        i += 1
    i += len(name)
    end = data.find(b"\n", i)
    return data[i : end if end >= 0 else len(data)]


def meminfo_fields(data: bytes, names: tuple[bytes, ...] = _MEMINFO_KEYS) -> dict[str, int]:
    """Only ``names`` of ``/proc/meminfo``, as bytes (the same values as :func:`parse_meminfo`)."""
    out: dict[str, int] = {}
    for name in names:
        rest = _find_line(data, name + b":")
        if rest is None:
            continue
        # The value parsing of parse_meminfo, inlined on purpose: this runs every pass.
        parts = rest.split()
        if not parts:
            continue
        try:
            val = int(parts[0])
        except ValueError:
            continue
        if len(parts) > 1 and parts[1] == b"kB":
            val *= 1024
        out[name.decode("ascii")] = val
    return out


def parse_meminfo(data: bytes) -> dict[str, int]:
    """``/proc/meminfo`` as bytes (the ``kB`` unit applied)."""
    out: dict[str, int] = {}
    for line in data.splitlines():
        name, _, rest = line.partition(b":")
        parts = rest.split()
        if not parts:
            continue
        try:
            val = int(parts[0])
        except ValueError:
            continue
        if len(parts) > 1 and parts[1] == b"kB":
            val *= 1024
        out[name.decode("ascii", "replace")] = val
    return out


def parse_vmstat(data: bytes, wanted: frozenset[bytes] = _VMSTAT_KEYS) -> dict[str, int]:
    """The ``wanted`` counters of ``/proc/vmstat``, each found directly (no split of ~180 lines)."""
    out: dict[str, int] = {}
    for name in wanted:
        val = _find_line(data, name + b" ")
        if val is not None:
            try:
                out[name.decode()] = int(val)
            except ValueError:
                continue
    return out


def parse_psi(data: bytes) -> dict[str, float]:
    """``some avg10=0.12 avg60=...`` lines -> {"some_avg10": 0.12, ...}."""
    out: dict[str, float] = {}
    for line in data.splitlines():
        kind, _, rest = line.partition(b" ")
        for field in rest.split():
            name, _, val = field.partition(b"=")
            if name in (b"avg10", b"avg60"):
                try:
                    out[f"{kind.decode()}_{name.decode()}"] = float(val)
                except ValueError:
                    continue
    return out


class MemoryCollector(BaseCollector[MemorySettings]):
    """See the module docstring for the metrics and events."""

    name = "memory"
    inline = True  # /proc and /sys reads only: on the event loop

    def __init__(self, settings: MemorySettings | None = None, *, root: str = "/") -> None:
        super().__init__(settings or MemorySettings(), root=root)
        self._rates = RateTracker()
        self._psi: dict[str, str] = {}  # resource -> path, only those readable at start
        # resource -> (field, metric key) of the fields it had at start
        self._psi_keys: dict[str, list[tuple[str, str]]] = {}
        self._last_oom: int | None = None
        self._used: deque[tuple[float, float]] = deque(maxlen=128)  # (mono, used bytes)

    def start(self) -> None:
        self._require("proc/meminfo")
        self._psi.clear()
        for res in PSI_RESOURCES:
            path = self._p(f"proc/pressure/{res}")
            data = read_bytes(path)  # psi=0 kernels have the files but reading fails (EOPNOTSUPP)
            if data is not None and (fields := parse_psi(data)):
                self._psi[res] = path
                self._psi_keys[res] = [(f, key(f"psi.{f}_pct", res)) for f in sorted(fields)]
        vm = read_bytes(self._p("proc/vmstat"))
        self._last_oom = parse_vmstat(vm).get("oom_kill") if vm is not None else None

    def collect(self) -> Reading:
        now = time.monotonic()
        m: Metrics = {}
        events: list[Event] = []
        self._meminfo(m, now)
        self._vmstat(m, events, now)
        for res, path in self._psi.items():
            data = read_bytes(path)
            vals = parse_psi(data) if data is not None else {}
            for field, metric_key in self._psi_keys[res]:
                m[metric_key] = vals.get(field)
        self._rates.sweep()
        return Reading(metrics=m, events=events)

    def _meminfo(self, m: Metrics, now: float) -> None:
        data = read_bytes(self._p("proc/meminfo"))
        info = meminfo_fields(data) if data is not None else {}
        total = info.get("MemTotal")
        avail = info.get("MemAvailable")
        if avail is None and total is not None and "MemFree" in info:  # kernels < 3.14
            avail = info["MemFree"] + info.get("Buffers", 0) + info.get("Cached", 0)
        m["mem.total_bytes"] = None if total is None else float(total)
        m["mem.available_bytes"] = None if avail is None else float(avail)
        if total and avail is not None:
            m["mem.used_bytes"] = float(total - avail)
            m["mem.used_pct"] = 100.0 * (total - avail) / total
            rate = growth(self._used, now, float(total - avail), self.settings.slope_window_s)
            m["mem.growth_bytes_per_s"] = rate
            if rate is not None and rate > 0:
                m["mem.eta_s"] = max(0.0, float(avail)) / rate
        else:
            m["mem.used_bytes"] = m["mem.used_pct"] = None
            self._used.clear()
        swap_total = info.get("SwapTotal")
        swap_free = info.get("SwapFree")
        m["mem.swap_total_bytes"] = None if swap_total is None else float(swap_total)
        if swap_total and swap_free is not None:
            m["mem.swap_used_pct"] = 100.0 * (swap_total - swap_free) / swap_total

    def _vmstat(self, m: Metrics, events: list[Event], now: float) -> None:
        data = read_bytes(self._p("proc/vmstat"))
        vm = parse_vmstat(data) if data is not None else {}
        m["mem.page_faults_per_s"] = self._rates.rate("pgfault", vm.get("pgfault"), now)
        m["mem.major_faults_per_s"] = self._rates.rate("pgmajfault", vm.get("pgmajfault"), now)
        oom = vm.get("oom_kill")
        if oom is None:
            if data is None and self._last_oom is not None:
                m["mem.oom_kills"] = None
            return
        m["mem.oom_kills"] = float(oom)
        if self._last_oom is not None and oom > self._last_oom:
            n = oom - self._last_oom
            events.append(
                self._event("mem.oom_kill", f"the kernel OOM killer killed {n} process(es)", value=float(n))
            )
        self._last_oom = oom
