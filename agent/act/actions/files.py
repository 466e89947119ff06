"""File and kernel-cache actions: ``clean_paths``, ``vacuum_journal``, ``rotate_logs``, ``drop_caches``.

``clean_paths`` deletes only regular files under ``clean_roots``, never following symlinks nor
crossing filesystems, never inside another service's PrivateTmp; each unlink is relative to a
directory opened component by component with O_NOFOLLOW (docs/playbooks.md, "Safety").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.act.actions._common import run_tool, write_kernel_file
from agent.act.base import ActionContext, ActionResult
from agent.decide.units import parse_duration, parse_size
from agent.errors import HealdError


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


async def clean_paths(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    return await asyncio.to_thread(_clean_sync, params, ctx)


JOURNAL_DIRS = ("/var/log/journal", "/run/log/journal")


def _journal_free(dirs: tuple[str, ...] = JOURNAL_DIRS) -> dict[str, int]:
    """Free bytes on the filesystem of each journal directory that exists."""
    free: dict[str, int] = {}
    for d in dirs:
        try:
            st = os.statvfs(d)
        except OSError:
            continue
        free[d] = st.f_bavail * st.f_frsize
    return free


async def vacuum_journal(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    argv = [*ctx.settings.journalctl]
    if "max_size" in params:
        argv.append(f"--vacuum-size={parse_size(params['max_size'])}")
    if "max_age" in params:
        argv.append(f"--vacuum-time={int(parse_duration(params['max_age']))}s")
    before = _journal_free()
    result = await run_tool(ctx, argv)
    if ctx.dry_run or not before:
        return result
    # What it freed, as the journal's filesystems saw it (others may write meanwhile: "about").
    after = _journal_free(tuple(before))
    freed = {d: after.get(d, 0) - b for d, b in before.items()}
    result.data["freed_bytes"] = max(0, sum(freed.values()))
    where = ", ".join(f"{max(0, f)} bytes on {d}" for d, f in freed.items())
    result.detail = f"{result.detail}; freed about {where}"
    return result


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


async def rotate_logs(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    if "config" in params:
        return await run_tool(ctx, [*ctx.settings.logrotate, "-f", str(params["config"])])
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


async def drop_caches(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    if ctx.settings.use_helper_units:
        return await run_tool(ctx, [*ctx.settings.systemctl, "start", "heald-action@drop-caches.service"])
    level = int(params.get("level", 1))
    path = ctx.settings.drop_caches_path
    if ctx.dry_run:
        return ActionResult(ok=True, detail=f"would sync and write {level} to {path}")

    def do() -> None:
        os.sync()
        write_kernel_file(Path(path), f"{level}\n")

    try:
        await asyncio.to_thread(do)
    except OSError as exc:
        return ActionResult(ok=False, detail=f"{path}: {exc.strerror or exc}")
    return ActionResult(ok=True, changed=True, detail=f"wrote {level} to {path}")

