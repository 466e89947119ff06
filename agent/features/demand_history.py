"""The node's demand history: one mean per ``[demand] step_s`` of each forecast resource, kept for days.

The demand model (:mod:`agent.score.demand`) is fitted on this history, not on the per-second
feature history: a two-week profile at five-minute steps is 4,032 rows a resource, where the
feature history keeps hours. Per sample (:meth:`DemandHistory.push`) the resources' values are
added to the open step's sums (O(resources), no I/O, no numpy); when a sample falls in the next
step the step's means become a row. Rows older than ``history_days`` are dropped.

The history lives in ``<state_dir>/demand/history.json`` (written by :meth:`DemandHistory.save`
from a worker thread: :func:`agent.fsutil.atomic_write`, so a ``kill -9`` leaves the old or the new
file, never half of one) and is read back at start, so a restart keeps what the node learned. Not
:func:`agent.fsutil.write_small_state`: its in-place overwrite on a full disk is safe only for a few
bytes, and two weeks of rows are hundreds of KiB: a full state dir tore the file (a short ``pwrite``)
and the next start threw the whole history away. On a full or read-only disk a save now fails and
leaves the old file whole; the rows stay in memory and the next save writes them.
A file that cannot be read, is not a history or was kept at another ``step_s`` is ignored with
one log line (and replaced at the next save): the history starts again, nothing else changes.

This module is numpy-free (the config imports :class:`DemandSettings`; ``heald check`` stays light).
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Final

import msgspec
import structlog

from agent.collect.sample import KeyDelta
from agent.fsutil import atomic_write

log = structlog.get_logger("heald.demand")

#: Resources the daemon forecasts when they are in the sample (wildcards: every label).
DEFAULT_RESOURCES: Final = ("cpu.util_pct", "mem.used_pct", "gpu.util_pct[*]", "net.rx_bytes_per_s[*]",
                            "net.tx_bytes_per_s[*]")
#: At most this many resources are kept (a host with hundreds of interfaces keeps the first ones).
MAX_RESOURCES: Final = 32
FORMAT: Final = 1
DAY_S: Final = 86_400.0


class DemandSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[demand]``: the node's demand forecasts (needs ``[model] enabled``)."""

    enabled: bool = True
    # A pre-fitted demand artifact (`agent.score.demand`, e.g. fitted on another node's history or by
    # bench/demand_forecast.py). Set: it is loaded at start and the node fits none of its own.
    # "" (default): the node fits its own once min_history_s of history exists.
    model_path: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    # One history row (the resources' means) and one forecast step per this many seconds.
    step_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 300.0
    # How far ahead the forecasts reach.
    horizon_s: Annotated[float, msgspec.Meta(ge=1, le=7 * DAY_S)] = 7200.0
    # Days of history kept (and fitted on: two weeks or more adds weekday offsets to the profile).
    history_days: Annotated[float, msgspec.Meta(ge=2, le=60)] = 14.0
    # History needed before the first fit (the fit needs two days of steps).
    min_history_s: Annotated[float, msgspec.Meta(ge=2 * DAY_S, le=60 * DAY_S)] = 2 * DAY_S
    # The model is refitted on the history this often.
    refit_interval_s: Annotated[float, msgspec.Meta(ge=600, le=30 * DAY_S)] = DAY_S
    # A fit child running longer than this is killed (the previous model stays).
    fit_timeout_s: Annotated[float, msgspec.Meta(ge=1, le=7200)] = 600.0
    # The history is saved to the state dir this often (and at stop).
    save_interval_s: Annotated[float, msgspec.Meta(ge=1, le=DAY_S)] = 300.0


Row = tuple[float, dict[str, float]]


def matches(key: str, patterns: Sequence[str]) -> bool:
    """``key`` is one of ``patterns``: a key, or ``family[*]`` for every label of a family."""
    return any(key.startswith(p[:-2]) and key.endswith("]") if p.endswith("[*]") else key == p
               for p in patterns)


class DemandHistory:
    """Step means of the demand resources, bounded, persisted (see the module docstring)."""

    def __init__(self, step_s: float, history_days: float, path: Path | None = None,
                 resources: Sequence[str] = DEFAULT_RESOURCES) -> None:
        self.step_s = float(step_s)
        self.path = path
        self.patterns = tuple(resources)
        self.keep_s = history_days * DAY_S
        self.rows: deque[Row] = deque(maxlen=max(2, math.ceil(self.keep_s / self.step_s)))
        self.keys: list[str] = []
        self._present: set[str] = set()  # the resources' keys in the last looked-at sample
        self._delta = KeyDelta()
        self._bin: int | None = None
        self._sum: dict[str, float] = {}
        self._count: dict[str, int] = {}
        # the summary period's sums (:meth:`take_period`)
        self._psum: dict[str, float] = {}
        self._pcount: dict[str, int] = {}
        self.dirty = False
        self._load()

    # -------------------------------------------------------------- per sample
    def _discover(self, metrics: Mapping[str, float | None]) -> None:
        """Follow the keys that came and went (only those are matched against the patterns)."""
        added, removed = self._delta.delta(metrics)
        present = self._present
        before = len(present)
        present -= removed
        gone = len(present) != before
        new = {k for k in added if matches(k, self.patterns)}
        if new or gone:
            present |= new
            self.keys = sorted(present)[:MAX_RESOURCES]

    def push(self, metrics: Mapping[str, float | None], wall: float) -> None:
        if not math.isfinite(wall):
            return
        if self._delta.changed(metrics):  # the key set changed: look at what came and went
            self._discover(metrics)
        b = int(wall // self.step_s)
        if self._bin is not None and b != self._bin:
            self._close()
        self._bin = b
        for k in self.keys:
            v = metrics.get(k)
            if v is None or not math.isfinite(v):
                continue
            self._sum[k] = self._sum.get(k, 0.0) + v
            self._count[k] = self._count.get(k, 0) + 1
            self._psum[k] = self._psum.get(k, 0.0) + v
            self._pcount[k] = self._pcount.get(k, 0) + 1

    def _close(self) -> None:
        if self._bin is None or not self._count:
            return
        wall = self._bin * self.step_s
        if not self.rows or self.rows[-1][0] < wall:  # the clock went back: keep time order, drop it
            self.rows.append((wall, {k: self._sum[k] / n for k, n in self._count.items()}))
            self.dirty = True
            while self.rows[0][0] < wall - self.keep_s:  # after a long stop: rows older than the window
                self.rows.popleft()
        self._sum, self._count = {}, {}

    def take_period(self) -> dict[str, float]:
        """The resources' means since the last call (the summary period's actual demand)."""
        out = {k: self._psum[k] / n for k, n in self._pcount.items() if n}
        self._psum, self._pcount = {}, {}
        return out

    @property
    def span_s(self) -> float:
        """Seconds from the first kept row to the last."""
        return self.rows[-1][0] - self.rows[0][0] + self.step_s if self.rows else 0.0

    # -------------------------------------------------------------- state
    def snapshot(self) -> list[Row]:
        """The rows now (a shallow copy, microseconds: rows are never changed once appended). Take it
        on the thread that pushes, then :meth:`save` it from a worker thread."""
        self.dirty = False
        return list(self.rows)

    def encode(self, rows: list[Row] | None = None) -> bytes:
        rows = self.snapshot() if rows is None else rows
        return json.dumps({"format": FORMAT, "step_s": self.step_s, "rows": [[w, v] for w, v in rows]},
                          separators=(",", ":")).encode()

    def save(self, rows: list[Row] | None = None) -> None:
        """Write ``rows`` (default: a snapshot now) atomically. Raises OSError, leaving the file as it
        was and :attr:`dirty` set, so the next save tries again."""
        if self.path is None:
            return
        data = self.encode(rows)
        try:
            atomic_write(self.path, data)  # makes the directory
        except OSError:
            self.dirty = True
            raise

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            rows = load_rows(self.path, self.step_s)
        except (OSError, ValueError) as exc:
            log.warning("demand history ignored; starting a new one", path=str(self.path), error=str(exc))
            return
        self.rows.extend(rows[-(self.rows.maxlen or 0):])


def load_rows(path: Path, step_s: float | None = None) -> list[Row]:
    """The rows of a saved history (time order, finite values, at most MAX_RESOURCES keys a row).

    Raises ValueError for anything but a history (kept at ``step_s``, when given)."""
    doc = json.loads(path.read_bytes() or b"null")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("rows"), list):
        raise ValueError("not a demand history")
    step = doc.get("step_s")
    if not isinstance(step, int | float) or not 0 < step < math.inf \
            or (step_s is not None and step != step_s):
        raise ValueError(f"kept at step_s {step!r}, not {step_s}")
    out: list[Row] = []
    last = -math.inf
    for r in doc["rows"]:
        if not (isinstance(r, list) and len(r) == 2 and isinstance(r[0], int | float)
                and isinstance(r[1], dict) and math.isfinite(r[0]) and r[0] > last):
            raise ValueError("a row is not [wall, {resource: value}] in time order")
        vals = {str(k): float(v) for k, v in list(r[1].items())[:MAX_RESOURCES]
                if isinstance(v, int | float) and math.isfinite(v)}
        last = float(r[0])
        out.append((last, vals))
    return out


def saved_step(path: Path) -> float:
    """The ``step_s`` a saved history was kept at (ValueError: not a history)."""
    doc = json.loads(path.read_bytes() or b"null")
    step = doc.get("step_s") if isinstance(doc, dict) else None
    if not isinstance(step, int | float) or not 0 < step < math.inf:
        raise ValueError("not a demand history")
    return float(step)
