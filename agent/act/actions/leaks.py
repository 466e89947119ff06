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

Under the shipped unit (user heald, no CAP_SYS_PTRACE) other users' fd links, and without
CAP_DAC_* their fd directories, are closed to this process: the scan counts those processes as
denied, and each scan is then made as root by ``heald-action@leakscan-conntrack`` /
``leakscan-file`` (the same code, :mod:`agent.act.procscan`), whose result file is checked before
it is used (:func:`agent.act.procscan.load`); a dry run does not start it.

Only when one group explains at least ``min_share_pct`` of the growth (its growth over the larger
of the host's and the sum of every grower's) is it stopped:

* a system service (``/system.slice/x.service``, not a user manager's): ``systemctl restart``
  (``[playbooks] systemctl``, as ``restart_unit``), unless one of its processes is protected;
* any other process: SIGTERM (KILL after ``grace``), only when the table is full within
  ``term_eta_below`` at the measured rate, never pid 1, kernel threads, heald and its parents or
  ``[playbooks] protected_processes`` (:func:`agent.act.procs.protection`).

Otherwise the step fails (nothing touched) and the ladder goes on: the run escalates. The result
names the target and the evidence (its growth against the host's, the top growers). Not in
``REPEATABLE`` but ``UNTIL_COMMIT``: a run cut off by a ``kill -9`` during the scans (nothing
restarted or signalled yet) scans again on resume; one cut off after the step's commit (right
before the restart or the signal) never restarts or signals a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from agent.act import procscan
from agent.act.actions._common import run_tool
from agent.act.base import ActionContext, ActionResult
from agent.act.procs import protection, wait_gone
from agent.act.procscan import (  # noqa: F401  (Proc, scan, service_unit: this module's API before)
    HELPER_NAMES,
    Proc,
    ScanRefused,
    reused,
    scan,
    service_unit,
    survey,
)
from agent.decide.units import parse_duration

TABLES = ("files", "tasks", "sockets")
_HOST_NAME = {"files": "file table", "tasks": "task table", "sockets": "conntrack table"}


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


async def _helper_scan(table: str, proc: Path, ctx: ActionContext) -> tuple[float, dict[int, Proc]] | str:
    """One scan by the root helper (``systemctl start heald-action@leakscan-….service``): its
    monotonic time and the processes it counted, each with what this process reads itself (parent,
    service, name) where its start time matches the helper's (a pid reused in between is left
    out); or why it cannot be used."""
    name = HELPER_NAMES[table]
    unit = f"heald-action@{name}.service"
    asked = time.monotonic()
    done = await run_tool(ctx, [*ctx.settings.systemctl, "start", unit])
    if not done.ok:
        return f"the root helper's scan failed ({unit}): {done.detail}"
    try:
        path = procscan.HELPER_DIR / f"{name}.json"
        when, counts = await asyncio.to_thread(procscan.load, path, table, asked)
    except ScanRefused as exc:
        return f"the root helper's scan ({unit}) is refused: {exc}"
    meta, _ = await asyncio.to_thread(survey, table, proc, False)
    procs = {pid: replace(meta[pid], count=count) for pid, (count, start) in counts.items()
             if pid in meta and meta[pid].start == start}
    return when, procs


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
    before, denied = await asyncio.to_thread(survey, table, proc)
    helper = None
    t0 = time.monotonic()
    if denied and table in HELPER_NAMES and proc == Path("/proc"):
        # Other users' fds are ptrace-guarded (heald.service holds no CAP_SYS_PTRACE): the root
        # helper counts them, the same scan, and this step reads its result.
        helper = f"heald-action@{HELPER_NAMES[table]}.service"
        base = {"table": table, "denied": denied, "helper": helper}
        if ctx.dry_run:
            return ActionResult(ok=False, data=base, detail=(
                f"cannot read the fds of {denied} processes of other users (no CAP_SYS_PTRACE): the "
                f"scan needs {helper}, which a dry run does not start; nothing stopped"))
        first = await _helper_scan(table, proc, ctx)
        if isinstance(first, str):
            return ActionResult(ok=False, data=base, detail=f"{first}; nothing stopped")
        t0, before = first
    if not before:
        return ActionResult(ok=False, detail=f"no process to attribute the {_HOST_NAME[table]}'s growth to "
                                             f"under {proc}; nothing stopped", data={"table": table})
    await asyncio.sleep(window)
    host1, limit = await asyncio.to_thread(host_count, table, ctx.settings.sysctl_root)
    if helper is not None:
        second = await _helper_scan(table, proc, ctx)
        if isinstance(second, str):
            return ActionResult(ok=False, data={"table": table, "denied": denied, "helper": helper},
                                detail=f"{second}; nothing stopped")
        t1, now = second
    else:
        now = await asyncio.to_thread(scan, table, proc)
        t1 = time.monotonic()
    span = max(t1 - t0, 1e-3)

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
    if helper is not None:
        data.update(helper=helper, denied=denied)
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
        if not ctx.dry_run:
            ctx.commit()
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
    ctx.commit()
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
