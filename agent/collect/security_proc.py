"""Security collector, process side: suspicious executables, their CPU and egress, watched files.

Suspicious processes. Every pass reads ``/proc/PID/exe`` (one readlink a process) and flags a
process whose executable is

* ``deleted``: the file it runs from was unlinked (``... (deleted)``): droppers do this;
* ``temp_path``: below one of ``temp_dirs`` (``/tmp``, ``/var/tmp``, ``/dev/shm``);
* ``world_writable``: in a world-writable directory (anyone could have replaced it);
* ``unknown_hash``: outside ``trusted_prefixes`` (the package manager's root-owned trees) and its
  sha256 was never seen on this node. Hashes are computed lazily, only for executables outside
  those prefixes, and cached by (device, inode, mtime, size); the binary is read through
  ``/proc/PID/exe``, so a deleted one is hashed too. The baseline (at most ``max_hashes``, least
  recently seen dropped first) is kept in the state directory (``security/baseline.json``) and is
  learned, not reported, for ``learn_s`` after it is first created.

Only suspicious processes cost more than the readlink: their ``/proc/PID/stat`` (CPU, state) and,
when frozen by heald, their freezer cgroup. ``allow_sha256`` exempts a binary wherever it runs.

Egress (every ``egress_interval_s`` while there is a suspect): the established TCP sockets with
their inode and ``bytes_acked``, read in-process from netlink sock_diag
(:mod:`agent.collect.sockdiag`; where that fails, or below a fixture root, one
``ss -tinHe state established``, where ``ss`` exists); sockets to a loopback peer are not
egress. The sockets of each suspicious process are found through its ``/proc/PID/fd`` links
(``socket:[INODE]``), so only those few directories are read.
A process's first egress pass sets its base. A spike is ``egress_min_bytes_per_s`` and
``egress_factor`` times the process's own average of the passes before (with no average yet,
the absolute floor alone decides), or ``egress_min_new_conns`` new connections in one pass.

Watched files (every ``files_interval_s``): ``~/.ssh/authorized_keys`` (and ``authorized_keys2``)
of every user in ``passwd_file``, and ``watch_files`` (a directory: each file in it, one level).
Their sha256 is compared with the baseline; a change is an event. The baseline persists, so a
change made while heald was stopped is reported at its next start.

Metrics (``PID`` = a process id as text; at most ``max_suspects`` suspicious processes, busiest
first):

================================= ==================================================================
``sec.suspects``                  suspicious processes now
``sec.exe_unreadable``            processes whose executable heald may not read (no CAP_SYS_PTRACE)
``sec.suspect_cpu_pct[PID]``      its CPU use over the last interval, % of one CPU
``sec.suspect_frozen[PID]``       1 when heald froze it: its forensics record (``record_name``) says
                                  so and it is stopped (state T) or in heald's frozen freezer group;
                                  with no record (the state dir was full), in the frozen group
                                  heald named after this very process
``sec.egress_bytes_per_s[PID]``   bytes its TCP sockets had acknowledged per second, last egress pass
``sec.egress_conns[PID]``         its established TCP connections to non-loopback peers
``sec.egress_spike[PID]``         1 when that rate or its new connections make a spike (see above)
``sec.egress_bytes_per_s``        the node's total over all non-loopback TCP sockets
``sec.files_watched``             watched files that exist
================================= ==================================================================

Events: ``sec.file_changed`` (labels ``path``, ``change``: modified, created, removed).
Detail: ``suspects``: ``[{pid, exe, reasons, sha256, cpu_pct, state, frozen, egress_bytes_per_s}]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import math
import os
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import structlog

from agent.collect import sockdiag
from agent.collect.base import BaseCollector
from agent.collect.processes import parse_pid_stat
from agent.collect.procfs import read_bytes
from agent.collect.sample import Event, Metrics, Reading, key
from agent.collect.settings import SecurityProcSettings
from agent.fsutil import atomic_write

#: The cgroup (below the freezer hierarchy's root, or below the v2 root) heald freezes processes in.
FROZEN_GROUP = "heald-frozen"


def record_name(pid: str | int, starttime: bytes | int) -> str:
    """The name of freeze_process's forensics record of a process: pid and its start time (clock
    ticks after boot, /proc/PID/stat field 22), so a reused pid never finds another's record."""
    return f"{pid}-{int(starttime)}"


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_DELETED = " (deleted)"
_EXE_MAX = 256  # characters of an executable path in the detail
_FILE_MAX = 1 << 20  # a watched file larger than this is hashed on its first MiB
_MAX_HOMES = 1000
_MAX_DIR_FILES = 256
_MAX_FDS = 4096  # fds of one suspicious process looked at for sockets


def _sha256_fd(fd: int, limit: int) -> str | None:
    h = hashlib.sha256()
    size = 0
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return h.hexdigest()
        size += len(chunk)
        if size > limit:
            return None
        h.update(chunk)


def sha256_file(path: str, limit: int = 1 << 62) -> str | None:
    """sha256 of a file (a deleted binary through /proc/PID/exe); None: unreadable or over ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _sha256_fd(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def file_digest(path: str, limit: int = _FILE_MAX) -> str | None:
    """A watched file's digest: sha256 of its size and first ``limit`` bytes (a huge file costs one
    MiB, and growing it still changes the digest); None when it is absent or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        h = hashlib.sha256(b"%d\n" % st.st_size)
        left = limit
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 16))):
            h.update(chunk)
            left -= len(chunk)
        return h.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


log = structlog.get_logger("heald.collect.security_proc")


def _head(path: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit)
    except OSError:
        return b""


def parse_ss(text: str) -> dict[int, tuple[bool, int]]:
    """``ss -tinHe`` output -> {socket inode: (peer is loopback, bytes_acked)}."""
    out: dict[int, tuple[bool, int]] = {}
    ino: int | None = None
    local = False
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():  # a socket line: State Recv-Q Send-Q Local Peer [ino:N ...]
            parts = line.split()
            ino = None
            for tok in parts:
                if tok.startswith("ino:"):
                    with contextlib.suppress(ValueError):
                        ino = int(tok[4:])
            peer = parts[4] if len(parts) > 4 and parts[0].isalpha() else (parts[3] if len(parts) > 3 else "")
            local = _loopback(peer)
            if ino:
                out[ino] = (local, 0)
            continue
        if ino:  # the info line of the socket above
            for tok in line.split():
                if tok.startswith("bytes_acked:"):
                    with contextlib.suppress(ValueError):
                        out[ino] = (local, int(tok[12:]))
    return out


def _loopback(endpoint: str) -> bool:
    host = endpoint.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
    host = host.removeprefix("::ffff:")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class _Proc:
    starttime: bytes = b""
    ticks: int = -1
    # egress: inode -> bytes_acked at the last egress pass; the average rate and passes seen
    sockets: dict[int, int] = field(default_factory=dict)
    egress_avg: float = 0.0
    egress_n: int = 0
    egress_seen: bool = False
    egress_rate: float | None = None
    egress_conns: int = 0
    egress_spike: bool = False


class SecurityProcCollector(BaseCollector[SecurityProcSettings]):
    name = "security_proc"

    def __init__(self, settings: SecurityProcSettings | None = None, *, root: str = "/",
                 state_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(settings or SecurityProcSettings(), root=root)
        s = self.settings
        self._temp = tuple(d.rstrip("/") + "/" for d in s.temp_dirs)
        self._trusted = tuple(s.trusted_prefixes)
        self._allow = frozenset(h.lower() for h in s.allow_sha256)
        self._base_path = Path(state_dir) / "security" / "baseline.json" if state_dir is not None else None
        self._forensics = Path(state_dir) / "forensics" if state_dir is not None else None
        self._hashes: dict[str, float] = {}  # sha256 -> last seen (wall)
        self._files: dict[str, str | None] = {}  # watched path -> sha256 (None: absent)
        self._files_known = False  # the baseline holds the watched files (else the first pass learns)
        self._created = 0.0
        self._learn_until = 0.0
        self._dirty = False
        self._saved = 0.0
        self._hash_cache: dict[tuple[int, int, int, int], str | None] = {}
        self._dir_ww: dict[str, bool] = {}
        self._procs: dict[str, _Proc] = {}
        self._prev_t: float | None = None
        self._egress_t: float | None = None
        self._node_sockets: dict[int, int] = {}
        self._node_rate: float | None = None
        self._files_t = -1e18
        self._ss_ok = s.egress
        # the host's own sockets in-process (agent/collect/sockdiag.py); fixture roots use ss
        self._diag = s.egress and root == "/"
        self._unreadable = 0  # processes whose executable could not be read in the last pass

    # ------------------------------------------------------------------ baseline
    def start(self) -> None:
        now = time.time()
        data: dict[str, object] = {}
        if self._base_path is not None:
            raw = read_bytes(str(self._base_path))
            if raw is not None:
                with contextlib.suppress(ValueError):
                    loaded = json.loads(raw)
                    if isinstance(loaded, dict):
                        data = loaded
        hashes, files, created = data.get("hashes"), data.get("files"), data.get("created")
        if isinstance(hashes, dict):
            self._hashes = {str(k): float(v) for k, v in hashes.items()
                            if isinstance(v, (int, float)) and math.isfinite(v) and len(str(k)) == 64}
        if isinstance(files, dict):
            self._files_known = True
            self._files = {str(k): (str(v) if isinstance(v, str) else None) for k, v in files.items()}
        fine = isinstance(created, (int, float)) and math.isfinite(created)
        self._created = float(created) if fine else now  # type: ignore[arg-type]
        self._learn_until = self._created + self.settings.learn_s
        if not data:
            self._dirty = True

    def _save(self, now: float, force: bool = False) -> None:
        if self._base_path is None or not self._dirty or (not force and now - self._saved < 30):
            return
        if len(self._hashes) > self.settings.max_hashes:
            keep = sorted(self._hashes.items(), key=lambda kv: kv[1])[-self.settings.max_hashes:]
            self._hashes = dict(keep)
        doc = {"version": 1, "created": self._created, "hashes": self._hashes, "files": self._files}
        try:
            atomic_write(self._base_path, json.dumps(doc, sort_keys=True).encode())
        except OSError:
            return  # a full or read-only state dir: kept in memory, tried again later
        self._dirty = False
        self._saved = now

    def close(self) -> None:
        self._save(time.time(), force=True)

    # ------------------------------------------------------------------ one pass
    def collect(self) -> Reading:
        mono, wall = time.monotonic(), time.time()
        reading = Reading()
        m = reading.metrics
        suspects = self._suspects(wall)
        dt = mono - self._prev_t if self._prev_t is not None else 0.0
        self._prev_t = mono
        rows: list[dict[str, object]] = []
        live: dict[str, _Proc] = {}
        for pid, (exe, reasons, digest) in suspects.items():
            st = parse_pid_stat(read_bytes(self._p(f"proc/{pid}/stat")) or b"")
            if st is None:
                continue
            p = self._procs.get(pid)
            if p is None or p.starttime != st[4]:
                p = _Proc(starttime=st[4])
            d = st[2] - p.ticks if p.ticks >= 0 and dt > 0 else 0
            p.ticks = st[2]
            live[pid] = p
            state = st[1].decode("ascii", "replace")
            rows.append({
                "pid": int(pid), "exe": exe[:_EXE_MAX], "reasons": reasons, "sha256": digest,
                "cpu_pct": round(100.0 * max(d, 0) / (_CLK_TCK * dt), 1) if dt > 0 else 0.0,
                "state": state, "frozen": self._heald_froze(pid, st[4], state),
            })
        self._procs = live
        rows.sort(key=lambda r: (-cast("float", r["cpu_pct"]), cast("int", r["pid"])))
        rows = rows[: self.settings.max_suspects]
        due = self._egress_t is None or mono - self._egress_t >= self.settings.egress_interval_s
        if self._ss_ok and due and rows:  # no suspect, no ss: its cost grows with the node's sockets
            self._egress(mono, [str(r["pid"]) for r in rows])
        m["sec.suspects"] = float(len(suspects))
        m["sec.exe_unreadable"] = float(self._unreadable)
        for r in rows:
            pid = str(r["pid"])
            p = live[pid]
            m[key("sec.suspect_cpu_pct", pid)] = float(r["cpu_pct"])  # type: ignore[arg-type]
            m[key("sec.suspect_frozen", pid)] = 1.0 if r["frozen"] else 0.0
            if self._egress_t is not None:
                m[key("sec.egress_bytes_per_s", pid)] = p.egress_rate
                m[key("sec.egress_conns", pid)] = float(p.egress_conns)
                m[key("sec.egress_spike", pid)] = 1.0 if p.egress_spike else 0.0
                r["egress_bytes_per_s"] = p.egress_rate
        if self._egress_t is not None:
            m["sec.egress_bytes_per_s"] = self._node_rate
        if mono - self._files_t >= self.settings.files_interval_s:
            self._files_t = mono
            reading.events.extend(self._watch(m))
        else:
            m["sec.files_watched"] = float(sum(1 for v in self._files.values() if v is not None))
        reading.detail = {"suspects": rows}
        self._save(wall)
        return reading

    # ------------------------------------------------------------------ suspects
    def _suspects(self, wall: float) -> dict[str, tuple[str, list[str], str | None]]:
        out: dict[str, tuple[str, list[str], str | None]] = {}
        proc = self._p("proc")
        try:
            entries = [e for e in os.listdir(proc) if e.isdigit()]
        except OSError:
            return out
        own = str(os.getpid())
        self._unreadable = 0
        for pid in entries:
            if pid == own:
                continue
            try:
                exe = os.readlink(f"{proc}/{pid}/exe")
            except PermissionError:  # another user's, without CAP_SYS_PTRACE: counted, not seen
                self._unreadable += 1
                continue
            except OSError:
                continue  # a kernel thread, or gone
            reasons: list[str] = []
            deleted = exe.endswith(_DELETED)
            path = exe[: -len(_DELETED)] if deleted else exe
            if deleted:
                reasons.append("deleted")
            if path.startswith(self._temp):
                reasons.append("temp_path")
            if self.settings.world_writable and self._world_writable(os.path.dirname(path)):
                reasons.append("world_writable")
            digest: str | None = None
            if reasons or not path.startswith(self._trusted):
                digest = self._hash(f"{proc}/{pid}/exe")
                if digest is not None and digest in self._allow:
                    continue
                if not path.startswith(self._trusted) and digest is not None:
                    if digest not in self._hashes:
                        if wall < self._learn_until:
                            self._dirty = True
                        else:
                            reasons.append("unknown_hash")
                    if "unknown_hash" not in reasons:
                        if self._hashes.get(digest, 0.0) < wall - 3600:
                            self._dirty = True
                        self._hashes[digest] = wall
                elif digest is None and not path.startswith(self._trusted):
                    reasons.append("unhashed")
            if reasons:
                out[pid] = (exe, reasons, digest)
        return out

    def _world_writable(self, directory: str) -> bool:
        got = self._dir_ww.get(directory)
        if got is None:
            try:
                got = bool(os.stat(directory).st_mode & stat.S_IWOTH)
            except OSError:
                got = False  # deleted directory, or another mount namespace: the path says nothing
            if len(self._dir_ww) > 4096:
                self._dir_ww.clear()
            self._dir_ww[directory] = got
        return got

    def _hash(self, exe_link: str) -> str | None:
        try:
            st = os.stat(exe_link)  # the running file itself, deleted or not
        except OSError:
            return None
        ck = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        if ck in self._hash_cache:
            return self._hash_cache[ck]
        digest = sha256_file(exe_link, self.settings.hash_max_bytes) \
            if st.st_size <= self.settings.hash_max_bytes else None
        if len(self._hash_cache) > 4096:
            self._hash_cache.clear()
        self._hash_cache[ck] = digest
        return digest

    def _heald_froze(self, pid: str, starttime: bytes, state: str) -> bool:
        """Stopped or frozen, and by heald: a process someone else stopped (a shell's Ctrl-Z, a
        debugger) is not one heald may offer to kill."""
        if self._forensics is None:
            return False
        name = record_name(pid, starttime)
        raw = read_bytes(str(self._forensics / name / "record.json"))
        try:
            rec = json.loads(raw) if raw is not None else None
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            # No record: freeze_process froze it all the same when the state dir was full (or the
            # record is torn). The frozen freezer group heald named after this very process (pid
            # and start time) says who froze it; a SIGSTOP alone does not.
            return self._frozen(pid, f"/{FROZEN_GROUP}/{name}")
        if rec.get("state") not in {"freezing", "frozen"}:  # freezing: a crash
            return False
        return state in {"T", "t"} or self._frozen(pid)

    def _frozen(self, pid: str, group: str = "") -> bool:
        """In heald's freezer group (``group`` exactly, when given), and that group frozen (v1
        freezer.state, v2 cgroup.events)."""
        text = read_bytes(self._p(f"proc/{pid}/cgroup")) or b""
        for line in text.decode("utf-8", "replace").splitlines():
            parts = line.split(":", 2)
            if group and len(parts) == 3 and parts[2] != group:
                continue
            if len(parts) == 3 and f"/{FROZEN_GROUP}/" in parts[2] + "/":
                if parts[1] == "freezer":
                    st = read_bytes(self._p(f"sys/fs/cgroup/freezer{parts[2]}/freezer.state")) or b""
                    return st.strip() == b"FROZEN"
                if parts[0] == "0":
                    for base in ("sys/fs/cgroup", "sys/fs/cgroup/unified"):
                        ev = read_bytes(self._p(f"{base}{parts[2]}/cgroup.events"))
                        if ev is not None:
                            return b"frozen 1" in ev
        return False

    # ------------------------------------------------------------------ egress
    def _sockets(self) -> dict[int, tuple[bool, int]] | None:
        """The established TCP sockets: from netlink sock_diag in-process where this collector
        reads the host's own /proc, else (or where sock_diag fails) from ``ss``; None this pass."""
        s = self.settings
        if self._diag:
            try:
                return sockdiag.established(timeout_s=max(0.2, s.timeout_s / 2))
            except OSError as exc:  # TimeoutError included: ss from now on
                self._diag = False
                log.info("netlink sock_diag unavailable; egress read with ss", error=str(exc))
        try:
            done = subprocess.run([*s.ss, "-tinHe", "state", "established"], capture_output=True,
                                  timeout=max(0.2, s.timeout_s / 2), check=False)
        except (OSError, subprocess.TimeoutExpired):
            self._ss_ok = isinstance(self._egress_t, float)  # missing at the first try: off
            return None
        if done.returncode != 0:
            return None
        return parse_ss(done.stdout.decode("utf-8", "replace"))

    def _egress(self, mono: float, pids: list[str]) -> None:
        socks = self._sockets()
        if socks is None:
            return
        dt = mono - self._egress_t if self._egress_t is not None else 0.0
        self._egress_t = mono
        total = 0
        node: dict[int, int] = {}
        for ino, (local, acked) in socks.items():
            if local:
                continue
            node[ino] = acked
            prev = self._node_sockets.get(ino)
            total += acked - prev if prev is not None and acked >= prev else 0
        self._node_rate = total / dt if dt > 0 else None
        self._node_sockets = node
        for pid in pids:
            mine = {i: node[i] for i in self._socket_inodes(pid) if i in node}
            self._proc_egress(self._procs[pid], mine, dt)

    def _proc_egress(self, p: _Proc, mine: dict[int, int], dt: float) -> None:
        """One egress pass of one process: its rate since the last pass, and whether that is a spike."""
        s = self.settings
        p.egress_conns = len(mine)
        if not p.egress_seen or dt <= 0:  # its first pass: what its sockets hold now is the base
            p.egress_seen, p.sockets, p.egress_rate, p.egress_spike = True, mine, None, False
            return
        sent, new = 0, 0
        for ino, acked in mine.items():
            prev = p.sockets.get(ino)
            if prev is None:  # opened since the last pass: all it sent is new
                new += 1
                sent += acked
            elif acked >= prev:
                sent += acked - prev
        rate = sent / dt
        p.egress_spike = (rate >= s.egress_min_bytes_per_s
                          and (p.egress_n == 0 or rate >= s.egress_factor * p.egress_avg)) \
            or new >= s.egress_min_new_conns
        if not p.egress_spike:  # a spike does not raise its own bar
            p.egress_n = min(p.egress_n + 1, 100)
            p.egress_avg += (rate - p.egress_avg) / p.egress_n
        p.sockets, p.egress_rate = mine, rate

    def _socket_inodes(self, pid: str) -> list[int]:
        fd_dir = self._p(f"proc/{pid}/fd")
        out: list[int] = []
        try:
            fds = os.listdir(fd_dir)[:_MAX_FDS]
        except OSError:
            return out
        for fd in fds:
            with contextlib.suppress(OSError, ValueError):
                link = os.readlink(f"{fd_dir}/{fd}")
                if link.startswith("socket:["):
                    out.append(int(link[8:-1]))
        return out

    # ------------------------------------------------------------------ watched files
    def watched_paths(self) -> list[str]:
        s = self.settings
        paths: list[str] = []
        if s.authorized_keys:
            text = _head(s.passwd_file, _FILE_MAX)
            homes = []
            for line in text.decode("utf-8", "replace").splitlines()[:_MAX_HOMES]:
                parts = line.split(":")
                if len(parts) >= 6 and parts[5].startswith("/"):
                    homes.append(parts[5])
            for home in dict.fromkeys(homes):
                ssh = home.rstrip("/") + "/.ssh/"
                paths += [ssh + "authorized_keys", ssh + "authorized_keys2"]
        for p in s.watch_files:
            if os.path.isdir(p):
                with contextlib.suppress(OSError):
                    names = sorted(os.listdir(p))[:_MAX_DIR_FILES]
                    paths += [os.path.join(p, n) for n in names if not n.startswith(".")]
            else:
                paths.append(p)
        return list(dict.fromkeys(paths))

    def _watch(self, m: Metrics) -> list[Event]:
        events: list[Event] = []
        first = not self._files_known
        self._files_known = True
        now: dict[str, str | None] = {}
        for path in self.watched_paths():
            now[path] = file_digest(path)
        for path in set(self._files) - set(now):  # a file that left its directory
            now[path] = None
        for path, digest in now.items():
            old = self._files.get(path)
            if digest == old or first or (path not in self._files and digest is None):
                continue
            change = "removed" if digest is None else ("created" if old is None else "modified")
            events.append(self._event("sec.file_changed", f"watched file {path} {change}",
                                      labels={"path": path, "change": change}))
        files = {k: v for k, v in now.items() if v is not None or k in self._files}
        self._dirty = self._dirty or files != self._files
        self._files = files
        if self._dirty:
            self._save(time.time(), force=True)  # a change must survive a crash right after it
        m["sec.files_watched"] = float(sum(1 for v in self._files.values() if v is not None))
        return events
