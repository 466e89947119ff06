"""Runs the collectors and assembles their latest readings into sequence-numbered Samples.

Each collector runs in a task at its own interval. One that may block (statvfs on NFS, NVML,
``systemctl``/``ss`` children, hashing binaries, fsyncs) runs its ``collect()`` in a worker thread
under its time budget: a pass that overruns is abandoned (its metrics go stale, then missing) and
no second pass of that collector starts until the first returns, so a hung NVML call cannot pile
up threads. One that only reads /proc and /sys files (its ``inline`` attribute is true: cpu,
memory, network without probes, cgroups, limits) runs on the event loop itself: no thread
hand-off, no wake-up of a worker and of the loop again, and those sharing an interval run in one
task (one timer). An inline pass that ever takes longer than :data:`INLINE_MAX_S` (a slow
sensor, a loaded host) moves that collector to a worker thread for good, logged once. A collector
that cannot start is disabled and logged once.

The fast path: a collector with one (:class:`agent.collect.base.FastCollector`: the cgroup
collector, while a limited cgroup heads for its limit within seconds) sets :attr:`Sampler.hot`
after a pass; the daemon then calls :meth:`Sampler.fast_pass` every few tenths of a second, on
the event loop, and evaluates the playbooks on :meth:`Sampler.assemble` ``(fast=True)``: the
latest readings with the hot metrics read anew, the same sequence number, no events (they go
with the next sample), not scored and not reported.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from agent.collect import registry
from agent.collect.base import Collector, FastCollector
from agent.collect.sample import CollectorState, Event, Reading, Sample
from agent.collect.settings import CollectSettings
from agent.errors import CollectorUnavailable

log = structlog.get_logger("heald.sampler")
#: Every collector a node can run; those a config disables show as absent in each Sample.
COLLECTOR_NAMES = ("cpu", "memory", "disk", "network", "processes", "gpu")
#: An inline pass slower than this moves its collector to a worker thread (the loop must stay free).
INLINE_MAX_S = 0.05
T = TypeVar("T")


@dataclass
class _Slot:
    collector: Collector
    # starting | ok | late | failing (its last pass raised) | absent (host lacks it) | disabled
    status: str = "starting"
    reason: str = ""
    reading: Reading | None = None
    at: float | None = None  # monotonic time of the last good reading
    duration_ms: float | None = None
    failures: int = 0
    known_keys: set[str] = field(default_factory=set)
    inline: bool = False  # collect() runs on the event loop (see the module docstring)
    fast: bool = False  # it has a fast path (a FastCollector)


class Sampler:
    """Owns the collectors; ``assemble()`` builds one Sample from their latest readings."""

    def __init__(self, node: str, collectors: list[Collector], stale_after: float = 3.0,
                 absent: dict[str, str] | None = None) -> None:
        self.node = node
        self.stale_after = stale_after
        self.seq = 0
        self._slots = {c.name: _Slot(c, inline=getattr(c, "inline", False) is True,
                                     fast=isinstance(c, FastCollector)) for c in collectors}
        self._absent = dict(absent or {})
        self._events: list[Event] = []
        self._executor = ThreadPoolExecutor(max_workers=max(2, len(collectors) + 1),
                                            thread_name_prefix="heald-collect")
        self._pending: dict[str, Future[list[tuple[str, Reading | Exception, float]]]] = {}
        # Set once every collector has had its start() (ok, absent or disabled): from then on the
        # node is watched (an auth log is followed from its end as of then: see ``wait_started``).
        self._unstarted = set(self._slots)
        self._all_started = asyncio.Event()
        #: Set after a pass of a collector whose fast path is hot (see the module docstring).
        self.hot = asyncio.Event()
        if not self._unstarted:
            self._all_started.set()

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    async def _in_thread(self, fn: Callable[[], T], budget_s: float) -> T:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, fn)
        async with asyncio.timeout(budget_s):  # never asyncio.wait_for here (tests/test_architecture.py)
            return await asyncio.shield(fut)

    async def wait_started(self) -> None:
        """Return once every collector's start() has returned (or failed, or timed out)."""
        await self._all_started.wait()

    def _started(self, name: str) -> None:
        self._unstarted.discard(name)
        if not self._unstarted:
            self._all_started.set()

    async def start_collector(self, name: str) -> bool:
        try:
            return await self._start_collector(name)
        finally:
            self._started(name)

    async def _start_collector(self, name: str) -> bool:
        slot = self._slots[name]
        c = slot.collector
        try:
            await self._in_thread(c.start, max(c.timeout_s, 5.0))
        except CollectorUnavailable as exc:
            slot.status, slot.reason = "absent", str(exc)
            log.info("collector absent", collector=name, reason=str(exc))
            return False
        except TimeoutError:
            slot.status, slot.reason = "disabled", "start timed out"
            log.warning("collector disabled", collector=name, reason="start timed out")
            return False
        except Exception as exc:  # noqa: BLE001 - a collector bug must disable it, not the daemon
            slot.status, slot.reason = "disabled", f"{type(exc).__name__}: {exc}"
            log.warning("collector disabled", collector=name, reason=slot.reason)
            return False
        slot.status = "ok"
        return True

    def _late(self, name: str) -> None:
        slot = self._slots[name]
        slot.status = "late"
        slot.failures += 1
        if slot.failures in (1, 10) or slot.failures % 600 == 0:
            log.warning("collector pass overran its budget", collector=name,
                        timeout_s=slot.collector.timeout_s, failures=slot.failures)

    def _apply(self, name: str, result: Reading | Exception, duration_ms: float) -> None:
        slot = self._slots[name]
        if isinstance(result, Exception):
            slot.status = "failing"
            slot.failures += 1
            if slot.failures in (1, 10) or slot.failures % 600 == 0:
                log.warning("collector pass failed", collector=name,
                            error=f"{type(result).__name__}: {result}", failures=slot.failures)
            return
        slot.duration_ms = duration_ms
        slot.reading = result
        slot.at = time.monotonic()
        slot.status = "ok"
        slot.known_keys.update(result.metrics)
        if result.events:
            self._events.extend(result.events)
            del self._events[:-1000]  # bounded if nobody drains (never in the daemon)
        if slot.fast and slot.inline and slot.collector.hot:  # type: ignore[attr-defined]
            self.hot.set()

    def fast_pass(self) -> bool:
        """One fast-path reading of every hot collector that runs on the event loop (one moved to
        a worker thread has none: its state is not shared across threads): its metrics as they
        are now replace its last reading's. False when none is hot (the fast path then waits for
        :attr:`hot` again)."""
        any_hot = False
        for name, slot in self._slots.items():
            c = slot.collector
            if (not slot.fast or slot.status != "ok" or slot.reading is None or not slot.inline
                    or not isinstance(c, FastCollector) or not c.hot):
                continue
            try:
                extra = c.collect_hot()
            except Exception as exc:  # noqa: BLE001 - a collector bug costs its fast path, not the daemon
                log.warning("collector fast path failed", collector=name,
                            error=f"{type(exc).__name__}: {exc}")
                continue
            any_hot = True
            last = slot.reading
            slot.reading = Reading(metrics=extra.metrics, events=last.events, detail=last.detail)
            slot.known_keys.update(extra.metrics)
            if extra.events:
                self._events.extend(extra.events)
                del self._events[:-1000]
        return any_hot

    def _collect_many(self, names: tuple[str, ...]) -> list[tuple[str, Reading | Exception, float]]:
        """Worker-thread side: one pass of each collector in turn, each timed on its own."""
        out: list[tuple[str, Reading | Exception, float]] = []
        for name in names:
            t0 = time.perf_counter()
            try:
                result: Reading | Exception = self._slots[name].collector.collect()
            except Exception as exc:  # noqa: BLE001 - a collector bug costs one pass, not the daemon
                result = exc
            out.append((name, result, (time.perf_counter() - t0) * 1000.0))
        return out

    def _collect_inline(self, names: list[str]) -> None:
        """On the event loop: one pass of each inline collector, timed; a slow one leaves the loop."""
        for name, result, ms in self._collect_many(tuple(names)):
            self._apply(name, result, ms)
            if ms > INLINE_MAX_S * 1000.0:
                self._slots[name].inline = False
                log.warning("collector pass too slow for the event loop; it runs in a worker thread "
                            "from now on", collector=name, duration_ms=round(ms, 1),
                            limit_ms=INLINE_MAX_S * 1000.0)

    def is_inline(self, name: str) -> bool:
        return self._slots[name].inline

    async def collect_once(self, *names: str) -> None:
        """One pass of one collector — or of several in one worker-thread job, to save the
        thread hand-off per collector — under their summed time budget. Never raises (but for
        cancellation). A pass still stuck in its thread blocks the next one: no pile-up.
        Inline collectors (see the module docstring) run first, on the loop, without a budget."""
        inline = [n for n in names if self._slots[n].inline]
        if inline:
            self._collect_inline(inline)
            names = tuple(n for n in names if n not in inline)
            if not names:
                return
        key = "+".join(names)
        prev = self._pending.get(key)
        if prev is not None and not prev.done():
            for name in names:
                self._slots[name].status = "late"
            return
        budget = sum(self._slots[n].collector.timeout_s for n in names)
        fut = self._executor.submit(self._collect_many, names)
        self._pending[key] = fut
        try:
            async with asyncio.timeout(budget):
                results = await asyncio.shield(asyncio.wrap_future(fut))
        except TimeoutError:
            for name in names:
                self._late(name)
            return
        for name, result, ms in results:
            self._apply(name, result, ms)

    async def run_collector(self, *names: str, stop: asyncio.Event | None = None) -> None:
        """The task of one collector, or of a group sharing an interval: start each (a collector
        that cannot start is dropped from the group), then a pass every interval until cancelled."""
        started = tuple([n for n in names if await self.start_collector(n)])
        if not started:
            return
        interval = self._slots[started[0]].collector.interval_s
        next_at = time.monotonic()
        while stop is None or not stop.is_set():
            await self.collect_once(*started)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind: skip missed ticks rather than bursting
                next_at = time.monotonic()
                delay = 0
            await asyncio.sleep(delay)

    def task_groups(self, groupable: frozenset[str] = frozenset({"cpu", "memory", "network"})
                    ) -> list[tuple[str, ...]]:
        """How the daemon runs the collectors: inline ones (on the loop) that share an interval run
        in one task; cheap, never-blocking ones that share an interval run as one worker-thread
        job per tick; the rest (disk: statvfs can hang on NFS; processes: systemctl;
        gpu: NVML) get their own job so that one cannot stall the others."""
        inline: dict[float, list[str]] = {}
        groups: dict[float, list[str]] = {}
        out: list[tuple[str, ...]] = []
        for name, slot in self._slots.items():
            if slot.inline:
                inline.setdefault(slot.collector.interval_s, []).append(name)
            elif name in groupable:
                groups.setdefault(slot.collector.interval_s, []).append(name)
            else:
                out.append((name,))
        return [tuple(g) for g in inline.values()] + [tuple(g) for g in groups.values()] + out

    def statuses(self) -> dict[str, str]:
        """Each collector's status now (starting, ok, late, failing, absent, disabled)."""
        return {name: slot.status for name, slot in self._slots.items()}

    def assemble(self, *, fast: bool = False) -> Sample:
        """One Sample from the latest readings; stale collectors' metrics are reported missing.
        ``fast``: for the fast path's evaluation only: the sequence number is not advanced and the
        events stay for the next sample."""
        now = time.monotonic()
        metrics: dict[str, float | None] = {}
        states: dict[str, CollectorState] = {}
        detail: dict[str, dict[str, object]] = {}
        for name, slot in self._slots.items():
            c = slot.collector
            age = None if slot.at is None else now - slot.at
            fresh = age is not None and age <= self.stale_after * c.interval_s + c.timeout_s
            status = slot.status
            if status == "ok" and not fresh:
                status = "stale"
            if slot.reading is not None and fresh:
                metrics.update(slot.reading.metrics)
                if slot.reading.detail:
                    detail[name] = slot.reading.detail
            else:
                metrics.update(dict.fromkeys(slot.known_keys))
            states[name] = CollectorState(status=status, reason=slot.reason, age_s=age,
                                          duration_ms=slot.duration_ms)
        for name, reason in self._absent.items():
            states[name] = CollectorState(status="absent", reason=reason)
        if fast:
            return Sample(node=self.node, seq=self.seq, wall=time.time(), mono=now, metrics=metrics,
                          events=(), collectors=states, detail=detail)
        events, self._events = tuple(self._events), []
        self.seq += 1
        return Sample(node=self.node, seq=self.seq, wall=time.time(), mono=now, metrics=metrics,
                      events=events, collectors=states, detail=detail)

    def close(self) -> None:
        for slot in self._slots.values():
            try:
                slot.collector.close()
            except Exception as exc:  # noqa: BLE001 - closing must go on for the others
                log.warning("collector close failed", collector=slot.collector.name, error=str(exc))
        self._executor.shutdown(wait=False, cancel_futures=True)


def build_sampler(node: str, collect: CollectSettings, *, stale_after: float,
                  nvml: object | None = None, state_dir: str | None = None) -> Sampler:
    """A Sampler over the collectors ``collect`` enables; the others are reported as absent."""
    collectors = registry.build(collect, nvml=nvml, state_dir=state_dir)
    enabled = {c.name for c in collectors}
    absent = {name: "disabled in config" for name in COLLECTOR_NAMES if name not in enabled}
    return Sampler(node, collectors, stale_after=stale_after, absent=absent)


def take_sample(node: str, collect: CollectSettings, *, window: float = 1.0,
                nvml: object | None = None) -> Sample:
    """Start every collector, run two passes ``window`` seconds apart, return one Sample
    (``heald once``). Blocking: it runs its own event loop."""
    sampler = build_sampler(node, collect, stale_after=1e9, nvml=nvml)

    async def go() -> Sample:
        started = [n for n in sampler.names if await sampler.start_collector(n)]
        for n in started:
            await sampler.collect_once(n)
        await asyncio.sleep(window)
        await asyncio.gather(*(sampler.collect_once(n) for n in started))
        return sampler.assemble()

    try:
        return asyncio.run(go())
    finally:
        sampler.close()
