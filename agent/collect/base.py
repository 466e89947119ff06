"""The collector contract.

A collector is a small synchronous object: ``start()`` once (raise CollectorUnavailable when the
host lacks what it needs — it is then disabled and logged once), then ``collect()`` every
``interval_s``. ``collect()`` is blocking (psutil, /proc, NVML) and is run by the daemon in a
worker thread under ``timeout_s``. It must not raise for a metric it cannot read: that metric is
reported as ``None``. An unexpected exception is logged and the pass counts as failed; the
collector keeps running.

Rates are computed from deltas with monotonic time (see :mod:`agent.collect.counters`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from agent.collect.sample import Reading


@runtime_checkable
class Collector(Protocol):
    name: str
    interval_s: float
    timeout_s: float

    def start(self) -> None:
        """Probe the host; raise CollectorUnavailable if this collector cannot work here."""

    def collect(self) -> Reading:
        """One pass. Blocking; never raises for a missing metric."""

    def close(self) -> None:
        """Release handles (NVML shutdown, open files)."""
