"""Network-side security signals: authentication failures per source, new listening sockets.

``[collect.security_net]`` (docs/security.md). Two parts, one collector:

**Authentication failures** (every pass, ``interval_s``): the new lines of the systemd journal
(the auth facilities, through a ``journalctl --follow`` child resumed at its cursor) or, where no
journald runs, of the auth log files (``auth_files``, tailed by inode and offset), parsed by
:func:`agent.collect.auth.parse` and counted per source over ``window_s``
(:class:`agent.collect.auth.FailureWindow`). Reading and parsing are bounded per pass
(``max_read_bytes``, ``max_line_bytes``), memory by ``max_sources``.

**Listening sockets** (every ``listener_interval_s``): TCP listeners (and, with ``"udp"`` in
``listener_protocols``, bound unconnected UDP sockets) from netlink sock_diag in-process
(:func:`agent.collect.sockdiag.listening`: the kernel's listening hash only), or, below a fixture
root or where sock_diag fails, from ``/proc/net/{tcp,tcp6,udp,udp6}`` (which walks every
established socket's hash bucket too: 60x the CPU on a host with a large hash), each
attributed to the binary holding it (``/proc/PID/fd`` → socket inode, ``/proc/PID/exe``;
the fd walk runs only when an unknown socket inode appears). A listener is identified by
(protocol, port, binary). Those seen in the first scan and for ``baseline_s`` after it are the
node's baseline; one seen later for the first time is a ``sec.new_listener`` event, once
(never one bound only to loopback, unless ``listener_ignore_loopback = false``). With a state
directory the baseline, when it was first learned and the listeners reported are kept in
``STATE/security/listeners.json``: a restart neither learns nor reports them again.

With a state directory where each auth source stood is kept too (``STATE/security/auth_tails.json``
and inside ``auth_window.json``): a restart younger than ``window_s`` resumes there, so failures
written while heald was down are counted, once (:meth:`SecurityNetCollector._resume`,
:meth:`agent.collect.auth.FileTail.resume`).

With a state directory the failure window of the sources reported by label is kept too, in
``STATE/security/auth_window.json`` (rewritten when their counts change, so at most once a pass,
and never while no source fails): a restart (a kill -9 in the middle of a block) goes on counting
them where it was, and a run resumed after it verifies against the same counts an uninterrupted
run would (``sec.auth_failures_recent[SRC]`` reads 0, not absent, once the source stopped).

Metrics (``SRC`` = an IP address as text; ``PROTO/PORT`` e.g. ``tcp/8080``):

=================================== =================================================================
``sec.auth_failures[SRC]``          failures from SRC over ``window_s`` (the ``max_series`` sources
                                    with most failures; absent once SRC has none in the window)
``sec.auth_failures_recent[SRC]``   failures from SRC over the last ``recent_s`` (same SRCs)
``sec.auth_failures_other``         failures over the window from sources not reported by label
                                    (past ``max_series``) or not an address (host names, garbage)
``sec.auth_failures_local``         failures over the window with no remote address (sudo, su, login)
``sec.auth_sources``                sources with failures in the window
``sec.auth_failures_total``         failures counted since start (never goes backwards)
``sec.auth_sources_forgotten``      sources forgotten to keep memory bounded, since start
``sec.listeners``                   listening sockets (each address family counts)
``sec.listeners_new``               of those, listeners (proto, port, binary) not in the baseline
``sec.listener_new[PORT]``          listeners on PORT that were reported new (an event) and listen
                                    now; 0 once they are gone (the latest 64 such ports)
=================================== =================================================================

Events: ``sec.new_listener`` (labels ``proto``, ``port``, ``exe``, ``addr``; value = port).
The detail (``security_net``) carries each reported source's failures by kind, the window, the
auth source in use, and the listeners by (proto, port, binary).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog

from agent.collect import sockdiag
from agent.collect.auth import LOCAL, OTHER, FailureWindow, FileTail, JournalFollower, parse
from agent.collect.base import BaseCollector
from agent.collect.sample import Reading, key
from agent.collect.settings import SecurityNetSettings
from agent.errors import CollectorUnavailable
from agent.fsutil import atomic_write

_LISTEN = {"tcp": "0A", "udp": "07"}
_MAX_EXE = 256
_MAX_NEW_SERIES = 64
_MAX_WINDOW_FILE = 1 << 20  # auth_window.json holds at most max_series (256) sources of ~31 buckets
_MAX_TAILS_FILE = 1 << 20  # auth_tails.json: a few paths and a journal cursor
_TAILS_EVERY_S = 10.0  # positions alone (no count changed) are saved at most this often

log = structlog.get_logger("heald.collect.security_net")


def _seq(doc: dict[str, Any]) -> int:
    """The save number of a state file (0: none, or not one heald wrote)."""
    seq = doc.get("seq")
    return seq if type(seq) is int and 0 <= seq < 1 << 62 else 0


def _hex_addr(text: str) -> tuple[str, int] | None:
    """``0100007F:1F90`` (or 32 hex digits for IPv6) -> ``("127.0.0.1", 8080)``."""
    addr, _, port = text.partition(":")
    try:
        raw = bytes.fromhex(addr)
        p = int(port, 16)
    except ValueError:
        return None
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1])), p
    if len(raw) == 16:  # four host-order 32-bit words
        return str(ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))), p
    return None


def parse_proc_net(text: str | Iterable[str], proto: str) -> list[tuple[str, int, int]]:
    """Listening sockets of one ``/proc/net/<proto>[6]`` table: ``(addr, port, inode)``.

    The kernel lists TCP's listening sockets first, so the TCP table is read only up to its
    first other socket (a server's 100,000 connections are never read); UDP has no such order."""
    out: list[tuple[str, int, int]] = []
    state = _LISTEN[proto]
    lines = iter(text.splitlines() if isinstance(text, str) else text)
    next(lines, None)  # the header
    for line in lines:
        f = line.split()
        if len(f) < 10:
            continue
        if f[3] != state:
            if proto == "tcp":
                break
            continue
        if proto == "udp" and not f[2].endswith(":0000"):
            continue  # a connected UDP socket is a client's
        local = _hex_addr(f[1])
        if local is None or not f[9].isdigit():
            continue
        out.append((local[0], local[1], int(f[9])))
    return out


class SecurityNetCollector(BaseCollector[SecurityNetSettings]):
    name = "security_net"

    def __init__(self, settings: SecurityNetSettings | None = None, *, root: str = "/",
                 state_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(settings or SecurityNetSettings(), root=root)
        # The listener baseline survives restarts (a listener opened while heald was down, or by
        # whoever restarted it, is not learned as normal); None: in memory only.
        self._base_path = Path(state_dir) / "security" / "listeners.json" if state_dir is not None else None
        self._base_dirty = False
        self._window_path = None if state_dir is None else Path(state_dir) / "security" / "auth_window.json"
        self._window_saved: object = ()  # what the file holds: (source, failures, recent) of each
        # Where the auth sources stood (file positions, the journal cursor), for a restart: in
        # auth_tails.json when only they moved (at most every _TAILS_EVERY_S), and in
        # auth_window.json with every window write, so the newer of the two always matches the
        # counts restored with it.
        self._tails_path = None if state_dir is None else Path(state_dir) / "security" / "auth_tails.json"
        self._tails_saved: object = None
        self._tails_written = -1e18
        self._window_positions: tuple[int, float, Any] | None = None  # (seq, wall, positions) in the window
        self._seq = 0  # both files' saves, numbered: the higher is the newer (a wall clock can step back)
        self.resumed: dict[str, str] = {}  # auth source -> how it was resumed at start (the detail)
        s = self.settings
        self.window = FailureWindow(s.window_s, s.max_sources)
        self._journal: JournalFollower | None = None
        self._tails: list[FileTail] = []
        self.auth_source = "none"
        self._created: float | None = None  # wall time the baseline was first learned
        self._listen_next = -1e18
        self._baseline: set[tuple[str, int, str]] = set()
        self._new: dict[tuple[str, int, str], str] = {}  # reported, not in the baseline -> addr
        self._exe_by_inode: dict[int, str] = {}
        # the host's own sockets from netlink sock_diag; fixture roots (tests) read their /proc/net
        self._diag = root == "/"
        self._listening: dict[tuple[str, int, str], list[str]] = {}
        self._counts = {"lines": 0, "parsed": 0}

    def start(self) -> None:
        s = self.settings
        self._load_baseline()
        self._load_window()
        journald = os.path.exists(self._p("run/systemd/journal/socket"))
        if s.auth_source == "journal" or (s.auth_source == "auto" and journald):
            self._journal = JournalFollower(s.journalctl, s.journal_match, max_line=s.max_line_bytes)
            self.auth_source = "journal"
        else:
            self._tails = [FileTail(p, max_line=s.max_line_bytes, from_end=True) for p in s.auth_files]
            self.auth_source = "files"
        self._resume()
        for t in self._tails:  # open the existing files now: at their end, or where the last run stood
            t.poll(0)
        if not s.listeners and not self._journal and not self._tails:
            raise CollectorUnavailable("no auth source configured and listeners off")

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
        for t in self._tails:
            t.close()

    # ------------------------------------------------------------------ auth failures

    def _read_auth(self, now: float) -> None:
        budget = self.settings.max_read_bytes
        lines: list[str] = []
        if self._journal is not None:
            lines = self._journal.poll(budget)
        for tail in self._tails:
            raw = tail.poll(max(0, budget // len(self._tails)))
            lines.extend(r.decode("utf-8", "replace") for r in raw)
        self._counts["lines"] += len(lines)
        for line in lines:
            hit = parse(line)
            if hit is not None:
                self._counts["parsed"] += 1
                self.window.add(hit[1], hit[0], now)

    def _auth_metrics(self, reading: Reading, now: float) -> None:
        s = self.settings
        m = reading.metrics
        counts = self.window.counts(now, s.recent_s)
        local = counts.pop(LOCAL, (0, 0))[0]
        other = counts.pop(OTHER, (0, 0))[0]
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1][0], kv[0]))
        sources: dict[str, object] = {}
        for src, (total, recent) in ranked[: s.max_series]:
            m[key("sec.auth_failures", src)] = float(total)
            m[key("sec.auth_failures_recent", src)] = float(recent)
            sources[src] = {"failures": total, "recent": recent, "kinds": self.window.kinds(src)}
        other += sum(total for _, (total, _r) in ranked[s.max_series:])
        m["sec.auth_failures_other"] = float(other)
        m["sec.auth_failures_local"] = float(local)
        m["sec.auth_sources"] = float(len(counts))
        m["sec.auth_failures_total"] = float(self.window.total)
        m["sec.auth_sources_forgotten"] = float(self.window.forgotten)
        state = tuple((src, total, recent) for src, (total, recent) in ranked[: s.max_series])
        if self._save_window(now, state):
            self._save_tails(now)  # only behind a window file that holds what was read before them
        reading.detail["auth"] = {
            "source": self.auth_source, "window_s": s.window_s, "recent_s": s.recent_s,
            "sources": sources, "lines": self._counts["lines"], "failures": self._counts["parsed"],
            "files": [{"path": t.path, "offset": t.offset, "rotations": t.rotations,
                       "truncations": t.truncations} for t in self._tails],
            "resumed": self.resumed,
        }

    # ------------------------------------------------------------------ listeners

    def _scan_listeners(self) -> list[tuple[str, str, int, int]]:
        if self._diag:
            try:
                return sockdiag.listening(self.settings.listener_protocols,
                                          timeout_s=max(0.2, self.settings.timeout_s / 2))
            except OSError as exc:  # TimeoutError included: /proc/net from now on
                self._diag = False
                log.info("netlink sock_diag unavailable; listeners read from /proc/net", error=str(exc))
        out: list[tuple[str, str, int, int]] = []
        for proto in self.settings.listener_protocols:
            for fam in ("", "6"):
                try:
                    with open(self._p(f"proc/net/{proto}{fam}"), encoding="ascii", errors="replace") as f:
                        found = parse_proc_net(f, proto)
                except OSError:
                    continue
                out.extend((proto, a, p, i) for a, p, i in found)
        return out

    def _map_inodes(self, wanted: set[int]) -> None:
        """Find the binaries holding the socket inodes in ``wanted`` (one walk of /proc/*/fd)."""
        try:
            pids = [e for e in os.listdir(self._p("proc")) if e.isdigit()]
        except OSError:
            return
        for pid in pids:
            if not wanted:
                return
            fd_dir = self._p(f"proc/{pid}/fd")
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            exe: str | None = None
            for fd in fds:
                try:
                    link = os.readlink(f"{fd_dir}/{fd}")
                except OSError:
                    continue
                if not link.startswith("socket:["):
                    continue
                try:
                    inode = int(link[8:-1])
                except ValueError:
                    continue
                if inode in wanted:
                    if exe is None:
                        try:
                            exe = os.readlink(self._p(f"proc/{pid}/exe"))[:_MAX_EXE]
                        except OSError:
                            exe = "?"
                    self._exe_by_inode[inode] = exe
                    wanted.discard(inode)

    def _listeners(self, reading: Reading, now: float) -> None:
        s = self.settings
        if now < self._listen_next:
            self._listener_metrics(reading)
            return
        self._listen_next = now + s.listener_interval_s
        socks = self._scan_listeners()
        inodes = {i for *_, i in socks}
        self._exe_by_inode = {i: e for i, e in self._exe_by_inode.items() if i in inodes}
        unknown = {i for i in inodes if i not in self._exe_by_inode and i != 0}
        if unknown:
            self._map_inodes(unknown)
            for inode in unknown:  # no process holds it (a kernel socket): never walked for again
                self._exe_by_inode.setdefault(inode, "?")
        listening: dict[tuple[str, int, str], list[str]] = {}
        for proto, addr, port, inode in socks:
            exe = self._exe_by_inode.get(inode, "?")
            listening.setdefault((proto, port, exe), []).append(addr)
        self._listening = listening
        wall = time.time()
        if self._created is None:
            self._created, self._base_dirty = wall, True
        learning = wall - self._created <= s.baseline_s
        for lkey, addrs in sorted(listening.items()):
            if lkey in self._baseline or lkey in self._new:
                continue
            if s.listener_ignore_loopback and all(ipaddress.ip_address(a).is_loopback for a in addrs):
                continue
            if learning:
                if len(self._baseline) < s.max_listeners:
                    self._baseline.add(lkey)
                    self._base_dirty = True
                continue
            if len(self._new) >= s.max_listeners:
                self._new.pop(next(iter(self._new)))
            self._new[lkey] = addrs[0]
            self._base_dirty = True
            proto, port, exe = lkey
            reading.events.append(self._event(
                "sec.new_listener",
                f"new {proto} listener on port {port} ({', '.join(addrs[:4])}) by {exe}, "
                "not in this node's baseline",
                value=float(port),
                labels={"proto": proto, "port": str(port), "exe": exe, "addr": addrs[0]},
            ))
        self._save_baseline()
        self._listener_metrics(reading)

    def _load_baseline(self) -> None:
        if self._base_path is None:
            return
        try:
            doc = json.loads(self._base_path.read_bytes())
        except (OSError, ValueError):
            return  # none yet, or unreadable: learned again
        if not isinstance(doc, dict) or not isinstance(doc.get("created"), int | float):
            return

        def keys(name: str) -> list[tuple[str, int, str]]:
            items = doc.get(name)
            items = items[: self.settings.max_listeners] if isinstance(items, list) else []
            return [(i[0], i[1], i[2][:_MAX_EXE]) for i in items
                    if isinstance(i, list) and len(i) == 3 and i[0] in _LISTEN
                    and isinstance(i[1], int) and isinstance(i[2], str)]

        self._created = float(doc["created"])
        self._baseline = set(keys("baseline"))
        self._new = dict.fromkeys(keys("reported"), "")

    def _save_baseline(self) -> None:
        if self._base_path is None or not self._base_dirty:
            return
        doc = {"version": 1, "created": self._created, "baseline": sorted(self._baseline),
               "reported": list(self._new)}
        try:
            self._base_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self._base_path, json.dumps(doc).encode())
        except OSError:
            return  # a full or read-only state dir: kept in memory, written with the next change
        self._base_dirty = False

    def _load_window(self) -> None:
        if self._window_path is None:
            return
        try:
            with self._window_path.open("rb") as f:
                doc = json.loads(f.read(_MAX_WINDOW_FILE + 1)[:_MAX_WINDOW_FILE])  # cut: not JSON
        except (OSError, ValueError):
            return  # none yet (or torn, or not one heald wrote): counting starts afresh
        if isinstance(doc, dict) and isinstance(doc.get("wall"), int | float):
            elapsed = max(0.0, time.time() - float(doc["wall"]))
            if self.window.restore(time.monotonic(), doc.get("sources"), elapsed):
                self._window_saved = None  # rewritten at the first pass
            if "positions" in doc:
                self._window_positions = (_seq(doc), float(doc["wall"]), doc["positions"])

    def _save_window(self, now: float, state: tuple[tuple[str, int, int], ...]) -> bool:
        """Rewrite auth_window.json if the reported counts changed; whether it is up to date."""
        if self._window_path is None or state == self._window_saved:
            return True
        positions = self._positions()
        self._seq += 1
        doc = {"version": 1, "wall": time.time(), "sources": self.window.export(now, (s[0] for s in state)),
               "positions": positions, "seq": self._seq}
        try:
            self._window_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self._window_path, json.dumps(doc).encode())
        except OSError:
            return False  # a full or read-only state dir: tried again at the next pass
        self._window_saved = state
        self._tails_saved = positions  # the newer file holds them
        return True

    # ------------------------------------------------------------------ where the auth sources stood

    def _positions(self) -> dict[str, Any]:
        return {"files": [t.position() or {"path": t.path} for t in self._tails],
                "journal": self._journal.cursor if self._journal is not None else ""}

    def _save_tails(self, now: float) -> None:
        """auth_tails.json, when the positions moved and at most every _TAILS_EVERY_S (lines that
        changed a reported count rewrote auth_window.json, positions included, already)."""
        if self._tails_path is None or now - self._tails_written < _TAILS_EVERY_S:
            return
        positions = self._positions()
        if positions == self._tails_saved:
            return
        self._tails_written = now
        self._seq += 1
        try:
            self._tails_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self._tails_path, json.dumps({"version": 1, "wall": time.time(), "seq": self._seq,
                                                       "positions": positions}).encode())
        except OSError:
            return  # a full or read-only state dir: tried again later; the tails go on in memory
        self._tails_saved = positions

    def _saved_positions(self) -> tuple[float, Any] | str | None:
        """The newer of the positions in auth_tails.json and in auth_window.json: (wall,
        positions); None when there are none; a string saying why a file was refused."""
        found = self._window_positions
        if found is not None:
            self._seq = max(self._seq, found[0])
        if self._tails_path is None:
            return None if found is None else found[1:]
        try:
            with self._tails_path.open("rb") as f:
                raw = f.read(_MAX_TAILS_FILE + 1)
        except FileNotFoundError:
            return None if found is None else found[1:]
        except OSError as exc:
            return f"unreadable: {exc}"
        if len(raw) > _MAX_TAILS_FILE:
            return "not a file heald wrote (over 1 MiB)"
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            return "not a file heald wrote (not JSON)"
        wall = doc.get("wall") if isinstance(doc, dict) else None
        if not isinstance(wall, int | float) or isinstance(wall, bool) or not math.isfinite(wall) \
                or not isinstance(doc.get("positions"), dict):
            return "not a file heald wrote (no wall time or positions)"
        seq = _seq(doc)
        self._seq = max(self._seq, seq)
        if found is None or seq > found[0] or (seq == found[0] and float(wall) >= found[1]):
            return float(wall), doc["positions"]
        return found[1:]

    def _resume(self) -> None:
        """Go on reading the auth sources where the last run stood when that is younger than the
        failure window, else from their end (see docs/security.md).

        The lines written while heald was down are counted as failing now, not when they were
        written: each was written after the saved position, so less than ``window_s`` ago, and
        is in the window either way; it stays in it at most the downtime longer than it would
        have (the counts can only be higher by lines that are real and recent, never by history
        from before the window)."""
        saved = self._saved_positions()
        refused: dict[str, str] = {}
        if isinstance(saved, str):
            refused["state"] = saved
            saved = None
        elif saved is not None:
            wall, positions = saved
            age = time.time() - wall
            if not (math.isfinite(age) and -5.0 <= age < self.settings.window_s):
                if not (math.isfinite(age) and age >= 0):
                    refused["state"] = f"saved in the future or at no time ({wall!r})"
                saved = None
            elif not isinstance(positions, dict):
                refused["state"] = "not a file heald wrote"
                saved = None
        if saved is not None:
            wall, positions = saved
            files = positions.get("files")
            files = files[:64] if isinstance(files, list) else []
            by_path = {f["path"]: f for f in files if isinstance(f, dict) and isinstance(f.get("path"), str)}
            for t in self._tails:
                if t.path not in by_path:
                    continue  # not followed then: from its end
                done = t.resume(by_path[t.path], wall)
                self.resumed[t.path] = done
                if done.startswith("refused"):
                    refused[t.path] = done
            cursor = positions.get("journal")
            if self._journal is not None and isinstance(cursor, str) and cursor:
                if len(cursor) < 1024 and cursor.isprintable() and "=" in cursor:
                    # journalctl --after-cursor=; one it refuses (vacuumed, another journal): the end
                    self._journal.cursor = cursor
                    self.resumed["journal"] = "resumed"
                else:
                    refused["journal"] = "refused: not a journal cursor"
        if refused:
            log.warning("auth sources not resumed where the last run stood: read from their end",
                        refused=refused)
        elif self.resumed:
            log.info("auth sources resumed where the last run stood", resumed=self.resumed)

    def _listener_metrics(self, reading: Reading) -> None:
        if self._created is None:
            return
        reading.metrics["sec.listeners"] = float(sum(len(a) for a in self._listening.values()))
        reading.metrics["sec.listeners_new"] = float(sum(1 for k in self._listening if k in self._new))
        ports: dict[str, float] = {}
        for proto, port, exe in list(self._new)[-_MAX_NEW_SERIES:]:  # 0 once it is gone
            n = float((proto, port, exe) in self._listening)
            ports[str(port)] = ports.get(str(port), 0.0) + n
        for label, n in ports.items():
            reading.metrics[key("sec.listener_new", label)] = n
        reading.detail["listeners"] = [
            {"proto": p, "port": port, "exe": exe, "addrs": addrs[:8],
             "baseline": (p, port, exe) in self._baseline}
            for (p, port, exe), addrs in sorted(self._listening.items())[:256]
        ]

    def collect(self) -> Reading:
        now = time.monotonic()
        reading = Reading()
        if self._journal is not None or self._tails:
            self._read_auth(now)
            self._auth_metrics(reading, now)
        if self.settings.listeners:
            self._listeners(reading, now)
        return reading

