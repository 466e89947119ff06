"""Small persisted counters of the report stage (``<state_dir>/report/``).

``seq``    the per-node message sequence high-water mark. Sequence numbers are handed out from a
           reserved block: the file holds the end of the block, written (fsync + rename) before
           any number of the block is used. After a crash the next process starts at the end of
           the last reserved block, so numbers skip forward but never go backwards or repeat.
``bdseq``  the birth/death sequence, +1 on every connect, written before it is used.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

log = structlog.get_logger()


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        return int(text)
    except ValueError:
        log.warning("report.state_unreadable", file=str(path), content=text[:40])
        return None


def _write_int(path: Path, value: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{value}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class SeqStore:
    """Monotonic sequence numbers that survive restarts (see the module docstring)."""

    def __init__(self, path: Path | str, *, block: int = 1000, at_least: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.block = block
        stored = _read_int(self.path)
        self._next = max(stored if stored is not None else 0, at_least)
        self._reserved = self._next  # nothing of a new block is reserved yet

    def bump(self, at_least: int) -> None:
        """Never hand out a number below ``at_least`` (e.g. above what the spool already holds)."""
        self._next = max(self._next, at_least)

    def next(self) -> int:
        seq = self._next
        if seq >= self._reserved:
            self._reserved = seq + self.block
            _write_int(self.path, self._reserved)
        self._next = seq + 1
        return seq

    @property
    def peek(self) -> int:
        return self._next


class PersistentCounter:
    """A counter written on every increment (for rare events such as connects)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        stored = _read_int(self.path)
        self.value = stored if stored is not None else 0

    def next(self) -> int:
        self.value += 1
        _write_int(self.path, self.value)
        return self.value
