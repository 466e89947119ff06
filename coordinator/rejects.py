"""Rejected reports, counted per node in bounded memory, and logged without flooding the log.

A report is rejected when it cannot be decoded or fails the wire's bounds (NaN, an oversized
string, ...), arrives on another node's topic, or is refused by the store (a row the database
will not take; :mod:`coordinator.store.reports` isolates it). Rejections are counted by the
node named in the *topic* (with a broker ACL, the identity the publisher logged in as) and by
reason, and shown in ``/api/info`` → ``ingest.rejected``.

A hostile publisher chooses its topics, so it can invent any number of node names: the table
tracks at most ``max_nodes``. When it is full, the half with the fewest rejections (the least
recently rejected first among equals) is folded into the :data:`OTHER` bucket: a sort every
``max_nodes / 2`` new names, amortised O(log n) a name. A node that keeps sending bad data stays
named, with its exact count, once it is rejected twice within ``max_nodes / 2`` new names
(500 with the default). Logging: one line per node per ``log_interval_s`` at most (saying how
many were not logged since), and at most ``log_lines`` lines per interval over all nodes.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Final

#: Bucket of the nodes the table no longer names (never a node id: ids start with a letter or digit).
OTHER: Final = "(other)"
#: Bucket of messages whose topic names no node.
NO_NODE: Final = "(no node)"


@dataclass(slots=True)
class _Entry:
    name: str = ""
    reasons: dict[str, int] = field(default_factory=dict)  # a plain dict: made for every new name
    total: int = 0
    seen: int = 0  # the table's total at this node's latest rejection (recency, for eviction)
    logged_at: float | None = None
    unlogged: int = 0  # rejections since this node's last log line


_RANK: Final = attrgetter("total", "seen")  # eviction order: fewest rejections, then least recent


class RejectTable:
    """Rejections per node and reason (see the module docstring)."""

    def __init__(self, *, max_nodes: int = 1000, log_interval_s: float = 60.0, log_lines: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_nodes = max_nodes
        self.log_interval_s = log_interval_s
        self.log_lines = log_lines
        self.clock = clock
        self.total = 0
        self.by_reason: Counter[str] = Counter()
        self.suppressed_lines = 0  # log lines not written because of the per-interval cap
        self._nodes: dict[str, _Entry] = {}
        self._other = _Entry()
        self._window_start: float | None = None
        self._window_lines = 0

    def add(self, node: str | None, reason: str) -> int | None:
        """Count one rejection. When it should be logged, return how many rejections of this node
        (or bucket) were not logged since its last line; None when it should not be logged."""
        self.total += 1
        self.by_reason[reason] += 1
        entry = self._entry(node)
        entry.total += 1
        entry.seen = self.total
        reasons = entry.reasons
        reasons[reason] = reasons.get(reason, 0) + 1
        entry.unlogged += 1
        now = self.clock()
        if entry.logged_at is not None and now - entry.logged_at < self.log_interval_s:
            return None
        if self._window_start is None or now - self._window_start >= self.log_interval_s:
            self._window_start, self._window_lines = now, 0
        if self._window_lines >= self.log_lines:
            self.suppressed_lines += 1
            return None
        self._window_lines += 1
        entry.logged_at = now
        unlogged, entry.unlogged = entry.unlogged - 1, 0
        return unlogged

    def _entry(self, node: str | None) -> _Entry:
        name = NO_NODE if node is None else node
        entry = self._nodes.get(name)
        if entry is not None:
            return entry
        if len(self._nodes) >= self.max_nodes:
            self._evict()
        entry = self._nodes[name] = _Entry(name)
        return entry

    def _evict(self) -> None:
        """Fold the half of the nodes with the fewest rejections into :data:`OTHER`."""
        ranked = sorted(self._nodes.values(), key=_RANK)
        other = self._other
        for entry in ranked[: max(1, len(ranked) // 2)]:
            del self._nodes[entry.name]
            other.total += entry.total
            for reason, n in entry.reasons.items():
                other.reasons[reason] = other.reasons.get(reason, 0) + n
            other.unlogged += entry.unlogged

    def count(self, node: str) -> int:
        """Rejections counted for ``node`` (0 when it is not, or no longer, named)."""
        entry = self._nodes.get(node)
        return 0 if entry is None else entry.total

    def as_dict(self) -> dict[str, Any]:
        nodes = sorted(self._nodes.items(), key=lambda item: (-item[1].total, item[0]))
        return {
            "total": self.total,
            "by_reason": dict(self.by_reason),
            "nodes": {name: {"total": e.total, **e.reasons} for name, e in nodes},
            "other": {"total": self._other.total, **self._other.reasons},
            "tracked": len(self._nodes),
            "max_tracked": self.max_nodes,
            "log_lines_suppressed": self.suppressed_lines,
        }
