"""Cost transparency: what this node wastes, accumulated from the samples it already has.

Per sample (:meth:`CostMeter.on_sample`, O(1) per metric it reads, no I/O) the time since the
previous sample is credited to:

* ``core_h`` / ``idle_core_h``: core-hours present and core-hours unused, per core where the
  cpu collector reports ``cpu.util_pct[cpuN]`` (``(1 - util/100) x dt`` each), else
  ``cpu.count x (1 - cpu.util_pct/100) x dt``; ``cores_under_line_h`` counts the core-hours a core
  spent under ``[cost] idle_line_pct`` (a core doing nothing useful);
* ``gpu_h`` / ``idle_gpu_h``: GPU-hours of powered GPUs and of those under ``gpu_idle_line_pct``;
  ``gpu_mem_idle_gib_h``: GPU memory held (used) on GPUs that are under the line: reserved, unused;
* ``mem_stranded_gib_h``: memory available (unused) GiB-hours;
* ``energy_kwh``: GPU power draw (``gpu.power_w``) integrated, plus the RAPL package counters
  (``/sys/class/powercap/intel-rapl:*/energy_uj``) where readable, read at each roll (not per
  sample).

Two accumulators take the same credits: the hour bucket (rolled into a bounded history kept in
the state directory, ``cost/hours.json``) and the summary period (``[cost] summary_interval_s``),
which becomes one compact ``cost`` wire message (:class:`agent.wire.Cost`). Money is the
resource-hours times ``[cost]`` prices (zero by default: figures are then resource-hours only).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Final

import msgspec
import structlog

from agent import wire
from agent.collect.sample import Sample
from agent.fsutil import atomic_write, describe

log = structlog.get_logger("heald.cost")

GIB: Final = float(1 << 30)
#: Hours kept in the node's history (two weeks).
HISTORY_HOURS: Final = 336
RAPL_ROOT: Final = "/sys/class/powercap"
Price = Annotated[float, msgspec.Meta(ge=0, le=1e9)]


class CostSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    # The node's class (a label for the fleet's cost page: "gpu-a100", "cpu-large"); set the prices
    # of each class in that class's conf.d drop-in.
    node_class: Annotated[str, msgspec.Meta(max_length=64)] = "default"
    # A summary of the period goes to the coordinator this often (and at stop).
    summary_interval_s: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 3600.0
    # A core under this utilisation counts as idle (cores_under_line_h).
    idle_line_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 10.0
    # A GPU under this utilisation counts as idle (idle_gpu_h, gpu_mem_idle_gib_h).
    gpu_idle_line_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 5.0
    # The prices' currency ("EUR", "USD"). With every price zero (the default) the figures are
    # resource-hours only.
    currency: Annotated[str, msgspec.Meta(max_length=16)] = ""
    # Price of one idle core-hour.
    per_core_hour: Price = 0.0
    # Price of one idle GPU-hour.
    per_gpu_hour: Price = 0.0
    # Price of one kWh drawn (GPU power from NVML, CPU packages from RAPL).
    per_kwh: Price = 0.0
    # Price of one GiB-hour of memory left unused.
    per_gib_hour: Price = 0.0
    # A gap between samples longer than this is not credited (the agent was stopped or stalled).
    max_gap_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 10.0


FIELDS: Final = ("seconds", "core_h", "idle_core_h", "cores_under_line_h", "gpu_h", "idle_gpu_h",
                 "gpu_mem_idle_gib_h", "mem_stranded_gib_h", "energy_kwh")


class Totals:
    """One accumulator (an hour, or a summary period)."""

    __slots__ = ("start", "end", *FIELDS)

    def __init__(self, start: float) -> None:
        self.start = self.end = start
        self.seconds = self.core_h = self.idle_core_h = self.cores_under_line_h = 0.0
        self.gpu_h = self.idle_gpu_h = self.gpu_mem_idle_gib_h = self.mem_stranded_gib_h = 0.0
        self.energy_kwh = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"start": self.start, "end": self.end} | {f: getattr(self, f) for f in FIELDS}


def money(t: Totals | dict[str, float], s: CostSettings) -> float:
    """The idle resources' price: idle core-hours, idle GPU-hours, stranded GiB-hours, plus energy."""
    get = t.get if isinstance(t, dict) else lambda f, d=0.0: getattr(t, f, d)
    return (get("idle_core_h", 0.0) * s.per_core_hour + get("idle_gpu_h", 0.0) * s.per_gpu_hour
            + get("mem_stranded_gib_h", 0.0) * s.per_gib_hour + get("energy_kwh", 0.0) * s.per_kwh)


class CostMeter:
    """Accumulates a node's idle resources per sample; rolls hours; builds summaries."""

    def __init__(self, settings: CostSettings, state_dir: Path | str | None = None, *,
                 rapl_root: str = RAPL_ROOT) -> None:
        self.settings = settings
        self.path = None if state_dir is None else Path(state_dir) / "cost" / "hours.json"
        self.hours: deque[dict[str, float]] = deque(maxlen=HISTORY_HOURS)
        self._last_mono: float | None = None
        self._hour: Totals | None = None
        self._period: Totals | None = None
        self._core_keys: list[str] = []
        self._gpu_keys: list[tuple[str, str, str]] = []
        self._ncores = -1
        self._nmetrics = -1
        self.core_idle_s: dict[str, float] = {}  # per core, since start (for checks and `heald status`)
        self._rapl = [p for p in sorted(Path(rapl_root).glob("intel-rapl:*")) if ":" not in p.name[11:]]
        self._rapl_last: dict[Path, int] = {}
        # the demand part of each summary (agent.score.demand_stage.DemandStage.summaries), when on
        self.demand: Callable[[float, float], list[wire.DemandSummary]] | None = None
        self._load()

    # -------------------------------------------------------------- per sample
    def _discover(self, metrics: dict[str, float | None], ncores: int) -> None:
        self._ncores, self._nmetrics = ncores, len(metrics)
        self._core_keys = [k for k in metrics if k.startswith("cpu.util_pct[")]
        labels = [k[13:-1] for k in metrics if k.startswith("gpu.util_pct[")]
        self._gpu_keys = [(f"gpu.util_pct[{g}]", f"gpu.mem_used_bytes[{g}]", f"gpu.power_w[{g}]")
                          for g in labels]

    def on_sample(self, sample: Sample) -> None:
        last, self._last_mono = self._last_mono, sample.mono
        m = sample.metrics
        count = m.get("cpu.count")
        ncores = int(count) if count is not None and math.isfinite(count) else 0
        if ncores != self._ncores or len(m) != self._nmetrics:  # the key set changed: look again
            self._discover(m, ncores)
        if last is None:
            self._roll(sample.wall)
            return
        dt = sample.mono - last
        if not 0 < dt <= self.settings.max_gap_s:
            self._roll(sample.wall)
            return
        h = dt / 3600.0
        s = self.settings
        core_h = idle = under = 0.0
        if self._core_keys:
            for k in self._core_keys:
                u = m.get(k)
                if u is None or not math.isfinite(u):
                    continue
                u = min(max(u, 0.0), 100.0)
                core_h += h
                free = (1.0 - u / 100.0) * dt
                idle += free
                self.core_idle_s[k] = self.core_idle_s.get(k, 0.0) + free
                under += h if u < s.idle_line_pct else 0.0
            idle /= 3600.0
        else:
            u = m.get("cpu.util_pct")
            if u is not None and math.isfinite(u) and ncores:
                u = min(max(u, 0.0), 100.0)
                core_h = ncores * h
                idle = ncores * h * (1.0 - u / 100.0)
                under = core_h if u < s.idle_line_pct else 0.0
        gpu_h = idle_gpu = gpu_mem = kwh = 0.0
        for uk, mk, pk in self._gpu_keys:
            u = m.get(uk)
            if u is None or not math.isfinite(u):
                continue
            gpu_h += h
            if u < s.gpu_idle_line_pct:
                idle_gpu += h
                used = m.get(mk)
                if used is not None and math.isfinite(used) and used > 0:
                    gpu_mem += used / GIB * h
            p = m.get(pk)
            if p is not None and math.isfinite(p) and p > 0:
                kwh += p * h / 1000.0
        avail = m.get("mem.available_bytes")
        stranded = avail / GIB * h if avail is not None and math.isfinite(avail) and avail > 0 else 0.0
        for t in (self._hour, self._period):
            if t is None:
                continue
            t.seconds += dt
            t.core_h += core_h
            t.idle_core_h += idle
            t.cores_under_line_h += under
            t.gpu_h += gpu_h
            t.idle_gpu_h += idle_gpu
            t.gpu_mem_idle_gib_h += gpu_mem
            t.mem_stranded_gib_h += stranded
            t.energy_kwh += kwh
            t.end = sample.wall
        self._roll(sample.wall)

    def _roll(self, wall: float) -> None:
        """Start the hour bucket; close it when ``wall`` is in the next hour."""
        if self._period is None:
            self._period = Totals(wall)
        hour = math.floor(wall / 3600.0) * 3600.0
        if self._hour is None:
            self._hour = Totals(hour)
        elif hour != self._hour.start:
            self._close_hour()
            self._hour = Totals(hour)

    def _close_hour(self) -> None:
        if self._hour is not None and self._hour.seconds > 0:
            row = self._hour.as_dict()
            row["end"] = self._hour.start + 3600.0
            if self.hours and self.hours[-1]["start"] == row["start"]:  # the hour we were stopped in
                prev = self.hours.pop()
                row = {k: (v + prev.get(k, 0.0) if k in FIELDS else v) for k, v in row.items()}
            self.hours.append(row)

    # -------------------------------------------------------------- rolls, summaries, state
    def _rapl_kwh(self) -> float:
        """Energy the RAPL packages counted since the last call (kWh); 0 where unreadable."""
        total = 0.0
        for p in self._rapl:
            try:
                now = int((p / "energy_uj").read_text())
                wrap = int((p / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            prev = self._rapl_last.get(p)
            self._rapl_last[p] = now
            if prev is not None:
                total += ((now - prev) % (wrap + 1) if wrap > 0 else max(now - prev, 0)) / 3.6e12
        return total

    def take_summary(self, wall: float | None = None) -> wire.Cost | None:
        """The period's summary message (None when it credited no time); starts the next period."""
        period = self._period
        rapl = self._rapl_kwh()
        if period is not None:
            period.energy_kwh += rapl
        if self._hour is not None:
            self._hour.energy_kwh += rapl
        self._period = Totals(wall if wall is not None else time.time())
        if period is None or period.seconds <= 0:
            return None
        s = self.settings
        end = max(period.end, period.start)
        demand = self.demand(period.start, end) if self.demand is not None else []
        return wire.Cost(
            v=wire.PROTOCOL_VERSION, node="_", site="_", seq=0, ts=time.time(), mono=time.monotonic(),
            start=period.start, end=end, node_class=s.node_class,
            currency=s.currency, money=money(period, s), seconds=period.seconds, core_h=period.core_h,
            idle_core_h=period.idle_core_h, cores_under_line_h=period.cores_under_line_h,
            gpu_h=period.gpu_h, idle_gpu_h=period.idle_gpu_h, gpu_mem_idle_gib_h=period.gpu_mem_idle_gib_h,
            mem_stranded_gib_h=period.mem_stranded_gib_h, energy_kwh=period.energy_kwh, demand=demand)

    def history(self) -> list[dict[str, float]]:
        """The closed hours and the current one."""
        cur = [self._hour.as_dict()] if self._hour is not None and self._hour.seconds > 0 else []
        return [*self.hours, *cur]

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Atomic, never in place: hundreds of hourly rows are no small state file, and an
            # in-place write on a full disk could tear them (the load then drops the history).
            atomic_write(self.path, json.dumps(self.history()).encode())
        except OSError as exc:
            log.warning("cost history not saved", path=str(self.path), **describe(exc))

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            rows = json.loads(self.path.read_bytes() or b"[]")
        except (OSError, ValueError):
            return
        if isinstance(rows, list):
            for r in rows[-HISTORY_HOURS:]:
                if isinstance(r, dict) and all(isinstance(v, int | float) for v in r.values()):
                    self.hours.append({str(k): float(v) for k, v in r.items()})

    async def run(self, send: Callable[[wire.Envelope], object]) -> None:
        """Every ``summary_interval_s``: send the period's summary, keep the history; at stop too."""
        try:
            while True:
                await asyncio.sleep(self.settings.summary_interval_s)
                self._flush(send)
                await asyncio.to_thread(self.save)
        except asyncio.CancelledError:
            self._flush(send)
            self.save()
            raise

    def _flush(self, send: Callable[[wire.Envelope], object]) -> None:
        msg = self.take_summary()
        if msg is not None:
            send(msg)
            log.info("cost summary", seconds=round(msg.seconds, 1), idle_core_h=round(msg.idle_core_h, 4),
                     idle_gpu_h=round(msg.idle_gpu_h, 4), money=round(msg.money, 4))
