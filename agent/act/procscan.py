"""The per-process counts behind the host-wide kernel tables: one implementation for ``stop_leaker``
(:mod:`agent.act.actions.leaks`) and for the root helper's scan (``heald-action leakscan-file`` /
``leakscan-conntrack``, which runs ``python3 -I -m agent.act.procscan TABLE OUT``).

Standard library only (plus :mod:`agent.errors`): the helper runs it as root from the installed
package without importing the rest of heald; only :func:`dump` (the helper's side, run by the
installed heald's interpreter) imports :mod:`agent.fsutil` (and with it structlog) for its write.

Why a helper: ``/proc/PID/fd`` of another user's process is mode 0500 (listing it needs
CAP_DAC_READ_SEARCH or CAP_DAC_OVERRIDE) and its links (``socket:[…]``) are ptrace-guarded
(CAP_SYS_PTRACE, which heald.service does not hold). The agent's own scan reports such processes
as *denied*; ``stop_leaker`` then asks the helper, and reads its result with :func:`load`, which
refuses anything stale, malformed or out of range (:class:`ScanRefused`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import HealdError

TABLES = ("files", "tasks", "sockets")
#: The helper's instance name for each table it scans (threads come from world-readable stat).
HELPER_NAMES = {"files": "leakscan-file", "sockets": "leakscan-conntrack"}
#: Where the helper writes (heald-action@.service: RuntimeDirectory=heald-action, root-owned 0755).
HELPER_DIR = Path("/run/heald-action")
FORMAT = "heald-leakscan/1"
PID_MAX = 4194304  # PID_MAX_LIMIT on 64-bit
COUNT_MAX = 1 << 30  # above fs.nr_open's ceiling (1073741816): no process holds more
START_MAX = 1 << 62
MAX_BYTES = 32 << 20  # ~4 M processes at ~30 bytes each would not fit; no host has them
STAT_MAX = 4096  # a real /proc/PID/stat line is < 1 KiB
CGROUP_MAX = 65536
_DENIED = (errno.EACCES, errno.EPERM)


class ScanRefused(HealdError):
    """The helper's result cannot be used (missing, stale, malformed, hostile)."""


@dataclass(frozen=True, slots=True)
class Proc:
    ppid: int
    count: int
    unit: str | None
    name: str
    start: int  # starttime in clock ticks since boot (/proc/PID/stat field 22): the pid's identity


class _Denied(Exception):
    pass


def service_unit(cgroup_text: str) -> str | None:
    """The system service a process runs in, from ``/proc/PID/cgroup``: the deepest ``.service``
    of its v2 path (else of v1's ``name=systemd``); None outside one or under a user manager
    (``user@UID.service``: ``systemctl restart`` would not reach its units)."""
    paths: dict[str, str] = {}
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths.setdefault(parts[1], parts[2])
    for key in ("", "name=systemd"):
        comps = [c for c in paths.get(key, "").split("/") if c]
        if any(c.startswith("user@") and c.endswith(".service") for c in comps):
            return None
        services = [c for c in comps if c.endswith(".service")]
        if services:
            return services[-1]
    return None


def _read(path: Path, limit: int) -> str | None:
    """At most ``limit`` bytes of a /proc file as text; None when unreadable or longer."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return None
    if len(data) > limit:
        return None
    return data.decode("utf-8", "replace")


def parse_stat(text: str) -> tuple[str, int, int, int] | None:
    """(name, ppid, threads, start) of a ``/proc/PID/stat`` line; None when it is not one."""
    head, sep, rest = text.rpartition(") ")
    if not sep or " (" not in head:
        return None
    name = head.partition(" (")[2]
    fields = rest.split()
    if len(fields) < 20:
        return None
    try:
        ppid, threads, start = int(fields[1]), int(fields[17]), int(fields[19])
    except ValueError:
        return None
    if not (0 <= ppid <= PID_MAX and 0 <= threads <= PID_MAX and 0 <= start <= START_MAX):
        return None
    return name, ppid, threads, start


def _count(proc: Path, pid: int, table: str, threads: int) -> int | None:
    """``pid``'s entries in ``table``; None when it is gone; _Denied when its fds are guarded."""
    if table == "tasks":
        return threads
    try:
        names = os.listdir(proc / f"{pid}/fd")
    except OSError as exc:
        if exc.errno in _DENIED:
            raise _Denied from None
        return None
    if table == "files":
        return len(names)
    n = 0
    for name in names:
        try:
            if os.readlink(proc / f"{pid}/fd/{name}").startswith("socket:"):
                n += 1
        except OSError as exc:
            if exc.errno in _DENIED:
                raise _Denied from None
    return n


def survey(table: str, proc: Path, counts: bool = True) -> tuple[dict[int, Proc], int]:
    """Every user-space process (its parent, count in ``table``, service, name, start) and how
    many processes' fds this process may not read (EACCES/EPERM: another user's, no ptrace).
    ``counts=False``: only what world-readable files say (every count 0)."""
    out: dict[int, Proc] = {}
    denied = 0
    try:
        entries = os.listdir(proc)
    except OSError:
        return out, 0
    for entry in entries:
        if not entry.isdigit() or len(entry) > 7:
            continue
        pid = int(entry)
        text = _read(proc / f"{pid}/stat", STAT_MAX)
        cgroup = _read(proc / f"{pid}/cgroup", CGROUP_MAX)
        if text is None or cgroup is None:
            continue
        parsed = parse_stat(text)
        if parsed is None:
            continue
        name, ppid, threads, start = parsed
        if pid == 2 or ppid == 2:  # kernel threads hold no table entries of their own
            continue
        count: int | None = 0
        if counts:
            try:
                count = _count(proc, pid, table, threads)
            except _Denied:
                denied += 1
                continue
        if count is None:
            continue
        out[pid] = Proc(ppid, count, service_unit(cgroup), name, start)
    return out, denied


def scan(table: str, proc: Path) -> dict[int, Proc]:
    """Every user-space process: its parent, its count in ``table``, its service, its name."""
    return survey(table, proc)[0]


def reused(pid: int, before: Mapping[int, Proc], now: Mapping[int, Proc], proc: Path) -> bool:
    """Whether ``pid`` named another process in the first scan, or names another one now than in
    the second: its growth would be two processes' difference, and the signal would hit a stranger."""
    if pid in before and before[pid].start != now[pid].start:
        return True
    text = _read(proc / f"{pid}/stat", STAT_MAX)
    parsed = parse_stat(text) if text is not None else None
    return parsed is None or parsed[3] != now[pid].start  # gone (or unreadable): nothing to stop


# --- the helper's side ------------------------------------------------------------------------

def dump(table: str, proc: Path, out: Path) -> int:
    """Scan ``table`` under ``proc`` and write the result to ``out`` atomically
    (:func:`agent.fsutil.atomic_write`: tmp + fsync + rename), mode 0644:
    ``{"format", "table", "monotonic", "denied", "pids": {pid: [count, start]}}``."""
    procs, denied = survey(table, proc)
    payload = {"format": FORMAT, "table": table, "monotonic": time.monotonic(), "denied": denied,
               "pids": {str(pid): [p.count, p.start] for pid, p in procs.items()}}
    data = json.dumps(payload, separators=(",", ":")).encode()
    # Imported here: agent.fsutil needs structlog, which the agent's own scan (survey, load) does
    # not; a bare system python3 can import this module without it (tests/test_leak_scan_helper).
    from agent.fsutil import atomic_write  # noqa: PLC0415

    atomic_write(out, data, mode=0o644)
    return len(procs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _int(v: object, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def load(path: Path, table: str, since: float, owner: int = 0) -> tuple[float, dict[int, tuple[int, int]]]:
    """The helper's scan of ``table`` written after the monotonic time ``since``: (its monotonic
    time, {pid: (count, start)}). :class:`ScanRefused` for a file that is missing, not a regular
    file owned by ``owner`` (root), group/other-writable, over :data:`MAX_BYTES`, not the format,
    another table's, older than ``since`` or from the future, or holding out-of-range values."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ScanRefused(f"no helper scan at {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ScanRefused(f"{path} is not a regular file")
        if st.st_uid != owner or st.st_mode & 0o022:
            raise ScanRefused(f"{path} is not the helper's (owner uid {st.st_uid}, mode "
                              f"{stat.S_IMODE(st.st_mode):o}); not trusted")
        if st.st_size > MAX_BYTES:
            raise ScanRefused(f"{path} is {st.st_size} bytes, over {MAX_BYTES}")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_BYTES:
        raise ScanRefused(f"{path} is over {MAX_BYTES} bytes")
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ScanRefused(f"{path} is not the helper's JSON: {str(exc)[:120]}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ScanRefused(f"{path} is not a {FORMAT} scan")
    if data.get("table") != table:
        raise ScanRefused(f"{path} holds a scan of {str(data.get('table'))[:40]!r}, not {table!r}")
    when = data.get("monotonic")
    if not isinstance(when, (int, float)) or isinstance(when, bool) or not math.isfinite(when):
        raise ScanRefused(f"{path} has no scan time")
    if not since <= when <= time.monotonic():
        raise ScanRefused(f"{path} is not the scan just asked for (scanned at {when:.3f}, asked at "
                          f"{since:.3f}): stale or from the future")
    pids = data.get("pids")
    if not isinstance(pids, dict) or len(pids) > PID_MAX:
        raise ScanRefused(f"{path} has no valid pid map")
    out: dict[int, tuple[int, int]] = {}
    for key, value in pids.items():
        if not (key.isdigit() and len(key) <= 7 and 0 < int(key) <= PID_MAX and key == str(int(key))):
            raise ScanRefused(f"{path}: {key[:20]!r} is not a pid")
        if not (isinstance(value, list) and len(value) == 2 and _int(value[0], 0, COUNT_MAX)
                and _int(value[1], 0, START_MAX)):
            raise ScanRefused(f"{path}: pid {key}: {str(value)[:60]} is not [count, start] in range")
        out[int(key)] = (value[0], value[1])
    return float(when), out


def main(argv: list[str]) -> int:
    """``python3 -I -m agent.act.procscan files|sockets OUT``: the helper's scan (exit 0; 2 for a
    usage error). The output path comes from packaging/heald-action, never from the agent."""
    if len(argv) != 2 or argv[0] not in HELPER_NAMES:
        sys.stderr.write("usage: python3 -m agent.act.procscan files|sockets OUT\n")
        return 2
    with contextlib.suppress(OSError):
        os.nice(5)
    n = dump(argv[0], Path("/proc"), Path(argv[1]))
    sys.stdout.write(f"scanned {n} processes ({argv[0]}) into {argv[1]}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
