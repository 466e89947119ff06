"""Process actions: stop, signal and renice selected processes; (re)start a supervised child.

Which processes is decided by :func:`agent.act.procs.select` (the ``target`` param), which
already refuses pid 1, kernel threads, heald and its ancestors and ``protected_processes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Mapping
from typing import Any

import psutil

from agent.act.base import ActionContext, ActionResult
from agent.act.procs import Candidate, select, wait_gone
from agent.decide.units import parse_duration

# the signals a playbook may name (the schema's enum), by their name without "SIG"
_SIGNALS = {
    n: getattr(signal, f"SIG{n}")
    for n in ("TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "CHLD", "STOP", "CONT")
}


def _describe(candidates: list[Candidate]) -> str:
    return ", ".join(c.describe() for c in candidates)


async def stop_process(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    """TERM (or the given signal), then KILL whatever is left after ``grace``."""
    sig = _SIGNALS[str(params.get("signal", "TERM"))]
    grace = parse_duration(params.get("grace", "5s"))
    candidates, notes = await select(
        params["target"], ctx.settings, limit=int(params.get("max_processes", 1)), env=ctx.env()
    )
    data: dict[str, Any] = {"pids": [c.proc.pid for c in candidates], "notes": notes}
    if not candidates:
        return ActionResult(
            ok=False, detail="no process matched" + (f" ({'; '.join(notes)})" if notes else ""), data=data
        )
    if ctx.dry_run:
        return ActionResult(
            ok=True,
            detail=f"would send {sig.name} to {_describe(candidates)}, KILL after {grace:g}s",
            data=data,
        )
    ctx.commit()
    for c in candidates:
        with contextlib.suppress(psutil.NoSuchProcess):
            c.proc.send_signal(sig)
    alive = await asyncio.to_thread(wait_gone, [c.proc for c in candidates], grace)
    killed = []
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
            killed.append(p.pid)
    alive = await asyncio.to_thread(wait_gone, alive, 5.0)
    data["killed"] = killed
    detail = f"sent {sig.name} to {_describe(candidates)}" + (f"; KILL to {killed}" if killed else "")
    if alive:
        return ActionResult(
            ok=False, changed=True, detail=detail + f"; still alive: {[p.pid for p in alive]}", data=data
        )
    return ActionResult(ok=True, changed=True, detail=detail, data=data)


async def signal_process(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    sig = _SIGNALS[str(params["signal"])]
    candidates, notes = await select(
        params["target"], ctx.settings, limit=int(params.get("max_processes", 1)), env=ctx.env()
    )
    data: dict[str, Any] = {"pids": [c.proc.pid for c in candidates], "notes": notes}
    if not candidates:
        return ActionResult(ok=False, detail="no process matched", data=data)
    if ctx.dry_run:
        return ActionResult(ok=True, detail=f"would send {sig.name} to {_describe(candidates)}", data=data)
    for c in candidates:
        with contextlib.suppress(psutil.NoSuchProcess):
            c.proc.send_signal(sig)
    return ActionResult(
        ok=True, changed=True, detail=f"sent {sig.name} to {_describe(candidates)}", data=data
    )


async def renice(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    candidates, notes = await select(
        params["target"], ctx.settings, limit=int(params.get("max_processes", 1)), env=ctx.env()
    )
    if not candidates:
        return ActionResult(ok=False, detail="no process matched", data={"notes": notes})
    what = []
    if "nice" in params:
        what.append(f"nice {params['nice']}")
    if "ionice_class" in params:
        what.append(f"ionice {params['ionice_class']} {params.get('ionice_level', '')}".rstrip())
    if ctx.dry_run:
        return ActionResult(ok=True, detail=f"would set {', '.join(what)} on {_describe(candidates)}")
    for c in candidates:
        try:
            if "nice" in params:
                c.proc.nice(int(params["nice"]))
            if params.get("ionice_class") == "idle":
                c.proc.ionice(psutil.IOPRIO_CLASS_IDLE)
            elif params.get("ionice_class") == "best-effort":
                c.proc.ionice(psutil.IOPRIO_CLASS_BE, int(params.get("ionice_level", 7)))
        except psutil.Error as exc:
            return ActionResult(ok=False, detail=f"{c.describe()}: {exc}")
    return ActionResult(ok=True, changed=True, detail=f"set {', '.join(what)} on {_describe(candidates)}")


async def restart_process(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    """Non-systemd supervision: start the argv unless heald's child of that name still runs."""
    name = str(params["name"])
    argv = [str(a) for a in params["argv"]]
    current = ctx.supervisor.alive(name)
    if current is not None:
        return ActionResult(
            ok=True, detail=f"{name} already running as pid {current.pid}", data={"pid": current.pid}
        )
    if ctx.dry_run:
        return ActionResult(ok=True, detail=f"would start {name}: {' '.join(argv)}")
    try:
        child = await ctx.supervisor.spawn(
            name, argv, cwd=params.get("cwd"), env=ctx.env(params.get("env")), output=params.get("output")
        )
    except OSError as exc:
        return ActionResult(ok=False, detail=f"cannot start {name}: {exc.strerror or exc}")
    return ActionResult(
        ok=True, changed=True, detail=f"started {name} as pid {child.pid}", data={"pid": child.pid}
    )
