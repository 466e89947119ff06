"""Crash-safe file replacement, shared by every stage that persists state.

After :func:`atomic_write` returns, ``path`` holds the new bytes durably; a crash at any point
before that leaves the old content (or no file), never a torn one. The temporary file is
created beside ``path`` (same filesystem, so the rename is atomic), fsync'd, renamed over
``path``, and the directory is fsync'd so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


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
