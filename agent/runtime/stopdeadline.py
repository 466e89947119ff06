"""A bound on how long the daemon may take to stop.

On SIGTERM the root TaskGroup cancels every task and waits for each to finish its clean-up (the
reporter's "offline" status, the cost and demand histories, heald's nftables table, /metrics).
One clean-up that never returns — a library that swallows the cancellation, a thread stuck in a
call the loop waits for, an executor thread the interpreter joins at exit — would keep heald
running until systemd's ``TimeoutStopSec`` (30 s in heald.service) kills it with SIGKILL, and
nothing would say what hung.

So the first stop request arms a timer on its own thread (it fires even when the event loop is
blocked): past :data:`STOP_DEADLINE_S` it logs one error naming every asyncio task still pending
and where each waits, and every other thread's innermost frame, then exits with status 1. A
second SIGTERM or SIGINT does the same at once (as uvicorn does on a second Ctrl-C). Exiting here
is as safe as the kill -9 that every journal, spool and state file of heald is built to survive;
it only happens earlier than systemd's, and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import types
from collections.abc import Callable

import structlog

log = structlog.get_logger("heald.daemon")

#: Below heald.service's TimeoutStopSec (30 s), so heald's own report comes before systemd's kill.
STOP_DEADLINE_S = 20.0
#: The exit status of a stop that did not finish (systemd: a failure, Restart=on-failure applies).
EXIT_STOP_STALLED = 1


_ASYNCIO_DIR = os.path.dirname(asyncio.__file__)
_POOL = os.path.join("concurrent", "futures", "thread.py")


def _where(frame: types.FrameType | None) -> str | None:
    if frame is None:
        return None
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def task_waits(task: asyncio.Task[object]) -> str:
    """Where a pending task waits: the innermost frame of its await chain outside asyncio itself,
    and the asyncio call it is in (``.../reporter.py:12 in run -> asyncio sleep``)."""
    coro: object = task.get_coro()
    frames: list[types.FrameType] = []
    for _ in range(64):  # an await chain is short; a cycle must not hang the report
        if coro is None:
            break
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    if not frames:
        return "(not started or finished)"
    ours = [f for f in frames if not f.f_code.co_filename.startswith(_ASYNCIO_DIR)]
    where = _where(ours[-1] if ours else frames[-1]) or "?"
    if ours and frames[-1] is not ours[-1]:
        where += f" -> asyncio {frames[-1].f_code.co_name}"
    return where


def pending_tasks(loop: asyncio.AbstractEventLoop) -> list[str]:
    """``name: where`` for every task of ``loop`` not done yet; safe to call from another thread
    (the task set may change under us: retried, then given up)."""
    for _ in range(10):
        try:
            tasks = [t for t in list(asyncio.all_tasks(loop)) if not t.done()]
        except RuntimeError:  # the set changed size while we copied it
            continue
        return sorted(f"{t.get_name()}: {task_waits(t)}" for t in tasks)
    return ["(the task list kept changing)"]


def thread_frames() -> list[str]:
    """Every busy thread but the caller's: ``name: innermost frame <- its caller <- ...`` (three
    frames). Idle pool workers, waiting for work, are left out."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    out = []
    for ident, frame in sys._current_frames().items():
        if ident == me or (frame.f_code.co_name == "_worker" and frame.f_code.co_filename.endswith(_POOL)):
            continue
        chain: list[str] = []
        f: types.FrameType | None = frame
        while f is not None and len(chain) < 3:
            chain.append(_where(f) or "?")
            f = f.f_back
        out.append(f"{names.get(ident, ident)}: {' <- '.join(chain)}")
    return sorted(out)


class StopDeadline:
    """Arm with :meth:`arm` on the first stop request; :meth:`force` on a second one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float = STOP_DEADLINE_S, *,
                 exit_process: Callable[[int], object] = os._exit) -> None:
        self._loop = loop
        self.seconds = seconds
        self._exit = exit_process
        self._timer: threading.Timer | None = None
        self._fired = threading.Lock()

    @property
    def armed(self) -> bool:
        return self._timer is not None

    def arm(self) -> None:
        """Start counting (once; later calls keep the first deadline)."""
        if self._timer is not None:
            return
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.name = "heald-stop-deadline"
        self._timer.daemon = True  # never the reason the interpreter waits
        self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def force(self, why: str, code: int = EXIT_STOP_STALLED) -> None:
        """Exit now with the report (a second stop signal)."""
        self._give_up(why, code=code)

    def _expire(self) -> None:
        self._give_up(f"not stopped {self.seconds:g} s after the stop request", code=EXIT_STOP_STALLED)

    def _give_up(self, why: str, *, code: int) -> None:
        if not self._fired.acquire(blocking=False):
            return  # the timer and a second signal at once: one report, one exit
        log.error("heald did not stop cleanly: exiting now", reason=why, deadline_s=self.seconds,
                  pending_tasks=pending_tasks(self._loop), threads=thread_frames(),
                  hint="state is journaled as for kill -9; the next start resumes it")
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        self._exit(code)
