"""Typed samples: what the collect stage hands to every later stage.

A metric is addressed by a flat key, ``family`` or ``family[label]`` (``cpu.util_pct``,
``disk.used_pct[/]``, ``net.rx_bytes_per_s[eth0]``). ``None`` means "this host could not
read it this time"; a key that is absent means "this host does not have it".
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import msgspec

Metrics = dict[str, float | None]
# Extra structured detail of one reading (top processes, unit states, devices): shown, not scored.
Detail = dict[str, object]


def key(family: str, label: str | None = None) -> str:
    """Build a metric key; ``label`` is a mount, device, interface, unit, ... ."""
    return family if label is None else f"{family}[{label}]"


@functools.lru_cache(maxsize=8192)
def split_key(metric_key: str) -> tuple[str, str | None]:
    """Inverse of :func:`key`. Memoised: every later stage splits the same few hundred keys each
    sample (a cache hit is a fifth of the split; bounded, least recently used dropped)."""
    if metric_key.endswith("]") and "[" in metric_key:
        family, _, rest = metric_key.partition("[")
        return family, rest[:-1]
    return metric_key, None


class KeyDelta:
    """Which keys of a stream of metrics dicts came and went, looked at only when the key count
    changed (:meth:`changed`, one ``len``): the later stages re-plan what they gather from what
    arrived, not from every key. On a host where processes come and go the per-process series
    change the count most samples; a set difference against the last looked-at keys costs a
    microsecond or two in C where a walk over every key costs a Python step a key.

    Keys that swap with the count unchanged are not seen here: each user also rescans at its own
    slower cadence, or re-plans when a key it reads is missing (a ``KeyError``)."""

    __slots__ = ("_len", "_seen")

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._len = -1

    def changed(self, metrics: Mapping[str, float | None]) -> bool:
        return len(metrics) != self._len

    def delta(self, metrics: Mapping[str, float | None]) -> tuple[set[str], set[str]]:
        """(added, removed) since the last look (in no order; on the first look every key is
        added), and ``metrics`` becomes the last look."""
        keys = metrics.keys()
        added, removed = keys - self._seen, self._seen - keys
        self._seen, self._len = set(keys), len(metrics)
        return added, removed

    def forget(self) -> None:
        """The next look sees every key as added."""
        self._seen, self._len = set(), -1


def in_order(metrics: Mapping[str, float | None], keys: set[str]) -> list[str]:
    """``keys`` (all in ``metrics``) in the order ``metrics`` holds them."""
    if len(keys) < 2:
        return list(keys)
    return [k for k in metrics if k in keys]


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """Something that happened, as opposed to a level: an XID, an OOM kill, a link going down."""

    kind: str  # e.g. "gpu.xid", "mem.oom_kill", "net.link_down", "disk.readonly"
    source: str  # collector name
    wall: float
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    value: float | None = None
    message: str = ""


class Reading(msgspec.Struct, kw_only=True):
    """What one collector returns from one pass."""

    metrics: Metrics = msgspec.field(default_factory=dict)
    events: list[Event] = msgspec.field(default_factory=list)
    detail: Detail = msgspec.field(default_factory=dict)


class CollectorState(msgspec.Struct, frozen=True, kw_only=True):
    """How a collector is doing; carried with each sample so consumers can tell absent from late."""

    status: str  # "ok" | "stale" | "disabled" | "absent"
    reason: str = ""
    age_s: float | None = None  # seconds since its last successful reading
    duration_ms: float | None = None  # how long its last pass took


class Sample(msgspec.Struct, frozen=True, kw_only=True):
    """One full, timestamped, sequence-numbered picture of the node."""

    node: str
    seq: int
    wall: float  # time.time() when assembled
    mono: float  # time.monotonic() when assembled
    metrics: Metrics
    events: tuple[Event, ...] = ()
    collectors: dict[str, CollectorState] = msgspec.field(default_factory=dict)
    detail: dict[str, Detail] = msgspec.field(default_factory=dict)  # by collector name

    def get(self, metric_key: str) -> float | None:
        return self.metrics.get(metric_key)
