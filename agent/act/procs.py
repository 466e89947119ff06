"""Running tools (argv lists, never a shell) and choosing processes to act on, safely."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from agent.decide.settings import PlaybookSettings
from agent.decide.units import parse_duration
from agent.errors import HealdError

OUTPUT_LIMIT = 4000


@dataclass(frozen=True, slots=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        out = self.output.strip()
        tail = f": {out[-300:]}" if out else ""
        return f"{' '.join(self.argv)} exited {self.returncode}{tail}"


async def run_argv(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout_s: float | None = None,
) -> Completed:
    """Run argv to completion in its own session; on timeout or cancellation its whole process
    group is killed and reaped before the exception propagates."""
    if not argv:
        raise HealdError("empty argv")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as exc:
        return Completed(tuple(argv), 127, f"cannot run {argv[0]!r}: {exc.strerror or exc}")
    try:
        async with asyncio.timeout(timeout_s):
            out, _ = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()  # reap: PID 1 here reaps slowly
        raise
    text = out.decode("utf-8", "replace") if out else ""
    return Completed(
        tuple(argv), proc.returncode if proc.returncode is not None else -1, text[-OUTPUT_LIMIT:]
    )


def substitute_argv(template: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Replace ``{name}`` elements (whole elements only: never split, never partial)."""
    out: list[str] = []
    for item in template:
        m = re.fullmatch(r"\{([a-z_][a-z0-9_]*)\}", item)
        if m:
            if m.group(1) not in values:
                raise HealdError(f"argv needs '{{{m.group(1)}}}', which is not known here")
            out.append(values[m.group(1)])
        else:
            out.append(item)
    return out


# --------------------------------------------------------------------------- process selection


def _ancestors() -> set[int]:
    out: set[int] = set()
    pid = os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            pid = psutil.Process(pid).ppid()
        except psutil.Error:
            break
    return out


def process_names(p: psutil.Process) -> set[str]:
    names: set[str] = set()
    with contextlib.suppress(psutil.Error):
        names.add(p.name())
    with contextlib.suppress(psutil.Error, IndexError):
        cmd = p.cmdline()
        if cmd:
            names.add(os.path.basename(cmd[0]))
    return names


def protection(
    p: psutil.Process, settings: PlaybookSettings, ancestors: set[int] | None = None
) -> str | None:
    """Why ``p`` must never be acted on (None when it may be)."""
    if p.pid <= 2:
        return "pid 1 and kernel threads are never touched"
    if p.pid in (ancestors if ancestors is not None else _ancestors()):
        return "heald itself and its parents are never touched"
    try:
        if p.ppid() == 2:
            return "kernel thread"
    except psutil.Error:
        return "gone"
    hit = process_names(p) & set(settings.protected_processes)
    if hit:
        return f"protected process ({', '.join(sorted(hit))}) per playbooks.protected_processes"
    return None


def in_cgroup(pid: int, cgroup: str) -> bool:
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return False
    want = cgroup.rstrip("/") or "/"
    for line in lines:
        path = line.split(":", 2)[-1]
        if path == want or path.startswith(want + "/"):
            return True
    return False


@dataclass
class Candidate:
    proc: psutil.Process
    name: str
    cpu_pct: float | None = None
    rss: int | None = None
    tasks: int | None = None  # its threads + its children in the pool (top: pids)

    def describe(self) -> str:
        extra = []
        if self.tasks is not None:
            extra.append(f"{self.tasks} tasks")
        if self.cpu_pct is not None:
            extra.append(f"cpu {self.cpu_pct:.0f}%")
        if self.rss is not None:
            extra.append(f"rss {self.rss / 2**20:.0f} MiB")
        return f"pid {self.proc.pid} ({self.name}{', ' + ', '.join(extra) if extra else ''})"


def _main_pid_argv(settings: PlaybookSettings, unit: str) -> list[str]:
    return [*settings.systemctl, "show", "--property=MainPID", "--value", unit]


async def select(
    target: Mapping[str, Any],
    settings: PlaybookSettings,
    *,
    limit: int = 1,
    env: Mapping[str, str] | None = None,
) -> tuple[list[Candidate], list[str]]:
    """Resolve a target to processes; returns (chosen, notes on what was skipped and why)."""
    notes: list[str] = []
    if "unit" in target:
        done = await run_argv(_main_pid_argv(settings, str(target["unit"])), env=env, timeout_s=10)
        pid_text = done.output.strip()
        if not done.ok or not pid_text.isdigit() or int(pid_text) == 0:
            return [], [f"unit {target['unit']} has no main process ({done.describe()})"]
        target = {**target, "pid": int(pid_text)}
    measure = parse_duration(target.get("measure", "1s")) if target.get("top") == "cpu" else 0.0
    return await asyncio.to_thread(_select_sync, target, settings, limit, measure, notes)


def _select_sync(
    target: Mapping[str, Any], settings: PlaybookSettings, limit: int, measure: float, notes: list[str]
) -> tuple[list[Candidate], list[str]]:
    ancestors = _ancestors()
    cgroup = target.get("cgroup")
    procs: list[psutil.Process]
    if "pid" in target:
        try:
            procs = [psutil.Process(int(target["pid"]))]
        except (psutil.Error, ValueError) as exc:
            return [], [f"pid {target['pid']}: {exc}"]
    else:
        procs = list(psutil.process_iter())
    name_rx = re.compile(str(target["name"])) if "name" in target else None
    cmd_rx = re.compile(str(target["cmdline"])) if "cmdline" in target else None
    if target.get("zombie_parent"):
        # the parents of zombies (most zombies first); the filters below then apply to the parents
        counts: dict[int, int] = {}
        for p in procs:
            with contextlib.suppress(psutil.Error):
                if p.status() == psutil.STATUS_ZOMBIE:
                    counts[p.ppid()] = counts.get(p.ppid(), 0) + 1
        procs = []
        for ppid, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(ppid))
                notes.append(f"pid {ppid} has {n} zombie children")
    pool: list[Candidate] = []
    for p in procs:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if cgroup and not in_cgroup(p.pid, str(cgroup)):
                continue
            if name_rx is not None and not any(name_rx.fullmatch(n) for n in process_names(p)):
                continue
            if cmd_rx is not None and not cmd_rx.search(" ".join(p.cmdline())):
                continue
            pool.append(Candidate(p, p.name()))
        except psutil.Error:
            continue
    kept: list[Candidate] = []
    for c in pool:
        why = protection(c.proc, settings, ancestors)
        if why is None:
            kept.append(c)
        elif "pid" in target or "unit" in target or len(notes) < 5:
            notes.append(f"skipped {c.describe()}: {why}")
    pool = kept
    if target.get("top") == "cpu" or "min_cpu_pct" in target:
        for c in pool:
            with contextlib.suppress(psutil.Error):
                c.proc.cpu_percent(None)
        time.sleep(measure or 1.0)
        for c in pool:
            try:
                c.cpu_pct = c.proc.cpu_percent(None)
            except psutil.Error:
                c.cpu_pct = None
        pool = [c for c in pool if c.cpu_pct is not None]
    if target.get("top") == "memory" or "min_memory_pct" in target:
        for c in pool:
            try:
                c.rss = c.proc.memory_info().rss
            except psutil.Error:
                c.rss = None
        pool = [c for c in pool if c.rss is not None]
    if "min_cpu_pct" in target:
        pool = [c for c in pool if (c.cpu_pct or 0.0) >= float(target["min_cpu_pct"])]
    if "min_memory_pct" in target:
        total = psutil.virtual_memory().total
        pool = [c for c in pool if 100.0 * (c.rss or 0) / total >= float(target["min_memory_pct"])]
    if target.get("top") == "pids":  # the process forking (or spawning threads) the most
        kids: dict[int, int] = {}
        for c in pool:
            with contextlib.suppress(psutil.Error):
                kids[c.proc.ppid()] = kids.get(c.proc.ppid(), 0) + 1
        for c in pool:
            with contextlib.suppress(psutil.Error):
                c.tasks = c.proc.num_threads() + kids.get(c.proc.pid, 0)
        pool = [c for c in pool if c.tasks is not None]
        pool.sort(key=lambda c: -(c.tasks or 0))
    if target.get("top") == "cpu":
        pool.sort(key=lambda c: -(c.cpu_pct or 0.0))
    elif target.get("top") == "memory":
        pool.sort(key=lambda c: -(c.rss or 0))
    return pool[:limit], notes


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def wait_gone(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited (a zombie counts as exited); returns the survivors."""
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive:
        alive = [p for p in alive if not gone(p)]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    return alive
