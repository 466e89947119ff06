"""The action implementations (registered by name in :data:`agent.act.base.REGISTRY`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent.act.base import REGISTRY, ActionContext, ActionResult, action
from agent.act.procs import Candidate, run_argv, select, substitute_argv, wait_gone
from agent.decide.loader import action_names
from agent.decide.units import parse_duration, parse_size
from agent.errors import HealdError

_SIGNALS = {
    n: getattr(signal, f"SIG{n}")
    for n in ("TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "CHLD", "STOP", "CONT")
}


def _tool(ctx: ActionContext, argv: list[str]) -> str:
    return "would run: " + " ".join(argv)


async def _run_tool(ctx: ActionContext, argv: list[str], timeout_s: float | None = None) -> ActionResult:
    if ctx.dry_run:
        return ActionResult(ok=True, detail=_tool(ctx, argv), data={"argv": argv})
    done = await run_argv(argv, env=ctx.env(), timeout_s=timeout_s)
    return ActionResult(
        ok=done.ok,
        changed=done.ok,
        detail=done.describe(),
        data={"argv": argv, "returncode": done.returncode},
    )


# --------------------------------------------------------------------------- systemd


@action("restart_unit")
async def restart_unit(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    return await _run_tool(ctx, [*ctx.settings.systemctl, "restart", str(params["unit"])])


# --------------------------------------------------------------------------- processes


def _describe(cands: list[Candidate]) -> str:
    return ", ".join(c.describe() for c in cands)


@action("stop_process")
async def stop_process(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    """TERM (or the given signal), then KILL whatever is left after ``grace``."""
    sig = _SIGNALS[str(params.get("signal", "TERM"))]
    grace = parse_duration(params.get("grace", "5s"))
    cands, notes = await select(
        params["target"], ctx.settings, limit=int(params.get("max_processes", 1)), env=ctx.env()
    )
    data: dict[str, Any] = {"pids": [c.proc.pid for c in cands], "notes": notes}
    if not cands:
        return ActionResult(
            ok=False, detail="no process matched" + (f" ({'; '.join(notes)})" if notes else ""), data=data
        )
    if ctx.dry_run:
        return ActionResult(
            ok=True, detail=f"would send {sig.name} to {_describe(cands)}, KILL after {grace:g}s", data=data
        )
    for c in cands:
        with contextlib.suppress(psutil.NoSuchProcess):
            c.proc.send_signal(sig)
    alive = await asyncio.to_thread(wait_gone, [c.proc for c in cands], grace)
    killed = []
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
            killed.append(p.pid)
    alive = await asyncio.to_thread(wait_gone, alive, 5.0)
    data["killed"] = killed
    detail = f"sent {sig.name} to {_describe(cands)}" + (f"; KILL to {killed}" if killed else "")
    if alive:
        return ActionResult(
            ok=False, changed=True, detail=detail + f"; still alive: {[p.pid for p in alive]}", data=data
        )
    return ActionResult(ok=True, changed=True, detail=detail, data=data)


@action("signal_process")
async def signal_process(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    sig = _SIGNALS[str(params["signal"])]
    cands, notes = await select(
        params["target"], ctx.settings, limit=int(params.get("max_processes", 1)), env=ctx.env()
    )
    data: dict[str, Any] = {"pids": [c.proc.pid for c in cands], "notes": notes}
    if not cands:
        return ActionResult(ok=False, detail="no process matched", data=data)
    if ctx.dry_run:
        return ActionResult(ok=True, detail=f"would send {sig.name} to {_describe(cands)}", data=data)
    for c in cands:
        with contextlib.suppress(psutil.NoSuchProcess):
            c.proc.send_signal(sig)
    return ActionResult(ok=True, changed=True, detail=f"sent {sig.name} to {_describe(cands)}", data=data)


@action("renice")
async def renice(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    cands, notes = await select(
        params["target"], ctx.settings, limit=int(params.get("max_processes", 1)), env=ctx.env()
    )
    if not cands:
        return ActionResult(ok=False, detail="no process matched", data={"notes": notes})
    what = []
    if "nice" in params:
        what.append(f"nice {params['nice']}")
    if "ionice_class" in params:
        what.append(f"ionice {params['ionice_class']} {params.get('ionice_level', '')}".rstrip())
    if ctx.dry_run:
        return ActionResult(ok=True, detail=f"would set {', '.join(what)} on {_describe(cands)}")
    for c in cands:
        try:
            if "nice" in params:
                c.proc.nice(int(params["nice"]))
            if params.get("ionice_class") == "idle":
                c.proc.ionice(psutil.IOPRIO_CLASS_IDLE)
            elif params.get("ionice_class") == "best-effort":
                c.proc.ionice(psutil.IOPRIO_CLASS_BE, int(params.get("ionice_level", 7)))
        except psutil.Error as exc:
            return ActionResult(ok=False, detail=f"{c.describe()}: {exc}")
    return ActionResult(ok=True, changed=True, detail=f"set {', '.join(what)} on {_describe(cands)}")


# --------------------------------------------------------------------------- cgroups


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


def _write(path: Path, value: str) -> str:
    old = path.read_text().strip() if path.exists() else ""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
    return old


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
            old = _write(p, v)
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


@action("cgroup_limit")
async def cgroup_limit(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    """Limit the process's unit through systemd (`systemctl set-property --runtime`): heald.service
    has a read-only cgroupfs (ProtectControlGroups=yes), and systemd must stay the only writer of
    the tree it manages. Processes outside a unit need ``cgroup_direct_write``."""
    cands, notes = await select(params["target"], ctx.settings, limit=1, env=ctx.env())
    if not cands:
        return ActionResult(ok=False, detail="no process matched", data={"notes": notes})
    pid = cands[0].proc.pid
    try:
        cgs, own = await asyncio.to_thread(lambda: (_proc_cgroups(pid), _proc_cgroups(os.getpid())))
    except OSError as exc:
        return ActionResult(
            ok=False, detail=f"{cands[0].describe()}: cannot read its cgroup: {exc.strerror or exc}"
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
            res = await _run_tool(ctx, argv, timeout_s=_SYSTEMCTL_TIMEOUT_S)
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
    res.detail = f"{cands[0].describe()}: {res.detail}"
    return res


# --------------------------------------------------------------------------- files


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def used_pct(path: str) -> float:
    st = os.statvfs(path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    avail = st.f_bavail * st.f_frsize
    return 100.0 * used / (used + avail) if used + avail > 0 else 0.0


@dataclass
class _File:
    rel: tuple[str, ...]  # components below the root
    dev: int
    ino: int
    size: int
    mtime: float


# systemd's PrivateTmp= of other services: /tmp/systemd-private-<boot>-<unit>-<rand>/ (and the
# same under /var/tmp). Those files belong to running services' private /tmp; never cleaned.
PRIVATE_TMP_PREFIX = "systemd-private-"


def _private_tmp(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(PRIVATE_TMP_PREFIX) for p in parts)


def _scan(
    root: str, older_than: float, larger_than: int, now: float, limit: int, *, notes: list[str] | None = None
) -> tuple[list[_File], int]:
    """Regular files under ``root`` (not following symlinks, not crossing filesystems, never
    descending into another service's ``systemd-private-*`` directory)."""
    out: list[_File] = []
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        root_dev = os.fstat(root_fd).st_dev
    finally:
        os.close(root_fd)
    seen = 0
    for dirpath, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
        rel_dir = tuple(Path(os.path.relpath(dirpath, root)).parts) if dirpath != root else ()
        keep = []
        for d in dirnames:
            if d.startswith(PRIVATE_TMP_PREFIX):
                if notes is not None:
                    notes.append(f"{os.path.join(dirpath, d)}: another service's PrivateTmp, skipped")
                continue
            with contextlib.suppress(OSError):
                if os.stat(d, dir_fd=dirfd, follow_symlinks=False).st_dev == root_dev:
                    keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            seen += 1
            try:
                st = os.stat(f, dir_fd=dirfd, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_dev != root_dev:
                continue
            if now - st.st_mtime < older_than or st.st_size < larger_than:
                continue
            out.append(_File((*rel_dir, f), st.st_dev, st.st_ino, st.st_size, st.st_mtime))
            if len(out) >= limit:
                return out, seen
    return out, seen


def _unlink_safely(root: str, f: _File) -> bool:
    """Open each directory component with O_NOFOLLOW from the root, re-check the file's identity
    and unlink it relative to its directory fd: a symlink swapped in meanwhile is never followed."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in f.rel[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        st = os.stat(f.rel[-1], dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (f.dev, f.ino):
            return False
        os.unlink(f.rel[-1], dir_fd=fd)
    except OSError:
        return False
    else:
        return True
    finally:
        os.close(fd)


def _clean_sync(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    roots = [os.path.realpath(r) for r in ctx.settings.clean_roots]
    paths = [str(p) for p in params.get("paths", ctx.settings.clean_roots)]
    older = parse_duration(params.get("older_than", 0))
    larger = parse_size(params.get("larger_than", 0))
    target = params.get("target_used_pct")
    limit = int(params.get("max_files", 100_000))
    mount = params.get("on_mount")
    mount_dev = os.stat(mount).st_dev if mount else None
    notes: list[str] = []
    chosen: list[tuple[str, _File]] = []
    now = time.time()
    for p in paths:
        real = os.path.realpath(p)
        if not any(_within(real, r) for r in roots):
            notes.append(f"{p}: outside clean_roots, skipped")
            continue
        if not os.path.isdir(real) or os.path.islink(p.rstrip("/") or "/"):
            notes.append(f"{p}: not a directory (or a symlink), skipped")
            continue
        if mount_dev is not None and os.stat(real).st_dev != mount_dev:
            notes.append(f"{p}: not on {mount}, skipped")
            continue
        if _private_tmp(Path(real).parts):
            notes.append(f"{p}: inside another service's PrivateTmp (systemd-private-*), skipped")
            continue
        files, _ = _scan(real, older, larger, now, limit, notes=notes)
        chosen.extend((real, f) for f in files)
    chosen.sort(key=lambda rf: rf[1].mtime)  # oldest first
    check = mount or (chosen[0][0] if chosen else None)
    total = sum(f.size for _, f in chosen)
    data: dict[str, Any] = {"candidates": len(chosen), "candidate_bytes": total, "notes": notes}
    if ctx.dry_run:
        sample = [os.path.join(r, *f.rel) for r, f in chosen[:5]]
        return ActionResult(
            ok=True,
            detail=f"would delete up to {len(chosen)} files ({total} bytes), oldest first"
            + (f" until {check} is below {target}% used" if target is not None else "")
            + (f", e.g. {sample}" if sample else ""),
            data=data,
        )
    deleted = freed = 0
    for root, f in chosen:
        if target is not None and check is not None and used_pct(check) < float(target):
            break
        if _unlink_safely(root, f):
            deleted += 1
            freed += f.size
    data.update(deleted=deleted, freed_bytes=freed)
    reached = "" if target is None or check is None else f"; {check} now {used_pct(check):.1f}% used"
    return ActionResult(
        ok=True, changed=deleted > 0, detail=f"deleted {deleted} files, {freed} bytes{reached}", data=data
    )


@action("clean_paths")
async def clean_paths(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    return await asyncio.to_thread(_clean_sync, params, ctx)


@action("vacuum_journal")
async def vacuum_journal(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    argv = [*ctx.settings.journalctl]
    if "max_size" in params:
        argv.append(f"--vacuum-size={parse_size(params['max_size'])}")
    if "max_age" in params:
        argv.append(f"--vacuum-time={int(parse_duration(params['max_age']))}s")
    return await _run_tool(ctx, argv)


def _copytruncate(path: str) -> str:
    if not os.path.isabs(path):
        raise HealdError(f"{path}: not an absolute path")
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HealdError(f"{path}: not a regular file")
        dst = os.open(path + ".1", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, st.st_mode & 0o777)
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            while chunk := os.read(fd, 1 << 20):
                os.write(dst, chunk)
            os.fsync(dst)
        finally:
            os.close(dst)
        os.ftruncate(fd, 0)
        return f"{path}: {st.st_size} bytes -> {path}.1"
    finally:
        os.close(fd)


@action("rotate_logs")
async def rotate_logs(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    if "config" in params:
        return await _run_tool(ctx, [*ctx.settings.logrotate, "-f", str(params["config"])])
    files = [str(f) for f in params["files"]]
    if ctx.dry_run:
        return ActionResult(ok=True, detail=f"would copy and truncate {files}")
    out = []
    for f in files:
        try:
            out.append(await asyncio.to_thread(_copytruncate, f))
        except (OSError, HealdError) as exc:
            return ActionResult(ok=False, changed=bool(out), detail="; ".join([*out, f"{f}: {exc}"]))
    return ActionResult(ok=True, changed=True, detail="; ".join(out))


@action("drop_caches")
async def drop_caches(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    if ctx.settings.use_helper_units:
        return await _run_tool(ctx, [*ctx.settings.systemctl, "start", "heald-action@drop-caches.service"])
    level = int(params.get("level", 1))
    path = ctx.settings.drop_caches_path
    if ctx.dry_run:
        return ActionResult(ok=True, detail=f"would sync and write {level} to {path}")

    def do() -> None:
        os.sync()
        _write(Path(path), f"{level}\n")

    try:
        await asyncio.to_thread(do)
    except OSError as exc:
        return ActionResult(ok=False, detail=f"{path}: {exc.strerror or exc}")
    return ActionResult(ok=True, changed=True, detail=f"wrote {level} to {path}")


# --------------------------------------------------------------------------- GPU


def _gpu_values(params: Mapping[str, Any], ctx: ActionContext) -> dict[str, str]:
    """``{gpu}``/``{pci}``/``{uuid}`` for the GPU argv templates: explicit params win, then the
    run's bindings (an XID event binds ``gpu``), then the GPU collector's device table."""
    vals = {"node": ctx.node, **ctx.bindings}
    for k in ("gpu", "pci"):
        if k in params:
            vals[k] = str(params[k])
    gpu_detail = ctx.detail.get("gpu")
    devices = gpu_detail.get("devices") if isinstance(gpu_detail, Mapping) else None
    dev = devices.get(vals["gpu"]) if isinstance(devices, Mapping) and "gpu" in vals else None
    if isinstance(dev, Mapping):
        for k in ("pci", "uuid"):
            if k not in vals and dev.get(k):
                vals[k] = str(dev[k])
    return vals


_GPU_INDEX_RE = re.compile(r"0|[1-9][0-9]?")  # as heald-action accepts it (0..63)


async def _gpu_helper(ctx: ActionContext, what: str, vals: Mapping[str, str]) -> ActionResult:
    """``systemctl start heald-action@<what>-<gpu>.service``: the root-only helper does the step."""
    gpu = vals.get("gpu")
    if gpu is None:
        return ActionResult(ok=False, detail=f"{what} needs a gpu index (params.gpu or a bound {{gpu}})")
    if not _GPU_INDEX_RE.fullmatch(gpu) or int(gpu) > 63:
        return ActionResult(ok=False, detail=f"{what}: gpu {gpu!r} is not a GPU index (0..63)")
    return await _run_tool(ctx, [*ctx.settings.systemctl, "start", f"heald-action@{what}-{gpu}.service"])


@action("gpu_reset")
async def gpu_reset(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    vals = _gpu_values(params, ctx)
    if ctx.settings.use_helper_units:
        return await _gpu_helper(ctx, "gpu-reset", vals)
    try:
        argv = substitute_argv(ctx.settings.gpu_reset_argv, vals)
    except HealdError as exc:
        return ActionResult(ok=False, detail=str(exc))
    return await _run_tool(ctx, argv)


@action("gpu_drain")
async def gpu_drain(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    vals = _gpu_values(params, ctx)
    if ctx.settings.use_helper_units:
        # nvidia-smi drain needs CAP_SYS_ADMIN, which heald.service does not hold
        return await _gpu_helper(ctx, "gpu-undrain" if params.get("undo") else "gpu-drain", vals)
    template = ctx.settings.gpu_undrain_argv if params.get("undo") else ctx.settings.gpu_drain_argv
    try:
        argv = substitute_argv(template, vals)
    except HealdError as exc:
        return ActionResult(ok=False, detail=str(exc))
    return await _run_tool(ctx, argv)


# --------------------------------------------------------------------------- commands, events


@action("run_command")
async def run_command(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    argv = [str(a) for a in params["argv"]]
    if ctx.dry_run:
        return ActionResult(ok=True, detail=_tool(ctx, argv), data={"argv": argv})
    done = await run_argv(argv, env=ctx.env(params.get("env")), cwd=params.get("cwd"))
    return ActionResult(
        ok=done.ok, changed=True, detail=done.describe(), data={"argv": argv, "returncode": done.returncode}
    )


@action("notify")
async def notify(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    event = {
        "kind": params.get("kind", "playbook.notify"),
        "severity": params.get("severity", "warning"),
        "message": str(params["message"]),
        "playbook": ctx.playbook,
        "run_id": ctx.run_id,
        "labels": dict(ctx.bindings),
        "dry_run": ctx.dry_run,
    }
    if ctx.dry_run:
        return ActionResult(ok=True, detail=f"would publish {event['kind']}: {event['message']}")
    ctx.emit(event)
    return ActionResult(ok=True, changed=False, detail=f"published {event['kind']}")


@action("cordon")
async def cordon(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    if not ctx.settings.cordon_argv:
        return ActionResult(ok=False, detail="playbooks.cordon_argv is not configured")
    argv = substitute_argv(ctx.settings.cordon_argv, {"node": ctx.node, **ctx.bindings})
    return await _run_tool(ctx, argv, timeout_s=None)


@action("restart_process")
async def restart_process(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
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


def check_registry() -> None:
    """The implementations match the schema's action vocabulary exactly."""
    if set(REGISTRY) != set(action_names()):
        missing = set(action_names()) - set(REGISTRY)
        extra = set(REGISTRY) - set(action_names())
        raise RuntimeError(f"action registry mismatch: missing {sorted(missing)}, extra {sorted(extra)}")


check_registry()
