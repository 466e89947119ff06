"""``stop_leaker``: find who grows a host-wide kernel table and stop it gently (issue 20).

The host's file table (fs.file-max), task table (pid_max / threads-max) and conntrack table fill
from a leak somewhere on the host; raising the limit (``raise_limit``) only buys time. This step
attributes the growth at run time, not at 1 Hz: two scans of ``/proc`` ``window`` apart (open fds
per process, its threads, or its sockets: the local proxy for conntrack entries), grouped per
systemd service (the ``.service`` in the process's cgroup) or else per process (a process that
appeared between the scans counts for its oldest ancestor seen in the first: a fork leak's
parent). The host's own count is read at both scans too (``file-nr``, ``loadavg``'s task count,
``nf_conntrack_count`` under ``[playbooks] sysctl_root``). The processes are those of the /proc
that ``sysctl_root`` is in (``/proc/sys`` -> ``/proc``): with a fixture ``sysctl_root`` (tests)
no process is seen, so none is ever stopped.

Only when one group explains at least ``min_share_pct`` of the growth (its growth over the larger
of the host's and the sum of every grower's) is it stopped:

* a system service (``/system.slice/x.service``, not a user manager's): ``systemctl restart``
  (``[playbooks] systemctl``, as ``restart_unit``), unless one of its processes is protected;
* any other process: SIGTERM (KILL after ``grace``), only when the table is full within
  ``term_eta_below`` at the measured rate, never pid 1, kernel threads, heald and its parents or
  ``[playbooks] protected_processes`` (:func:`agent.act.procs.protection`).

Otherwise the step fails (nothing touched) and the ladder goes on: the run escalates. The result
names the target and the evidence (its growth against the host's, the top growers). Not in
``REPEATABLE``: a run cut off by a ``kill -9`` never restarts or signals a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent.act.actions._common import run_tool
from agent.act.base import ActionContext, ActionResult
from agent.act.procs import protection, wait_gone
from agent.decide.units import parse_duration

TABLES = ("files", "tasks", "sockets")
_HOST_NAME = {"files": "file table", "tasks": "task table", "sockets": "conntrack table"}


@dataclass(frozen=True, slots=True)
class Proc:
    ppid: int
    count: int
    unit: str | None
    name: str
    start: int  # starttime in clock ticks since boot (/proc/PID/stat field 22): the pid's identity


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


def _count(proc: Path, pid: int, table: str, threads: int) -> int | None:
    if table == "tasks":
        return threads
    try:
        names = os.listdir(proc / f"{pid}/fd")
    except OSError:
        return None
    if table == "files":
        return len(names)
    n = 0
    for name in names:
        with contextlib.suppress(OSError):
            if os.readlink(proc / f"{pid}/fd/{name}").startswith("socket:"):
                n += 1
    return n


def scan(table: str, proc: Path) -> dict[int, Proc]:
    """Every user-space process: its parent, its count in ``table``, its service, its name."""
    out: dict[int, Proc] = {}
    try:
        entries = os.listdir(proc)
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            stat = (proc / f"{pid}/stat").read_text()
            cgroup = (proc / f"{pid}/cgroup").read_text()
        except OSError:
            continue
        name, _, rest = stat.partition(" (")[2].rpartition(") ")
        fields = rest.split()
        if len(fields) < 20:
            continue
        ppid, threads, start = int(fields[1]), int(fields[17]), int(fields[19])
        if pid == 2 or ppid == 2:  # kernel threads hold no table entries of their own
            continue
        count = _count(proc, pid, table, threads)
        if count is None:
            continue
        out[pid] = Proc(ppid, count, service_unit(cgroup), name, start)
    return out


def reused(pid: int, before: Mapping[int, Proc], now: Mapping[int, Proc], proc: Path) -> bool:
    """Whether ``pid`` named another process in the first scan, or names another one now than in
    the second: its growth would be two processes' difference, and the signal would hit a stranger."""
    if pid in before and before[pid].start != now[pid].start:
        return True
    try:
        fields = (proc / f"{pid}/stat").read_text().rpartition(") ")[2].split()
        return int(fields[19]) != now[pid].start
    except (OSError, ValueError, IndexError):
        return True  # gone (or unreadable): nothing to stop


def host_count(table: str, sysctl_root: str) -> tuple[int | None, int | None]:
    """The host table's (count, limit), as the limits collector reads them; None when unreadable."""
    root = Path(sysctl_root)

    def first(path: Path, sep: str | None = None) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(path.read_text().split(sep)[0])
        return None

    if table == "files":  # allocated - free = in use
        with contextlib.suppress(OSError, ValueError, IndexError):
            nr = [int(v) for v in (root / "fs/file-nr").read_text().split()]
            return nr[0] - nr[1], first(root / "fs/file-max")
        return None, first(root / "fs/file-max")
    if table == "sockets":
        nf = root / "net/netfilter"
        return first(nf / "nf_conntrack_count"), first(nf / "nf_conntrack_max")
    used = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        used = int((root.parent / "loadavg").read_text().split()[3].split("/")[1])
    limits = [v for v in (first(root / "kernel/pid_max"), first(root / "kernel/threads-max")) if v]
    return used, min(limits) if limits else None


def _key(pid: int, now: Mapping[int, Proc], before: Mapping[int, Proc]) -> str:
    """A process's group: its service, else itself, or for a process born since the first scan
    the oldest ancestor seen in it (the one that forked it)."""
    p = now[pid]
    if p.unit is not None:
        return f"unit:{p.unit}"
    at, seen = pid, set()
    while at not in before and at in now and at not in seen:
        seen.add(at)
        at = now[at].ppid
    if at > 1 and at in before and before[at].unit is None:  # never pid 1 (it adopts orphans)
        return f"pid:{at}"
    return f"pid:{pid}"


def groups(before: Mapping[int, Proc], now: Mapping[int, Proc]) -> dict[str, tuple[int, int]]:
    """Each group's (count in the first scan, count in the second)."""
    out: dict[str, list[int]] = {}
    for pid, p in before.items():
        key = f"unit:{p.unit}" if p.unit is not None else f"pid:{pid}"
        out.setdefault(key, [0, 0])[0] += p.count
    for pid, p in now.items():
        out.setdefault(_key(pid, now, before), [0, 0])[1] += p.count
    return {k: (a, b) for k, (a, b) in out.items()}


async def stop_leaker(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    table = str(params["table"])
    if table not in TABLES:  # the schema's enum already refuses it
        return ActionResult(ok=False, detail=f"unknown table {table!r}")
    window = parse_duration(params.get("window", "3s"))
    min_share = float(params.get("min_share_pct", 50))
    term_below = parse_duration(params.get("term_eta_below", "10m"))
    grace = parse_duration(params.get("grace", "5s"))
    what = _HOST_NAME[table]

    # the processes of the /proc that sysctl_root is in: a fixture sysctl_root (tests) shows none
    proc = Path(ctx.settings.sysctl_root).parent
    host0, _ = await asyncio.to_thread(host_count, table, ctx.settings.sysctl_root)
    before = await asyncio.to_thread(scan, table, proc)
    if not before:
        return ActionResult(ok=False, detail=f"no process to attribute the {_HOST_NAME[table]}'s growth to "
                                             f"under {proc}; nothing stopped", data={"table": table})
    t0 = time.monotonic()
    await asyncio.sleep(window)
    host1, limit = await asyncio.to_thread(host_count, table, ctx.settings.sysctl_root)
    now = await asyncio.to_thread(scan, table, proc)
    span = max(time.monotonic() - t0, 1e-3)

    deltas = {k: b - a for k, (a, b) in groups(before, now).items()}
    growers = sorted(((d, k) for k, d in deltas.items() if d > 0), reverse=True)
    summed = sum(d for d, _ in growers)
    host_delta = host1 - host0 if host0 is not None and host1 is not None else None
    total = max(summed, host_delta or 0)
    top = [{"group": k, "growth": d} for d, k in growers[:5]]
    data: dict[str, Any] = {
        "table": table, "window_s": round(span, 2), "host_growth": host_delta, "host_count": host1,
        "host_limit": limit, "growers_growth": summed, "top": top,
    }
    if total <= 0 or (host_delta is not None and host_delta <= 0):
        return ActionResult(ok=False, data=data, detail=f"the {what} did not grow over {span:.1f} s: "
                                                         "no leak to attribute, nothing stopped")
    delta, key = growers[0] if growers else (0, "")
    share = 100.0 * delta / total
    rate = (host_delta if host_delta is not None else summed) / span
    eta = (limit - host1) / rate if limit is not None and host1 is not None and rate > 0 else None
    evidence = (f"{key.partition(':')[2] if key.startswith('unit:') else key.replace(':', ' ')} grew "
                f"+{delta} of the {what}'s +{total} in {span:.1f} s ({share:.0f}%)")
    data.update(target=key, growth=delta, share_pct=round(share, 1), rate_per_s=round(rate, 2),
                eta_s=None if eta is None else round(eta, 1))
    if not growers or share < min_share:
        return ActionResult(ok=False, data=data, detail=f"no single grower explains {min_share:g}% of the "
                                                         f"{what}'s growth: {evidence}; nothing stopped")

    if key.startswith("unit:"):
        unit = key.partition(":")[2]
        members = [pid for pid, p in now.items() if p.unit == unit]
        data.update(unit=unit, pids=members)
        for pid in members:
            with contextlib.suppress(psutil.Error):
                why = protection(psutil.Process(pid), ctx.settings)
                if why is not None and why != "gone":
                    return ActionResult(ok=False, data=data,
                                        detail=f"{evidence}; not restarted: pid {pid} of it: {why}")
        done = await run_tool(ctx, [*ctx.settings.systemctl, "restart", unit])
        data.update(done.data)
        verb = "would restart" if ctx.dry_run else "restarted"
        detail = f"{verb} {unit}: {evidence}" if done.ok else f"{evidence}; restart failed: {done.detail}"
        return ActionResult(ok=done.ok, changed=done.changed, detail=detail, data=data)

    pid = int(key.partition(":")[2])
    data["pids"] = [pid]
    if eta is None or eta >= term_below:
        when = "not heading for full" if eta is None else f"full in {eta:.0f} s"
        return ActionResult(ok=False, data=data, detail=f"{evidence}; not stopped: the table is {when}, "
                                                         f"not within {term_below:g} s (a process outside a "
                                                         "service is stopped only when the ETA is short)")
    try:
        victim = psutil.Process(pid)
    except psutil.Error as exc:
        return ActionResult(ok=False, data=data, detail=f"{evidence}; pid {pid}: {exc}")
    if reused(pid, before, now, proc):
        return ActionResult(ok=False, data=data, detail=f"{evidence}; not stopped: pid {pid} is not the "
                                                         "process the scans counted (it exited; the pid "
                                                         "was reused)")
    why = protection(victim, ctx.settings)
    if why is not None:
        return ActionResult(ok=False, data=data, detail=f"{evidence}; not stopped: {why}")
    if ctx.dry_run:
        return ActionResult(ok=True, data=data,
                            detail=f"would send TERM to pid {pid} ({now[pid].name}), KILL after "
                                   f"{grace:g}s: {evidence}, full in {eta:.0f} s")
    with contextlib.suppress(psutil.NoSuchProcess):
        victim.send_signal(signal.SIGTERM)
    alive = await asyncio.to_thread(wait_gone, [victim], grace)
    if alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()
        data["killed"] = [pid]
        alive = await asyncio.to_thread(wait_gone, alive, 5.0)
    detail = (f"sent TERM to pid {pid} ({now[pid].name}){'; KILL' if 'killed' in data else ''}: "
              f"{evidence}, full in {eta:.0f} s")
    if alive:
        return ActionResult(ok=False, changed=True, data=data, detail=detail + "; still alive")
    return ActionResult(ok=True, changed=True, data=data, detail=detail)
