"""Store-and-forward spool: a bounded, crash-safe, ordered on-disk queue of encoded wire messages.

Layout under ``<state_dir>/spool/``::

    0000000000000001.seg   segment files, append-only, replayed in id order
    0000000000000002.seg
    cursor                 {"acked_seq": N, "dropped_unreported": M[, "dropped_other_unreported": K]}
                           (tmp + fsync + rename; on a full disk rewritten in place)
    quarantine/            corrupt segments, moved aside with a timestamp suffix

Segments hold CRC-checked records in strictly increasing ``seq`` order (the format:
:mod:`agent.report.segment`), so "acknowledged up to seq N" is the whole cursor: it survives
compaction (which rewrites segments and moves offsets) unchanged.

Recovery on open: a torn last record of the newest segment (``kill -9``/power loss mid-write) is
truncated away. Any other damage (bad magic, bad CRC followed by more data, seq going backwards)
moves the segment to ``quarantine/``, keeps its valid prefix as the segment, and is logged; it is
never fatal. Where the state dir cannot take that repair (full or read-only), the file is left as
it is and only its valid prefix is read.

Quota: when appending would exceed ``quota_bytes``, fully acknowledged segments are deleted, then
the oldest segment that holds metrics is compacted (its metrics and acknowledged records removed,
everything else kept in order). Dropped metrics are counted (``dropped_unreported`` is persisted
until the reporter has told the coordinator). Events, actions and other non-metrics records are
never dropped while the disk has room: they may push the spool past its quota.

Full or read-only state dir (issue 17): :meth:`Spool.append` never raises for the disk.

* On a full disk (ENOSPC/EDQUOT) the spool sheds its own records, oldest first, until the new one
  fits: acknowledged segments, then the oldest segment whole, whatever it holds (compacting it
  would need room the disk does not have). Every unacknowledged record shed is counted in
  ``dropped_metrics`` / ``dropped_other`` (non-metrics) and their ``*_unreported`` halves, which
  the reporter sends in its ``report.spool_dropped`` event and its ``status``.
* What the disk cannot take even so (nothing left to shed, a read-only filesystem, EIO) is held
  in a memory tail, after every record on disk, and read and acknowledged like the rest (the
  reporter still publishes while the broker is up). It is bounded by ``memory_bytes``: past it
  its oldest metrics record goes (its oldest record, when it holds no metrics), counted the same
  way. The disk is tried again at most every ``retry_s``, the tail written out first, so the order
  on disk stays the order of ``seq``.
* A crash loses the memory tail, uncounted, and the unreported drop counts unless the cursor
  could be written (on a full disk it is, in place: :func:`agent.fsutil.write_small_state`).
  Failing writes are logged once per streak (:class:`agent.fsutil.FailureStreak`).

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
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from agent.fsutil import NO_SPACE, FailureStreak, atomic_write, describe, fsync_dir
from agent.report.segment import (
    CODE_KINDS,
    DROPPABLE,
    HEADER_BYTES,
    KIND_CODES,
    MAGIC,
    Segment,
    SyncJob,
    crc,
    encode_record,
    quarantine,
    recover,
    scan,
    unpack_header,
    write_all,
)

__all__ = ["DEFAULT_MEMORY_BYTES", "KIND_CODES", "MAGIC", "Spool", "SpoolRecord", "SyncJob", "encode_record"]

#: Default bound of the memory tail (records the disk could not take), capped by the quota.
DEFAULT_MEMORY_BYTES: Final = 16 * 1024 * 1024

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    seq: int
    kind: str
    payload: bytes


@dataclass(frozen=True, slots=True, eq=False)  # compared by identity: deque.remove() of one record
class _Held:
    """A record of the memory tail: encoded as it will go to disk."""

    seq: int
    kind: str
    record: bytes


class Spool:
    """See the module docstring. Construction scans and repairs the directory (blocking)."""

    def __init__(self, directory: Path | str, *, quota_bytes: int, segment_bytes: int,
                 memory_bytes: int | None = None, retry_s: float = 5.0) -> None:
        self.dir = Path(directory)
        self.quarantine_dir = self.dir / "quarantine"
        self.quota_bytes = quota_bytes
        # Quota enforcement works a segment at a time: keep segments small relative to the quota.
        self.segment_bytes = max(4096, min(segment_bytes, quota_bytes // 8))
        self.memory_bytes = min(quota_bytes, DEFAULT_MEMORY_BYTES) if memory_bytes is None else memory_bytes
        self.retry_s = retry_s
        self._cursor_path = self.dir / "cursor"
        self._segments: list[Segment] = []
        self._next_id = 1
        self._fd: int | None = None  # append fd of the active (last) segment
        self.acked_seq = -1
        self.dropped_unreported = 0
        self.dropped_other_unreported = 0
        self.dropped_metrics = 0  # since open
        self.dropped_other = 0  # non-metrics records shed (full or unwritable disk) since open
        self.quarantined = 0  # segments moved aside since open
        self.sheds = 0  # segments deleted whole (with unacknowledged records) for a full disk since open
        self.pending = 0  # records not yet acknowledged
        self._read_seg = 0
        self._read_off = len(MAGIC)
        self._read_seq = -1
        self._inflight: deque[int] = deque()  # read but not yet acknowledged, in order
        self._held: deque[_Held] = deque()  # the memory tail: after every record on disk
        self._held_bytes = 0
        self._retry_at = 0.0
        self._shed_log_at = 0.0
        self._saved_cursor: bytes | None = None
        self._last_seq = -1
        self._dirty = False
        self._append_failures = FailureStreak(
            "spool.disk_write_failed", log, dir=str(self.dir),
            consequence="records are kept in memory (bounded, oldest dropped and counted) and published "
                        "from there; the disk is retried")
        self._sync_failures = FailureStreak("spool.sync_failed", log, dir=str(self.dir))
        self._delete_failures = FailureStreak("spool.delete_failed", log, dir=str(self.dir))
        self._open()

    # ------------------------------------------------------------------ open / recovery
    def _open(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:  # appends will find out and keep records in memory
            log.error("spool.dir_unusable", dir=str(self.dir), **describe(exc))
        self._load_cursor()
        found = recover(self.dir, self.quarantine_dir, self.acked_seq)
        self._segments, self._next_id, self.pending = found.segments, found.next_id, found.pending
        self.quarantined += found.quarantined
        self._last_seq = max(found.last_seq, self.acked_seq)
        self.rewind()
        if self.pending:
            log.info("spool.opened", dir=str(self.dir), segments=len(self._segments), pending=self.pending,
                     bytes=self.used_bytes, acked_seq=self.acked_seq)

    def _load_cursor(self) -> None:
        try:
            raw = self._cursor_path.read_bytes()
            doc = json.loads(raw)
            self.acked_seq = int(doc["acked_seq"])
            self.dropped_unreported = int(doc.get("dropped_unreported", 0))
            self.dropped_other_unreported = int(doc.get("dropped_other_unreported", 0))
            self._saved_cursor = raw
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Replaying everything is safe (receivers dedupe); losing records is not.
            log.warning("spool.cursor_unreadable", file=str(self._cursor_path), **describe(exc),
                        consequence="replaying every spooled record")

    # ------------------------------------------------------------------ properties
    @property
    def used_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    @property
    def held_bytes(self) -> int:
        """Bytes of the memory tail (records the disk could not take)."""
        return self._held_bytes

    @property
    def degraded(self) -> bool:
        """Whether the disk is failing the spool (records kept in memory, or the last write failed)."""
        return bool(self._held) or self._append_failures.failing

    @property
    def last_seq(self) -> int:
        """Highest sequence number ever stored here (or acknowledged), -1 when none."""
        return self._last_seq

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    # ------------------------------------------------------------------ append
    def append(self, seq: int, kind: str, payload: bytes) -> bool:
        """Append one encoded message. False when it was a metrics record dropped for the quota.

        Never raises for the disk: what the disk cannot take is kept in memory (module docstring).
        """
        if seq <= self.last_seq:
            raise ValueError(f"spool sequence must increase: {seq} after {self.last_seq}")
        record = encode_record(seq, kind, payload)
        if self._disk_usable():
            try:
                stored = self._store(seq, kind, record)
            except OSError as exc:
                self._disk_failed(exc)
            else:
                self._append_failures.succeeded(pending=self.pending)
                self._last_seq = seq
                self.pending += stored
                return stored
        self._hold(_Held(seq, kind, record))
        return True

    def _disk_usable(self) -> bool:
        """Whether to write to disk now: always while it works; while it fails, once per ``retry_s``,
        and only after the memory tail (older than anything new) has gone to disk first."""
        if not self._held and not self._append_failures.failing:
            return True
        if time.monotonic() < self._retry_at:
            return False
        while self._held:
            held = self._held[0]
            try:
                stored = self._store(held.seq, held.kind, held.record)
            except OSError as exc:
                self._disk_failed(exc)
                return False
            self._held.popleft()
            self._held_bytes -= len(held.record)
            if not stored:  # a metrics record the quota dropped (counted)
                self._forget(held.seq)
        return True

    def _disk_failed(self, exc: OSError) -> None:
        self._retry_at = time.monotonic() + self.retry_s
        self._append_failures.failed(exc, held=len(self._held), pending=self.pending)

    def _hold(self, held: _Held) -> None:
        self._held.append(held)
        self._held_bytes += len(held.record)
        self._last_seq = held.seq
        self.pending += 1
        while self._held_bytes > self.memory_bytes and len(self._held) > 1:
            victim = next((h for h in self._held if h.kind in DROPPABLE), self._held[0])
            self._held.remove(victim)
            self._held_bytes -= len(victim.record)
            self._forget(victim.seq)
            self._count_dropped(int(victim.kind in DROPPABLE), int(victim.kind not in DROPPABLE))

    def _forget(self, seq: int) -> None:
        """A pending record is gone without being acknowledged."""
        self.pending -= 1
        if seq in self._inflight:
            self._inflight.remove(seq)

    def _store(self, seq: int, kind: str, record: bytes) -> bool:
        """Write one record to disk (quota rules first); on a full disk shed the oldest segments
        until it fits. False: a metrics record dropped for the quota. Raises OSError otherwise."""
        while True:
            try:
                return self._store_once(seq, kind, record)
            except OSError as exc:
                if exc.errno not in NO_SPACE or not self._shed_oldest():
                    raise

    def _store_once(self, seq: int, kind: str, record: bytes) -> bool:
        self._make_room(len(record))
        if self.used_bytes + len(record) > self.quota_bytes and kind in DROPPABLE:
            self._count_dropped(1)
            return False
        seg = self._segments[-1] if self._segments else None
        if seg is None or self._fd is None or (seg.size + len(record) > self.segment_bytes and seg.records):
            seg = self._roll()
        if self._fd is None:
            raise RuntimeError("spool has no active segment after a roll")
        try:
            write_all(self._fd, record)
        except OSError:
            # A torn record would hide every later record of the segment from readers: cut it off.
            try:
                os.ftruncate(self._fd, seg.size)
            except OSError:
                self._close_fd(fsync=False)  # never append after it; the reader stops at seg.size
            raise
        seg.add(seq, kind, len(record))
        self._dirty = True
        return True

    def _roll(self) -> Segment:
        self._close_fd(fsync=True)
        new_id = self._next_id
        self._next_id += 1  # even when this fails: an id is never tried twice
        path = self.dir / f"{new_id:016x}.seg"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            write_all(fd, MAGIC)
            fsync_dir(self.dir)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self._fd = fd
        seg = Segment(new_id, path, len(MAGIC))
        self._segments.append(seg)
        return seg

    def _close_fd(self, *, fsync: bool) -> None:
        if self._fd is not None:
            try:
                if fsync:
                    os.fsync(self._fd)
            finally:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None

    def _count_dropped(self, metrics: int, other: int = 0) -> None:
        self.dropped_metrics += metrics
        self.dropped_unreported += metrics
        self.dropped_other += other
        self.dropped_other_unreported += other

    def take_dropped_unreported(self) -> int:
        """The count of dropped metrics not yet reported; resets it (persisted at the next sync)."""
        n, self.dropped_unreported = self.dropped_unreported, 0
        return n

    def take_unreported(self) -> tuple[int, int]:
        """(metrics, other records) dropped and not yet reported; resets both."""
        other, self.dropped_other_unreported = self.dropped_other_unreported, 0
        return self.take_dropped_unreported(), other

    # ------------------------------------------------------------------ quota, shedding
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
                try:
                    seg.path.unlink(missing_ok=True)
                except OSError as exc:  # read-only: it stays, acknowledged; tried again at the next sync
                    self._delete_failures.failed(exc, segment=str(seg.path))
                    continue
                self._delete_failures.succeeded()
                self._segments.remove(seg)
                deleted = True
        return deleted

    def _compact(self, seg: Segment) -> None:
        data = seg.path.read_bytes()
        keep = bytearray(MAGIC)
        new = Segment(seg.id, seg.path, len(MAGIC))
        dropped: set[int] = set()
        for off, seq, kind, size in scan(data).records:
            if seq <= self.acked_seq:
                continue
            if kind in DROPPABLE:
                dropped.add(seq)
                continue
            keep += data[off:off + size]
            new.add(seq, kind, size)
        idx = self._segments.index(seg)
        if new.records:
            atomic_write(seg.path, bytes(keep))  # may fail on a full disk: nothing has changed yet
            self._segments[idx] = new
        else:
            seg.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                fsync_dir(self.dir)
            del self._segments[idx]
        self._count_dropped(len(dropped))
        self.pending -= len(dropped)
        if dropped and self._inflight:
            self._inflight = deque(s for s in self._inflight if s not in dropped)
        if self._read_seg == seg.id:
            self._read_off = len(MAGIC)  # offsets moved: re-read, skipping what was already read
        log.warning("spool.quota_dropped_metrics", segment=str(seg.path), dropped=len(dropped),
                    kept=new.records, quota_bytes=self.quota_bytes)

    def _shed_oldest(self) -> bool:
        """Free disk space on a full disk: acknowledged segments, else the oldest segment whole
        (each unacknowledged record counted as dropped). False when there is nothing to delete."""
        if self._delete_acked():
            return True
        if not self._segments or not self._segments[0].records:
            return False  # nothing, or only the empty segment just rolled for this very record
        seg = self._segments[0]
        try:
            data = seg.path.read_bytes()[:seg.size]
        except OSError:
            data = b""
        unacked = [(seq, kind) for _off, seq, kind, _size in scan(data).records if seq > self.acked_seq]
        if seg is self._segments[-1]:
            self._close_fd(fsync=False)
        seg.path.unlink(missing_ok=True)  # on a full disk an unlink still works; if not, nothing changed
        self._segments.remove(seg)
        metrics = sum(kind in DROPPABLE for _seq, kind in unacked)
        self._count_dropped(metrics, len(unacked) - metrics)
        gone = {seq for seq, _kind in unacked}
        self.pending -= len(gone)
        if gone and self._inflight:
            self._inflight = deque(s for s in self._inflight if s not in gone)
        self.sheds += 1
        self._log_shed()
        return True

    def _log_shed(self) -> None:
        """A disk that stays full sheds again and again: one line, then at most one a minute."""
        now = time.monotonic()
        if now >= self._shed_log_at:
            self._shed_log_at = now + 60.0
            log.warning("spool.disk_full_shed", dir=str(self.dir), dropped_metrics=self.dropped_metrics,
                        dropped_other=self.dropped_other, remaining_segments=len(self._segments))

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
        for held in self._held:  # the memory tail comes after every record on disk
            if len(out) >= max_records:
                break
            if held.seq > self._read_seq:
                self._read_seq = held.seq
                self._inflight.append(held.seq)
                out.append(SpoolRecord(held.seq, held.kind, held.record[HEADER_BYTES:]))
        return out

    def _read_from(self, seg: Segment, max_records: int, out: list[SpoolRecord]) -> None:
        with seg.path.open("rb") as f:
            f.seek(self._read_off)
            data = f.read(seg.size - self._read_off)
        view = memoryview(data)
        off = 0
        while off < len(data) and len(out) < max_records:
            length, checksum, seq, code = unpack_header(data, off)
            end = off + HEADER_BYTES + length
            if end > len(data) or checksum != crc(view[off + 8:off + HEADER_BYTES],
                                                  view[off + HEADER_BYTES:end]):
                self._quarantine_at_runtime(seg, f"CRC mismatch at byte {self._read_off + off} while reading")
                return
            off = end
            if seq <= self._read_seq:
                continue
            self._read_seq = seq
            self._inflight.append(seq)
            out.append(SpoolRecord(seq, CODE_KINDS.get(code, "event"), bytes(view[end - length:end])))
        self._read_off += off

    def _quarantine_at_runtime(self, seg: Segment, reason: str) -> None:
        if seg is self._segments[-1]:
            self._close_fd(fsync=False)
        # Unreadable either way: if it cannot be moved aside now, the next open finds it again.
        self.quarantined += quarantine(self.dir, self.quarantine_dir, seg.path, reason, keep=b"")
        self._segments.remove(seg)
        self.pending = max(0, self.pending - seg.records)
        self._read_seg, self._read_off = seg.id + 1, len(MAGIC)

    def ack(self, seq: int) -> None:
        """Records up to and including ``seq`` (which was read) are delivered."""
        while self._inflight and self._inflight[0] <= seq:
            self._inflight.popleft()
            self.pending -= 1
        while self._held and self._held[0].seq <= seq:
            self._held_bytes -= len(self._held.popleft().record)
        self.acked_seq = max(self.acked_seq, seq)

    # ------------------------------------------------------------------ durability
    def _cursor_bytes(self) -> bytes:
        doc = {"acked_seq": self.acked_seq, "dropped_unreported": self.dropped_unreported}
        if self.dropped_other_unreported:
            doc["dropped_other_unreported"] = self.dropped_other_unreported
        return json.dumps(doc, sort_keys=True).encode()

    def prepare_sync(self) -> SyncJob | None:
        """Collect what needs to reach the disk; run the returned job (maybe in a thread), then
        hand it to :meth:`finish_sync` on this thread."""
        self._delete_acked()
        cursor = self._cursor_bytes()
        changed = cursor != self._saved_cursor
        if not self._dirty and not changed:
            return None
        fd = None
        if self._fd is not None and self._dirty:
            try:
                fd = os.dup(self._fd)
            except OSError as exc:
                self._sync_failures.failed(exc)
        self._dirty = False
        if changed:
            self._saved_cursor = cursor
        return SyncJob(fd, self._cursor_path, cursor if changed else None)

    def finish_sync(self, job: SyncJob) -> None:
        """Log how a job went (once per failure streak); a cursor not written is written next time."""
        if job.cursor_failed:
            self._saved_cursor = None
        if job.error is not None:
            self._sync_failures.failed(job.error, cursor=str(self._cursor_path))
        else:
            self._sync_failures.succeeded()

    def sync(self) -> None:
        """Blocking sync in the calling thread."""
        job = self.prepare_sync()
        if job is not None:
            job.run()
            self.finish_sync(job)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sync()
        with contextlib.suppress(OSError):
            self._close_fd(fsync=False)
