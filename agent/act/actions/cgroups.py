"""``cgroup_limit``: limit a process's memory and CPU through systemd, or (opt-in) through cgroupfs.

systemd owns the cgroup tree, so a process in a system unit's own cgroup is limited with
``systemctl set-property --runtime UNIT ...`` (the whole unit, until reboot or ``systemctl
revert``). Only hosts without systemd write the cgroup files directly (``cgroup_direct_write``).
Never the root cgroup, never heald's own.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.act.actions._common import run_tool, write_kernel_file
from agent.act.base import ActionContext, ActionResult
from agent.act.procs import select
from agent.decide.units import parse_size


def cgroup_v2_root(settings_root: str) -> Path | None:
    if settings_root:
        return Path(settings_root)
    for cand in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (cand / "cgroup.controllers").exists():
            return cand
    return None


def _proc_cgroups(pid: int) -> dict[str, str]:
    """controller (``""`` for v2) -> path, from /proc/PID/cgroup."""
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/cgroup", encoding="utf-8") as fh:
        for line in fh.read().splitlines():
            _, ctrls, path = line.split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
    return out



def _own_cgroup(cgs: Mapping[str, str], own: Mapping[str, str], ctrl: str) -> str | None:
    """The process's cgroup path for ``ctrl`` unless it is the root or heald's own cgroup."""
    path = cgs.get(ctrl, "/")
    return None if path == "/" or path == own.get(ctrl) else path


def _cgroup_limit_sync(
    pid: int, params: Mapping[str, Any], settings_root: str, dry: bool, own: Mapping[str, str]
) -> ActionResult:
    """The direct write into cgroupfs (``cgroup_direct_write``): for hosts without systemd."""
    cgs = _proc_cgroups(pid)
    v2root = cgroup_v2_root(settings_root)
    v2path = _own_cgroup(cgs, own, "")
    writes: list[tuple[Path, str]] = []
    missing: list[str] = []
    mem = {
        "memory_high": ("memory.high", "memory.soft_limit_in_bytes"),
        "memory_max": ("memory.max", "memory.limit_in_bytes"),
    }
    for key, (v2file, v1file) in mem.items():
        if key not in params:
            continue
        value = str(parse_size(params[key]))
        v2 = v2root / v2path.lstrip("/") / v2file if v2root and v2path else None
        v1path = _own_cgroup(cgs, own, "memory")
        v1 = Path("/sys/fs/cgroup/memory") / v1path.lstrip("/") / v1file if v1path else None
        if v2 is not None and v2.exists():
            writes.append((v2, value))
        elif v1 is not None and v1.exists():
            writes.append((v1, value))
        else:
            missing.append(
                f"{key}: process {pid} is in no memory-controlled cgroup of its own "
                "(refusing the root cgroup and heald's own)"
            )
    if "cpu_pct" in params:
        period = 100_000
        quota = max(1000, int(float(params["cpu_pct"]) / 100.0 * period))
        v2 = v2root / v2path.lstrip("/") / "cpu.max" if v2root and v2path else None
        v1path = _own_cgroup(cgs, own, "cpu")
        v1dir = Path("/sys/fs/cgroup/cpu") / v1path.lstrip("/") if v1path else None
        if v2 is not None and v2.exists():
            writes.append((v2, f"{quota} {period}"))
        elif v1dir is not None and (v1dir / "cpu.cfs_quota_us").exists():
            writes.append((v1dir / "cpu.cfs_period_us", str(period)))
            writes.append((v1dir / "cpu.cfs_quota_us", str(quota)))
        else:
            missing.append(
                f"cpu_pct: process {pid} is in no cpu-controlled cgroup of its own "
                "(refusing the root cgroup and heald's own)"
            )
    plan = "; ".join(f"{p} = {v}" for p, v in writes)
    if missing and not writes:
        return ActionResult(ok=False, detail="; ".join(missing))
    if dry:
        return ActionResult(ok=True, detail=f"would write {plan}", data={"missing": missing})
    done: list[str] = []
    for p, v in writes:
        try:
            old = write_kernel_file(p, v)
        except OSError as exc:
            return ActionResult(ok=False, changed=bool(done), detail=f"{p}: {exc.strerror or exc}")
        done.append(f"{p}: {old or '?'} -> {v}")
    return ActionResult(ok=not missing, changed=True, detail="; ".join(done + missing))


# A system unit's own cgroup: slices all the way down, then the .service or .scope leaf. Only the
# system manager creates such a path; anything below a .service/.scope (a delegated subtree: a
# container runtime, a user manager's user@UID.service) may be named freely by its owner, so
# "/system.slice/docker-1.scope/sshd.service" must not become `set-property sshd.service`.
# Unit names never start with '-' here, so the name cannot be read as a systemctl option.
_SLICE_RE = re.compile(r"[A-Za-z0-9_\\][A-Za-z0-9:_.\\-]*\.slice")
_UNIT_RE = re.compile(r"[A-Za-z0-9_\\][A-Za-z0-9:_.\\@-]*\.(?:service|scope)")
_SYSTEMCTL_TIMEOUT_S = 30.0


def unit_cgroup_path(cgs: Mapping[str, str]) -> str:
    """The cgroup path systemd tracks units in: the v2 line, else the v1 ``name=systemd`` line."""
    for ctrl in ("", "name=systemd"):
        path = cgs.get(ctrl, "/")
        if path != "/":
            return path
    return "/"


def systemd_unit_of(path: str) -> str | None:
    """The system unit whose own cgroup ``path`` is (a .service or .scope leaf under slices)."""
    parts = path.strip("/").split("/")
    if not path.startswith("/") or not parts[-1]:
        return None
    if not all(_SLICE_RE.fullmatch(p) for p in parts[:-1]) or not _UNIT_RE.fullmatch(parts[-1]):
        return None
    return parts[-1]


def unit_properties(params: Mapping[str, Any]) -> list[str]:
    """``cgroup_limit`` params as systemd resource-control properties (systemd maps MemoryMax and
    CPUQuota onto the v1 controllers on legacy hosts; MemoryHigh needs cgroup v2)."""
    props = []
    if "memory_high" in params:
        props.append(f"MemoryHigh={parse_size(params['memory_high'])}")
    if "memory_max" in params:
        props.append(f"MemoryMax={parse_size(params['memory_max'])}")
    if "cpu_pct" in params:
        props.append(f"CPUQuota={max(1, round(float(params['cpu_pct'])))}%")
    return props


async def cgroup_limit(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    """Limit the process's unit through systemd (`systemctl set-property --runtime`): heald.service
    has a read-only cgroupfs (ProtectControlGroups=yes), and systemd must stay the only writer of
    the tree it manages. Processes outside a unit need ``cgroup_direct_write``."""
    candidates, notes = await select(params["target"], ctx.settings, limit=1, env=ctx.env())
    if not candidates:
        return ActionResult(ok=False, detail="no process matched", data={"notes": notes})
    pid = candidates[0].proc.pid
    try:
        cgs, own = await asyncio.to_thread(lambda: (_proc_cgroups(pid), _proc_cgroups(os.getpid())))
    except OSError as exc:
        return ActionResult(
            ok=False, detail=f"{candidates[0].describe()}: cannot read its cgroup: {exc.strerror or exc}"
        )
    path = unit_cgroup_path(cgs)
    unit = systemd_unit_of(path)
    if unit is not None and path == unit_cgroup_path(own):
        res = ActionResult(ok=False, detail=f"{unit} is heald's own unit; never limited by a playbook")
    elif unit is not None:
        props = unit_properties(params)
        if not props:
            res = ActionResult(ok=False, detail="nothing to set: give memory_high, memory_max or cpu_pct")
        else:
            argv = [*ctx.settings.systemctl, "set-property", "--runtime", unit, *props]
            res = await run_tool(ctx, argv, timeout_s=_SYSTEMCTL_TIMEOUT_S)
        res.data.update(unit=unit, cgroup=path)
    elif ctx.settings.cgroup_direct_write:
        res = await asyncio.to_thread(
            _cgroup_limit_sync, pid, params, ctx.settings.cgroup_root, ctx.dry_run, own
        )
    else:
        where = "the root cgroup" if path == "/" else f"cgroup {path}"
        res = ActionResult(
            ok=False,
            detail=(
                f"in {where}, which is not a systemd unit's own cgroup (a .service or .scope under "
                "slices), so systemd cannot limit it; [playbooks] cgroup_direct_write = true writes "
                "its cgroup files instead (hosts without systemd; not under heald.service)"
            ),
            data={"cgroup": path},
        )
    res.detail = f"{candidates[0].describe()}: {res.detail}"
    return res

