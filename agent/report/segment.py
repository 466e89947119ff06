"""The spool's files: the record format, a segment's bookkeeping, recovery and quarantine, the
sync job.

:mod:`agent.report.spool` is the queue built on them. A segment starts with the 8-byte magic
``HSPOOL1\\n`` followed by records::

    u32 length | u32 crc32 | u64 seq | u8 kind | payload (length bytes)      little-endian

``crc32`` covers ``seq``, ``kind`` and the payload. ``seq`` is the message's wire sequence number;
records are appended in strictly increasing ``seq`` order.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from agent.fsutil import describe, fsync_dir, write_small_state

MAGIC: Final = b"HSPOOL1\n"
_HDR: Final = struct.Struct("<IIQB")
HEADER_BYTES: Final = _HDR.size
MAX_RECORD_BYTES: Final = 256 * 1024 * 1024

#: Stable on-disk codes of message kinds (never renumber: old spools must stay readable).
KIND_CODES: Final[dict[str, int]] = {
    "birth": 1, "status": 2, "metrics": 3, "risk": 4, "event": 5, "action": 6, "command": 7,
    "command_ack": 8, "cost": 9,
}
CODE_KINDS: Final[dict[int, str]] = {code: kind for kind, code in KIND_CODES.items()}
#: Kinds the quota may drop while the disk has room (see :mod:`agent.report.spool`).
DROPPABLE: Final = frozenset({"metrics"})

log = structlog.get_logger()


@dataclass(slots=True)
class Scan:
    records: list[tuple[int, int, str, int]]  # (offset, seq, kind, total size)
    good_bytes: int  # end of the valid prefix
    error: str | None  # None: the whole file is valid
    torn: bool  # the error is a tail that a crash mid-append can leave


def crc(seq_kind: bytes | memoryview, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(seq_kind))


def unpack_header(data: bytes, offset: int) -> tuple[int, int, int, int]:
    """(length, crc, seq, kind code) of the record at ``offset``."""
    length, checksum, seq, code = _HDR.unpack_from(data, offset)
    return int(length), int(checksum), int(seq), int(code)


def encode_record(seq: int, kind: str, payload: bytes) -> bytes:
    code = KIND_CODES[kind]
    seq_kind = _HDR.pack(0, 0, seq, code)[8:]
    return _HDR.pack(len(payload), crc(seq_kind, payload), seq, code) + payload


def scan(data: bytes, *, min_seq: int = -1) -> Scan:
    """Parse a whole segment file."""
    if not data.startswith(MAGIC):
        torn = MAGIC.startswith(data)  # an empty or half-written header
        return Scan([], 0, "bad magic (not a spool segment)", torn)
    view = memoryview(data)
    off = len(MAGIC)
    out: list[tuple[int, int, str, int]] = []
    prev = min_seq
    while off < len(data):
        if len(data) - off < HEADER_BYTES:
            return Scan(out, off, f"truncated record header at byte {off}", True)
        length, checksum, seq, code = unpack_header(data, off)
        end = off + HEADER_BYTES + length
        if length > MAX_RECORD_BYTES or end > len(data):
            return Scan(out, off, f"record at byte {off} runs past the end of the file", True)
        if crc(view[off + 8:off + HEADER_BYTES], view[off + HEADER_BYTES:end]) != checksum:
            return Scan(out, off, f"CRC mismatch in record at byte {off}", end == len(data))
        kind = CODE_KINDS.get(code)
        if kind is None:
            return Scan(out, off, f"unknown kind code {code} at byte {off}", False)
        if seq <= prev:
            return Scan(out, off, f"sequence goes backwards at byte {off} ({seq} after {prev})", False)
        prev = seq
        out.append((off, seq, kind, end - off))
        off = end
    return Scan(out, off, None, False)


def write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


@dataclass(slots=True)
class Segment:
    """What the spool knows of one segment file (``size``: its valid bytes, magic included)."""

    id: int
    path: Path
    size: int
    records: int = 0
    metrics: int = 0
    first_seq: int | None = None
    last_seq: int | None = None

    def add(self, seq: int, kind: str, size: int) -> None:
        self.size += size
        self.records += 1
        self.metrics += kind in DROPPABLE
        if self.first_seq is None:
            self.first_seq = seq
        self.last_seq = seq


def quarantine(spool_dir: Path, quarantine_dir: Path, path: Path, reason: str, *, keep: bytes) -> bool:
    """Move a damaged segment aside and put its valid prefix ``keep`` back in its place. False when
    the state dir cannot take it (full, read-only): the file then stays as it is (logged)."""
    target = quarantine_dir / f"{path.name}.{time.time_ns()}"
    tmp: str | None = None
    try:
        quarantine_dir.mkdir(exist_ok=True, mode=0o700)
        if keep:
            # The prefix is written before anything moves: a disk without room for it leaves the
            # damaged file in place rather than moved aside with nothing in its stead.
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=spool_dir)
            try:
                write_all(fd, keep)
                os.fsync(fd)
            finally:
                os.close(fd)
        path.replace(target)
        if tmp is not None:
            os.replace(tmp, path)
            tmp = None
        fsync_dir(spool_dir)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        log.error("spool.segment_damaged", segment=str(path), reason=reason, **describe(exc),
                  consequence="left in place (state dir full or read-only); only its valid prefix is read")
        return False
    log.error("spool.segment_quarantined", segment=str(path), moved_to=str(target), reason=reason,
              kept_valid_prefix_bytes=len(keep))
    return True


@dataclass(slots=True)
class Recovered:
    segments: list[Segment]
    next_id: int  # above every segment file's id, readable or not
    last_seq: int  # the newest record's, -1 when none
    pending: int  # records above the cursor's acked_seq
    quarantined: int


def recover(spool_dir: Path, quarantine_dir: Path, acked_seq: int) -> Recovered:
    """Scan a spool's segments in id order and repair what a crash or damage left (the rules:
    :mod:`agent.report.spool`). Never raises for a full or read-only state dir."""
    segments: list[Segment] = []
    next_id, pending, quarantined = 1, 0, 0
    prev_last = -1
    paths = sorted(spool_dir.glob("*.seg"))
    for path in paths:
        try:
            seg_id = int(path.stem, 16)
        except ValueError:
            quarantined += quarantine(spool_dir, quarantine_dir, path, "unexpected segment file name",
                                      keep=b"")
            continue
        next_id = max(next_id, seg_id + 1)
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.error("spool.segment_unreadable", segment=str(path), **describe(exc))
            continue
        found = scan(data, min_seq=prev_last)
        if found.error is not None:
            good = found.good_bytes
            if path == paths[-1] and found.torn:
                log.warning("spool.torn_tail_truncated", segment=str(path), at_byte=good,
                            lost_bytes=len(data) - good, reason=found.error)
                try:
                    if not found.records:
                        path.unlink()
                        continue
                    os.truncate(path, good)
                except OSError as exc:  # read-only: read the valid prefix, append to a new segment
                    log.error("spool.repair_failed", segment=str(path), **describe(exc))
                    if not found.records:
                        continue
            else:
                # Moved aside with its valid prefix put back; or, where the state dir cannot
                # take that, left as it is: either way only the valid prefix is used.
                keep = data[:good] if found.records else b""
                quarantined += quarantine(spool_dir, quarantine_dir, path, found.error, keep=keep)
                if not found.records:
                    continue
        seg = Segment(seg_id, path, len(MAGIC))
        for _off, seq, kind, size in found.records:
            seg.add(seq, kind, size)
            pending += seq > acked_seq
        if seg.last_seq is not None:
            prev_last = seg.last_seq
        segments.append(seg)
    return Recovered(segments, next_id, prev_last, pending, quarantined)


@dataclass(slots=True)
class SyncJob:
    """Blocking half of a sync: safe to run in a worker thread. Never raises ``OSError``: what
    failed is left in ``error`` / ``cursor_failed`` for :meth:`agent.report.spool.Spool.finish_sync`."""

    fd: int | None  # a dup of the active segment's fd, closed by run()
    cursor_path: Path
    cursor: bytes | None  # new cursor contents, or None when unchanged
    error: OSError | None = None
    cursor_failed: bool = False

    def run(self) -> None:
        if self.fd is not None:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                self.error = exc
            finally:
                os.close(self.fd)
                self.fd = None
        if self.cursor is not None:
            try:
                write_small_state(self.cursor_path, self.cursor)
            except OSError as exc:
                self.error = self.error or exc
                self.cursor_failed = True
