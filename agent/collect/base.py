"""The collector contract, and the base class every collector builds on.

A collector is a small synchronous object: ``start()`` once (raise CollectorUnavailable when the
host lacks what it needs — it is then disabled and logged once), then ``collect()`` every
``interval_s``. ``collect()`` is blocking (psutil, /proc, NVML) and is run by the daemon in a
worker thread under ``timeout_s``. It must not raise for a metric it cannot read: that metric is
reported as ``None``. An unexpected exception is logged and the pass counts as failed; the
collector keeps running.

:class:`Collector` is the contract the sampler relies on (anything with these members will do,
test doubles included). :class:`BaseCollector` is what the shipped collectors share: settings,
schedule and root taken from ``[collect.<name>]``, paths below ``root``, the start-time check
that a required file is readable, events stamped with the collector's name, and no-op
``start``/``close``. It adds nothing to a pass: ``collect()`` is the subclass's alone. A
collector whose passes only read /proc and /sys files sets ``inline``: the sampler then runs it on
the event loop, without a thread hand-off (and moves it to a thread if a pass is ever slow).

Rates are computed from deltas with monotonic time (see :mod:`agent.collect.counters`).
"""

from __future__ import annotations

import abc
import os
import time
from typing import Generic, Protocol, TypeVar, runtime_checkable

from agent.collect.procfs import read_bytes
from agent.collect.sample import Event, Reading
from agent.collect.settings import CollectorSettings
from agent.errors import CollectorUnavailable


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


@runtime_checkable
class FastCollector(Protocol):
    """A collector with a fast path (:class:`agent.collect.cgroups.CgroupCollector`): while ``hot``,
    ``collect_hot()`` reads again, out of its schedule, the few metrics that cannot wait for the
    next pass, and returns the whole reading's metrics as they are now (the last pass's with
    those replaced) and the new events only."""

    @property
    def hot(self) -> bool: ...

    def collect_hot(self) -> Reading: ...


S = TypeVar("S", bound=CollectorSettings)


class BaseCollector(abc.ABC, Generic[S]):
    """A :class:`Collector` configured by settings of type ``S``; see the module docstring.

    A subclass sets ``name``, calls ``super().__init__(settings or ItsSettings(), root=root)``
    and implements ``collect()``; it overrides ``start``/``close`` when it has something to
    probe or release.
    """

    #: The collector's name: its ``[collect.<name>]`` section and its key in a Sample.
    name: str
    #: ``collect()`` cannot block (it reads /proc and /sys files only): the daemon may run it on the
    #: event loop instead of a worker thread (:mod:`agent.runtime.sampler`). False by default.
    inline: bool = False

    def __init__(self, settings: S, *, root: str = "/") -> None:
        self.settings = settings
        # Copied, not properties: the sampler reads them as plain attributes (the protocol).
        self.interval_s = settings.interval_s
        self.timeout_s = settings.timeout_s
        # Prefix of every /proc, /sys and /dev path; tests point it at fixture trees.
        self.root = root

    def _p(self, rel: str) -> str:
        """``rel`` (``proc/stat``) below ``root``."""
        return os.path.join(self.root, rel)

    def _require(self, rel: str) -> bytes:
        """The file ``rel`` below ``root``; CollectorUnavailable when it cannot be read."""
        path = self._p(rel)
        data = read_bytes(path)
        if data is None:
            raise CollectorUnavailable(f"cannot read {path}")
        return data

    def _event(
        self, kind: str, message: str, *, value: float | None = None, labels: dict[str, str] | None = None
    ) -> Event:
        """An event of this collector, stamped now (events are rare: this is off the hot path)."""
        return Event(
            kind=kind,
            source=self.name,
            wall=time.time(),
            labels={} if labels is None else labels,
            value=value,
            message=message,
        )

    def start(self) -> None:
        """Nothing to probe by default: the first pass finds out what the host has."""

    @abc.abstractmethod
    def collect(self) -> Reading:
        """One pass. Blocking; never raises for a missing metric."""

    def close(self) -> None:
        """Nothing to release by default."""
