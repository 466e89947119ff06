"""Write-ahead action journal: ``<state_dir>/journal/<run_id>.jsonl``, one fsync'd line a record.

Records of a run, in order::

    {"t": "run", run_id, playbook, bindings, inputs, dry_run, trigger, wall}
    {"t": "intent", step, action, wall}          # written and fsync'd BEFORE the action starts
    {"t": "commit", step, wall}                  # by an action, BEFORE its first change to the host
    {"t": "result", step, status, result, wall}  # status: done | failed | interrupted
    {"t": "verify", step, ok, wall}
    {"t": "end", outcome, wall}                  # then the file is removed

Recovery (on start): a file without ``end`` is an unfinished run. A step with a ``result`` is
never executed again. A step with an ``intent`` but no ``result`` was interrupted by the crash:
it is NOT re-run blindly (it may have half-happened, or fully happened without being
recorded); it is marked ``interrupted`` and the run continues with verification, then with
the next step of the ladder if the problem is still there. Two exceptions, by action
(:mod:`agent.act.actions`): a ``REPEATABLE`` one is run again; an ``UNTIL_COMMIT`` one
(``stop_leaker``, ``stop_process``: they look first, for seconds, then act) is run again when
it has no ``commit`` record, i.e. the crash came before it changed anything.

A full or read-only state dir (issue 17) never stops a run: no method here raises ``OSError``.
A record that cannot be written is kept in memory with the ones after it and written, in order,
at the run's next record once the disk takes it again (the header first, so a late journal is a
whole one); a partial line left by a failed write is cut off, so it never hides the records
after it. Failures are logged once per streak, and :attr:`RunJournal.complete` says whether the
journal on disk has every record. The price, while records are not on disk: a crash then
forgets the run (no header) or the step in progress (no ``intent``), so the next start does not
resume it, or runs that step again, or resumes a finished run whose ``end`` was not written and
whose file could not be removed (read-only), going on from its last recorded step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.fsutil import FailureStreak, describe, fsync_dir

log = structlog.get_logger("heald.act.journal")
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True, separators=(",", ":"), default=str) + "\n").encode()


def _write_line(fd: int, line: bytes) -> int:
    """Append one whole line and fsync it, or raise with the file as it was before; the size it had."""
    size = os.fstat(fd).st_size
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:
        # A torn line (ENOSPC halfway) would swallow the next record written after it.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise
    return size


class RunJournal:
    """One run's journal file. Never raises ``OSError`` (see the module docstring)."""

    def __init__(self, path: Path, failures: FailureStreak | None = None) -> None:
        self.path = path
        self._failures = failures if failures is not None else _streak()
        self._unwritten: list[bytes] = []  # records not on disk yet, in order
        self._fd = -1
        self._open()

    def _open(self) -> bool:
        try:
            self._fd = os.open(self.path, _FLAGS, 0o600)
        except OSError as exc:
            self._failures.failed(exc, file=str(self.path), run_id=self.path.stem)
            return False
        return True

    @property
    def complete(self) -> bool:
        """Whether every record so far is on disk."""
        return not self._unwritten

    def write(self, record: dict[str, Any]) -> bool:
        """Append a record (fsync'd); False when it is held in memory for now (logged once a streak)."""
        self._unwritten.append(_line({**record, "wall": time.time()}))
        if self._fd < 0 and not self._open():
            return False
        while self._unwritten:
            try:
                was = _write_line(self._fd, self._unwritten[0])
            except OSError as exc:
                self._failures.failed(exc, file=str(self.path), run_id=self.path.stem,
                                      unwritten=len(self._unwritten))
                self._drop_if_empty()
                return False
            del self._unwritten[0]
            if was == 0:  # a new file's directory entry must survive a crash too, or recovery would
                try:  # not find it
                    fsync_dir(self.path.parent)
                except OSError as exc:
                    self._failures.failed(exc, file=str(self.path), run_id=self.path.stem)
                    return False
        self._failures.succeeded(file=str(self.path))
        return True

    def _drop_if_empty(self) -> None:
        """A file still empty (its header could not be written) is removed and made again at the next
        write: an empty file is no journal, and the next start would remove it under us."""
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_size == 0:
                self.path.unlink(missing_ok=True)
                self.close()

    def intent(self, step: int, action: str) -> None:
        self.write({"t": "intent", "step": step, "action": action})

    def commit(self, step: int) -> None:
        self.write({"t": "commit", "step": step})

    def result(self, step: int, status: str, result: dict[str, Any]) -> None:
        self.write({"t": "result", "step": step, "status": status, "result": result})

    def verify(self, step: int, ok: bool) -> None:
        self.write({"t": "verify", "step": step, "ok": ok})

    def end(self, outcome: str) -> None:
        self.write({"t": "end", "outcome": outcome})
        if not self.complete:
            log.warning("run finished without a complete journal (state dir full or read-only)",
                        run_id=self.path.stem, outcome=outcome, unwritten=len(self._unwritten))
        self.close()
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:  # read-only: the next start finds the run (with its end, if written)
            log.error("journal file of a finished run not removed", path=str(self.path), **describe(exc))

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def _streak() -> FailureStreak:
    return FailureStreak("journal write failed; the run goes on unjournaled", log,
                         consequence="a crash now forgets the run or its step in progress "
                                     "(see agent/act/journal.py)")


@dataclass
class Unfinished:
    """A run found in the journal without an ``end`` record."""

    run_id: str
    header: dict[str, Any]
    done: dict[int, str] = field(default_factory=dict)  # step -> status
    interrupted: int | None = None  # step with intent but no result
    last_step: int = -1  # highest step with an intent
    verified: dict[int, bool] = field(default_factory=dict)
    committed: set[int] = field(default_factory=set)  # steps that began to change the host
    details: dict[int, str] = field(default_factory=dict)  # step -> its result's detail
    # step -> when it ended (its result's wall; its intent's while it has none, or only the
    # "interrupted" a resume wrote): a resumed verification's window counts from there
    ended: dict[int, float] = field(default_factory=dict)
    path: Path | None = None

    @property
    def playbook(self) -> str:
        return str(self.header.get("playbook", ""))

    @property
    def next_step(self) -> int:
        return self.last_step + 1


class Journal:
    """The journal directory. No method raises ``OSError`` (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._failures = _streak()  # one streak for every run: one log line while the disk is full
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            self._failures.failed(exc, dir=str(self.dir))

    def open_run(self, run_id: str, header: dict[str, Any]) -> RunJournal:
        run_journal = RunJournal(self.dir / f"{run_id}.jsonl", self._failures)
        run_journal.write({"t": "run", "run_id": run_id, **header})  # and fsyncs the directory
        return run_journal

    def reopen(self, unfinished: Unfinished) -> RunJournal:
        if unfinished.path is None:
            raise ValueError(f"run {unfinished.run_id} has no journal file")
        return RunJournal(unfinished.path, self._failures)

    def unfinished(self) -> list[Unfinished]:
        out: list[Unfinished] = []
        try:
            paths = sorted(self.dir.glob("*.jsonl"))
        except OSError as exc:
            log.error("journal directory unreadable", dir=str(self.dir), **describe(exc))
            return out
        for path in paths:
            unfinished = self._read(path)
            if unfinished is not None:
                out.append(unfinished)
        return out

    def _read(self, path: Path) -> Unfinished | None:
        run: Unfinished | None = None
        intents: set[int] = set()
        try:
            lines = path.read_bytes().splitlines()
        except OSError as exc:
            log.error("journal file unreadable", path=str(path), error=str(exc))
            return None
        for raw in lines:
            try:
                record = json.loads(raw)
            except ValueError:
                log.warning("torn journal line ignored (crash while writing)", path=str(path))
                continue
            kind = record.get("t")
            if kind == "run":
                run = Unfinished(str(record.get("run_id", path.stem)), record, path=path)
            elif run is None:
                continue
            elif kind == "intent":
                intents.add(int(record["step"]))
                run.last_step = max(run.last_step, int(record["step"]))
                # an intent after the step's result: a repeatable step was started again (what was
                # verified of it before is stale too)
                run.done.pop(int(record["step"]), None)
                run.details.pop(int(record["step"]), None)
                run.verified.pop(int(record["step"]), None)
                run.committed.discard(int(record["step"]))
                run.ended[int(record["step"])] = _wall(record)
            elif kind == "commit":
                run.committed.add(int(record["step"]))
            elif kind == "result":
                run.done[int(record["step"])] = str(record.get("status", "done"))
                if run.done[int(record["step"])] != "interrupted":
                    run.ended[int(record["step"])] = _wall(record)
                result = record.get("result")
                if isinstance(result, dict) and result.get("detail"):
                    run.details[int(record["step"])] = str(result["detail"])
            elif kind == "verify":
                run.verified[int(record["step"])] = bool(record.get("ok"))
            elif kind == "end":
                _remove(path)
                return None
        if run is None:
            log.warning("journal file without a run header removed", path=str(path))
            _remove(path)
            return None
        pending = sorted(intents - set(run.done))
        run.interrupted = pending[-1] if pending else None
        return run


def _wall(record: dict[str, Any]) -> float:
    """The record's wall time; now when it has none, is not finite or lies in the future (a
    damaged line or a clock step must not stretch a resumed verification's window)."""
    now = time.time()
    wall = record.get("wall")
    if isinstance(wall, int | float) and not isinstance(wall, bool) and math.isfinite(wall):
        return min(float(wall), now)
    return now


def _remove(path: Path) -> None:
    """Remove a journal file that holds no unfinished run; a read-only disk keeps it (it is read
    again, with the same result, at the next start)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("journal file not removed", path=str(path), **describe(exc))
