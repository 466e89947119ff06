"""Hash-chained audit log: ``<state_dir>/audit.jsonl``.

Each line is ``{"seq": n, "ts": wall, "prev": <hash of line n-1>, "record": {...}, "hash": h}``
where ``h = sha256(canonical JSON of {seq, ts, prev, record})`` and canonical JSON is sorted
keys, no spaces, UTF-8. The first line's ``prev`` is 64 zeros. Editing a line breaks its hash;
removing or reordering lines breaks the ``prev``/``seq`` links; removing lines at the end is
caught by ``audit.jsonl.head`` (the last seq and hash, rewritten atomically on every append).
Every record's hash is also handed to ``on_action`` so the coordinator holds off-node anchors:
a chain rewritten wholesale by someone with root on the node only verifies locally.

A full or read-only state dir (issue 17): an entry whose line cannot be written whole is not
appended at all: the partial line is cut off (or, if even that fails, before the next append
or at the next start), :meth:`AuditLog.append` raises ``OSError`` and the chain (``seq``,
``prev``) stays at the last entry on disk, so the entries after it chain correctly and
``heald audit verify`` passes. The engine hands the record on at once, unchained, and appends it
later, marked ``late``, once the disk takes it (:class:`agent.act.records.Recorder`). The head
is written in place on a full disk; where it cannot be written at all it lags behind the log,
which verify accepts — meanwhile lines removed at the end are caught only back to the head's
seq. Failures are logged once per streak.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.fsutil import FailureStreak, write_small_state

GENESIS = "0" * 64
log = structlog.get_logger("heald.act.audit")


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def entry_hash(seq: int, ts: float, prev: str, record: Any) -> str:
    return hashlib.sha256(canonical({"seq": seq, "ts": ts, "prev": prev, "record": record})).hexdigest()


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.head_path = path.with_name(path.name + ".head")
        self._failures = FailureStreak("audit append failed; records go on unchained", log, path=str(path))
        self._head_failures = FailureStreak("audit head not written; it lags behind the log", log,
                                            path=str(self.head_path))
        self._cut_to: int | None = None  # a torn line to cut off before the next append
        self._fd = -1
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._failures.failed(exc)
        self.seq, self.prev = self._recover()
        try:
            self._open()
        except OSError as exc:  # a read-only state dir without the file yet: tried at each append
            self._failures.failed(exc)

    def _recover(self) -> tuple[int, str]:
        if not self.path.exists():
            return 0, GENESIS
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            # A crash mid-append leaves a torn last line; the head file never points at it.
            cut = data.rfind(b"\n") + 1
            log.warning("truncating torn last audit line", path=str(self.path), bytes=len(data) - cut)
            try:
                with open(self.path, "r+b") as fh:
                    fh.truncate(cut)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError:  # read-only: cut it before the first append (until then, nothing is appended)
                self._cut_to = cut
            data = data[:cut]
        lines = data.splitlines()
        if not lines:
            return 0, GENESIS
        try:
            last = json.loads(lines[-1])
            return int(last["seq"]), str(last["hash"])
        except (ValueError, KeyError, TypeError):
            log.error("last audit line unreadable; chain continues from a fresh link", path=str(self.path))
            return len(lines), hashlib.sha256(lines[-1]).hexdigest()

    def _open(self) -> int:
        if self._fd < 0:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o600)
        if self._cut_to is not None:
            os.ftruncate(self._fd, self._cut_to)
            self._cut_to = None
        return self._fd

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Chain and write one entry; raises ``OSError`` when it could not be written (the chain
        then stays where it was: see the module docstring)."""
        seq = self.seq + 1
        ts = round(time.time(), 6)
        h = entry_hash(seq, ts, self.prev, record)
        entry = {"seq": seq, "ts": ts, "prev": self.prev, "record": record, "hash": h}
        line = canonical(entry) + b"\n"
        try:
            fd = self._open()
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                self._cut_to = size  # a partial line would break the chain for every later entry
                with contextlib.suppress(OSError):  # else: before the next append, or at the next start
                    self._open()
                raise
        except OSError as exc:
            self._failures.failed(exc, seq=seq, type=record.get("type"))
            raise
        self._failures.succeeded(seq=seq)
        self.seq, self.prev = seq, h
        try:
            write_small_state(self.head_path, canonical({"seq": seq, "hash": h}) + b"\n")
        except OSError as exc:
            self._head_failures.failed(exc, seq=seq)
        else:
            self._head_failures.succeeded(seq=seq)
        return entry

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class VerifyReport:
    path: str
    ok: bool
    lines: int
    first_bad_line: int | None = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "lines": self.lines,
            "first_bad_line": self.first_bad_line,
            "reason": self.reason,
        }


def verify(path: Path) -> VerifyReport:
    """Check the whole chain; names the first line that is edited, missing or out of order."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    prev = GENESIS
    seq = 0
    for n, raw in enumerate(lines, start=1):
        try:
            e = json.loads(raw)
            eseq, ets, eprev, rec, eh = (
                int(e["seq"]),
                float(e["ts"]),
                str(e["prev"]),
                e["record"],
                str(e["hash"]),
            )
        except (ValueError, KeyError, TypeError):
            return VerifyReport(str(path), False, len(lines), n, "not a valid audit entry (torn or edited)")
        if entry_hash(eseq, ets, eprev, rec) != eh:
            return VerifyReport(
                str(path), False, len(lines), n, "hash does not match the content (line edited)"
            )
        if eprev != prev:
            return VerifyReport(
                str(path),
                False,
                len(lines),
                n,
                "prev hash does not match the line before (a line removed, inserted or reordered)",
            )
        if eseq != seq + 1:
            return VerifyReport(str(path), False, len(lines), n, f"sequence jumps from {seq} to {eseq}")
        prev, seq = eh, eseq
    head = path.with_name(path.name + ".head")
    if head.exists():
        try:
            h = json.loads(head.read_bytes())
            hseq, hhash = int(h["seq"]), str(h["hash"])
        except (ValueError, KeyError, TypeError):
            return VerifyReport(str(path), False, len(lines), None, f"{head.name} is unreadable")
        if hseq > seq:
            return VerifyReport(
                str(path),
                False,
                len(lines),
                len(lines) + 1,
                f"log ends at seq {seq} but {head.name} records seq {hseq} (lines removed at the end)",
            )
        if hseq == seq and hhash != prev:
            return VerifyReport(
                str(path), False, len(lines), len(lines), f"last hash differs from {head.name}"
            )
    return VerifyReport(str(path), True, len(lines))
