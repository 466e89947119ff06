"""Cgroup collector: memory, pressure, PIDs and CPU throttling of limited cgroups (v2 and v1).

Most memory on a real node lives in limited cgroups (systemd units with ``MemoryMax=``,
containers). When one of them leaks, the kernel OOM-kills inside it while host memory and host
PSI stay calm: host-wide metrics never see it coming. This collector watches the cgroups that
have a limit (memory, or PIDs), plus those the operator names (``[collect.cgroups] include``).

Discovery walks the hierarchy at most ``max_depth`` deep and keeps ``max_cgroups`` (the most
limited first: the smallest memory limit), so a pass reads a bounded number of small files. The
walk runs every ``rescan_s`` and, with inotify watches on the walked directories
(:mod:`agent.collect.inotify`), at the next pass after a cgroup is created or removed, and once
more ``settle_s`` later (a runtime sets the limit just after the ``mkdir``): a container that
starts leaking at once is watched within a second or two, not after up to ``rescan_s`` (a fault
recording found cgroups 19-29 s late with a 30 s rescan and no watches). A pass reads ``memory.current`` or
``memory.usage_in_bytes``, ``memory.stat`` (for the reclaimable page cache), the events file,
``memory.pressure`` (v2), ``pids.*`` and ``cpu.stat``.

The label is the cgroup's path as ``/proc/PID/cgroup`` shows it (``/system.slice/x.service``),
so a playbook step can pick processes in it (``target: {cgroup: "{cgroup}"}``).

Metrics (``CG`` = the cgroup path):

======================================= ==================================================================
``cgroup.mem.used_bytes[CG]``           working set: current usage - file cache (the active and
                                        inactive file LRU lists), bytes: the cache the kernel reclaims
                                        or writes back before it OOM-kills is not "used". Anonymous
                                        memory, shmem/tmpfs (on the anon lists) and kernel memory are.
                                        Not usage - inactive_file (cAdvisor's working set): freshly
                                        written or twice-read file pages sit on the ACTIVE list (with
                                        the multi-gen LRU, the youngest generations are reported as
                                        active), so a backup job writing through a 128 MiB cgroup
                                        looked like a leak heading for its limit and was stopped
                                        (the CI run of 2026-12-05 stopped this
                                        test suite's page-cache writer)
``cgroup.mem.limit_bytes[CG]``          memory.max / memory.limit_in_bytes, bytes (absent: no limit)
``cgroup.mem.used_pct[CG]``             working set / limit, %
``cgroup.mem.headroom_bytes[CG]``       limit - working set, bytes (the forecaster's resource -> 0)
``cgroup.mem.growth_bytes_per_s[CG]``   least-squares slope of the working set over the last
                                        ``slope_window_s``, bytes/s
``cgroup.mem.eta_s[CG]``                headroom / growth while the working set grows (absent when it
                                        does not): seconds until the limit at the current rate
``cgroup.mem.eta_now_s[CG]``            headroom / the growth since the newest reading at least
                                        ``NOW_S`` (0.3 s) older: seconds until the limit at the rate
                                        of right now (absent when it does not grow now). The slope
                                        remembers a jump for its whole window (a heap pre-touched
                                        to 80 % in one step keeps eta_s short for seconds after it
                                        stopped); this one forgets it 0.3 s later
``cgroup.mem.oom_kills[CG]``            OOM kills inside the cgroup (memory.events oom_kill; v1
                                        memory.oom_control oom_kill, kernels >= 4.13)
``cgroup.psi.mem_some_avg10_pct[CG]``   the cgroup's own memory PSI, "some" 10 s average, % (v2)
``cgroup.pids.used_pct[CG]``            pids.current / pids.max, % (absent: no PIDs limit)
``cgroup.pids.headroom[CG]``            pids.max - pids.current: tasks (processes and threads) left
                                        before fork/clone fails with EAGAIN in the cgroup
``cgroup.pids.eta_s[CG]``               headroom / growth of pids.current over the last
                                        ``slope_window_s`` while it grows: seconds until fork fails
``cgroup.cpu.throttled_pct[CG]``        share of wall time the cgroup was throttled by its CPU quota, %
======================================= ==================================================================

Events: ``cgroup.oom_kill`` (labels ``cgroup``; ``value`` = new kills) when the count increases.

The fast path: once a second is too slow for a leak that fills a small limit in a few seconds
(60 MiB/s into 256 MiB: the OOM kill 4-5 s after the start, three or four passes in all, the
ETA's slope needs three of them). A cgroup whose working set would reach its limit within
``fast_eta_s`` at its present rate (over the last two readings, or the slope), growing by at least
``HOT_MIN_PCT_S`` (2 %) of its limit a second, is *hot*:
:meth:`CgroupCollector.collect_hot` reads its memory files again (only the hot cgroups', only
the memory files), every ``fast_interval_s`` while it stays hot, and the daemon evaluates the
playbooks on each such reading (:meth:`agent.runtime.sampler.Sampler.fast_pass`). A node whose
limited cgroups are calm pays nothing for it: no timer runs while none is hot.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field

from agent.collect.base import BaseCollector
from agent.collect.counters import growth
from agent.collect.inotify import DirWatch
from agent.collect.procfs import read_bytes
from agent.collect.sample import Metrics, Reading, key
from agent.collect.settings import CgroupSettings
from agent.errors import CollectorUnavailable

# v1 reports "no limit" as the largest page-aligned 63-bit value; anything this big is no limit.
_V1_UNLIMITED = 1 << 60
#: cgroup.mem.eta_now_s: the rate against the newest reading at least this much older, seconds.
NOW_S = 0.3
#: Hot needs growth of at least this share of the limit a second (%/s): a cgroup sitting at its
#: limit with a little jitter is always "within 30 s" of it, and would keep the fast path (ten
#: playbook evaluations a second) running for as long as it sits there. A leak slower than this
#: gives the once-a-second lines their time (at 2 %/s, 25 s from half the limit to the limit).
HOT_MIN_PCT_S = 2.0
#: What a pass writes for a cgroup's memory (:meth:`CgroupCollector._memory`): the fast path
#: drops a hot cgroup's last values of these before it reads them anew (an ETA absent now is absent).
_MEM_FAMILIES = ("cgroup.mem.used_bytes", "cgroup.mem.limit_bytes", "cgroup.mem.used_pct",
                 "cgroup.mem.headroom_bytes", "cgroup.mem.growth_bytes_per_s", "cgroup.mem.eta_s",
                 "cgroup.mem.eta_now_s", "cgroup.mem.oom_kills", "cgroup.psi.mem_some_avg10_pct")


def _int(data: bytes | None) -> int | None:
    if data is None:
        return None
    text = data.strip()
    if not text or text == b"max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _field(data: bytes | None, name: bytes) -> int | None:
    """``name value`` lines (memory.stat, memory.events, cpu.stat): the value of ``name``."""
    if data is None:
        return None
    for line in data.split(b"\n"):
        k, _, v = line.partition(b" ")
        if k == name:
            try:
                return int(v)
            except ValueError:
                return None
    return None


def _psi_some_avg10(data: bytes | None) -> float | None:
    if data is None:
        return None
    for line in data.split(b"\n"):
        if line.startswith(b"some "):
            for part in line.split()[1:]:
                k, _, v = part.partition(b"=")
                if k == b"avg10":
                    try:
                        return float(v)
                    except ValueError:
                        return None
    return None


@dataclass
class _Watched:
    """One cgroup being watched: where its files are, and what the rates need."""

    label: str
    memory: str | None  # the directory with its memory files (v2: the unified dir)
    pids: str | None
    cpu: str | None
    v2: bool
    # 8 s of readings at 1 Hz, or of the fast path's 10 Hz (a shorter window while hot)
    used: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=96))
    tasks: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=64))
    oom_kills: int | None = None
    throttled: tuple[float, float] | None = None  # (mono, throttled seconds so far)
    hot: bool = False  # heading for its limit within fast_eta_s: read on the fast path


class CgroupCollector(BaseCollector[CgroupSettings]):
    name = "cgroups"
    inline = True  # /proc and /sys reads only: on the event loop

    def __init__(self, settings: CgroupSettings | None = None, *, root: str = "/") -> None:
        super().__init__(settings or CgroupSettings(), root=root)
        self._v2: str | None = None  # the unified mount with the memory controller
        self._v1: dict[str, str] = {}  # controller -> v1 mount
        self._watched: dict[str, _Watched] = {}
        self._scanned = -1e18
        self._follow_up: float | None = None  # a second walk after a change (limits set after mkdir)
        self._dirs = DirWatch() if self.settings.watch_changes else None
        self._last: Metrics = {}  # the last reading's metrics (the fast path reads over them)

    # ------------------------------------------------------------------ discovery
    def start(self) -> None:
        base = self._p("sys/fs/cgroup")
        for cand in (base, os.path.join(base, "unified")):
            controllers = read_bytes(os.path.join(cand, "cgroup.controllers"))
            if controllers is not None and b"memory" in controllers.split():
                self._v2 = cand
                break
        for ctrl, names in (("memory", ("memory",)), ("pids", ("pids",)),
                            ("cpu", ("cpu", "cpu,cpuacct", "cpuacct,cpu"))):
            for n in names:
                d = os.path.join(base, n)
                if os.path.isdir(d) and os.listdir(d):
                    self._v1[ctrl] = d
                    break
        if self._v2 is None and "memory" not in self._v1 and "pids" not in self._v1:
            raise CollectorUnavailable(f"no cgroup memory or pids controller under {base}")

    def _walk(self, top: str) -> list[tuple[str, str]]:
        """(label, directory) of every cgroup below ``top`` up to ``max_depth`` (not the root);
        every directory listed is watched for new and removed cgroups."""
        out: list[tuple[str, str]] = []
        stack: list[tuple[str, int]] = [(top, 0)]
        listed: list[str] = []
        while stack:
            d, depth = stack.pop()
            if depth >= self.settings.max_depth:
                continue
            listed.append(d)
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    out.append(("/" + os.path.relpath(e.path, top), e.path))
                    stack.append((e.path, depth + 1))
        if self._dirs is not None:
            self._dirs.watch(listed)
        return out

    def _limit_of(self, w: _Watched) -> int | None:
        if w.memory is None:
            return None
        if w.v2:
            return _int(read_bytes(os.path.join(w.memory, "memory.max")))
        limit = _int(read_bytes(os.path.join(w.memory, "memory.limit_in_bytes")))
        return None if limit is None or limit >= _V1_UNLIMITED else limit

    def _pids_limited(self, d: str | None) -> bool:
        return d is not None and _int(read_bytes(os.path.join(d, "pids.max"))) is not None

    def close(self) -> None:
        if self._dirs is not None:
            self._dirs.close()

    def _rescan(self) -> None:
        if self._dirs is not None:
            self._dirs.forget_missing()
        found: dict[str, _Watched] = {}
        if self._v2 is not None:
            for label, d in self._walk(self._v2):
                found[label] = _Watched(label, d, d, d, True)
        else:  # v1: a cgroup may exist in the pids hierarchy only (a unit with TasksMax=)
            labels = {label for ctrl in ("memory", "pids") if ctrl in self._v1
                      for label, _ in self._walk(self._v1[ctrl])}
            for label in labels:
                def at(ctrl: str, rel: str = label) -> str | None:
                    top = self._v1.get(ctrl)
                    p = os.path.join(top, rel.lstrip("/")) if top else None
                    return p if p is not None and os.path.isdir(p) else None
                found[label] = _Watched(label, at("memory"), at("pids"), at("cpu"), False)
        include = set(self.settings.include)
        kept: list[tuple[int, _Watched]] = []
        for label, w in found.items():
            limit = self._limit_of(w)
            if limit is not None or label in include or self._pids_limited(w.pids):
                kept.append((limit if limit is not None else 1 << 62, w))
        kept.sort(key=lambda lw: (lw[1].label not in include, lw[0], lw[1].label))
        new: dict[str, _Watched] = {}
        for _, w in kept[: self.settings.max_cgroups]:
            old = self._watched.get(w.label)
            new[w.label] = old if old is not None and old.memory == w.memory else w
        self._watched = new

    # ------------------------------------------------------------------ one pass
    def collect(self) -> Reading:
        now = time.monotonic()
        changed = self._dirs is not None and self._dirs.changed()
        if changed:
            self._follow_up = now + self.settings.settle_s
        due = self._follow_up is not None and now >= self._follow_up
        if changed or due or now - self._scanned >= self.settings.rescan_s:
            if due and not changed:
                self._follow_up = None
            self._rescan()
            self._scanned = now
        reading = Reading()
        for w in self._watched.values():
            self._memory(w, now, reading)
            self._pids(w, now, reading.metrics)
            self._cpu(w, now, reading.metrics)
        reading.detail = {"watched": sorted(self._watched)}
        self._last = reading.metrics
        return reading

    @property
    def hot(self) -> bool:
        """Whether a watched cgroup heads for its memory limit within ``fast_eta_s`` (and the
        fast path is on): :meth:`collect_hot` is then worth calling every ``fast_interval_s``."""
        return self.settings.fast_interval_s > 0 and any(w.hot for w in self._watched.values())

    def collect_hot(self) -> Reading:
        """The fast path: the last reading's metrics with the hot cgroups' memory read anew (a
        value the new reading lacks, such as an ETA that is over, is gone), and the new OOM-kill
        events only; no detail (the last pass's stands)."""
        now = time.monotonic()
        hot = [w for w in self._watched.values() if w.hot]
        reading = Reading(metrics=dict(self._last))
        for w in hot:
            for family in _MEM_FAMILIES:
                reading.metrics.pop(key(family, w.label), None)
        for w in hot:
            self._memory(w, now, reading)
        self._last = reading.metrics
        return reading

    def _memory(self, w: _Watched, now: float, reading: Reading) -> None:
        m, label, d = reading.metrics, w.label, w.memory
        if d is None:
            return
        if w.v2:
            usage = _int(read_bytes(os.path.join(d, "memory.current")))
            stat = read_bytes(os.path.join(d, "memory.stat"))
            cache = (_field(stat, b"inactive_file") or 0) + (_field(stat, b"active_file") or 0)
            events = read_bytes(os.path.join(d, "memory.events"))
            m[key("cgroup.psi.mem_some_avg10_pct", label)] = _psi_some_avg10(
                read_bytes(os.path.join(d, "memory.pressure")))
        else:
            usage = _int(read_bytes(os.path.join(d, "memory.usage_in_bytes")))
            stat = read_bytes(os.path.join(d, "memory.stat"))
            cache = (_field(stat, b"total_inactive_file") or 0) + (_field(stat, b"total_active_file") or 0)
            events = read_bytes(os.path.join(d, "memory.oom_control"))
        limit = self._limit_of(w)
        used = None if usage is None else max(0, usage - cache)
        m[key("cgroup.mem.used_bytes", label)] = None if used is None else float(used)
        m[key("cgroup.mem.limit_bytes", label)] = None if limit is None else float(limit)
        kills = _field(events, b"oom_kill")
        m[key("cgroup.mem.oom_kills", label)] = None if kills is None else float(kills)
        if kills is not None and w.oom_kills is not None and kills > w.oom_kills:
            reading.events.append(self._event(
                "cgroup.oom_kill", f"the kernel OOM-killed {kills - w.oom_kills} process(es) in {label}",
                value=float(kills - w.oom_kills), labels={"cgroup": label}))
        w.oom_kills = kills
        if used is None or limit is None or limit <= 0:
            w.used.clear()
            w.hot = False
            return
        headroom = max(0, limit - used)
        m[key("cgroup.mem.used_pct", label)] = 100.0 * used / limit
        m[key("cgroup.mem.headroom_bytes", label)] = float(headroom)
        last = w.used[-1] if w.used else None
        rate = growth(w.used, now, float(used), self.settings.slope_window_s)
        m[key("cgroup.mem.growth_bytes_per_s", label)] = rate
        if rate is not None and rate > 0:
            m[key("cgroup.mem.eta_s", label)] = headroom / rate
        for t, v in reversed(w.used):
            if now - t >= NOW_S:
                if used > v:
                    m[key("cgroup.mem.eta_now_s", label)] = headroom * (now - t) / (used - v)
                break
        # Hot: the limit within fast_eta_s at the slope's rate or at the last step's (the slope
        # needs three readings: the second pass of a fast leak already says where it goes).
        step = (used - last[1]) / (now - last[0]) if last is not None and now > last[0] else 0.0
        fastest = max(rate or 0.0, step)
        w.hot = (fastest >= limit * HOT_MIN_PCT_S / 100.0
                 and headroom < fastest * self.settings.fast_eta_s)

    def _pids(self, w: _Watched, now: float, m: Metrics) -> None:
        if w.pids is None:
            return
        top = _int(read_bytes(os.path.join(w.pids, "pids.max")))
        cur = _int(read_bytes(os.path.join(w.pids, "pids.current")))
        if not top or cur is None:
            w.tasks.clear()
            return
        headroom = max(0, top - cur)
        m[key("cgroup.pids.used_pct", w.label)] = 100.0 * cur / top
        m[key("cgroup.pids.headroom", w.label)] = float(headroom)
        rate = growth(w.tasks, now, float(cur), self.settings.slope_window_s)
        if rate is not None and rate > 0:
            m[key("cgroup.pids.eta_s", w.label)] = headroom / rate

    def _cpu(self, w: _Watched, now: float, m: Metrics) -> None:
        if w.cpu is None:
            return
        stat = read_bytes(os.path.join(w.cpu, "cpu.stat"))
        if w.v2:
            usec = _field(stat, b"throttled_usec")
            total = None if usec is None else usec / 1e6
        else:
            ns = _field(stat, b"throttled_time")
            total = None if ns is None else ns / 1e9
        if total is None:
            return
        prev, w.throttled = w.throttled, (now, total)
        if prev is not None and now > prev[0] and total >= prev[1]:
            share = (total - prev[1]) / (now - prev[0])
            m[key("cgroup.cpu.throttled_pct", w.label)] = min(100.0, 100.0 * share)
