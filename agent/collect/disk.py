"""Disk collector: filesystem capacity per mount and I/O per block device.

Sources: ``/proc/self/mountinfo`` (superblock options; ``/proc/self/mounts`` as a fallback) +
``statvfs(2)`` per mount, ``/proc/diskstats`` deltas.

Mounts: every mount whose fstype is not in ``exclude_fstypes`` (tmpfs is kept), plus
``include_mounts``, minus ``exclude_mounts``; a mount point mounted twice is reported once (the top
mount). Metrics per mount point ``M``:

============================== ==========================================================
``disk.total_bytes[M]``        size of the filesystem, bytes
``disk.used_bytes[M]``         used, bytes ((blocks - free) * fragment size)
``disk.free_bytes[M]``         available to unprivileged users, bytes
``disk.used_pct[M]``           used / (used + available), % (as ``df`` computes it)
``disk.inodes_used_pct[M]``    used inodes, % (absent on filesystems without an inode count)
``disk.inodes_free[M]``        free inodes (absent likewise)
``disk.readonly[M]``           1 when mounted read-only, else 0
============================== ==========================================================

Block devices ``D`` from ``/proc/diskstats``: all of them except loop devices that back no
mounted filesystem and ``ram*``/``zram*`` devices that never did any I/O.

============================== ==========================================================
``disk.read_iops[D]``          reads completed per second
``disk.write_iops[D]``         writes completed per second
``disk.read_bytes_per_s[D]``   bytes read per second (sectors are 512 bytes)
``disk.write_bytes_per_s[D]``  bytes written per second
``disk.read_await_ms[D]``      mean time per read completed in the interval, ms (0 without reads)
``disk.write_await_ms[D]``     mean time per write completed in the interval, ms (0 without writes)
``disk.util_pct[D]``           share of the interval the device was busy, % (capped at 100)
============================== ==========================================================

Events: ``disk.readonly`` (labels ``mount``, ``device``, ``fstype``) when a mount that was
read-write becomes read-only (typically ext4 ``errors=remount-ro`` after an I/O error).

Note: ``statvfs`` on a hung network filesystem blocks; the daemon's per-pass timeout covers it.

Cost: the mount table is parsed again only when ``/proc/self/mounts`` changed since the last pass;
metric keys are built once per mount and device; files are read with os.open/os.read
(:mod:`agent.collect.procfs`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from agent.collect.base import BaseCollector
from agent.collect.counters import RateTracker
from agent.collect.procfs import read_bytes
from agent.collect.sample import Event, Metrics, Reading, key
from agent.collect.settings import DiskSettings

SECTOR_BYTES = 512


def unescape_mount(field: str) -> str:
    r"""Undo the octal escapes of /proc/mounts (``\040`` space, ``\011`` tab, ``\012``, ``\134``)."""
    if "\\" not in field:
        return field
    out: list[str] = []
    i = 0
    while i < len(field):
        c = field[i]
        if c == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            try:
                out.append(chr(int(field[i + 1 : i + 4], 8)))
                i += 4
                continue
            except ValueError:
                pass
        out.append(c)
        i += 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Mount:
    device: str
    mountpoint: str
    fstype: str
    options: tuple[str, ...]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def parse_mounts(text: str) -> list[Mount]:
    """Parse /proc/self/mounts; later lines win for a mount point mounted twice (the top mount)."""
    by_point: dict[str, Mount] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        point = unescape_mount(parts[1])
        by_point.pop(point, None)  # keep insertion order of the top mount
        by_point[point] = Mount(unescape_mount(parts[0]), point, parts[2], tuple(parts[3].split(",")))
    return list(by_point.values())


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse /proc/self/mountinfo, taking the *superblock* options (after ``-``) as the options.

    Why mountinfo: a hardened service (systemd's ProtectSystem=strict) sees /, /usr and /etc
    through read-only bind mounts, so the per-mount "ro" of /proc/self/mounts (and statvfs's
    ST_RDONLY) would flag every node's root as read-only. The filesystem itself going read-only
    (ext4 errors=remount-ro) shows in the superblock options, which is what the metric means.
    """
    by_point: dict[str, Mount] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lparts, rparts = left.split(), right.split()
        if len(lparts) < 6 or len(rparts) < 3:
            continue
        point = unescape_mount(lparts[4])
        by_point.pop(point, None)  # keep insertion order of the top mount
        by_point[point] = Mount(unescape_mount(rparts[1]), point, rparts[0], tuple(rparts[2].split(",")))
    return list(by_point.values())


def select_mounts(mounts: list[Mount], settings: DiskSettings) -> list[Mount]:
    excluded = set(settings.exclude_fstypes)
    include = set(settings.include_mounts)
    skip = set(settings.exclude_mounts)
    return [
        mt
        for mt in mounts
        if mt.mountpoint not in skip and (mt.fstype not in excluded or mt.mountpoint in include)
    ]


# /proc/diskstats: major minor name, then (0-based after name) reads, reads merged, sectors read,
# ms reading, writes, writes merged, sectors written, ms writing, in flight, ms doing I/O, ...
_RD, _RD_SEC, _RD_MS, _WR, _WR_SEC, _WR_MS, _IO_MS = 0, 2, 3, 4, 6, 7, 9


def parse_diskstats(text: str) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 14:
            continue
        try:
            out[parts[2]] = tuple(map(int, parts[3:14]))
        except ValueError:
            continue
    return out


_FS_FAMILIES = ("total_bytes", "used_bytes", "free_bytes", "used_pct", "inodes_used_pct", "inodes_free",
                "readonly")
_DEV_FAMILIES = ("read_iops", "write_iops", "read_bytes_per_s", "write_bytes_per_s", "read_await_ms",
                 "write_await_ms", "util_pct")


class DiskCollector(BaseCollector[DiskSettings]):
    """See the module docstring for the metrics and events."""

    name = "disk"

    def __init__(self, settings: DiskSettings | None = None, *, root: str = "/") -> None:
        super().__init__(settings or DiskSettings(), root=root)
        self._rates = RateTracker()
        self._ro: dict[str, bool] = {}
        self._prev_ms: dict[str, tuple[int, int, int, int, int, float]] = {}
        # The last /proc/self/mounts and what was derived from it (parsed again only on change).
        self._mounts_raw: bytes | None = None
        self._mounts: list[Mount] = []
        self._selected: list[Mount] = []
        self._backing: frozenset[str] = frozenset()
        self._fs_keys: dict[str, tuple[str, ...]] = {}  # mount point -> its disk.* keys
        self._dev_keys: dict[str, tuple[str, ...]] = {}  # device -> its disk.* keys, then rate keys

    def start(self) -> None:
        self._require("proc/self/mounts")

    def close(self) -> None:
        self._ro.clear()
        self._prev_ms.clear()
        self._mounts_raw = None

    def collect(self) -> Reading:
        now = time.monotonic()
        m: Metrics = {}
        events: list[Event] = []
        raw = read_bytes(self._p("proc/self/mountinfo"))
        parse = parse_mountinfo
        if raw is None:  # no mountinfo (fixture trees, odd kernels): the plain mount table
            raw, parse = read_bytes(self._p("proc/self/mounts")), parse_mounts
        if raw != self._mounts_raw:
            self._mounts_raw = raw
            self._mounts = parse(raw.decode("utf-8", "surrogateescape")) if raw is not None else []
            self._selected = select_mounts(self._mounts, self.settings)
            self._backing = frozenset(
                os.path.basename(mt.device) for mt in self._mounts if mt.device.startswith("/dev/"))
            self._fs_keys = {mt.mountpoint: self._fs_keys.get(mt.mountpoint)
                             or tuple(key(f"disk.{fam}", mt.mountpoint) for fam in _FS_FAMILIES)
                             for mt in self._selected}
        self._filesystems(self._selected, m, events)
        self._devices(self._backing, m, now)
        self._rates.sweep()
        return Reading(metrics=m, events=events)

    def _filesystems(self, mounts: list[Mount], m: Metrics, events: list[Event]) -> None:
        seen: set[str] = set()
        for mt in mounts:
            point = mt.mountpoint
            seen.add(point)
            k_total, k_used, k_free, k_pct, k_ipct, k_ifree, k_ro = self._fs_keys[point]
            try:
                st = os.statvfs(point)
            except OSError:
                for k in (k_total, k_used, k_free, k_pct, k_ro):
                    m[k] = None
                continue
            frsize = st.f_frsize or st.f_bsize
            total = st.f_blocks * frsize
            used = (st.f_blocks - st.f_bfree) * frsize
            avail = st.f_bavail * frsize
            m[k_total] = float(total)
            m[k_used] = float(used)
            m[k_free] = float(avail)
            m[k_pct] = 100.0 * used / (used + avail) if used + avail > 0 else 0.0
            if st.f_files > 0:
                m[k_ipct] = 100.0 * (st.f_files - st.f_ffree) / st.f_files
                m[k_ifree] = float(st.f_ffree)
            # Superblock options only (see parse_mountinfo): statvfs's ST_RDONLY is per mount.
            ro = mt.readonly
            m[k_ro] = 1.0 if ro else 0.0
            was = self._ro.get(point)
            self._ro[point] = ro
            if ro and was is False:
                events.append(
                    self._event(
                        "disk.readonly",
                        f"{point} ({mt.device}) became read-only",
                        value=1.0,
                        labels={"mount": point, "device": mt.device, "fstype": mt.fstype},
                    )
                )
        for gone in [p for p in self._ro if p not in seen]:
            del self._ro[gone]

    def _devices(self, backing: frozenset[str], m: Metrics, now: float) -> None:
        data = read_bytes(self._p("proc/diskstats"))
        if data is None:
            return
        prev = self._prev_ms
        keys = self._dev_keys
        rate = self._rates.rate
        seen: set[str] = set()
        for line in data.split(b"\n"):
            parts = line.split()
            if len(parts) < 14:
                continue
            dev = parts[2].decode("utf-8", "surrogateescape")
            if dev.startswith("loop") and dev not in backing:
                continue
            try:
                s = tuple(map(int, parts[3:14]))
            except ValueError:
                continue
            seen.add(dev)
            if dev.startswith(("ram", "zram")) and not any(s):
                continue
            k = keys.get(dev)
            if k is None:
                k = keys[dev] = (*(key(f"disk.{fam}", dev) for fam in _DEV_FAMILIES),
                                 f"rd/{dev}", f"wr/{dev}", f"rds/{dev}", f"wrs/{dev}")
            m[k[0]] = rate(k[7], s[_RD], now)
            m[k[1]] = rate(k[8], s[_WR], now)
            rb = rate(k[9], s[_RD_SEC], now)
            wb = rate(k[10], s[_WR_SEC], now)
            m[k[2]] = None if rb is None else rb * SECTOR_BYTES
            m[k[3]] = None if wb is None else wb * SECTOR_BYTES
            cur = (s[_RD], s[_RD_MS], s[_WR], s[_WR_MS], s[_IO_MS], now)
            old = prev.get(dev)
            prev[dev] = cur
            await_r = await_w = util = None
            if old is not None and all(c >= o for c, o in zip(cur, old, strict=True)):
                d_rd, d_rd_ms, d_wr, d_wr_ms, d_io_ms, dt = (c - o for c, o in zip(cur, old, strict=True))
                await_r = d_rd_ms / d_rd if d_rd else 0.0
                await_w = d_wr_ms / d_wr if d_wr else 0.0
                util = min(100.0, 100.0 * d_io_ms / (dt * 1000.0)) if dt > 0 else None
            m[k[4]] = await_r
            m[k[5]] = await_w
            m[k[6]] = util
        for gone in [d for d in prev if d not in seen]:
            del prev[gone]
        if len(keys) > len(seen):
            for gone in [d for d in keys if d not in seen]:
                del keys[gone]
