"""Processes collector: process table summary, top consumers, watched names, systemd units.

Sources: psutil (one cached ``psutil.Process`` per pid, so ``cpu_percent`` measures the interval
since the previous pass), ``/proc/stat`` (procs_running, procs_blocked) and
``systemctl show UNIT... --property=ActiveState,SubState,NRestarts,MainPID`` (argv list, timeout,
no shell; the executable is ``settings.systemctl``).

Metrics:

============================ ========================================================================
``proc.count``               processes
``proc.threads``             threads of all processes
``proc.zombies``             processes in state Z (exited, not yet reaped by their parent)
``proc.running``             runnable tasks now (procs_running)
``proc.blocked``             tasks blocked on I/O now (procs_blocked)
``proc.top_cpu_pct``         CPU use of the busiest process over the last interval, % of one CPU
``proc.top_rss_bytes``       resident memory of the largest process, bytes
``proc.count[NAME]``         processes named NAME, for each NAME in ``watch`` (0 when none)
``unit.active[UNIT]``        1 when ActiveState is active/reloading, else 0
``unit.failed[UNIT]``        1 when ActiveState is failed, else 0
``unit.restarts[UNIT]``      NRestarts: automatic restarts since the unit was started
============================ ========================================================================

The ``unit.*`` metrics are absent when systemctl is not installed and None when it is but cannot
answer (systemd is not PID 1, no D-Bus, timeout).

Detail: ``top_cpu`` and ``top_mem``: lists of ``{pid, name, cpu_pct, rss_bytes}`` (``top_n`` each);
``watch``: ``{NAME: [pids]}``; ``zombie_pids`` (at most 100); ``units``: ``{UNIT: {ActiveState,
SubState, NRestarts, MainPID}}``.
"""

from __future__ import annotations

import heapq
import shutil
import subprocess
from dataclasses import dataclass

import psutil

from agent.collect.cpu import read_proc_stat
from agent.collect.sample import Metrics, Reading, key
from agent.collect.settings import ProcessSettings

UNIT_PROPERTIES = ("ActiveState", "SubState", "NRestarts", "MainPID")
_MAX_ZOMBIE_PIDS = 100


@dataclass(slots=True)
class _Row:
    pid: int
    name: str
    cpu_pct: float
    rss_bytes: int

    def as_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "name": self.name, "cpu_pct": self.cpu_pct, "rss_bytes": self.rss_bytes}


def parse_systemctl_show(text: str, units: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``systemctl show A B`` prints one ``Key=Value`` block per unit, in order, blank-line separated."""
    blocks: list[dict[str, str]] = [{}]
    for line in text.splitlines():
        if not line.strip():
            if blocks[-1]:
                blocks.append({})
            continue
        name, sep, value = line.partition("=")
        if sep:
            blocks[-1][name] = value
    blocks = [b for b in blocks if b]
    return dict(zip(units, blocks, strict=False))


class ProcessCollector:
    """See the module docstring for the metrics and detail."""

    name = "processes"

    def __init__(self, settings: ProcessSettings | None = None, *, root: str = "/") -> None:
        self.settings = settings or ProcessSettings()
        self.interval_s = self.settings.interval_s
        self.timeout_s = self.settings.timeout_s
        self.root = root
        self._procs: dict[int, psutil.Process] = {}
        self._systemctl: str | None = None
        self._watch = frozenset(self.settings.watch)

    def start(self) -> None:
        if self.settings.units:
            # Absent (not None) when systemctl is not installed at all.
            self._systemctl = shutil.which(self.settings.systemctl)

    def close(self) -> None:
        self._procs.clear()

    def collect(self) -> Reading:
        m: Metrics = {}
        detail: dict[str, object] = {}
        self._table(m, detail)
        stat = read_proc_stat(self.root)
        running = stat.procs_running if stat is not None else None
        blocked = stat.procs_blocked if stat is not None else None
        m["proc.running"] = None if running is None else float(running)
        m["proc.blocked"] = None if blocked is None else float(blocked)
        if self._systemctl is not None:
            self._units(self._systemctl, m, detail)
        return Reading(metrics=m, detail=detail)

    def _table(self, m: Metrics, detail: dict[str, object]) -> None:
        try:
            pids = psutil.pids()
        except (OSError, psutil.Error):
            for k in ("proc.count", "proc.threads", "proc.zombies", "proc.top_cpu_pct", "proc.top_rss_bytes"):
                m[k] = None
            for name in self.settings.watch:
                m[key("proc.count", name)] = None
            return
        cache = self._procs
        live: dict[int, psutil.Process] = {}
        rows: list[_Row] = []
        threads = 0
        zombies: list[int] = []
        watched: dict[str, list[int]] = {name: [] for name in self.settings.watch}
        for pid in pids:
            proc = cache.get(pid)
            fresh = proc is None
            try:
                if proc is None:
                    proc = psutil.Process(pid)
                with proc.oneshot():
                    status = proc.status()
                    if status == psutil.STATUS_ZOMBIE:
                        zombies.append(pid)
                        name = proc.name()
                        cpu, rss, nthreads = 0.0, 0, 0
                    else:
                        name = proc.name()
                        # 0.0 on a process's first pass. A pid reused between two passes gives one
                        # wrong sample (clamped at 0): checking for reuse costs a read per process.
                        cpu = max(0.0, proc.cpu_percent(None))
                        rss = proc.memory_info().rss
                        nthreads = proc.num_threads()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                continue
            live[pid] = proc
            threads += nthreads
            rows.append(_Row(pid, name, 0.0 if fresh else cpu, rss))
            if name in self._watch:
                watched[name].append(pid)
        self._procs = live
        m["proc.count"] = float(len(rows))
        m["proc.threads"] = float(threads)
        m["proc.zombies"] = float(len(zombies))
        detail["zombie_pids"] = zombies[:_MAX_ZOMBIE_PIDS]
        for name, found in watched.items():
            m[key("proc.count", name)] = float(len(found))
        if watched:
            detail["watch"] = watched
        n = self.settings.top_n
        top_cpu = heapq.nlargest(n, rows, key=lambda r: r.cpu_pct) if n else []
        top_mem = heapq.nlargest(n, rows, key=lambda r: r.rss_bytes) if n else []
        m["proc.top_cpu_pct"] = top_cpu[0].cpu_pct if top_cpu else None
        m["proc.top_rss_bytes"] = float(top_mem[0].rss_bytes) if top_mem else None
        detail["top_cpu"] = [r.as_dict() for r in top_cpu]
        detail["top_mem"] = [r.as_dict() for r in top_mem]

    def _units(self, systemctl: str, m: Metrics, detail: dict[str, object]) -> None:
        units = self.settings.units
        argv = [systemctl, "show", *units, f"--property={','.join(UNIT_PROPERTIES)}"]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=self.settings.systemctl_timeout_s,
                check=False,
                stdin=subprocess.DEVNULL,
            )
            states = parse_systemctl_show(done.stdout, units) if done.returncode == 0 else {}
        except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
            states = {}
        for unit in units:
            st = states.get(unit)
            active = st.get("ActiveState") if st is not None else None
            m[key("unit.active", unit)] = None if active is None else float(active in ("active", "reloading"))
            m[key("unit.failed", unit)] = None if active is None else float(active == "failed")
            restarts = st.get("NRestarts", "") if st is not None else ""
            m[key("unit.restarts", unit)] = float(restarts) if restarts.isdigit() else None
        detail["units"] = states

