"""``raise_limit``: raise a kernel table's limit (a sysctl) by a factor, never past a bound.

The gentle step for a table that fills (conntrack entries, the host's file handles, PIDs): more
room buys the time for a human or the forceful step. Only the tables' sysctls are accepted
(:data:`ALLOWED`); the value is never lowered; at the bound the step fails, so the ladder goes on
(escalates). Writes ``/proc/sys/...`` (``[playbooks] sysctl_root``): needs root. Under the shipped
heald.service (``[playbooks] use_helper_units = true``: user heald, /proc/sys read-only) the
write goes to the root-only helper, ``systemctl start heald-action@sysctl-<table>-<value>``,
which accepts only these tables, never lowers and caps each; the agent then reads the value back,
also when the helper refused: a table that already reads the step's value or more (raised meanwhile,
e.g. by the unit of a run a ``kill -9`` cut off) is a step done, not a failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.act.actions._common import run_tool, write_kernel_file
from agent.act.base import ActionContext, ActionResult

ALLOWED = frozenset({"net.netfilter.nf_conntrack_max", "fs.file-max", "kernel.pid_max", "kernel.threads-max"})
#: Each table's name for the root-only helper (packaging/heald-action: sysctl-<name>-<value>).
HELPER_NAMES = {"net.netfilter.nf_conntrack_max": "conntrack-max", "fs.file-max": "file-max",
                "kernel.pid_max": "pid-max", "kernel.threads-max": "threads-max"}


async def raise_limit(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    name = str(params["sysctl"])
    if name not in ALLOWED:  # the schema's enum already refuses it; never write anything else
        return ActionResult(ok=False, detail=f"{name} is not a table limit heald raises")
    factor, bound = float(params.get("factor", 2.0)), int(params["max"])
    path = Path(ctx.settings.sysctl_root) / name.replace(".", "/")
    try:
        old = int((await asyncio.to_thread(path.read_text)).split()[0])
    except (OSError, ValueError, IndexError) as exc:
        return ActionResult(ok=False, detail=f"cannot read {path}: {exc}")
    new = min(bound, int(old * factor))
    data = {"sysctl": name, "old": old, "new": new, "max": bound}
    if new <= old:
        return ActionResult(ok=False, detail=f"{name} is {old}, already at its bound {bound}", data=data)
    if ctx.settings.use_helper_units:
        unit = f"heald-action@sysctl-{HELPER_NAMES[name]}-{new}.service"
        done = await run_tool(ctx, [*ctx.settings.systemctl, "start", unit])
        if ctx.dry_run:
            return ActionResult(ok=done.ok, detail=done.detail, data={**data, **done.data})
        try:
            now = int((await asyncio.to_thread(path.read_text)).split()[0])
        except (OSError, ValueError, IndexError) as exc:
            return ActionResult(ok=False, changed=done.ok, data={**data, **done.data},
                                detail=f"{unit}: {done.detail}; cannot read {path}: {exc}")
        if not done.ok:
            # The helper never lowers: it refuses a value the table already has. Raised meanwhile
            # (the unit of a run cut off by a kill -9, which the restarted agent could not know of
            # with a full state dir; an operator) to at least this step's value: its goal is met.
            return ActionResult(ok=now >= new, changed=False, data={**data, **done.data, "read_back": now},
                                detail=f"{name} already reads {now} (>= {new}); {unit}: {done.detail}"
                                if now >= new else f"{unit} failed: {done.detail}")
        return ActionResult(ok=now >= new, changed=now != old, data={**data, "read_back": now},
                            detail=f"raised {name} from {old} to {now} through {unit} (bound {bound})"
                            if now >= new else f"{unit} ran but {name} reads {now}, not {new}")
    if ctx.dry_run:
        return ActionResult(ok=True, detail=f"would write {new} to {path} (now {old}, bound {bound})",
                            data=data)
    try:
        await asyncio.to_thread(write_kernel_file, path, f"{new}\n")
    except OSError as exc:
        return ActionResult(ok=False, detail=f"cannot write {path}: {exc}", data=data)
    return ActionResult(ok=True, changed=True, detail=f"raised {name} from {old} to {new} (bound {bound})",
                        data=data)
