"""Small persisted counters of the report stage (``<state_dir>/report/``).

``seq``    the per-node message sequence high-water mark. Sequence numbers are handed out from a
           reserved block: the file holds the end of the block, written (fsync + rename) before
           any number of the block is used. After a crash the next process starts at the end of
           the last reserved block, so numbers skip forward but never go backwards or repeat.
``bdseq``  the birth/death sequence, +1 on every connect, written before it is used.

A full or read-only state dir (issue 17) never stops either counter: a write that fails is
logged once per failure streak and retried (``seq``: at the next number past the durable block,
at most once per :data:`RETRY_S`; ``bdseq``: at the next connect), and the numbers go on from
memory. What remains guaranteed:

* within one process, ``seq`` never repeats and never goes backwards, whatever the disk does;
* on a *full* disk the files are still written, in place (:func:`agent.fsutil.write_small_state`:
  no new block needed), so the crash guarantee above holds unchanged once the files exist;
* only where even that fails (a read-only filesystem, a first start on a full disk before the
  files exist) can a crash lose the high-water mark. The next process then starts at the last
  durable block end or above the spool's last record, whichever is higher; numbers handed out
  after the last durable write whose messages never reached the spool on disk (published
  straight from memory) may be handed out again, and the coordinator, which dedupes by
  ``(node, seq)``, then drops the newer message as a duplicate. A repeated ``bdseq`` makes a
  stale ``offline`` status look current until the next connect.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Final

import structlog

from agent.fsutil import FailureStreak, describe, write_small_state

log = structlog.get_logger()

#: While the seq file cannot be written, try again at most this often (seconds).
RETRY_S: Final = 1.0


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:  # unreadable: start from what else we know (the spool), never refuse to run
        log.warning("report.state_unreadable", file=str(path), **describe(exc))
        return None
    try:
        return int(text)
    except ValueError:
        log.warning("report.state_unreadable", file=str(path), content=text[:40])
        return None


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:  # the writes will fail and say so; the counter still works from memory
        log.warning("report.state_dir_unusable", dir=str(path.parent), **describe(exc))


class SeqStore:
    """Monotonic sequence numbers that survive restarts (see the module docstring)."""

    def __init__(self, path: Path | str, *, block: int = 1000, at_least: int = 0) -> None:
        self.path = Path(path)
        _make_parent(self.path)
        self.block = block
        stored = _read_int(self.path)
        self._next = max(stored if stored is not None else 0, at_least)
        self._durable = self._next  # numbers below this are covered by the file: nothing yet
        self._retry_at = 0.0
        self._failures = FailureStreak(
            "report.seq_persist_failed", log, file=str(self.path),
            consequence="sequence numbers go on from memory; a crash before the file is written "
                        "again may reuse some (see agent/report/state.py)")

    def bump(self, at_least: int) -> None:
        """Never hand out a number below ``at_least`` (e.g. above what the spool already holds)."""
        self._next = max(self._next, at_least)

    def next(self) -> int:
        seq = self._next
        if seq >= self._durable:
            self._reserve(seq + self.block)
        self._next = seq + 1
        return seq

    def _reserve(self, end: int) -> None:
        now = time.monotonic()
        if now < self._retry_at:
            return
        try:
            write_small_state(self.path, f"{end}\n".encode())
        except OSError as exc:
            self._retry_at = now + RETRY_S
            self._failures.failed(exc, next_seq=self._next)
            return
        self._durable = end
        self._failures.succeeded(next_seq=self._next)

    @property
    def peek(self) -> int:
        return self._next

    @property
    def durable(self) -> bool:
        """Whether every number handed out so far is covered by the file (the crash guarantee)."""
        return self._next <= self._durable


class PersistentCounter:
    """A counter written on every increment (for rare events such as connects)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        _make_parent(self.path)
        stored = _read_int(self.path)
        self.value = stored if stored is not None else 0
        self._failures = FailureStreak(
            "report.counter_persist_failed", log, file=str(self.path),
            consequence="the counter goes on from memory; a restart before it is written again may "
                        "reuse a value")

    def next(self) -> int:
        """The next value. Never raises: a value that cannot be written is used anyway (logged)."""
        self.value += 1
        try:
            write_small_state(self.path, f"{self.value}\n".encode())
        except OSError as exc:
            self._failures.failed(exc, value=self.value)
        else:
            self._failures.succeeded(value=self.value)
        return self.value


INCARNATION_RE: Final = re.compile(r"^[0-9a-f]{16}$")


def load_incarnation(path: Path | str) -> str:
    """This state directory's incarnation: 16 random hex digits, made (and written) the first time.

    Every report carries it (``Envelope.inc``). A new state directory (a reinstall, a lost
    ``/var/lib/heald``) means a new incarnation, so the coordinator never takes the new seqs, which
    start again near 0, for duplicates of the old ones. If it cannot be written (a full or
    read-only state dir at the very first start), it is used from memory: the next start then has
    another one, which is right, as its seq counter could not be written either.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    if INCARNATION_RE.match(text):
        return text
    inc = secrets.token_hex(8)
    try:
        _make_parent(path)
        write_small_state(path, f"{inc}\n".encode())
    except OSError as exc:
        log.error("report.incarnation_not_saved", file=str(path), **describe(exc))
    return inc
