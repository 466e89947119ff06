"""Store-and-forward spool: a bounded, crash-safe, ordered on-disk queue of encoded wire messages.

Layout under ``<state_dir>/spool/``::

    0000000000000001.seg   segment files, append-only, replayed in id order
    0000000000000002.seg
    cursor                 {"acked_seq": N, "dropped_unreported": M}  (tmp + fsync + rename)
    quarantine/            corrupt segments, moved aside with a timestamp suffix

A segment starts with the 8-byte magic ``HSPOOL1\\n`` followed by records::

    u32 length | u32 crc32 | u64 seq | u8 kind | payload (length bytes)      little-endian

``crc32`` covers ``seq``, ``kind`` and the payload. ``seq`` is the message's wire sequence number;
records are appended in strictly increasing ``seq`` order, so "acknowledged up to seq N" is the
whole cursor: it survives compaction (which rewrites segments and moves offsets) unchanged.

Recovery on open: a torn last record of the newest segment (``kill -9``/power loss mid-write) is
truncated away. Any other damage (bad magic, bad CRC followed by more data, seq going backwards)
moves the segment to ``quarantine/``, keeps its valid prefix as the segment, and is logged; it is
never fatal.

Quota: when appending would exceed ``quota_bytes``, fully acknowledged segments are deleted, then
the oldest segment that holds metrics is compacted (its metrics and acknowledged records removed,
everything else kept in order). Dropped metrics are counted (``dropped_unreported`` is persisted
until the reporter has told the coordinator). Events, actions and other non-metrics records are
never dropped while the disk has room: they may push the spool past its quota.

Durability: records are written with ``os.write`` (in the page cache at once, so they survive
``kill -9``); :meth:`Spool.prepare_sync` / :class:`SyncJob` fsync the active segment and persist the
cursor from a worker thread (the reporter does it once a second, i.e. power loss can cost about a
second of reports). The cursor is persisted lazily, so a crash may replay up to a second of
already acknowledged records: receivers dedupe by ``(node, seq)``.

Threading: every method except :meth:`SyncJob.run` must be called from one thread (the event
loop). ``SyncJob.run`` works on a duplicated fd and plain values, so it may run in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from agent.fsutil import atomic_write, fsync_dir

MAGIC: Final = b"HSPOOL1\n"
_HDR: Final = struct.Struct("<IIQB")
HEADER_BYTES: Final = _HDR.size
MAX_RECORD_BYTES: Final = 256 * 1024 * 1024

#: Stable on-disk codes of message kinds (never renumber: old spools must stay readable).
KIND_CODES: Final[dict[str, int]] = {
    "birth": 1, "status": 2, "metrics": 3, "risk": 4, "event": 5, "action": 6, "command": 7,
    "command_ack": 8,
}
_CODE_KINDS: Final[dict[int, str]] = {code: kind for kind, code in KIND_CODES.items()}
DROPPABLE: Final = frozenset({"metrics"})

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    seq: int
    kind: str
    payload: bytes


@dataclass(slots=True)
class _Segment:
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


@dataclass(slots=True)
class _Scan:
    records: list[tuple[int, int, str, int]]  # (offset, seq, kind, total size)
    good_bytes: int  # end of the valid prefix
    error: str | None  # None: the whole file is valid
    torn: bool  # the error is a tail that a crash mid-append can leave


def _crc(seq_kind: bytes | memoryview, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(seq_kind))


def encode_record(seq: int, kind: str, payload: bytes) -> bytes:
    code = KIND_CODES[kind]
    seq_kind = _HDR.pack(0, 0, seq, code)[8:]
    return _HDR.pack(len(payload), _crc(seq_kind, payload), seq, code) + payload


def _scan(data: bytes, *, min_seq: int = -1) -> _Scan:
    """Parse a whole segment file."""
    if not data.startswith(MAGIC):
        torn = MAGIC.startswith(data)  # an empty or half-written header
        return _Scan([], 0, "bad magic (not a spool segment)", torn)
    view = memoryview(data)
    off = len(MAGIC)
    out: list[tuple[int, int, str, int]] = []
    prev = min_seq
    while off < len(data):
        if len(data) - off < HEADER_BYTES:
            return _Scan(out, off, f"truncated record header at byte {off}", True)
        length, crc, seq, code = _HDR.unpack_from(data, off)
        end = off + HEADER_BYTES + length
        if length > MAX_RECORD_BYTES or end > len(data):
            return _Scan(out, off, f"record at byte {off} runs past the end of the file", True)
        if _crc(view[off + 8:off + HEADER_BYTES], view[off + HEADER_BYTES:end]) != crc:
            return _Scan(out, off, f"CRC mismatch in record at byte {off}", end == len(data))
        kind = _CODE_KINDS.get(code)
        if kind is None:
            return _Scan(out, off, f"unknown kind code {code} at byte {off}", False)
        if seq <= prev:
            return _Scan(out, off, f"sequence goes backwards at byte {off} ({seq} after {prev})", False)
        prev = seq
        out.append((off, seq, kind, end - off))
        off = end
    return _Scan(out, off, None, False)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


@dataclass(slots=True)
class SyncJob:
    """Blocking half of a sync: safe to run in a worker thread."""

    fd: int | None  # a dup of the active segment's fd, closed by run()
    cursor_path: Path
    cursor: bytes | None  # new cursor contents, or None when unchanged

    def run(self) -> None:
        try:
            if self.fd is not None:
                os.fsync(self.fd)
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
        if self.cursor is not None:
            atomic_write(self.cursor_path, self.cursor)


class Spool:
    """See the module docstring. Construction scans and repairs the directory (blocking)."""

    def __init__(self, directory: Path | str, *, quota_bytes: int, segment_bytes: int) -> None:
        self.dir = Path(directory)
        self.quarantine_dir = self.dir / "quarantine"
        self.quota_bytes = quota_bytes
        # Quota enforcement works a segment at a time: keep segments small relative to the quota.
        self.segment_bytes = max(4096, min(segment_bytes, quota_bytes // 8))
        self._cursor_path = self.dir / "cursor"
        self._segments: list[_Segment] = []
        self._fd: int | None = None  # append fd of the active (last) segment
        self.acked_seq = -1
        self.dropped_unreported = 0
        self.dropped_metrics = 0  # since open
        self.quarantined = 0  # segments moved aside since open
        self.pending = 0  # records not yet acknowledged
        self._read_seg = 0
        self._read_off = len(MAGIC)
        self._read_seq = -1
        self._inflight: deque[int] = deque()  # read but not yet acknowledged, in order
        self._saved_cursor: bytes | None = None
        self._last_seq = -1
        self._dirty = False
        self._open()

    # ------------------------------------------------------------------ open / recovery
    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._load_cursor()
        prev_last = -1
        paths = sorted(self.dir.glob("*.seg"))
        for path in paths:
            try:
                seg_id = int(path.stem, 16)
            except ValueError:
                self._quarantine(path, "unexpected segment file name", keep=b"")
                continue
            data = path.read_bytes()
            scan = _scan(data, min_seq=prev_last)
            if scan.error is not None:
                if path == paths[-1] and scan.torn:
                    log.warning("spool.torn_tail_truncated", segment=str(path), at_byte=scan.good_bytes,
                                lost_bytes=len(data) - scan.good_bytes, reason=scan.error)
                    if not scan.records:
                        path.unlink()
                        continue
                    os.truncate(path, scan.good_bytes)
                else:
                    self._quarantine(path, scan.error, keep=data[:scan.good_bytes] if scan.records else b"")
                    if not scan.records:
                        continue
            seg = _Segment(seg_id, path, len(MAGIC))
            for _off, seq, kind, size in scan.records:
                seg.add(seq, kind, size)
                self.pending += seq > self.acked_seq
            if seg.last_seq is not None:
                prev_last = seg.last_seq
            self._segments.append(seg)
        self._last_seq = max(prev_last, self.acked_seq)
        self.rewind()
        if self.pending:
            log.info("spool.opened", dir=str(self.dir), segments=len(self._segments), pending=self.pending,
                     bytes=self.used_bytes, acked_seq=self.acked_seq)

    def _load_cursor(self) -> None:
        try:
            raw = self._cursor_path.read_bytes()
        except FileNotFoundError:
            return
        try:
            doc = json.loads(raw)
            self.acked_seq = int(doc["acked_seq"])
            self.dropped_unreported = int(doc.get("dropped_unreported", 0))
            self._saved_cursor = raw
        except (ValueError, KeyError, TypeError) as exc:
            # Replaying everything is safe (receivers dedupe); losing records is not.
            log.warning("spool.cursor_unreadable", file=str(self._cursor_path), error=str(exc),
                        consequence="replaying every spooled record")

    def _quarantine(self, path: Path, reason: str, *, keep: bytes) -> None:
        self.quarantine_dir.mkdir(exist_ok=True, mode=0o700)
        target = self.quarantine_dir / f"{path.name}.{time.time_ns()}"
        path.replace(target)
        self.quarantined += 1
        log.error("spool.segment_quarantined", segment=str(path), moved_to=str(target), reason=reason,
                  kept_valid_prefix_bytes=len(keep))
        if keep:
            atomic_write(path, keep)
        else:
            fsync_dir(self.dir)

    # ------------------------------------------------------------------ properties
    @property
    def used_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    @property
    def last_seq(self) -> int:
        """Highest sequence number ever stored here (or acknowledged), -1 when none."""
        return self._last_seq

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    # ------------------------------------------------------------------ append
    def _active(self, need: int) -> tuple[_Segment, int]:
        seg = self._segments[-1] if self._segments else None
        if seg is None or self._fd is None or (seg.size + need > self.segment_bytes and seg.records):
            seg = self._roll()
        if self._fd is None:
            raise RuntimeError("spool has no active segment after a roll")
        return seg, self._fd

    def _roll(self) -> _Segment:
        self._close_fd(fsync=True)
        new_id = self._segments[-1].id + 1 if self._segments else 1
        path = self.dir / f"{new_id:016x}.seg"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        _write_all(fd, MAGIC)
        self._fd = fd
        fsync_dir(self.dir)
        seg = _Segment(new_id, path, len(MAGIC))
        self._segments.append(seg)
        return seg

    def _close_fd(self, *, fsync: bool) -> None:
        if self._fd is not None:
            try:
                if fsync:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None

    def append(self, seq: int, kind: str, payload: bytes) -> bool:
        """Append one encoded message. False when it was a metrics record dropped for the quota."""
        if seq <= self.last_seq:
            raise ValueError(f"spool sequence must increase: {seq} after {self.last_seq}")
        record = encode_record(seq, kind, payload)
        self._make_room(len(record))
        if self.used_bytes + len(record) > self.quota_bytes and kind in DROPPABLE:
            self._count_dropped(1)
            return False
        seg, fd = self._active(len(record))
        _write_all(fd, record)
        seg.add(seq, kind, len(record))
        self._last_seq = seq
        self.pending += 1
        self._dirty = True
        return True

    def _count_dropped(self, n: int) -> None:
        if n:
            self.dropped_metrics += n
            self.dropped_unreported += n

    def take_dropped_unreported(self) -> int:
        """The count of dropped metrics not yet reported; resets it (persisted at the next sync)."""
        n, self.dropped_unreported = self.dropped_unreported, 0
        return n

    # ------------------------------------------------------------------ quota
    def _make_room(self, need: int) -> None:
        while self.used_bytes + need > self.quota_bytes:
            if self._delete_acked():
                continue
            victim = next((s for s in self._segments if s.metrics), None)
            if victim is None:
                return
            if victim is self._segments[-1]:
                self._roll()
            self._compact(victim)

    def _delete_acked(self) -> bool:
        """Delete closed segments whose records are all acknowledged; True if any was."""
        deleted = False
        for seg in list(self._segments[:-1]):
            if seg.last_seq is None or seg.last_seq <= self.acked_seq:
                seg.path.unlink(missing_ok=True)
                self._segments.remove(seg)
                deleted = True
        return deleted

    def _compact(self, seg: _Segment) -> None:
        data = seg.path.read_bytes()
        scan = _scan(data)
        keep = bytearray(MAGIC)
        new = _Segment(seg.id, seg.path, len(MAGIC))
        dropped: set[int] = set()
        for off, seq, kind, size in scan.records:
            if seq <= self.acked_seq:
                continue
            if kind in DROPPABLE:
                dropped.add(seq)
                continue
            keep += data[off:off + size]
            new.add(seq, kind, size)
        self._count_dropped(len(dropped))
        self.pending -= len(dropped)
        if dropped and self._inflight:
            self._inflight = deque(s for s in self._inflight if s not in dropped)
        idx = self._segments.index(seg)
        if new.records:
            atomic_write(seg.path, bytes(keep))
            self._segments[idx] = new
        else:
            seg.path.unlink(missing_ok=True)
            fsync_dir(self.dir)
            del self._segments[idx]
        if self._read_seg == seg.id:
            self._read_off = len(MAGIC)  # offsets moved: re-read, skipping what was already read
        log.warning("spool.quota_dropped_metrics", segment=str(seg.path), dropped=len(dropped),
                    kept=new.records, quota_bytes=self.quota_bytes)

    # ------------------------------------------------------------------ read / ack
    def rewind(self) -> None:
        """Restart reading at the first unacknowledged record (after a lost connection)."""
        self._read_seg = self._segments[0].id if self._segments else 0
        self._read_off = len(MAGIC)
        self._read_seq = self.acked_seq
        self._inflight.clear()

    def read(self, max_records: int) -> list[SpoolRecord]:
        """The next records after the last one read, oldest first (possibly none)."""
        out: list[SpoolRecord] = []
        while len(out) < max_records:
            seg = next((s for s in self._segments if s.id >= self._read_seg), None)
            if seg is None:
                break
            if seg.id != self._read_seg:
                self._read_seg, self._read_off = seg.id, len(MAGIC)
            if self._read_off >= seg.size:
                if seg is self._segments[-1]:
                    break
                self._read_seg, self._read_off = seg.id + 1, len(MAGIC)
                continue
            self._read_from(seg, max_records, out)
        return out

    def _read_from(self, seg: _Segment, max_records: int, out: list[SpoolRecord]) -> None:
        with seg.path.open("rb") as f:
            f.seek(self._read_off)
            data = f.read(seg.size - self._read_off)
        view = memoryview(data)
        off = 0
        while off < len(data) and len(out) < max_records:
            length, crc, seq, code = _HDR.unpack_from(data, off)
            end = off + HEADER_BYTES + length
            if end > len(data) or _crc(view[off + 8:off + HEADER_BYTES], view[off + HEADER_BYTES:end]) != crc:
                self._quarantine_at_runtime(seg, f"CRC mismatch at byte {self._read_off + off} while reading")
                return
            off = end
            if seq <= self._read_seq:
                continue
            self._read_seq = seq
            self._inflight.append(seq)
            out.append(SpoolRecord(seq, _CODE_KINDS.get(code, "event"), bytes(view[end - length:end])))
        self._read_off += off

    def _quarantine_at_runtime(self, seg: _Segment, reason: str) -> None:
        if seg is self._segments[-1]:
            self._close_fd(fsync=False)
        self._quarantine(seg.path, reason, keep=b"")
        self._segments.remove(seg)
        self.pending = max(0, self.pending - seg.records)
        self._read_seg, self._read_off = seg.id + 1, len(MAGIC)

    def ack(self, seq: int) -> None:
        """Records up to and including ``seq`` (which was read) are delivered."""
        while self._inflight and self._inflight[0] <= seq:
            self._inflight.popleft()
            self.pending -= 1
        self.acked_seq = max(self.acked_seq, seq)

    # ------------------------------------------------------------------ durability
    def _cursor_bytes(self) -> bytes:
        doc = {"acked_seq": self.acked_seq, "dropped_unreported": self.dropped_unreported}
        return json.dumps(doc, sort_keys=True).encode()

    def prepare_sync(self) -> SyncJob | None:
        """Collect what needs to reach the disk; run the returned job (maybe in a thread)."""
        self._delete_acked()
        cursor = self._cursor_bytes()
        changed = cursor != self._saved_cursor
        if not self._dirty and not changed:
            return None
        fd = os.dup(self._fd) if (self._fd is not None and self._dirty) else None
        self._dirty = False
        if changed:
            self._saved_cursor = cursor
        return SyncJob(fd, self._cursor_path, cursor if changed else None)

    def sync(self) -> None:
        """Blocking sync in the calling thread."""
        job = self.prepare_sync()
        if job is not None:
            job.run()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sync()
        self._close_fd(fsync=False)
