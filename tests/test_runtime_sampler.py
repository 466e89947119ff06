"""The sampler: budgets, grouping, failures and staleness, with small real collectors."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import pytest

from agent.collect.sample import Event, Reading
from agent.errors import CollectorUnavailable
from agent.runtime.config import load_config
from agent.runtime.daemon import Daemon
from agent.runtime.sampler import Sampler
from agent.runtime.sdnotify import Notifier
from devtools.fake_nvml import FakeNVML


class Fake:
    def __init__(self, name: str, *, value: float = 1.0, interval_s: float = 0.05, timeout_s: float = 0.2,
                 sleep_s: float = 0.0, fail: bool = False, unavailable: bool = False) -> None:
        self.name, self.value, self.interval_s, self.timeout_s = name, value, interval_s, timeout_s
        self.sleep_s, self.fail, self.unavailable = sleep_s, fail, unavailable
        self.passes = 0
        self.release = threading.Event()

    def start(self) -> None:
        if self.unavailable:
            raise CollectorUnavailable(f"{self.name}: no such hardware")

    def collect(self) -> Reading:
        self.passes += 1
        if self.sleep_s:
            self.release.wait(self.sleep_s)
        if self.fail:
            raise RuntimeError("collector bug")
        return Reading(metrics={f"{self.name}.v": self.value},
                       events=[Event(kind=f"{self.name}.tick", source=self.name, wall=time.time())])

    def close(self) -> None:
        self.release.set()


async def _run(sampler: Sampler, seconds: float) -> None:
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(sampler.run_collector(*g)) for g in sampler.task_groups(
            frozenset({"cpu", "memory", "broken"}))]
        await asyncio.sleep(seconds)
        for t in tasks:
            t.cancel()


def test_group_shares_one_job_and_a_broken_member_costs_only_itself() -> None:
    cpu, mem, broken = Fake("cpu"), Fake("memory", value=2.0), Fake("broken", fail=True)
    sampler = Sampler("n", [cpu, mem, broken])
    assert sampler.task_groups(frozenset({"cpu", "memory", "broken"})) == [("cpu", "memory", "broken")]
    asyncio.run(_run(sampler, 0.3))
    s = sampler.assemble()
    sampler.close()
    assert s.metrics["cpu.v"] == 1.0
    assert s.metrics["memory.v"] == 2.0
    assert s.collectors["cpu"].status == "ok"
    assert s.collectors["broken"].status == "failing"
    assert cpu.passes >= 3
    assert broken.passes == cpu.passes
    kinds = {e.kind for e in s.events}
    assert kinds == {"cpu.tick", "memory.tick"}
    assert sampler.assemble().events == ()  # events are handed over once


def test_hung_collector_goes_late_then_stale_without_piling_up_threads() -> None:
    slow = Fake("disk", sleep_s=30.0, timeout_s=0.05, interval_s=0.05)
    ok = Fake("cpu")
    sampler = Sampler("n", [slow, ok], stale_after=1.0)
    asyncio.run(_run(sampler, 0.4))
    s = sampler.assemble()
    assert slow.passes == 1  # the stuck pass blocks the next one
    assert s.collectors["disk"].status == "late"
    assert s.metrics["cpu.v"] == 1.0
    sampler.close()


def test_unavailable_collector_is_absent_once() -> None:
    gpu = Fake("gpu", unavailable=True)
    sampler = Sampler("n", [gpu, Fake("cpu")])
    asyncio.run(_run(sampler, 0.15))
    s = sampler.assemble()
    sampler.close()
    assert s.collectors["gpu"].status == "absent"
    assert "no such hardware" in s.collectors["gpu"].reason
    assert gpu.passes == 0


def test_stale_metrics_are_reported_missing_not_dropped() -> None:
    cpu = Fake("cpu", interval_s=0.02, timeout_s=0.02)
    sampler = Sampler("n", [cpu], stale_after=1.0)
    asyncio.run(_run(sampler, 0.1))
    time.sleep(0.2)
    s = sampler.assemble()
    sampler.close()
    assert s.collectors["cpu"].status == "stale"
    assert "cpu.v" in s.metrics
    assert s.metrics["cpu.v"] is None


@pytest.mark.parametrize("n", [1, 3])
def test_sequence_numbers_increase(n: int) -> None:
    sampler = Sampler("n", [Fake("cpu")])
    seqs = [sampler.assemble().seq for _ in range(n)]
    sampler.close()
    assert seqs == list(range(1, n + 1))


class InlineFake(Fake):
    """A collector that declares ``inline`` and records the thread each pass ran on."""

    inline = True

    def __init__(self, name: str, **kw: float) -> None:
        super().__init__(name, **kw)
        self.threads: list[int] = []

    def collect(self) -> Reading:
        self.threads.append(threading.get_ident())
        if self.sleep_s and len(self.threads) == 2:  # the second pass is slow (a slow sensor)
            time.sleep(self.sleep_s)
        return Reading(metrics={f"{self.name}.v": self.value})


def test_inline_collectors_run_on_the_loop_in_one_task_and_a_slow_one_moves_to_a_thread() -> None:
    cpu, mem, slow = InlineFake("cpu"), InlineFake("memory", value=2.0), InlineFake("limits", sleep_s=0.08)
    disk = Fake("disk")
    sampler = Sampler("n", [cpu, mem, slow, disk])
    assert sampler.task_groups() == [("cpu", "memory", "limits"), ("disk",)]  # one task for the inline ones
    loop_thread: list[int] = []

    async def run() -> None:
        loop_thread.append(threading.get_ident())
        await _run(sampler, 0.4)

    asyncio.run(run())
    s = sampler.assemble()
    sampler.close()
    assert s.metrics["cpu.v"] == 1.0
    assert s.metrics["memory.v"] == 2.0
    assert s.metrics["limits.v"] == 1.0
    assert set(cpu.threads) == set(mem.threads) == {loop_thread[0]}  # no thread hand-off
    assert len(cpu.threads) >= 3
    # the slow pass (over INLINE_MAX_S) ran on the loop; every later pass in a worker thread
    assert slow.threads[:2] == [loop_thread[0]] * 2
    assert len(slow.threads) > 2
    assert loop_thread[0] not in slow.threads[2:]
    assert not sampler.is_inline("limits")
    assert sampler.is_inline("cpu")


class _DoneAtOnce(Executor):
    """Runs the job in submit(): the pass is finished before the sampler first awaits it."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        fut.set_result(fn(*args, **kwargs))
        return fut


def test_a_stop_that_races_a_finished_pass_is_not_swallowed() -> None:
    """Python 3.11's asyncio.wait_for returned the result when the cancellation arrived after the
    awaited pass had finished (gh-86296): the collector's task went on sleeping, the daemon's
    TaskGroup waited for it and a SIGINT stop hung until heald's 20 s deadline (exit 1, about one
    stop in four). The cancellation is sent at every point of the pass's completion in turn."""

    async def sweep() -> list[int]:
        swallowed = []
        for k in range(12):
            sampler = Sampler("n", [Fake("disk")])
            sampler._executor = _DoneAtOnce()  # type: ignore[assignment]
            task = asyncio.create_task(sampler.collect_once("disk"))
            for _ in range(k):
                await asyncio.sleep(0)
            if task.cancel():  # False once the pass is over: nothing left to swallow
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                else:
                    swallowed.append(k)
            sampler.close()
        return swallowed

    assert asyncio.run(sweep()) == []


class _GatedNVML(FakeNVML):
    """A GPU whose nvmlInit (the gpu collector's start) waits until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml names
        self.entered.set()
        self.gate.wait(10)
        super().nvmlInit()


class _Notes(Notifier):
    """The daemon's notifier with no socket (not under systemd), recording what it would send."""

    def __init__(self) -> None:
        super().__init__("")
        self.sent: list[dict[str, str | int]] = []

    def notify(self, **fields: str | int) -> bool:
        self.sent.append(fields)
        return super().notify(**fields)


def test_ready_only_once_every_collector_has_started(tmp_path: Path) -> None:
    """READY=1 (what `systemctl start` waits for) and "heald ready" come after the last collector's
    start(): an auth log is followed from where it ends at its collector's start, so a line
    written after READY must be seen. Before, READY went out with the tasks merely created (a CI
    run's brute-force lines, written right after start, were skipped as history)."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[node]\nid = "n1"\n[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'runtime_dir = "{tmp_path / "run"}"\n[model]\nenabled = false\n')
    nvml = _GatedNVML()
    daemon = Daemon(load_config(cfg, env={}), cfg, nvml=nvml)
    notes = _Notes()
    daemon.notifier = notes
    seen: list[tuple[bool, bool]] = []

    async def go() -> int:
        task = asyncio.create_task(daemon.run())
        await asyncio.to_thread(nvml.entered.wait, 10)
        await asyncio.sleep(1.0)  # every other collector has started by now
        seen.append((any("READY" in n for n in notes.sent), daemon.sampler.statuses()["gpu"] == "starting"))
        nvml.gate.set()
        for _ in range(100):
            if any("READY" in n for n in notes.sent):
                break
            await asyncio.sleep(0.05)
        seen.append((any("READY" in n for n in notes.sent), daemon.sampler.statuses()["gpu"] == "ok"))
        daemon.request_stop()
        return await task

    assert asyncio.run(go()) == 0
    assert seen == [(False, True), (True, True)]
