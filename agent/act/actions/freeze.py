"""``freeze_process`` / ``unfreeze_process``: contain a suspicious process reversibly, keep its evidence.

Freezing, in this order, for each process :func:`agent.act.procs.select` returns (which already
refuses pid 1, kernel threads, heald and its parents, and ``protected_processes``):

1. A record, ``STATE/forensics/PID-STARTTIME/record.json`` (``state: freezing``, with the freezer
   group and the pids it is about to use), written before anything is done to the process: a
   kill -9 of heald at any later point leaves a record that the freeze can be undone from.
   A full or read-only state dir does not stop the freeze (containment first): what could not be
   written is named in the result's ``unsaved``, with the metadata that did not fit, so it is in
   the step's audit record; the freezer group is named like the record would be, and
   ``unfreeze_process`` finds it by that name.
2. Forensics (``forensics: true``, the default): the binary copied from ``/proc/PID/exe`` (which
   works for a deleted file) with its sha256, and ``metadata.json``: exe, cmdline, the names of
   its environment variables (never their values), cwd, uids, open fds, inet connections, the
   parent chain. The forensics directory is bounded (``max_total``, default 512 MiB): the oldest
   records of processes no longer frozen go first; a binary that does not fit is not copied.
3. The cgroup freezer, so that no signal (an accomplice's SIGCONT) wakes it: the v1 freezer
   (``/sys/fs/cgroup/freezer/heald-frozen/PID-STARTTIME``) where it is mounted, else cgroup v2
   (``heald-frozen/PID-STARTTIME/cgroup.freeze``); then SIGSTOP to it and its descendants
   (pending under the freezer; alone where there is none, or with ``method: sigstop``). A
   process the cgroup freezer holds shows state D; one only stopped, T.
4. The check: every process is stopped (T) or its freezer group reads frozen; the record then
   says ``state: frozen`` with the method and the group.

``unfreeze_process`` thaws the group, moves the processes back to the root freezer group (v1) or
their former cgroup (v2), removes the group, sends SIGCONT and marks the record ``thawed``. A
frozen process does not act on SIGKILL until it is thawed: the kill ladder is ``signal_process``
KILL, then ``unfreeze_process`` (the process dies as it thaws, before running any of its code).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from agent.act.actions.cgroups import cgroup_v2_root
from agent.act.base import ActionContext, ActionResult
from agent.act.procs import Candidate, select
from agent.collect.security_proc import FROZEN_GROUP, record_name
from agent.decide.units import parse_size
from agent.fsutil import atomic_write

V1_FREEZER = Path("/sys/fs/cgroup/freezer")
_MAX_LIST = 256  # fds, connections, environment names kept in the metadata
_MAX_CMDLINE = 4096
_MAX_DESCENDANTS = 64


def forensics_root(ctx: ActionContext) -> Path:
    if ctx.state_dir is None:
        raise RuntimeError("freeze_process needs the engine's state directory")
    return Path(ctx.state_dir) / "forensics"


def _record_dir(root: Path, proc: psutil.Process) -> Path:
    """``root/PID-STARTTIME`` (the collector's :func:`record_name`); OSError when the process is gone."""
    stat_line = Path(f"/proc/{proc.pid}/stat").read_bytes()
    return root / record_name(proc.pid, stat_line.rsplit(b")", 1)[1].split()[19])


def _write_json(path: Path, doc: Mapping[str, Any]) -> None:
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True, default=str).encode())


def _keep_json(path: Path, doc: Mapping[str, Any], unsaved: list[str]) -> bool:
    """:func:`_write_json`, or a note in ``unsaved`` when the state dir is full or read-only: the
    freeze (and the thaw) go on without it, since containment must not wait for the disk."""
    try:
        _write_json(path, doc)
    except OSError as exc:
        unsaved.append(f"{path.name}: {exc.strerror or exc}")
        return False
    return True


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_size
    return total


def _prune(root: Path, keep: Path, budget: int) -> int:
    """Drop the oldest records of processes no longer frozen until the rest fits ``budget``;
    returns the bytes left for the new record."""
    dirs = sorted((d for d in root.iterdir() if d.is_dir() and d != keep), key=lambda d: d.stat().st_mtime)
    used = {d: _size(d) for d in dirs}
    total = sum(used.values())
    for d in dirs:
        if total <= budget:
            break
        if _read_json(d / "record.json").get("state") in {"freezing", "frozen"}:
            continue
        shutil.rmtree(d, ignore_errors=True)
        total -= used[d]
    return max(0, budget - total)


def _copy_binary(pid: int, dest: Path, room: int) -> tuple[str | None, int, str]:
    """Copy /proc/PID/exe to ``dest`` (at most ``room`` bytes); (sha256, size, note)."""
    import hashlib  # noqa: PLC0415 - only here

    src = f"/proc/{pid}/exe"
    try:
        size = os.stat(src).st_size
    except OSError as exc:
        return None, 0, f"binary not readable: {exc.strerror}"
    if size > room:
        return None, size, f"binary of {size} bytes not copied: over the forensics budget"
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            os.fchmod(fout.fileno(), 0o400)
            while chunk := fin.read(1 << 20):
                h.update(chunk)
                fout.write(chunk)
    except OSError as exc:
        with contextlib.suppress(OSError):
            dest.unlink()
        return None, size, f"binary not copied: {exc.strerror}"
    return h.hexdigest(), size, "copied"


def _metadata(proc: psutil.Process) -> dict[str, Any]:
    meta: dict[str, Any] = {"pid": proc.pid}
    getters: dict[str, Any] = {
        "exe": lambda: os.readlink(f"/proc/{proc.pid}/exe"),
        "cmdline": lambda: " ".join(proc.cmdline())[:_MAX_CMDLINE],
        "environ_keys": lambda: sorted(proc.environ())[:_MAX_LIST],  # names only: values may be secrets
        "cwd": proc.cwd,
        "uids": lambda: list(proc.uids()),
        "status": proc.status,
        "create_time": proc.create_time,
        "fds": lambda: {fd: os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                        for fd in sorted(os.listdir(f"/proc/{proc.pid}/fd"), key=int)[:_MAX_LIST]},
        "connections": lambda: [
            {"fd": c.fd, "type": int(c.type), "laddr": list(c.laddr),
             "raddr": list(c.raddr) if c.raddr else [], "status": c.status}
            for c in proc.net_connections(kind="inet")[:_MAX_LIST]],
    }
    for name, get in getters.items():
        try:
            meta[name] = get()
        except (psutil.Error, OSError) as exc:
            meta[name] = f"unreadable: {exc}"
    chain = []
    with contextlib.suppress(psutil.Error):
        for parent in proc.parents()[:16]:
            with contextlib.suppress(psutil.Error):
                chain.append({"pid": parent.pid, "name": parent.name(),
                              "cmdline": " ".join(parent.cmdline())[:256]})
    meta["parents"] = chain
    return meta


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _group_for(name: str, v2_root: Path | None) -> tuple[str, Path] | None:
    """(method, path) of the freezer group heald would use for record ``name``; None: no freezer."""
    if (V1_FREEZER / "cgroup.procs").exists():
        return "cgroup-v1-freezer", V1_FREEZER / FROZEN_GROUP / name
    if v2_root is not None and (v2_root / "cgroup.procs").exists():
        return "cgroup-v2-freeze", v2_root / FROZEN_GROUP / name
    return None


def _sweep(parent: Path) -> None:
    """Remove heald's freezer groups that hold no process any more (their process was killed or
    exited): the kernel refuses to remove one that still holds a task, so a frozen one stays."""
    with contextlib.suppress(OSError):
        for child in parent.iterdir():
            with contextlib.suppress(OSError):  # not one a concurrent freeze has just made
                if child.is_dir() and time.time() - child.stat().st_mtime > 60:
                    child.rmdir()


def _cgroup_freeze(pids: list[int], method: str, group: Path) -> None:
    """Move ``pids`` into ``group`` and freeze it (raises OSError when that cannot be done)."""
    v1 = method == "cgroup-v1-freezer"
    _sweep(group.parent)
    group.mkdir(parents=True, exist_ok=True)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            _write(group / "cgroup.procs", str(pid))
    _write(group / ("freezer.state" if v1 else "cgroup.freeze"), "FROZEN" if v1 else "1")
    deadline = time.monotonic() + 3.0
    while not _group_frozen(group):
        if time.monotonic() > deadline:
            raise OSError(f"{group} did not freeze")
        time.sleep(0.02)


def _group_frozen(group: Path) -> bool:
    try:
        if str(group).startswith(str(V1_FREEZER)):
            return (group / "freezer.state").read_text().strip() == "FROZEN"
        return "frozen 1" in (group / "cgroup.events").read_text()
    except OSError:
        return False


def _v2_cgroup(pid: int) -> str:
    """The process's cgroup v2 path (``0::/...`` in /proc/PID/cgroup): where a thaw moves it back."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:] or "/"
    return "/"


def _stopped(pid: int, group: str) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in {b"T", b"t"} or (bool(group) and _group_frozen(Path(group)))


def _freeze_one(c: Candidate, ctx: ActionContext, params: Mapping[str, Any]) -> dict[str, Any]:
    proc = c.proc
    root = forensics_root(ctx)
    rdir = _record_dir(root, proc)
    record = _read_json(rdir / "record.json")
    unsaved: list[str] = []  # what the state dir did not take (full, read-only): said in the result
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        rdir.mkdir(exist_ok=True, mode=0o700)
    except OSError as exc:
        unsaved.append(f"{rdir.name}/: {exc.strerror or exc}")
    pids = [proc.pid]
    with contextlib.suppress(psutil.Error):
        pids += [p.pid for p in proc.children(recursive=True)[:_MAX_DESCENDANTS]]
    plan = None if params.get("method", "auto") == "sigstop" else \
        _group_for(rdir.name, cgroup_v2_root(ctx.settings.cgroup_root))
    method, group = (plan[0], str(plan[1])) if plan is not None else ("sigstop", "")
    # first, naming the group and the pids: a crash from here on leaves a record to undo it from
    record.update({"pid": proc.pid, "playbook": ctx.playbook, "run_id": ctx.run_id, "node": ctx.node,
                   "state": "freezing", "since": time.time(), "bindings": dict(ctx.bindings),
                   "method": method, "group": group, "pids": pids,
                   "from_cgroup": record.get("from_cgroup") or _v2_cgroup(proc.pid)})
    _keep_json(rdir / "record.json", record, unsaved)
    meta: dict[str, Any] = {}  # the metadata the disk did not take (for the result)
    if params.get("forensics", True) and "binary_sha256" not in record:
        budget = parse_size(params.get("max_total", "512M"))
        try:
            room = _prune(root, rdir, budget)
        except OSError:  # the forensics directory could not be made (a full or read-only state dir)
            room = 0
        meta = _metadata(proc)
        kept = _keep_json(rdir / "metadata.json", meta, unsaved)
        digest, size, note = _copy_binary(proc.pid, rdir / "binary", room)
        record.update({"binary_sha256": digest, "binary_size": size, "binary": note, "exe": meta.get("exe")})
        if kept:
            meta = {}  # on disk: not repeated in the result
    if plan is not None:
        try:
            _cgroup_freeze(pids, *plan)
        except OSError as exc:
            record["cgroup"] = f"not used: {exc}"
            method, group = "sigstop", ""
    for pid in pids:  # on top of the freezer (pending until a thaw), or alone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 2.0
    while not (ok := _stopped(proc.pid, group)) and time.monotonic() < deadline:
        time.sleep(0.02)
    record.update({"state": "frozen" if ok else "freeze-failed", "method": method, "group": group,
                   "frozen_at": time.time()})
    if _keep_json(rdir / "record.json", record, unsaved):
        unsaved = [u for u in unsaved if not u.startswith(("record.json:", f"{rdir.name}/:"))]
    out = {"pid": proc.pid, "ok": ok, "method": method, "record": str(rdir),
           "binary_sha256": record.get("binary_sha256"), "exe": record.get("exe") or _exe(proc.pid)}
    if unsaved:  # the evidence the disk did not take goes into the step's audit record instead
        parents: list[Any] = meta.get("parents") or []
        out.update({"unsaved": list(dict.fromkeys(unsaved)), "binary": record.get("binary"),
                    "cmdline": str(meta.get("cmdline", ""))[:512] or None, "uids": meta.get("uids"),
                    "parents": [{"pid": p["pid"], "name": p["name"]} for p in parents]})
    return out


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _thaw_one(c: Candidate, ctx: ActionContext) -> dict[str, Any]:
    proc = c.proc
    rdir: Path | None = None
    with contextlib.suppress(OSError, RuntimeError):
        rdir = _record_dir(forensics_root(ctx), proc)
    record = _read_json(rdir / "record.json") if rdir is not None else {}
    group = Path(str(record.get("group") or ""))
    pids = [int(p) for p in record.get("pids", [proc.pid])]
    notes: list[str] = []
    if not record and rdir is not None:  # the record is lost or torn: the group is named like it
        plan = _group_for(rdir.name, cgroup_v2_root(ctx.settings.cgroup_root))
        if plan is not None and plan[1].is_dir():
            group = plan[1]
            notes.append(f"no record: thawing {group} by its name")
    if str(group) not in {"", "."} and group.is_dir():
        v1 = str(group).startswith(str(V1_FREEZER))
        try:
            _write(group / ("freezer.state" if v1 else "cgroup.freeze"), "THAWED" if v1 else "0")
        except OSError as exc:
            notes.append(f"thaw {group}: {exc.strerror}")
        back = V1_FREEZER if v1 else group.parent.parent / str(record.get("from_cgroup") or "/").lstrip("/")
        with contextlib.suppress(OSError):
            pids = [*pids, *(int(x) for x in (group / "cgroup.procs").read_text().split())]
        for pid in dict.fromkeys(pids):
            with contextlib.suppress(OSError):
                _write(back / "cgroup.procs", str(pid))
        deadline = time.monotonic() + 3.0
        while True:
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    notes.append(f"{group} not removed")
                    break
                time.sleep(0.05)
    for pid in dict.fromkeys(pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(pid), signal.SIGCONT)
    if rdir is not None and record:
        record.update({"state": "thawed", "thawed_at": time.time(), "thawed_by": ctx.playbook})
        unsaved: list[str] = []
        if not _keep_json(rdir / "record.json", record, unsaved):
            notes.append(f"record not updated: {unsaved[0]}")
    return {"pid": proc.pid, "group": str(group) if record else "", "notes": notes}


def _describe(candidates: list[Candidate]) -> str:
    return ", ".join(c.describe() for c in candidates)


def _suspects_only(
    candidates: list[Candidate], detail: Mapping[str, Any], notes: list[str]
) -> list[Candidate]:
    """Those the latest sample lists as suspects with the executable they run now: a pid reused
    since that sample, or a process that exec'd something else, is not frozen."""
    sec = detail.get("security_proc")
    rows = sec.get("suspects") if isinstance(sec, Mapping) else None
    rows = rows if isinstance(rows, list) else []
    seen = {r.get("pid"): r.get("exe") for r in rows if isinstance(r, Mapping)}
    kept = []
    for c in candidates:
        try:
            exe = os.readlink(f"/proc/{c.proc.pid}/exe")[:256]
        except OSError:
            exe = None
        if exe is not None and seen.get(c.proc.pid) == exe:
            kept.append(c)
        else:
            notes.append(f"skipped {c.describe()}: not a suspect in the latest sample "
                         "(or its executable changed)")
    return kept


async def freeze_process(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    """Copy the evidence, then stop and freeze the target process(es); see the module docstring."""
    candidates, notes = await select(
        params["target"], ctx.settings, limit=int(params.get("max_processes", 1)), env=ctx.env())
    if params.get("require_suspect", True):
        candidates = _suspects_only(candidates, ctx.detail, notes)
    data: dict[str, Any] = {"pids": [c.proc.pid for c in candidates], "notes": notes}
    if not candidates:
        why = f" ({'; '.join(notes)})" if notes else ""
        return ActionResult(ok=False, detail="no process matched" + why, data=data)
    if ctx.dry_run:
        return ActionResult(ok=True, data=data, detail=(
            f"would copy the binary and metadata of {_describe(candidates)} to {forensics_root(ctx)}"
            " and freeze it"))
    done = [await asyncio.to_thread(_freeze_one, c, ctx, params) for c in candidates]
    data["frozen"] = done
    failed = [d["pid"] for d in done if not d["ok"]]
    detail = "froze " + ", ".join(f"pid {d['pid']} ({d['method']}; evidence in {d['record']})" for d in done)
    unsaved = [f"pid {d['pid']}: {', '.join(d['unsaved'])}" for d in done if d.get("unsaved")]
    if unsaved:
        detail += ("; evidence not kept (state dir full or read-only), in this record instead: "
                   + "; ".join(unsaved))
    if failed:
        return ActionResult(ok=False, changed=True, detail=detail + f"; not stopped: {failed}", data=data)
    return ActionResult(ok=True, changed=True, detail=detail, data=data)


async def unfreeze_process(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    """Thaw and continue the target process(es) heald froze."""
    candidates, notes = await select(
        params["target"], ctx.settings, limit=int(params.get("max_processes", 1)), env=ctx.env())
    data: dict[str, Any] = {"pids": [c.proc.pid for c in candidates], "notes": notes}
    if not candidates:
        return ActionResult(ok=False, detail="no process matched", data=data)
    if ctx.dry_run:
        return ActionResult(ok=True, detail=f"would thaw {_describe(candidates)}", data=data)
    data["thawed"] = [await asyncio.to_thread(_thaw_one, c, ctx) for c in candidates]
    return ActionResult(ok=True, changed=True, detail=f"thawed {_describe(candidates)}", data=data)
