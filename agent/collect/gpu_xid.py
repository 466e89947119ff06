"""NVIDIA XIDs: the catalog (what each documented XID means and how it is resolved) and the two
places they are read from, NVML's event set (polled with a 0 ms wait: never blocks a pass) and
the kernel log (``/dev/kmsg``, read without blocking from where it ended at start).

The catalog follows NVIDIA's "Xid Errors" table (docs.nvidia.com/deploy/xid-errors): each XID
has one resolution bucket, the cheapest recovery NVIDIA documents for it:

================= ============================================================================
``ignore``        informational or a consequence of another error; nothing to do
``restart_app``   the application hit it (page fault, graphics exception): restart the job
``reset_gpu``     the GPU needs a reset (``nvidia-smi --gpu-reset``): drain, reset, undrain
``reboot_node``   a reset does not bring it back (fallen off the bus): reboot the node
``service``       the hardware needs a human (power cable, unstable memory, remap failure)
================= ============================================================================

The shipped GPU playbooks are built from these buckets (``tests/test_playbooks_shipped.py``
checks that their trigger values are exactly the buckets' XIDs): ``gpu-xid-reset`` acts on
``reset_gpu`` and ``reboot_node`` (a reset is tried first), ``gpu-xid-reboot`` (approval) on a
``reboot_node`` XID or a ``reset_gpu`` XID that comes back after a reset, and ``gpu-xid-service``
on ``service``. An XID not in the catalog is ``unknown``: reported, never acted on.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

Bucket = Literal["ignore", "restart_app", "reset_gpu", "reboot_node", "service", "unknown"]
BUCKETS: Final[tuple[Bucket, ...]] = ("ignore", "restart_app", "reset_gpu", "reboot_node", "service")


@dataclass(frozen=True, slots=True)
class Xid:
    xid: int
    bucket: Bucket
    what: str


def _catalog(*rows: tuple[int, Bucket, str]) -> Mapping[int, Xid]:
    return {n: Xid(n, bucket, what) for n, bucket, what in rows}


#: NVIDIA's documented XIDs that a data-centre GPU reports, with their resolution bucket.
CATALOG: Final[Mapping[int, Xid]] = _catalog(
    (8, "restart_app", "GPU stopped processing (driver or application error)"),
    (13, "restart_app", "graphics engine exception"),
    (31, "restart_app", "GPU memory page fault"),
    (32, "restart_app", "invalid or corrupted push buffer stream"),
    (38, "reset_gpu", "driver firmware error"),
    (43, "restart_app", "GPU stopped processing (the application hit a software error)"),
    (45, "ignore", "preemptive cleanup, due to a previous error"),
    (48, "reset_gpu", "double-bit ECC error"),
    (54, "service", "auxiliary power is not connected to the GPU board"),
    (56, "ignore", "display engine error"),
    (57, "service", "error programming video memory interface"),
    (58, "service", "unstable video memory interface detected"),
    (61, "reset_gpu", "internal micro-controller breakpoint/warning"),
    (62, "reset_gpu", "internal micro-controller halt"),
    (63, "reset_gpu", "ECC page retirement or row remapping recording event (pending a reset)"),
    (64, "reset_gpu", "ECC page retirement or row remapper recording failure"),
    (68, "restart_app", "NVDEC0 exception"),
    (69, "restart_app", "graphics engine class error"),
    (74, "reset_gpu", "NVLink error"),
    (79, "reboot_node", "GPU has fallen off the bus"),
    (92, "ignore", "high single-bit ECC error rate"),
    (94, "reset_gpu", "contained ECC error"),
    (95, "reset_gpu", "uncontained ECC error"),
    (109, "restart_app", "context switch timeout"),
    (110, "reset_gpu", "security fault error"),
    (119, "reset_gpu", "GSP RPC timeout"),
    (120, "reset_gpu", "GSP error"),
    (121, "reset_gpu", "C2C link corrected error"),
    (140, "reset_gpu", "unrecovered ECC error"),
    (143, "service", "GPU initialisation failure"),
)


def bucket(xid: int) -> Bucket:
    """The resolution bucket of an XID; ``unknown`` when NVIDIA documents none."""
    entry = CATALOG.get(xid)
    return entry.bucket if entry is not None else "unknown"


def xids(*buckets: Bucket) -> list[int]:
    """The XIDs in these buckets, sorted."""
    return sorted(n for n, e in CATALOG.items() if e.bucket in buckets)


# -- NVML event set ------------------------------------------------------------------------------

MAX_EVENTS_PER_PASS: Final = 256


@dataclass(frozen=True, slots=True)
class NvmlXid:
    handle: Any  # NVML's device handle the event names (a ctypes pointer)
    xid: int
    gpu_instance: int | None  # MIG GPU instance id, None when the event names the whole GPU
    compute_instance: int | None


def poll_event_set(nv: Any, event_set: Any, mask: int) -> list[NvmlXid]:
    """What the event set holds now: ``nvmlEventSetWait(set, 0)`` until it times out (never
    waits). Any other NVML error (a lost GPU, a broken set) ends the pass quietly: the per-device
    queries report the GPU itself."""
    found: list[NvmlXid] = []
    for _ in range(MAX_EVENTS_PER_PASS):
        try:
            data = nv.nvmlEventSetWait(event_set, 0)
        except nv.NVMLError:
            break  # Timeout: nothing more now; anything else: see above
        if not int(data.eventType) & mask:
            continue
        gi = int(getattr(data, "gpuInstanceId", 0xFFFFFFFF))
        ci = int(getattr(data, "computeInstanceId", 0xFFFFFFFF))
        found.append(NvmlXid(data.device, int(data.eventData), None if gi == 0xFFFFFFFF else gi,
                             None if ci == 0xFFFFFFFF else ci))
    return found


# -- /dev/kmsg -----------------------------------------------------------------------------------

_KMSG_READ = 8192
_KMSG_MAX_READS = 1024
_XID_RE = re.compile(rb"NVRM: Xid \(PCI:([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+)[^)]*\): (\d+)")


class KmsgXids:
    """XID lines of the kernel log, read without blocking from where the log ended at open."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self._buf = b""

    def open(self, path: str) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False  # no CAP_SYSLOG / no /dev/kmsg: XIDs of those devices are not seen
        try:
            os.lseek(fd, 0, os.SEEK_END)  # only what is logged from now on
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def read(self) -> list[tuple[tuple[int, int, int], int]]:
        """``((domain, bus, device), xid)`` for each XID line logged since the last read."""
        fd = self.fd
        if fd is None:
            return []
        chunks: list[bytes] = []
        for _ in range(_KMSG_MAX_READS):
            try:
                chunk = os.read(fd, _KMSG_READ)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # records were overwritten before we read them
                    continue
                break
            if not chunk:
                break
            chunks.append(chunk)
        if not chunks:
            return []
        lines = (self._buf + b"".join(chunks)).split(b"\n")
        self._buf = lines.pop()[-_KMSG_READ:]  # an incomplete last line (plain files only)
        found = []
        for line in lines:
            match = _XID_RE.search(line)
            if match is not None:
                domain, bus, device = (int(g, 16) for g in match.group(1, 2, 3))
                found.append(((domain, bus, device), int(match.group(4))))
        return found
