"""Write-ahead action journal: ``<state_dir>/journal/<run_id>.jsonl``, one fsync'd line a record.

Records of a run, in order::

    {"t": "run", run_id, playbook, bindings, inputs, dry_run, trigger, wall}
    {"t": "intent", step, action, wall}          # written and fsync'd BEFORE the action starts
    {"t": "result", step, status, result, wall}  # status: done | failed | interrupted
    {"t": "verify", step, ok, wall}
    {"t": "end", outcome, wall}                  # then the file is removed

Recovery (on start): a file without ``end`` is an unfinished run. A step with a ``result`` is
never executed again. A step with an ``intent`` but no ``result`` was interrupted by the crash:
it is NOT re-run blindly (it may have half-happened, or fully happened without being
recorded); it is marked ``interrupted`` and the run continues with verification, then with
the next step of the ladder if the problem is still there.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("heald.act.journal")


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True, separators=(",", ":"), default=str) + "\n").encode()


class RunJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def write(self, record: dict[str, Any]) -> None:
        os.write(self._fd, _line({**record, "wall": time.time()}))
        os.fsync(self._fd)

    def intent(self, step: int, action: str) -> None:
        self.write({"t": "intent", "step": step, "action": action})

    def result(self, step: int, status: str, result: dict[str, Any]) -> None:
        self.write({"t": "result", "step": step, "status": status, "result": result})

    def verify(self, step: int, ok: bool) -> None:
        self.write({"t": "verify", "step": step, "ok": ok})

    def end(self, outcome: str) -> None:
        self.write({"t": "end", "outcome": outcome})
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class Unfinished:
    """A run found in the journal without an ``end`` record."""

    run_id: str
    header: dict[str, Any]
    done: dict[int, str] = field(default_factory=dict)  # step -> status
    interrupted: int | None = None  # step with intent but no result
    last_step: int = -1  # highest step with an intent
    verified: dict[int, bool] = field(default_factory=dict)
    path: Path | None = None

    @property
    def playbook(self) -> str:
        return str(self.header.get("playbook", ""))

    @property
    def next_step(self) -> int:
        return self.last_step + 1


class Journal:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def open_run(self, run_id: str, header: dict[str, Any]) -> RunJournal:
        run_journal = RunJournal(self.dir / f"{run_id}.jsonl")
        run_journal.write({"t": "run", "run_id": run_id, **header})
        # the new file's directory entry must survive a crash too, or recovery would not find it
        dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return run_journal

    def reopen(self, unfinished: Unfinished) -> RunJournal:
        if unfinished.path is None:
            raise ValueError(f"run {unfinished.run_id} has no journal file")
        return RunJournal(unfinished.path)

    def unfinished(self) -> list[Unfinished]:
        out: list[Unfinished] = []
        for path in sorted(self.dir.glob("*.jsonl")):
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
            elif kind == "result":
                run.done[int(record["step"])] = str(record.get("status", "done"))
            elif kind == "verify":
                run.verified[int(record["step"])] = bool(record.get("ok"))
            elif kind == "end":
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                return None
        if run is None:
            log.warning("journal file without a run header removed", path=str(path))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        pending = sorted(intents - set(run.done))
        run.interrupted = pending[-1] if pending else None
        return run
