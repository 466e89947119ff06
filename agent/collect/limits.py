"""Kernel table collector: file descriptors, tasks (PIDs/threads) and conntrack entries vs their limits.

These run out as a wall, not a slope: the process that opens its 1025th file gets ``EMFILE``,
the 32769th task ``fork: Resource temporarily unavailable``, the packet after the conntrack table
fills is dropped (``nf_conntrack: table full``) — while CPU, memory and disk look fine. What
predicts the wall is the count's growth towards its own limit, so each table reports its use, its
headroom (what the forecaster tracks to 0) and, while it grows, the ETA at the rate of the last
``slope_window_s`` (least squares, as :mod:`agent.collect.cgroups`).

Sources: ``/proc/sys/fs/file-nr`` (allocated file handles) vs ``file-max``; ``/proc/loadavg``
(the kernel's count of tasks: every thread takes a PID) vs ``min(kernel.pid_max,
kernel.threads-max)``; ``/proc/sys/net/netfilter/nf_conntrack_count`` vs ``nf_conntrack_max``
(only while the module is loaded); per process, ``/proc/PID/fd`` (counted) vs the soft
``Max open files`` of ``/proc/PID/limits``. Counting every process's fds is a directory listing
each, so it is done every ``fd_rescan_s`` to pick the ``fd_top_n`` processes closest to their
own limit; only those are counted every pass.

Metrics (``PID`` = a process id as text):

=============================== ====================================================================
``fd.used_pct``                 allocated file handles / fs.file-max, %
``fd.headroom``                 fs.file-max - allocated file handles
``fd.eta_s``                    headroom / growth while the count grows (absent when it does not)
``fd.growth_per_s``             the count's growth, per second (least squares over the slope window)
``proc.fd.count[PID]``          open fds of one of the ``fd_top_n`` processes closest to their limit
``proc.fd.used_pct[PID]``       its open fds / its soft RLIMIT_NOFILE, %
``proc.fd.headroom[PID]``       its soft RLIMIT_NOFILE - open fds (the next open past it is EMFILE)
``proc.fd.eta_s[PID]``          seconds until its own limit at its rate of the last window
``proc.tasks.used_pct``         tasks (threads) / min(kernel.pid_max, kernel.threads-max), %
``proc.tasks.headroom``         that limit - tasks
``proc.tasks.eta_s``            seconds until that limit at the current rate
``proc.tasks.growth_per_s``     tasks' growth, per second
``net.conntrack.used_pct``      nf_conntrack_count / nf_conntrack_max, %
``net.conntrack.headroom``      nf_conntrack_max - nf_conntrack_count
``net.conntrack.max``           nf_conntrack_max (what a gentle step may raise)
``net.conntrack.eta_s``         seconds until the table is full at the current rate
``net.conntrack.growth_per_s``  the entries' growth, per second
=============================== ====================================================================
"""

from __future__ import annotations

import os
import time
from collections import deque

from agent.collect.base import BaseCollector
from agent.collect.counters import growth
from agent.collect.procfs import read_bytes
from agent.collect.sample import Metrics, Reading, key
from agent.collect.settings import LimitSettings

Points = deque[tuple[float, float]]


def nofile_soft(limits: bytes | None) -> int | None:
    """The soft ``Max open files`` of a ``/proc/PID/limits`` text (None: unlimited or unreadable)."""
    if limits is None:
        return None
    for line in limits.split(b"\n"):
        if line.startswith(b"Max open files"):
            parts = line.split()
            try:
                return int(parts[3])
            except (IndexError, ValueError):
                return None
    return None


def _ints(data: bytes | None) -> list[int]:
    if data is None:
        return []
    out = []
    for part in data.replace(b"/", b" ").split():
        try:
            out.append(int(part))
        except ValueError:
            break
    return out


def _fd_dir_size_counts() -> bool:
    """Whether this kernel reports open fds as the size of /proc/PID/fd."""
    try:
        return os.stat("/proc/self/fd").st_size > 0
    except OSError:
        return False


class LimitCollector(BaseCollector[LimitSettings]):
    name = "limits"
    inline = True  # /proc and /sys reads only: on the event loop

    def __init__(self, settings: LimitSettings | None = None, *, root: str = "/") -> None:
        super().__init__(settings or LimitSettings(), root=root)
        self._series: dict[str, Points] = {}
        self._fd_pids: dict[str, int] = {}  # pid -> soft RLIMIT_NOFILE, the processes counted each pass
        self._fd_scanned = -1e18
        # The kernel reports a process's fd count as its /proc/PID/fd size (Linux >= 6.2; 0 before).
        # Only on the real /proc: in a fixture tree the size is the directory's, not a count.
        self._fd_size = root == "/" and _fd_dir_size_counts()

    def collect(self) -> Reading:
        now = time.monotonic()
        reading = Reading()
        m = reading.metrics
        nr = _ints(read_bytes(self._p("proc/sys/fs/file-nr")))
        if len(nr) >= 3 and nr[2] > 0:
            self._table(m, now, "fd", nr[0] - nr[1], nr[2])  # allocated - free = in use
        fields = (read_bytes(self._p("proc/loadavg")) or b"").split()
        la = _ints(fields[3]) if len(fields) > 3 else []  # "running/total" tasks
        tops = [v for v in (_ints(read_bytes(self._p(f"proc/sys/kernel/{n}")))
                            for n in ("pid_max", "threads-max")) if v]
        if len(la) >= 2 and tops:
            self._table(m, now, "proc.tasks", la[1], min(v[0] for v in tops))
        cnt = _ints(read_bytes(self._p("proc/sys/net/netfilter/nf_conntrack_count")))
        top = _ints(read_bytes(self._p("proc/sys/net/netfilter/nf_conntrack_max")))
        if cnt and top and top[0] > 0:
            m["net.conntrack.max"] = float(top[0])
            self._table(m, now, "net.conntrack", cnt[0], top[0])
        self._fds(m, now)
        seen = {k for k in m if k.endswith(".headroom") or ".headroom[" in k}
        for name in [n for n in self._series if n not in seen]:
            del self._series[name]
        reading.detail = {"fd_pids": sorted(self._fd_pids, key=int)}
        return reading

    def _table(self, m: Metrics, now: float, family: str, used: int, limit: int, *,
               label: str = "") -> None:
        def k(f: str) -> str:
            return key(f"{family}.{f}", label) if label else f"{family}.{f}"
        headroom = max(0, limit - used)
        m[k("used_pct")] = 100.0 * used / limit
        m[k("headroom")] = float(headroom)
        pts = self._series.setdefault(k("headroom"), deque(maxlen=128))
        rate = growth(pts, now, float(used), self.settings.slope_window_s)
        if rate is not None and not label:  # the host tables: what a raise's verification reads
            m[k("growth_per_s")] = rate
        if rate is not None and rate > 0:
            m[k("eta_s")] = headroom / rate

    def _count_fds(self, pid: str) -> int | None:
        """Open fds of ``pid``: the size of its /proc/PID/fd directory (Linux >= 6.2 reports the
        count there, one stat instead of listing every fd), else the listing's length."""
        path = self._p(f"proc/{pid}/fd")
        try:
            if self._fd_size:
                n = os.stat(path).st_size
                if n > 0:
                    return n
            return len(os.listdir(path))
        except OSError:
            return None

    def _fds(self, m: Metrics, now: float) -> None:
        if now - self._fd_scanned >= self.settings.fd_rescan_s:
            self._fd_scanned = now
            ranked: list[tuple[float, str, int]] = []
            try:
                pids = [e for e in os.listdir(self._p("proc")) if e.isdigit()]
            except OSError:
                pids = []
            for pid in pids:
                soft = nofile_soft(read_bytes(self._p(f"proc/{pid}/limits")))
                if not soft or soft >= 1 << 30:
                    continue
                n = self._count_fds(pid)
                if n is not None:
                    ranked.append((n / soft, pid, soft))
            ranked.sort(reverse=True)
            self._fd_pids = {pid: soft for _, pid, soft in ranked[: self.settings.fd_top_n]}
        for pid in list(self._fd_pids):
            soft = nofile_soft(read_bytes(self._p(f"proc/{pid}/limits")))  # prlimit may change it
            n = self._count_fds(pid)
            if n is None or not soft:  # exited
                del self._fd_pids[pid]
                continue
            m[key("proc.fd.count", pid)] = float(n)
            self._table(m, now, "proc.fd", n, soft, label=pid)
