"""Non-systemd supervision: (re)spawn a configured argv and notice its death at once.

``restart_process`` spawns the argv in its own session and the supervisor waits on the child
(asyncio's child watcher), so a death is reported to the engine the moment it happens: the
engine turns it into a ``proc.exited`` event and re-evaluates playbooks immediately instead of
waiting for the next 1 Hz sample. Processes heald did not start are watched through a pidfd
(``watch_pid``), which is just as immediate. Every child is reaped by its waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger("heald.act.supervisor")

TaskFactory = Callable[[Coroutine[Any, Any, None], str], object]
ExitCallback = Callable[[str, int, "int | None"], None]  # name, pid, returncode (None: not our child)


@dataclass
class Child:
    name: str
    pid: int
    argv: tuple[str, ...]
    started_wall: float
    proc: asyncio.subprocess.Process | None = None


class Supervisor:
    def __init__(self, spawn_task: TaskFactory, on_exit: ExitCallback) -> None:
        self._spawn_task = spawn_task
        self._on_exit = on_exit
        self.children: dict[str, Child] = {}

    def alive(self, name: str) -> Child | None:
        c = self.children.get(name)
        if c is None:
            return None
        if c.proc is not None:
            return c if c.proc.returncode is None else None
        try:
            os.kill(c.pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return c
        return c

    async def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        output: str | None = None,
    ) -> Child:
        out_fd = os.open(output or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_fd,
                stderr=out_fd,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        finally:
            os.close(out_fd)
        child = Child(name, proc.pid, tuple(argv), time.time(), proc)
        self.children[name] = child
        self._spawn_task(self._wait_child(child, proc), f"supervise:{name}:{proc.pid}")
        log.info("process started", name=name, pid=proc.pid, argv=list(argv))
        return child

    async def _wait_child(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()  # reaps
        log.info("supervised process exited", name=child.name, pid=child.pid, returncode=rc)
        self._on_exit(child.name, child.pid, rc)

    def watch_pid(self, name: str, pid: int) -> bool:
        """Watch a process heald did not start (pidfd readable on exit). False where unsupported."""
        if not hasattr(os, "pidfd_open"):
            return False
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return False
        self.children[name] = Child(name, pid, (), time.time(), None)
        loop = asyncio.get_running_loop()

        def ready() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            self._on_exit(name, pid, None)

        loop.add_reader(fd, ready)
        return True

    async def terminate_all(self, grace_s: float = 3.0) -> None:
        """Stop every child heald started (tests, uninstall); normal shutdown leaves them running."""
        for child in list(self.children.values()):
            if child.proc is None or child.proc.returncode is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(grace_s):
                    await child.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                await child.proc.wait()
