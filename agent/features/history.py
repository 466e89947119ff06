"""Bounded on-disk history of feature vectors, for refitting the node's anomaly detector.

Rows are buffered in a preallocated array and written in chunks of ``chunk_rows`` as
``<dir>/<schema digest>-<first wall ms>.npz`` (``wall`` float64, ``x`` float32, atomically:
temporary file, fsync, rename). Chunks older than ``window_s`` are deleted, so the history holds
a rolling window (24 h at 1 Hz with ~250 features is ~90 MB of float32; shorten ``window_s`` or
narrow the schema on small nodes). Chunks written under another schema are ignored (and pruned).

The refit reads the history in a child process (``python -m agent model export-history``),
so the daemon never holds a day of rows in memory.

Writing stays off the per-sample path: :meth:`HistoryWriter.append` only copies the row into
the buffer; a full buffer is queued and a fresh one takes its place, and the daemon writes the
queue from a worker thread (:meth:`HistoryWriter.write_pending`, called by the score stage's
refit task every 30 s). If nobody drains the queue (``MAX_PENDING`` chunks waiting), append
writes them itself rather than hold more memory. Only the appending thread touches the current
buffer (:meth:`HistoryWriter.seal` queues a partial one); a lock serialises the writers.

A full or read-only state dir (issue 17) never stops scoring: a chunk that cannot be written
stays queued and is tried again at the next :meth:`HistoryWriter.write_pending` (every 30 s in
the daemon), the failure logged once per streak. While writes fail, append never writes on the
sample path: past ``MAX_PENDING`` queued chunks the oldest is dropped (counted in
``rows_dropped``), so memory stays bounded and the history that survives is the newest.
"""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog

from agent.features.schema import FeatureSchema
from agent.fsutil import FailureStreak, atomic_write

log = structlog.get_logger("heald.history")
F64 = npt.NDArray[np.float64]
MAX_PENDING = 2  # full chunks queued for the worker before append writes them itself


def _write_npz(path: Path, **arrays: npt.NDArray[np.generic]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    atomic_write(path, buf.getbuffer(), mode=0o644)


class HistoryWriter:
    def __init__(self, directory: str | os.PathLike[str], schema: FeatureSchema, window_s: float,
                 chunk_rows: int = 600) -> None:
        self.dir = Path(directory)
        self.schema = schema
        self.digest = schema.digest
        self.window_s = window_s
        self._chunk_rows = chunk_rows
        self._buf = np.empty((chunk_rows, schema.dim), dtype=np.float32)
        self._wall = np.empty(chunk_rows, dtype=np.float64)
        self._n = 0
        self._pending: list[tuple[npt.NDArray[np.float32], F64]] = []  # full chunks to write
        self._lock = threading.Lock()  # one writer at a time; guards the buffer swap
        self._failures = FailureStreak(
            "feature history not written; rows stay queued and are retried", log, dir=str(self.dir),
            consequence="scoring goes on; the oldest queued rows are dropped past the memory bound")
        self.last_wall: float | None = None
        self.rows_on_disk = 0
        self.rows_dropped = 0  # rows never written: the state dir would not take them in time
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.rows_on_disk = sum(r for _, r in self._chunks())
        except OSError as exc:  # tried again with every write
            self._failures.failed(exc)

    def _chunks(self) -> list[tuple[Path, int]]:
        out = []
        for p in sorted(self.dir.glob(f"{self.digest}-*.npz")):
            try:
                with np.load(p, allow_pickle=False) as z:
                    out.append((p, int(z["wall"].shape[0])))
            except (OSError, ValueError, KeyError):
                continue
        return out

    @property
    def rows(self) -> int:
        """Rows available for training (on disk, queued and buffered)."""
        return self.rows_on_disk + sum(int(w.shape[0]) for _, w in self._pending) + self._n

    @property
    def pending(self) -> int:
        """Full chunks queued for :meth:`write_pending`."""
        return len(self._pending)

    def append(self, wall: float, vec: F64) -> None:
        n = self._n
        self._buf[n] = vec
        self._wall[n] = wall
        self.last_wall = wall
        self._n = n + 1
        if n + 1 == self._chunk_rows:
            with self._lock:
                self._pending.append((self._buf, self._wall))
                self._buf = np.empty_like(self._buf)
                self._wall = np.empty_like(self._wall)
                self._n = 0
            if len(self._pending) > MAX_PENDING:
                if self._failures.failing:  # no disk writes on the sample path while they fail
                    self._drop_oldest()
                else:
                    self.write_pending()

    def _drop_oldest(self) -> None:
        if not self._lock.acquire(blocking=False):  # a worker is writing: never wait on the sample path
            return
        try:
            while len(self._pending) > MAX_PENDING:
                _, wall = self._pending.pop(0)
                self.rows_dropped += int(wall.shape[0])
        finally:
            self._lock.release()

    def write_pending(self) -> None:
        """Write the queued full chunks (from a worker thread in the daemon); a chunk that cannot be
        written stays queued for the next call."""
        with self._lock:
            while self._pending:
                buf, wall = self._pending[0]
                if not self._write(buf, wall):
                    return
                self._pending.pop(0)

    def seal(self) -> None:
        """Queue the buffered rows as a chunk of their own (on the thread that appends)."""
        n = self._n
        if n:
            with self._lock:
                self._pending.append((self._buf[:n].copy(), self._wall[:n].copy()))
                self._n = 0

    def flush(self) -> None:
        """Write every buffered row; prune chunks older than the window."""
        self.seal()
        self.write_pending()

    def _write(self, buf: npt.NDArray[np.float32], wall: F64) -> bool:
        """One chunk to disk (caller holds the lock); False when the state dir would not take it."""
        path = self.dir / f"{self.digest}-{int(wall[0] * 1000):015d}.npz"
        try:
            _write_npz(path, wall=wall, x=buf)  # makes the directory too, should it be gone
        except OSError as exc:
            self._failures.failed(exc, pending_chunks=len(self._pending), rows_dropped=self.rows_dropped)
            return False
        self._failures.succeeded(rows_dropped=self.rows_dropped)
        self.rows_on_disk += int(wall.shape[0])
        self.prune(float(wall[-1]))
        return True

    def prune(self, now_wall: float | None = None) -> None:
        now = time.time() if now_wall is None else now_wall
        cutoff_ms = (now - self.window_s) * 1000.0
        try:
            chunks = sorted(self.dir.glob("*.npz"))
        except OSError:
            return
        for i, p in enumerate(chunks):
            digest, _, start = p.stem.partition("-")
            # A chunk is wholly old when the next chunk of the same schema started before the cutoff.
            nxt = chunks[i + 1].stem.partition("-") if i + 1 < len(chunks) else None
            stale_schema = digest != self.digest
            old = nxt is not None and nxt[0] == digest and start.isdigit() and nxt[2].isdigit() \
                and float(nxt[2]) < cutoff_ms
            if stale_schema or old:
                try:
                    if not stale_schema:
                        with np.load(p, allow_pickle=False) as z:
                            self.rows_on_disk -= int(z["wall"].shape[0])
                    p.unlink()
                except (OSError, ValueError, KeyError):
                    continue


def read(directory: str | os.PathLike[str], digest: str, since_wall: float | None = None,
         ) -> tuple[F64, F64]:
    """All rows of schema ``digest`` (wall >= since_wall), oldest first: (wall (n,), x (n, d))."""
    walls, xs = [], []
    for p in sorted(Path(directory).glob(f"{digest}-*.npz")):
        try:
            with np.load(p, allow_pickle=False) as z:
                w = np.asarray(z["wall"], dtype=np.float64)
                x = np.asarray(z["x"], dtype=np.float64)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("skipping unreadable history chunk", path=str(p), error=str(exc))
            continue
        if since_wall is not None:
            keep = w >= since_wall
            w, x = w[keep], x[keep]
        if w.size:
            walls.append(w)
            xs.append(x)
    if not walls:
        return np.empty(0), np.empty((0, 0))
    return np.concatenate(walls), np.vstack(xs)


def usable_columns(x: F64) -> list[int]:
    """Columns with a finite value in at least half the rows and some variation."""
    keep = []
    for j in range(x.shape[1]):
        col = x[:, j]
        fin = col[np.isfinite(col)]
        if fin.size * 2 >= col.size and fin.size and float(fin.max() - fin.min()) > 0:
            keep.append(j)
    return keep


def export(directory: str | os.PathLike[str], schema: FeatureSchema, out: str | os.PathLike[str],
           since_wall: float | None = None) -> int:
    """Write a detector training file (``train``, ``feature_names``, ``units``) for
    :mod:`agent.score.fit`; returns the row count (0 writes nothing)."""
    wall, x = read(directory, schema.digest, since_wall)
    if wall.size == 0:
        return 0
    keep = usable_columns(x)
    if not keep:
        return 0
    names, units = schema.names, schema.units
    _write_npz(Path(out), train=x[:, keep], feature_names=np.asarray([names[j] for j in keep]),
               units=np.asarray([units[j] for j in keep]), wall=wall)
    return int(wall.size)
