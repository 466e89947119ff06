"""Cheap reads of /proc, /sys and /dev files, shared by the collectors.

A collector reads dozens of small kernel files every pass. These helpers use ``os.open`` and
``os.read`` directly: no file object, buffer or decoder is created per read, which is most of
the cost of ``open().read()`` on a procfs file. A file that cannot be read gives ``None``.
"""

from __future__ import annotations

import os

_O_FILE = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
_CHUNK = 65536


def read_bytes(path: str) -> bytes | None:
    """The whole file, or None when it cannot be read. os.open/os.read: no file object per read.

    A short read ends it: procfs and sysfs files return everything that fits in one read.
    """
    try:
        fd = os.open(path, _O_FILE)
    except OSError:
        return None
    try:
        data = os.read(fd, _CHUNK)
        if len(data) < _CHUNK:
            return data
        chunks = [data]
        while chunk := os.read(fd, _CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_text(path: str, encoding: str = "ascii", errors: str = "replace") -> str | None:
    """:func:`read_bytes`, decoded (kernel files are ASCII but for names: mounts, labels)."""
    data = read_bytes(path)
    return None if data is None else data.decode(encoding, errors)
