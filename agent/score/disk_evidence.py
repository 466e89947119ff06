"""Evidence for the failure classifier's ``disk_full``: a file system that is really filling.

The shipped classifier argues ``disk_full`` from the ``disk.*`` features (levels and rates of
free space, write latency and throughput: ``agent.score.classifier_train``), fitted on hosts
whose disk faults filled one small loop file system. On a busy disk nowhere near full it says
p >= 0.5 all the same: ``stress-ng --hdd`` writing and deleting a 1 GiB file on a disk with 78 GB
free drew 316 samples of ``disk_full`` in 5 minutes, a page-cache copy 7
(``bench/faultfree_load.py``, 2026-12-06, docs/risk.md). Heavy writing is not filling. As for
``memory_exhaustion`` (:mod:`agent.score.mem_evidence`), the model's probability is kept only
with evidence that a file system runs out, and otherwise capped at :data:`NO_EVIDENCE_CAP` (below
the stage's alert line, 0.5, and every shipped playbook's).

Evidence (any one; no labels, nothing host-specific), per mount, for its free bytes and its
free inodes (``disk.free_bytes[M]``, ``disk.inodes_free[M]``):

* **a fill**: the room keeps setting new lows (of the last ``window`` (16) samples at least
  ``renewals`` (8) were below every earlier one of them, the last within the last ``recent`` (3))
  **and** the fall so far (the window's highest room minus the room now) is at least
  ``min_fill`` (a tenth) of the room left: a fill of any speed on a disk of any size, once it has
  taken a tenth of what is left, the forecaster's own rule for acting on a disk
  (:meth:`agent.score.forecast.Forecaster._unproven`). A 1 GiB write on a disk with 78 GB free,
  or a copy's 4 GB burst on 84 GB, is a small share of the room; a fill that deletes and comes
  back does not keep setting new lows;
* **nearly full**: the mount at >= ``full_pct`` (90 %) of its space or of its inodes
  (``disk.used_pct[M]``, ``disk.inodes_used_pct[M]``).

Cost: :meth:`DiskEvidence.push` appends one value per tracked series (at most ``max_series``:
the mounts a node has), found by a scan of the sample's keys only when they change; the checks
run only when the classifier's probability would be capped.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

from agent.score.mem_evidence import NO_EVIDENCE_CAP

DISK_CLASS = "disk_full"
_ROOM = ("disk.free_bytes[", "disk.inodes_free[")
_LEVEL = ("disk.used_pct[", "disk.inodes_used_pct[")


class DiskEvidence:
    __slots__ = ("_keys", "_last", "_n", "_pushes", "_room", "full_pct", "max_series", "min_fill", "recent",
                 "renewals", "window")

    def __init__(self, *, window: int = 16, renewals: int = 8, recent: int = 3, min_fill: float = 0.1,
                 full_pct: float = 90.0, max_series: int = 256) -> None:
        self.window, self.renewals, self.recent = max(2, window), renewals, recent
        self.min_fill, self.full_pct, self.max_series = min_fill, full_pct, max_series
        self._room: dict[str, deque[float]] = {}
        self._keys: list[str] = []  # the sample's room keys, found again when the key set changes
        self._n = -1
        self._pushes = 0
        self._last: Mapping[str, float | None] = {}

    def push(self, metrics: Mapping[str, float | None]) -> None:
        """One sample: a dict lookup per tracked room series. The sample's keys are scanned only
        when their count changed (a mount came or went) or every 60 samples (one replaced by
        another): not a pass over every metric each second."""
        self._pushes += 1
        if len(metrics) != self._n or self._pushes % 60 == 0:
            self._n = len(metrics)
            self._keys = [k for k in metrics if k.startswith(_ROOM)][:self.max_series]
            keep = set(self._keys)
            for k in [k for k in self._room if k not in keep]:  # a mount gone (unmounted): forget it
                del self._room[k]
        room = self._room
        for k in self._keys:
            series = room.get(k)
            if series is None:
                series = room[k] = deque(maxlen=self.window)
            v = metrics.get(k)
            series.append(math.nan if v is None else float(v))
        self._last = metrics

    def gate(self, failure: dict[str, float]) -> dict[str, float]:
        """``failure`` with ``disk_full`` capped at :data:`NO_EVIDENCE_CAP` when no evidence holds
        (the same dict when nothing changes)."""
        p = failure.get(DISK_CLASS)
        if p is None or p <= NO_EVIDENCE_CAP or self.reasons():
            return failure
        return {**failure, DISK_CLASS: NO_EVIDENCE_CAP}

    def reasons(self) -> list[str]:
        """Which evidence holds now (empty: none)."""
        why: list[str] = []
        if any(self._filling(s) for s in self._room.values()):
            why.append("fill")
        if any(v is not None and v >= self.full_pct and k.startswith(_LEVEL) for k, v in self._last.items()):
            why.append("nearly_full")
        return why

    def _filling(self, series: deque[float]) -> bool:
        low, high = math.inf, -math.inf
        count, last = 0, -1
        for i, v in enumerate(series):
            if v != v:  # noqa: PLR0124 - NaN: not read
                continue
            high = max(high, v)
            if v < low:
                if low < math.inf:
                    count += 1
                    last = i
                low = v
        if count < self.renewals or last < len(series) - self.recent:
            return False
        now = series[-1]
        return now == now and high - now >= self.min_fill * max(now, 0.0)  # noqa: PLR0124
