"""Directory watches through inotify(7), for collectors that must notice new entries at once.

A cgroup is a directory: systemd and container runtimes ``mkdir`` one, set its limits and move
the workload in, and the VFS reports the ``mkdir`` (``IN_CREATE``) to a watch on the parent,
cgroupfs included. :class:`DirWatch` watches directories for entries created or removed and says,
with one non-blocking ``read(2)`` (``EAGAIN`` when nothing happened), whether anything did since
the last look. It uses libc through ctypes (the standard library has no inotify); where that is
not available (not Linux, no libc symbols, the per-user watch limit reached) :attr:`ok` is False
and callers fall back to polling.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_ONLYDIR = 0x01000000
IN_Q_OVERFLOW = 0x00004000
_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ONLYDIR


def _libc() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        return None
    return lib


class DirWatch:
    """inotify watches on directories: did an entry appear or go since the last :meth:`changed`?"""

    def __init__(self, max_watches: int = 4096) -> None:
        self.max_watches = max_watches
        self._lib = _libc()
        self._fd = -1
        self._watched: set[str] = set()
        if self._lib is not None:
            fd = int(self._lib.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
            self._fd = fd if fd >= 0 else -1

    @property
    def ok(self) -> bool:
        return self._fd >= 0

    def watch(self, paths: list[str]) -> int:
        """Watch these directories (again: a directory watched already keeps its one watch).
        Returns how many are watched; past ``max_watches`` the rest are left to polling."""
        if self._lib is None or self._fd < 0:
            return 0
        for path in paths:
            if path in self._watched:
                continue
            if len(self._watched) >= self.max_watches:
                break
            wd = int(self._lib.inotify_add_watch(self._fd, os.fsencode(path), _MASK))
            if wd >= 0:
                self._watched.add(path)
        return len(self._watched)

    def forget_missing(self) -> None:
        """Drop the names of directories that are gone (the kernel removed their watches)."""
        self._watched = {p for p in self._watched if os.path.isdir(p)}

    def changed(self) -> bool:
        """True when any watched directory gained or lost an entry since the last call (or the
        event queue overflowed); drains the queue. Never blocks."""
        if self._fd < 0:
            return False
        seen = False
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return seen
            except OSError:
                return True  # an unreadable queue: look again rather than miss a cgroup
            if not data:
                return seen
            seen = True

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        self._watched.clear()
