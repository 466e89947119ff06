"""Rates and deltas from monotonically increasing kernel counters.

Kernel and device counters (``/proc/diskstats``, ``/proc/net/dev``, ``/proc/vmstat``, NVML ECC
counts, ...) only ever increase, except when they

* **wrap**: a 32-bit (or, in theory, 64-bit) counter passes its maximum and starts again near 0;
* **reset**: the thing behind it was recreated (an interface re-added, a driver reloaded, a device
  hot-plugged) and the counter restarted from 0.

:class:`RateTracker` keeps the last value and the monotonic time it was seen per metric key and
turns each new value into a rate (per second) or a delta. The rules:

* the first value seen for a key gives ``None`` (no baseline yet);
* a missing value (``None``) gives ``None`` and keeps the old baseline;
* a value that went down is a wrap when the wrapped delta is plausible for a 32- or 64-bit
  counter (less than a quarter of its range), otherwise a reset: the pass gives ``None`` and the
  new value becomes the baseline. Never a negative or astronomically large rate;
* a zero or negative time step gives ``None``.

Keys that were not updated since the previous :meth:`RateTracker.sweep` are dropped by it, so
counters of vanished devices do not pile up.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

_WIDTHS = (32, 64)


def counter_delta(old: float, new: float, bits: int | None = None) -> float | None:
    """The increase from ``old`` to ``new`` of a counter of ``bits`` width (``None``: 32 or 64).

    Returns ``None`` when the counter was reset (the decrease is not a plausible wrap).
    """
    if new >= old:
        return new - old
    for width in (bits,) if bits is not None else _WIDTHS:
        modulus = 1 << width  # int arithmetic: exact for 64-bit counters given as ints
        if old < modulus:
            wrapped = new + modulus - old
            if wrapped <= modulus / 4:
                return wrapped
    return None


@dataclass(slots=True)
class _Last:
    value: float
    mono: float
    seen: bool  # updated since the last sweep


class RateTracker:
    """Per-key rates and deltas of counters, robust to first passes, resets and wraps."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[str, _Last] = {}

    def __len__(self) -> int:
        return len(self._last)

    def __contains__(self, metric_key: object) -> bool:
        return metric_key in self._last

    def _update(self, metric_key: str, value: float | None, now: float) -> tuple[float, float, float] | None:
        """Store ``value`` at ``now``; return (old value, new value, dt) if there was a baseline."""
        if value is None:
            return None
        last = self._last.get(metric_key)
        if last is None:
            self._last[metric_key] = _Last(value, now, seen=True)
            return None
        old, old_t = last.value, last.mono
        last.value, last.mono, last.seen = value, now, True
        return old, value, now - old_t

    def rate(self, metric_key: str, value: float | None, now: float, bits: int | None = None) -> float | None:
        """Per-second rate of the counter ``metric_key`` whose value at monotonic ``now`` is ``value``."""
        # _update and counter_delta inlined for the common case: called ~100 times a second.
        if value is None:
            return None
        last = self._last.get(metric_key)
        if last is None:
            self._last[metric_key] = _Last(value, now, seen=True)
            return None
        old, dt = last.value, now - last.mono
        last.value, last.mono, last.seen = value, now, True
        if dt <= 0:
            return None
        if value >= old:
            return float(value - old) / dt
        d = counter_delta(old, value, bits)
        return None if d is None else float(d) / dt

    def delta(
        self, metric_key: str, value: float | None, now: float, bits: int | None = None
    ) -> float | None:
        """Increase of the counter since the previous call (``None`` on the first one or a reset)."""
        got = self._update(metric_key, value, now)
        if got is None:
            return None
        d = counter_delta(got[0], got[1], bits)
        return None if d is None else float(d)

    def forget(self, metric_key: str) -> None:
        self._last.pop(metric_key, None)

    def sweep(self) -> None:
        """Drop keys not updated since the previous sweep; call once per pass, after the pass."""
        stale = [k for k, v in self._last.items() if not v.seen]
        for k in stale:
            del self._last[k]
        for v in self._last.values():
            v.seen = False


def slope(points: deque[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t, y) points, or None with fewer than 3 or no time span."""
    n = len(points)
    if n < 3:
        return None
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    if den <= 0:
        return None
    return sum((t - mt) * (y - my) for t, y in points) / den


def growth(points: deque[tuple[float, float]], now: float, value: float, window_s: float) -> float | None:
    """Add ``(now, value)`` to ``points``, drop the points older than ``window_s`` and return the
    least-squares slope of what is left (per second; None with fewer than 3 points). The growth
    rate behind the collectors' ``eta_s`` metrics (cgroup memory and PIDs, the kernel tables)."""
    points.append((now, value))
    while points and now - points[0][0] > window_s:
        points.popleft()
    return slope(points)
