"""Processes collector: process table summary, top consumers, watched names (and systemd units).

Sources: ``/proc/PID/stat``, read once per process and pass: comm, state, utime + stime,
num_threads, starttime and rss (the kernel's approximate count: it only picks the candidates for
the top lists, whose reported ``rss_bytes`` are read from ``/proc/PID/statm``, exact, as psutil's).
The stat files of the first ``_MAX_HELD_FDS`` processes (at most a quarter of RLIMIT_NOFILE) stay
open and are re-read with ``pread`` at offset 0, which regenerates them; such an fd stays bound to
its process (ESRCH once it is reaped, even if the pid is reused) and is closed then. Others are
opened, read and closed each pass; a stat file identical to the last pass's is not parsed again.
``/proc/PID/cmdline`` is read only for a process whose comm is truncated (15 characters) and that
is reported in a top list or could match a watched name. Also ``/proc/stat`` (procs_running,
procs_blocked). Where ``/proc`` is not usable (not Linux, not mounted) the table comes from psutil
instead, with the same metrics.

The collector also reports the state of the systemd units in ``units`` (``unit.*`` metrics and
the ``units`` detail, through ``systemctl show``): see :mod:`agent.collect.units`.

CPU use of a process is the increase of its utime + stime between two passes over the monotonic
time between them, % of one CPU rounded to 0.1 (as ``psutil.Process.cpu_percent``); a process seen
for the first time, or whose pid was reused (another starttime), reports 0.0 for that pass. Names
are psutil's: comm, or the basename of argv[0] when comm is truncated and argv[0] extends it.

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
============================ ========================================================================

Detail: ``top_cpu`` and ``top_mem``: lists of ``{pid, name, cpu_pct, rss_bytes}`` (``top_n`` each);
``watch``: ``{NAME: [pids]}``; ``zombie_pids`` (at most 100).
"""

from __future__ import annotations

import contextlib
import heapq
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TypedDict

import psutil

from agent.collect.base import BaseCollector
from agent.collect.sample import Detail, Metrics, Reading, key
from agent.collect.settings import ProcessSettings
from agent.collect.units import UnitStates

_MAX_ZOMBIE_PIDS = 100
_TABLE_KEYS = ("proc.count", "proc.threads", "proc.zombies", "proc.top_cpu_pct", "proc.top_rss_bytes")

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_O_FILE = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
_O_DIR = _O_FILE | getattr(os, "O_DIRECTORY", 0)
# /proc/PID/stat is at most ~1 KiB (52 numeric fields and a comm of 15 bytes): one read gets it all.
_STAT_READ = 4096
_CMDLINE_MAX = 1 << 20
_COMM_LEN = 15  # TASK_COMM_LEN - 1: comm holds at most this many bytes, longer names are cut
_RSS_MARGIN = 3  # candidates beyond top_n whose exact rss is read before the top_mem list is cut
# /proc/PID/stat files kept open between passes (pread instead of open/read/close: half the cost).
_MAX_HELD_FDS = 512


def _close_all(fds: dict[str, int]) -> None:
    held = list(fds.values())
    fds.clear()
    for fd in held:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fd_budget() -> int:
    """How many stat files may stay open: _MAX_HELD_FDS, at most a quarter of RLIMIT_NOFILE."""
    try:
        import resource  # noqa: PLC0415 - POSIX only

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 0
    return _MAX_HELD_FDS if soft == resource.RLIM_INFINITY else max(0, min(_MAX_HELD_FDS, soft // 4))


class ProcRow(TypedDict):
    """One process of the ``top_cpu`` and ``top_mem`` detail lists."""

    pid: int
    name: str
    cpu_pct: float
    rss_bytes: int


@dataclass(slots=True)
class _Row:
    pid: int
    name: str
    cpu_pct: float
    rss_bytes: int

    def as_dict(self) -> ProcRow:
        return {"pid": self.pid, "name": self.name, "cpu_pct": self.cpu_pct, "rss_bytes": self.rss_bytes}


_Stat = tuple[bytes, bytes, int, int, bytes, int]  # comm, state, ticks, threads, starttime, rss pages


def parse_pid_stat(data: bytes) -> _Stat | None:
    """``/proc/PID/stat`` -> (comm, state, utime + stime in ticks, num_threads, starttime, rss pages).

    comm may hold spaces and parentheses: it lies between the first ``(`` and the last ``)``.
    starttime stays bytes: it is only compared, to tell a reused pid. None when malformed.
    """
    rp = data.rfind(b")")
    lp = data.find(b"(")
    if lp < 0 or rp < lp:
        return None
    # fields[0] is field 3 of proc(5) (state): field N is fields[N - 3].
    f = data[rp + 2 :].split(None, 22)
    if len(f) < 22:
        return None
    try:
        return data[lp + 1 : rp], f[0], int(f[11]) + int(f[12]), int(f[17]), f[19], int(f[21])
    except ValueError:
        return None


def _statm_rss(dfd: int, entry: str, approx_pages: int) -> int:
    """Resident bytes from ``/proc/PID/statm`` (exact, as psutil's rss); stat's count if unreadable."""
    try:
        fd = os.open(entry + "/statm", _O_FILE, dir_fd=dfd)
    except OSError:
        return approx_pages * _PAGE
    try:
        return int(os.read(fd, 256).split(None, 2)[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return approx_pages * _PAGE
    finally:
        os.close(fd)


def parse_cmdline(data: bytes) -> list[str]:
    """``/proc/PID/cmdline`` as psutil splits it (NUL-separated, or spaces after setproctitle)."""
    text = os.fsdecode(data)
    if not text:
        return []
    sep = "\x00" if text.endswith("\x00") else " "
    if text.endswith(sep):
        text = text[:-1]
    argv = text.split(sep)
    if sep == "\x00" and len(argv) == 1 and " " in text:
        argv = text.split(" ")
    return argv


def extended_name(comm: str, argv: list[str]) -> str:
    """psutil's process name: comm, or argv[0]'s basename when comm is truncated and it extends it."""
    if len(comm) >= _COMM_LEN and argv:
        ext = os.path.basename(argv[0])
        if ext.startswith(comm):
            return ext
    return comm


def _read_all(path: str, limit: int = _CMDLINE_MAX, dir_fd: int | None = None) -> bytes | None:
    """The whole file (up to ``limit`` bytes) with os.open/os.read: no file object per read."""
    try:
        fd = os.open(path, _O_FILE, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        chunks: list[bytes] = []
        size = 0
        while size < limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def parse_procs_counts(data: bytes) -> tuple[int | None, int | None]:
    """(procs_running, procs_blocked) from ``/proc/stat``, without parsing its other lines."""
    out: list[int | None] = []
    for name in (b"\nprocs_running ", b"\nprocs_blocked "):
        i = data.find(name)
        if i < 0:
            out.append(None)
            continue
        i += len(name)
        j = data.find(b"\n", i)
        try:
            out.append(int(data[i : j if j >= 0 else len(data)]))
        except ValueError:
            out.append(None)
    return out[0], out[1]


class ProcessCollector(BaseCollector[ProcessSettings]):
    """See the module docstring for the metrics and detail."""

    name = "processes"

    def __init__(self, settings: ProcessSettings | None = None, *, root: str = "/") -> None:
        super().__init__(settings or ProcessSettings(), root=root)
        self._proc_dir = os.path.join(root, "proc")
        self._fast: bool | None = None  # /proc/PID/stat usable; None until probed
        # pid (as its /proc entry name) -> its stat file at the previous pass, and that parsed
        self._prev: dict[str, tuple[bytes, _Stat]] = {}
        self._prev_t: float | None = None
        self._fds: dict[str, int] = {}  # pid (entry name) -> its open /proc/PID/stat
        # A collector dropped without close() (a test, a reload gone wrong) must not leak its
        # held fds: they are closed when it is garbage-collected. The dict is only ever
        # cleared in place, so the finalizer always sees the live one.
        weakref.finalize(self, _close_all, self._fds)
        self._max_fds = 0  # set by start()
        self._lock = threading.Lock()  # a pass and close() never touch the fds at once
        self._close_pending = False
        self._procs: dict[int, psutil.Process] = {}  # the psutil fallback's cache
        self._units = UnitStates(self.settings)
        self._watch = frozenset(self.settings.watch)
        # Watched name -> its proc.count key, built once (in settings order: the metrics' order).
        self._watch_keys = {name: key("proc.count", name) for name in self.settings.watch}
        self._watch_b = {os.fsencode(n): n for n in self.settings.watch}
        # Watched names a truncated comm can be the start of.
        self._watch_long = tuple(w for w in self._watch_b if len(w) >= _COMM_LEN)

    def start(self) -> None:
        self._fast = self._probe()
        self._max_fds = _fd_budget() if self._fast else 0
        self._units.start()

    def _probe(self) -> bool:
        """Whether the process table can be read from /proc here (else psutil, on the real root)."""
        if self.root != "/":
            return True  # a fixture tree: never psutil, which would read this host's /proc
        if not sys.platform.startswith("linux"):
            return False
        data = _read_all(os.path.join(self._proc_dir, str(os.getpid()), "stat"), _STAT_READ)
        return data is not None and parse_pid_stat(data) is not None

    def close(self) -> None:
        self._procs.clear()
        # A pass abandoned by the daemon may still be running in its thread: it closes the fds
        # itself when it ends (a /proc scan takes milliseconds, so this rarely waits at all).
        if not self._lock.acquire(timeout=0.2):
            self._close_pending = True
            return
        try:
            self._close_fds()
        finally:
            self._lock.release()

    def _close_fds(self) -> None:
        _close_all(self._fds)
        self._prev = {}
        self._prev_t = None
        self._close_pending = False

    def collect(self) -> Reading:
        m: Metrics = {}
        detail: Detail = {}
        if self._fast is None:
            self._fast = self._probe()
        if self._fast:
            with self._lock:
                self._table(m, detail)
                if self._close_pending:
                    self._close_fds()
        else:
            self._table_psutil(m, detail)
        stat = _read_all(os.path.join(self._proc_dir, "stat"))
        running, blocked = parse_procs_counts(stat) if stat is not None else (None, None)
        m["proc.running"] = None if running is None else float(running)
        m["proc.blocked"] = None if blocked is None else float(blocked)
        units = self._units
        if units.systemctl is not None:  # checked here: most nodes watch no unit
            units.read(m, detail)
        return Reading(metrics=m, detail=detail)

    def _unreadable(self, m: Metrics) -> None:
        for k in _TABLE_KEYS:
            m[k] = None
        for watch_key in self._watch_keys.values():
            m[watch_key] = None

    def _summary(
        self, m: Metrics, detail: Detail, *, count: int, threads: int, zombies: list[int],
        watched: dict[str, list[int]],
    ) -> None:
        """The table's counts, zombies and watched names into ``m`` and ``detail`` (both readers)."""
        m["proc.count"] = float(count)
        m["proc.threads"] = float(threads)
        m["proc.zombies"] = float(len(zombies))
        detail["zombie_pids"] = zombies[:_MAX_ZOMBIE_PIDS]
        watch_keys = self._watch_keys
        for name, found in watched.items():
            m[watch_keys[name]] = float(len(found))
        if watched:
            detail["watch"] = watched

    @staticmethod
    def _tops(m: Metrics, detail: Detail, cpu_rows: list[_Row], mem_rows: list[_Row]) -> None:
        """The top lists (busiest first, largest first) into ``m`` and ``detail`` (both readers)."""
        m["proc.top_cpu_pct"] = cpu_rows[0].cpu_pct if cpu_rows else None
        m["proc.top_rss_bytes"] = float(mem_rows[0].rss_bytes) if mem_rows else None
        detail["top_cpu"] = [r.as_dict() for r in cpu_rows]
        detail["top_mem"] = [r.as_dict() for r in mem_rows]

    def _table(self, m: Metrics, detail: Detail) -> None:
        """The process table from /proc/PID/stat: one open/read/close per process."""
        now = time.monotonic()
        try:
            dfd = os.open(self._proc_dir, _O_DIR)
        except OSError:
            self._unreadable(m)
            return
        try:
            try:
                entries = os.listdir(dfd)
            except OSError:
                self._unreadable(m)
                return
            # By pid, as psutil.pids() (ties in the top lists go to the lower pid). /proc lists
            # them in that order already, so the sort is one linear pass.
            pids = [e for e in entries if e.isdigit()]
            pids.sort(key=int)
            self._scan(dfd, pids, now, m, detail)
        finally:
            os.close(dfd)

    def _scan(self, dfd: int, entries: list[str], now: float, m: Metrics, detail: Detail) -> None:
        """Read ``entries`` (the pid directories of ``dfd``, by pid) and fill ``m`` and ``detail``."""
        prev = self._prev
        cur: dict[str, tuple[bytes, _Stat]] = {}
        # Parallel lists, one slot per live process, by pid: no object per process.
        pids: list[str] = []
        comms: list[bytes] = []
        dticks: list[int] = []
        rsss: list[int] = []
        threads = 0
        zombies: list[int] = []
        watch_b = self._watch_b
        watch_long = self._watch_long
        watched: dict[str, list[int]] = {name: [] for name in self.settings.watch}
        fds = self._fds
        room = self._max_fds - len(fds)
        op, pread, rd, cl, parse = os.open, os.pread, os.read, os.close, parse_pid_stat
        for entry in entries:
            fd = fds.get(entry)
            data = None
            if fd is not None:
                try:
                    data = pread(fd, _STAT_READ, 0)  # offset 0: the kernel writes it anew
                except OSError:  # ESRCH: that process was reaped; the pid may name a new one
                    cl(fd)
                    del fds[entry]
                    room += 1
            if data is None:
                try:
                    fd = op(entry + "/stat", _O_FILE, dir_fd=dfd)
                except OSError:  # gone since listdir
                    continue
                try:
                    data = rd(fd, _STAT_READ)
                except OSError:  # ESRCH: exited between open and read
                    cl(fd)
                    continue
                if room > 0:
                    fds[entry] = fd
                    room -= 1
                else:
                    cl(fd)
            old = prev.get(entry)
            got: _Stat | None
            if old is not None and old[0] == data:  # an idle process: nothing moved, no parse
                got = old[1]
                d = 0
            else:
                got = parse(data)
                if got is None:
                    continue
                # 0 on a process's first pass, and when the pid now names another process.
                base = old[1] if old is not None else None
                d = got[2] - base[2] if base is not None and base[4] == got[4] and got[2] > base[2] else 0
            cur[entry] = (data, got)
            comm, state, _, nthreads, _, rss = got
            if state == b"Z":
                zombies.append(int(entry))
                d, rss = 0, 0
            else:
                threads += nthreads
            pids.append(entry)
            comms.append(comm)
            dticks.append(d)
            rsss.append(rss)
            if watch_b:
                if len(comm) < _COMM_LEN:
                    if comm in watch_b:
                        watched[watch_b[comm]].append(int(entry))
                elif comm in watch_b or any(w.startswith(comm) for w in watch_long):
                    # Possibly truncated: psutil's name decides (argv[0] may extend it).
                    name = self._name(dfd, entry, comm)
                    if name in self._watch:
                        watched[name].append(int(entry))
        if len(fds) > len(pids):  # processes gone (reaped) since the last pass
            live = set(pids)
            for gone in [e for e in fds if e not in live]:
                cl(fds.pop(gone))
        dt = now - self._prev_t if self._prev_t is not None else 0.0
        self._prev = cur
        self._prev_t = now
        scale = 100.0 / (_CLK_TCK * dt) if dt > 0 else 0.0

        self._summary(m, detail, count=len(pids), threads=threads, zombies=zombies, watched=watched)
        n = self.settings.top_n
        idx = range(len(pids))
        # Ordering by ticks is ordering by % (one dt for all); ties keep pid order, as before.
        top_cpu = heapq.nlargest(n, idx, key=dticks.__getitem__) if n else []
        # stat's rss is the kernel's approximate (per-CPU batched) count; statm's, which psutil
        # reports, is exact (kernels >= 6.16). Rank a few more by the first, then by the second.
        mem_cands = heapq.nlargest(n + _RSS_MARGIN, idx, key=rsss.__getitem__) if n else []
        exact: dict[int, int] = {}

        def rss_of(i: int) -> int:
            got = exact.get(i)
            if got is None:
                got = exact[i] = _statm_rss(dfd, pids[i], rsss[i])
            return got

        top_mem = heapq.nlargest(n, mem_cands, key=rss_of)
        names: dict[int, str] = {}

        def row(i: int) -> _Row:
            name = names.get(i)
            if name is None:
                name = names[i] = self._name(dfd, pids[i], comms[i])
            return _Row(int(pids[i]), name, round(dticks[i] * scale, 1), rss_of(i))

        self._tops(m, detail, [row(i) for i in top_cpu], [row(i) for i in top_mem])

    @staticmethod
    def _name(dfd: int, entry: str, comm: bytes) -> str:
        """psutil's name of a process: reads its cmdline only when comm is truncated."""
        name = os.fsdecode(comm)
        if len(name) < _COMM_LEN:
            return name
        data = _read_all(entry + "/cmdline", dir_fd=dfd)
        return extended_name(name, parse_cmdline(data)) if data else name

    def _table_psutil(self, m: Metrics, detail: Detail) -> None:
        """The process table through psutil, where /proc is not usable (three reads per process)."""
        try:
            pids = psutil.pids()
        except (OSError, psutil.Error):
            self._unreadable(m)
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
        self._summary(m, detail, count=len(rows), threads=threads, zombies=zombies, watched=watched)
        n = self.settings.top_n
        top_cpu = heapq.nlargest(n, rows, key=lambda r: r.cpu_pct) if n else []
        top_mem = heapq.nlargest(n, rows, key=lambda r: r.rss_bytes) if n else []
        self._tops(m, detail, top_cpu, top_mem)
