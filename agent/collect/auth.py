"""Authentication failures: the log lines, where they come from, and the per-source window.

The pieces of :mod:`agent.collect.security_net`'s auth side, each usable alone (the tests feed
them hostile input directly):

* :func:`parse` turns one log line (a syslog file line, or a journal ``MESSAGE``) into
  ``(kind, source)`` or None. Kinds: ``failed`` (sshd ``Failed password|publickey|... for``),
  ``invalid_user``, ``max_attempts``, ``preauth`` (connections given up before authentication:
  ``Connection closed by [authenticating|invalid user ...] ADDR port N [preauth]``, no
  identification string, a bad banner, no common algorithm), ``pam`` (``pam_*(SVC:auth):
  authentication failure`` of any service but sshd, whose own line already counts it) and
  ``sudo`` (``user NOT in sudoers``). The source is the remote address, normalised
  (IPv4-mapped IPv6 as IPv4, no zone, no brackets); ``LOCAL`` when the line has none (sudo, su,
  a console login); ``OTHER`` when it names something that is not an address (a host name with
  ``UseDNS yes``, garbage).
* :class:`FailureWindow` counts failures per source over a window in coarse time buckets, with
  at most ``max_sources`` sources (least recently failing forgotten first).
* :class:`FileTail` follows one log file by (device, inode, offset): rotation (the old file is
  read to its end first), truncation (read again from the start, nothing counted twice) and
  over-long lines (cut) are handled; a pass reads at most a budget. :meth:`FileTail.position`
  and :meth:`FileTail.resume` let a restart go on where the last run stood.
* :class:`JournalFollower` keeps one ``journalctl --follow --output=json`` child and resumes it
  at the last cursor if it dies, so no entry is lost or counted twice.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import re
import subprocess
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import Any

LOCAL = "local"
_HEAD = 64
OTHER = "other"

_ADDR = r"(?P<src>\S+)"
# (kind, a word every matching line holds: tested before the regex, pattern)
_PATTERNS: tuple[tuple[str, str, re.Pattern[str]], ...] = (
    ("failed", "Failed ", re.compile(
        r"\bFailed [\w/-]+ for (?:invalid user )?.{0,256}? from " + _ADDR + r" port \d+")),
    ("max_attempts", "maximum authentication", re.compile(
        r"maximum authentication attempts exceeded for (?:invalid user )?.{0,256}? from "
        + _ADDR + r" port \d+")),
    ("invalid_user", "Invalid user ", re.compile(
        r"\bInvalid user .{0,256}? from " + _ADDR + r"(?: port \d+)?\s*$")),
    ("preauth", "[preauth]", re.compile(
        r"\b(?:Connection (?:closed|reset)|Disconnected) by (?:(?:authenticating|invalid) user .{0,256}? )?"
        + _ADDR + r" port \d+\s*\[preauth\]")),
    ("preauth", "Connection ", re.compile(  # no key exchange at all
        r"\bConnection (?:closed|reset) by " + _ADDR + r" port \d+\s*$")),
    ("preauth", "identification string", re.compile(
        r"\bDid not receive identification string from " + _ADDR)),
    ("preauth", "banner exchange", re.compile(
        r"\bbanner exchange: Connection from " + _ADDR + r" port \d+: invalid format")),
    ("preauth", "Unable to negotiate", re.compile(r"\bUnable to negotiate with " + _ADDR + r" port \d+")),
)
_PAM_WORD = ":auth): authentication failure;"
_PAM = re.compile(r"\bpam_\w+\((?P<svc>[\w.@-]{1,64}):auth\): authentication failure;(?P<rest>.*)")
_RHOST = re.compile(r"\brhost=(?P<rhost>\S*)")
_SUDO = re.compile(r"(?:^|\s)\S{1,64} : user NOT (?:in sudoers|authorized on host)")


def source(text: str) -> str:
    """A remote address as the label it gets: canonical IP text, else :data:`OTHER`."""
    text = text.strip().strip("[]")
    if not text:
        return LOCAL
    text = text.split("%", 1)[0]  # an IPv6 zone (fe80::1%eth0)
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return OTHER
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def parse(line: str) -> tuple[str, str] | None:
    """``(kind, source)`` of an authentication failure line, or None for any other line."""
    if _PAM_WORD in line:
        m = _PAM.search(line)
        if m is not None:
            if m.group("svc") == "sshd":  # sshd's own "Failed password" line counts this attempt
                return None
            r = _RHOST.search(m.group("rest"))
            return "pam", source(r.group("rhost") if r else "")
    for kind, word, pattern in _PATTERNS:
        if word in line:
            m = pattern.search(line)
            if m is not None:
                return kind, source(m.group("src"))
    if " : user NOT " in line and _SUDO.search(line) is not None:
        return "sudo", LOCAL
    return None


class FailureWindow:
    """Failures per source over ``window_s``, in buckets of ``window_s / 30`` (at least 1 s).

    Memory is bounded: at most ``max_sources`` sources, each with at most ~31 buckets and its
    counts by kind; a new source past the bound forgets the least recently failing one
    (:attr:`forgotten` counts them). ``LOCAL`` and ``OTHER`` are sources like any other here.
    """

    def __init__(self, window_s: float, max_sources: int) -> None:
        self.window_s = window_s
        self.bucket_s = max(1.0, window_s / 30.0)
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, deque[list[float]]] = OrderedDict()  # src -> [[start, count]]
        self._kinds: dict[str, dict[str, int]] = {}
        self.forgotten = 0
        self.total = 0  # every failure ever added: never goes backwards

    def add(self, src: str, kind: str, now: float, n: int = 1) -> None:
        self.total += n
        buckets = self._buckets.get(src)
        if buckets is None:
            while len(self._buckets) >= self.max_sources:
                old, _ = self._buckets.popitem(last=False)
                self._kinds.pop(old, None)
                self.forgotten += 1
            buckets = self._buckets[src] = deque()
            self._kinds[src] = {}
        else:
            self._buckets.move_to_end(src)
        start = now - now % self.bucket_s
        if buckets and buckets[-1][0] == start:
            buckets[-1][1] += n
        else:
            buckets.append([start, float(n)])
        kinds = self._kinds[src]
        kinds[kind] = kinds.get(kind, 0) + n

    def counts(self, now: float, recent_s: float) -> dict[str, tuple[int, int]]:
        """``{source: (failures in the window, failures in the last recent_s)}``; sources with
        none left in the window are dropped."""
        horizon = now - self.window_s
        recent_from = now - recent_s
        out: dict[str, tuple[int, int]] = {}
        for src in list(self._buckets):
            buckets = self._buckets[src]
            while buckets and buckets[0][0] + self.bucket_s <= horizon:
                buckets.popleft()
            if not buckets:
                del self._buckets[src]
                self._kinds.pop(src, None)
                continue
            total = sum(c for _, c in buckets)
            recent = sum(c for s, c in buckets if s + self.bucket_s > recent_from)
            out[src] = (int(total), int(recent))
        return out

    def kinds(self, src: str) -> dict[str, int]:
        """Failures of ``src`` by kind since it last entered the window."""
        return dict(self._kinds.get(src, {}))

    def export(self, now: float, sources: Iterable[str]) -> dict[str, Any]:
        """``sources``' buckets as ``[age in seconds at now, count]`` and their kinds (for a restart)."""
        return {src: {"ages": [[round(now - start, 3), count] for start, count in self._buckets[src]],
                      "kinds": dict(self._kinds.get(src, {}))}
                for src in sources if src in self._buckets}

    def restore(self, now: float, saved: Any, elapsed: float) -> int:
        """Put back what :meth:`export` gave, ``elapsed`` seconds later (buckets past the window are
        dropped, garbage is skipped, at most ``max_sources``); the sources restored."""
        if not isinstance(saved, dict):
            return 0
        horizon = now - self.window_s
        restored = 0
        for src, doc in list(saved.items())[: self.max_sources]:
            ages = doc.get("ages") if isinstance(doc, dict) else None
            kinds = doc.get("kinds") if isinstance(doc, dict) else None
            if not isinstance(src, str) or len(src) > 64 or not isinstance(ages, list) \
                    or not isinstance(kinds, dict) or src in self._buckets:
                continue
            buckets: deque[list[float]] = deque()
            for item in ages[:64]:
                if isinstance(item, list) and len(item) == 2 \
                        and all(isinstance(x, int | float) and math.isfinite(x) and x >= 0 for x in item):
                    start = now - elapsed - float(item[0])
                    if start + self.bucket_s > horizon:
                        buckets.append([start, float(item[1])])
            if not buckets:
                continue
            while len(self._buckets) >= self.max_sources:
                old, _ = self._buckets.popitem(last=False)
                self._kinds.pop(old, None)
            self._buckets[src] = deque(sorted(buckets))
            self._kinds[src] = {str(k)[:32]: int(v) for k, v in list(kinds.items())[:16]
                                if isinstance(v, int) and v >= 0}
            restored += 1
        return restored

    def __len__(self) -> int:
        return len(self._buckets)


class _Lines:
    """Splits a byte stream into lines of at most ``max_line`` bytes (longer ones are cut; the
    rest up to the newline is skipped, never kept)."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._partial = b""
        self._overflow = False
        self.pending = 0  # bytes fed since the last newline (the partial line, uncut)

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        parts = data.split(b"\n")
        self.pending = len(parts[-1]) if len(parts) > 1 else self.pending + len(data)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if not self._overflow:
                room = self.max_line - len(self._partial)
                self._partial += part[:room]
                if len(part) > room:
                    self._overflow = True
            if not last:
                out.append(self._partial)
                self._partial = b""
                self._overflow = False
        return out

    def reset(self) -> None:
        self._partial = b""
        self._overflow = False
        self.pending = 0


def _checked_position(saved: Any) -> tuple[int, int, int, bytes] | None:
    """(dev, inode, offset, head) of a saved :meth:`FileTail.position`; None if it is not one."""
    if not isinstance(saved, dict):
        return None
    nums = [saved.get(k) for k in ("dev", "ino", "offset")]
    head = saved.get("head")
    if not all(type(n) is int and 0 <= n < 1 << 63 for n in nums) or not isinstance(head, str) \
            or len(head) > 2 * _HEAD:
        return None
    try:
        raw = bytes.fromhex(head)
    except ValueError:
        return None
    dev, ino, offset = (int(n) for n in nums)  # type: ignore[arg-type]  # checked above
    return dev, ino, offset, raw


class FileTail:
    """Follows one log file (see the module docstring). :meth:`poll` returns the new lines."""

    def __init__(self, path: str, *, max_line: int, from_end: bool) -> None:
        self.path = path
        self._fd: int | None = None
        self._id: tuple[int, int] | None = None  # (dev, inode)
        self.offset = 0
        self._head = b""  # the file's first bytes (up to _HEAD) as read: a rewrite changes them
        self._lines = _Lines(max_line)
        # The first file found at start is read from its end (history is not an attack now);
        # one that appears later (created, rotated in) is read from its start.
        self._from_end = from_end
        self.rotations = 0
        self.truncations = 0

    def _open(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        real = os.fstat(fd)
        self._fd, self._id = fd, (real.st_dev, real.st_ino)
        self.offset = real.st_size if self._from_end else 0
        self._head = os.pread(fd, min(_HEAD, self.offset), 0)
        self._from_end = False
        self._lines.reset()

    def position(self) -> dict[str, Any] | None:
        """Where this tail stands, for a restart: the file followed now (device, inode: while a
        rotated file is drained, that one), the offset of the first line not read whole (a
        partial line is read again whole, never half) and the file's first bytes (hex); None
        while no file is open."""
        if self._fd is None or self._id is None:
            return None
        return {"path": self.path, "dev": self._id[0], "ino": self._id[1],
                "offset": self.offset - self._lines.pending, "head": self._head.hex()}

    def resume(self, saved: Any, saved_wall: float) -> str:
        """Before the first :meth:`poll`: go on where a previous run stood (``saved``: what
        :meth:`position` gave, None when no file was open then; ``saved_wall``: when it was
        saved). The caller only asks while that is younger than the failure window.

        * the same file (device and inode, the same first bytes, at least as long): from the saved
          offset: ``"resumed"``;
        * the saved file renamed in the same directory (``auth.log.1``: rotated while heald was
          down): its rest from the saved offset, then the new file from its start: ``"rotated"``;
        * the saved file gone (or no file then), or truncated or rewritten in place (its first
          bytes differ, shorter than the offset: copytruncate, or its inode reused by a new
          file): the file now from its start when it was written after the save (``"new..."``),
          else from its end (``"end..."``);
        * ``"refused: WHY"`` when the saved position cannot be this file's (garbage, another
          file's inode): from the end, as a fresh start (the caller warns).

        Nothing is counted twice: the offset is never before what was read into the window that
        the caller restored with it, and a rotated file's new successor has had no line read yet.
        """
        self._from_end = True
        dev = ino = offset = -1
        head = b""
        if saved is not None and (not isinstance(saved, dict) or "dev" in saved):
            checked = _checked_position(saved)
            if checked is None:
                return "refused: not a position heald saved"
            dev, ino, offset, head = checked
        try:
            st: os.stat_result | None = os.stat(self.path)
        except OSError:
            st = None
        # Written (or created) after the save: a file that replaced the saved one then holds no
        # line the last run read. (Its birth time would say more; Python cannot read it here.)
        changed = st is None or st.st_mtime >= saved_wall - 1.0
        if ino < 0 or st is None or (st.st_dev, st.st_ino) != (dev, ino):
            if ino >= 0:
                found = self._sibling(dev, ino)
                if found == "":
                    return "refused: its inode is another file's"
                if found is not None and self._open_at(found, (dev, ino), offset, head):
                    self._from_end = not changed  # for the new file, once the old one is drained
                    return "rotated"
                if found is not None:
                    return "end: the rotated file was rewritten"
            self._from_end = not changed
            return "end" if self._from_end else "new"
        if not self._open_at(self.path, (dev, ino), offset, head):
            self._from_end = not changed
            return "end: rewritten before the save" if self._from_end \
                else "new: rewritten while heald was down"
        self._from_end = False  # a file rotated in later is new: from its start
        return "resumed"

    def _sibling(self, dev: int, ino: int) -> str | None:
        """The path of the file (dev, ino) in this tail's directory when it is named like a
        rotation of it (``auth.log.1``, ``auth.log-20260101``); "" when another file has it;
        None when no entry has it (at most 4096 entries are looked at)."""
        folder, base = os.path.split(self.path)
        try:
            with os.scandir(folder or ".") as entries:
                for i, entry in enumerate(entries):
                    if i >= 4096:
                        return None
                    if entry.inode() != ino or entry.name == base:
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if st.st_dev != dev:
                        continue
                    if entry.name.startswith(base) and entry.name[len(base):len(base) + 1] in {".", "-", "_"}:
                        return entry.path
                    return ""
        except OSError:
            return None
        return None

    def _open_at(self, path: str, ident: tuple[int, int], offset: int, head: bytes) -> bool:
        """Open ``path`` at ``offset`` if it is the file ``ident`` with these first bytes and at
        least ``offset`` long."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            real = os.fstat(fd)
            ok = (real.st_dev, real.st_ino) == ident and real.st_size >= offset \
                and os.pread(fd, len(head), 0) == head
        except OSError:
            ok = False
        if not ok:
            os.close(fd)
            return False
        self.close()
        self._fd, self._id, self.offset, self._head = fd, ident, offset, head
        self._lines.reset()
        return True

    def _read(self, budget: int) -> tuple[list[bytes], int]:
        out: list[bytes] = []
        if self._fd is None:
            return out, 0
        used = 0
        while used < budget:
            chunk = os.pread(self._fd, min(1 << 16, budget - used), self.offset)
            if not chunk:
                break
            self.offset += len(chunk)
            used += len(chunk)
            out.extend(self._lines.feed(chunk))
        return out, used

    def poll(self, budget: int) -> list[bytes]:
        try:
            st = os.stat(self.path)
        except OSError:
            st = None
        lines: list[bytes] = []
        if self._fd is not None and (st is None or (st.st_dev, st.st_ino) != self._id):
            # Rotated (renamed, a new file in its place) or removed: the rest of the old file first.
            got, used = self._read(budget)
            lines += got
            budget -= used
            if budget <= 0:
                return lines  # the old file is not drained yet: go on with it next pass
            self.close()
            self._lines.reset()
            if st is not None:
                self.rotations += 1
        if st is None:
            self._from_end = False  # when it comes back, it is a new file
            return lines
        if self._fd is None:
            self._open()
            if self._fd is None:
                return lines
        elif self._truncated():  # in place (copytruncate): read it again from the start
            self.offset = 0
            self._head = b""
            self._lines.reset()
            self.truncations += 1
        got, _ = self._read(budget)
        if len(self._head) < _HEAD and self._fd is not None:
            self._head = os.pread(self._fd, min(_HEAD, self.offset), 0)
        return lines + got

    def _truncated(self) -> bool:
        """Shorter than what was read, or its first bytes changed (truncated, then written past
        the old offset before this pass)."""
        if self._fd is None:
            return False
        if os.fstat(self._fd).st_size < self.offset:
            return True
        return os.pread(self._fd, len(self._head), 0) != self._head

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._id = None, None


class JournalFollower:
    """One ``journalctl --follow --output=json`` child, read without blocking; restarted at the
    last cursor (at most every ``restart_s``) when it exits."""

    def __init__(self, argv: Sequence[str], matches: Iterable[str], *, max_line: int,
                 restart_s: float = 5.0) -> None:
        self.argv = list(argv)
        self.matches = list(matches)
        self.cursor = ""
        self.restart_s = restart_s
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines = _Lines(max(max_line * 4, 65536))  # a JSON entry is longer than its MESSAGE
        self._max_line = max_line
        self._started = -1e18
        self._read_since_start = 0

    def _start(self) -> None:
        now = time.monotonic()
        if now - self._started < self.restart_s:
            return
        self._started = now
        pos = [f"--after-cursor={self.cursor}"] if self.cursor else ["--lines=0"]
        argv = [*self.argv, "--follow", "--output=json", "--no-pager", "--quiet",
                "--output-fields=MESSAGE", *pos, *self.matches]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,  # an argv list
                                    stderr=subprocess.DEVNULL, close_fds=True)
        except OSError:
            self._proc = None
            return
        self._proc = proc
        if proc.stdout is not None:
            os.set_blocking(proc.stdout.fileno(), False)
        self._lines.reset()
        self._read_since_start = 0

    def poll(self, budget: int) -> list[str]:
        """The MESSAGEs of the entries that arrived since the last poll. A child that ended is
        read to its end first, then started again (at the cursor) on a later poll."""
        if self._proc is None:
            self._start()
        if self._proc is None or self._proc.stdout is None:
            return []
        stdout = self._proc.stdout
        out: list[str] = []
        used = 0
        ended = False
        while used < budget:
            try:
                chunk = os.read(stdout.fileno(), 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                ended = True
                break
            if not chunk:  # end of file: the child exited
                ended = True
                break
            used += len(chunk)
            for raw in self._lines.feed(chunk):
                msg = self._entry(raw)
                if msg is not None:
                    out.append(msg)
        self._read_since_start += len(out)
        if ended:
            code = self._reap()
            self.restarts += 1
            if code is not None and code > 0 and not self._read_since_start and self.cursor:
                # journalctl refused the cursor (vacuumed, another journal): start at the end
                self.cursor = ""
        return out

    def _entry(self, raw: bytes) -> str | None:
        try:
            entry = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(entry, dict):
            return None
        cursor = entry.get("__CURSOR")
        if isinstance(cursor, str) and len(cursor) < 1024:
            self.cursor = cursor
        msg = entry.get("MESSAGE")
        if isinstance(msg, list):  # binary-safe form: a list of byte values
            with contextlib.suppress(ValueError, TypeError):
                msg = bytes(msg[: self._max_line]).decode("utf-8", "replace")
        return msg[: self._max_line] if isinstance(msg, str) else None

    def _reap(self) -> int | None:
        """Stop and reap the child; its exit status (None: there was none)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def close(self) -> None:
        self._reap()
