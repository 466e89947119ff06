"""Crash-safe file replacement, shared by every stage that persists state, and what the stages
do when the state directory cannot take a write.

After :func:`atomic_write` returns, ``path`` holds the new bytes durably; a crash at any point
before that leaves the old content (or no file), never a torn one. The temporary file is
created beside ``path`` (same filesystem, so the rename is atomic), fsync'd, renamed over
``path``, and the directory is fsync'd so the rename itself survives a power cut.

Degraded storage (a full or read-only state dir, issue 17): the agent must go on healing when
its own disk is full, so no write under the state dir may stop a stage. Two helpers:

* :func:`write_small_state` is :func:`atomic_write` for the few small state files (counters,
  cursors, the audit head): on a full filesystem (ENOSPC/EDQUOT), where the temporary file cannot
  get a block, it overwrites the existing file's bytes in place instead, which needs no new
  block. A crash cannot tear that one ``pwrite`` (the process dies between system calls), and
  the content is well under one disk sector, which devices write whole; that is weaker than the
  rename only against a device that tears a sector on power loss.
* :class:`FailureStreak` logs a failing write once per streak of failures (an error line), and
  the first success after it once, instead of one line a sample.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import structlog

#: errno values of "the filesystem has no room for this write" (full, or over the user's quota).
NO_SPACE: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes | bytearray | memoryview,
                 mode: int = 0o600) -> Path:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, dest)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(dest.parent)
    return dest


def write_small_state(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace a small state file with ``data``: :func:`atomic_write`, or on a full filesystem an
    in-place overwrite of the existing file (see the module docstring).

    ``data`` must be read back by a parser that ignores trailing ASCII whitespace (a number, JSON):
    an in-place overwrite shorter than the old content blanks the rest with spaces instead of
    truncating. Raises ``OSError`` when neither works (a read-only filesystem; on a full one, no
    file yet or ``data`` past the file's allocated blocks: the old content is then left whole,
    never torn).
    """
    dest = Path(path)
    try:
        atomic_write(dest, data)
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise exc from None  # no file to reuse: the disk is what failed, say so (ENOSPC)
        try:
            st = os.fstat(fd)
            old = st.st_size
            if len(data) > max(old, st.st_blocks * 512):
                # Past the blocks the file already has, the write needs space the disk does not
                # have: a short write would leave new bytes over old ones (a torn file). Leave the
                # old content whole instead. (A counter growing a digit stays in its block.)
                raise
            body = data + b" " * (old - len(data))
            if os.pwrite(fd, body, 0) != len(body):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest)) from exc
            os.fsync(fd)
        finally:
            os.close(fd)


def describe(exc: BaseException) -> dict[str, Any]:
    """Log fields of an error: its text, and its errno name when it has one (``ENOSPC``, ``EROFS``)."""
    fields: dict[str, Any] = {"error": str(exc) or type(exc).__name__}
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        fields["errno"] = errno.errorcode.get(code, str(code))
    return fields


class FailureStreak:
    """One error line per streak of failures of one kind of write, and one line when it recovers.

    A write that fails on every sample (a full disk) logged on every sample buries everything else
    (issue 17: 610 identical errors). :meth:`failed` logs the first failure of a streak at error
    level with ``event`` and the given fields; the failures after it are only counted (and logged
    at debug level); :meth:`succeeded` ends the streak with one info line saying how many
    failures it had and for how long.
    """

    def __init__(self, event: str, logger: Any = None, **fields: Any) -> None:
        self.event = event
        self._log = logger if logger is not None else structlog.get_logger("heald.storage")
        self._fields = fields
        self.failures = 0  # in the current streak
        self.total = 0  # since this object was made
        self._since = 0.0

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, exc: BaseException, **fields: Any) -> bool:
        """Count a failure; True when it started a streak (and was logged as an error)."""
        self.failures += 1
        self.total += 1
        if self.failures == 1:
            self._since = time.monotonic()
            self._log.error(self.event, **self._fields, **describe(exc), **fields)
            return True
        self._log.debug(self.event, **self._fields, **describe(exc), streak=self.failures, **fields)
        return False

    def succeeded(self, **fields: Any) -> None:
        if self.failures:
            context = {k: v for k, v in self._fields.items() if k != "consequence"}
            self._log.info("state write recovered", what=self.event, **context, failures=self.failures,
                           for_s=round(time.monotonic() - self._since, 1), **fields)
            self.failures = 0


class CounterFile:
    """A 64-bit counter in an 8-byte file, set with one ``pwrite`` and no fsync: cheap enough for
    once a second on the sample path, and what was set survives ``kill -9`` (it is in the page
    cache at once). A power loss can lose the last updates; :meth:`flush` fsyncs.

    Not a memory map on purpose: a store into a mapped page that needs a new block on a full
    copy-on-write filesystem kills the process with SIGBUS, where ``pwrite`` just fails. A write
    that fails (a full or read-only state dir) is counted and logged once per streak; the counter
    goes on in memory. When the file cannot be opened at all, :attr:`persistent` is False.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = -1
        self._value = 0
        self._failures = FailureStreak("counter not saved (state dir full or read-only)", path=str(self.path))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            data = os.pread(self._fd, 8, 0)
            self._value = int.from_bytes(data, "little") if len(data) == 8 else 0
        except OSError as exc:
            self._failures.failed(exc)
            self.close()

    @property
    def persistent(self) -> bool:
        return self._fd >= 0

    @property
    def value(self) -> int:
        return self._value

    @value.setter
    def value(self, value: int) -> None:
        self._value = value
        if self._fd < 0:
            return
        try:
            os.pwrite(self._fd, value.to_bytes(8, "little"), 0)
        except OSError as exc:
            self._failures.failed(exc)
        else:
            self._failures.succeeded()

    def flush(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
