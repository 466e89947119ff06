"""The fast path: a limited cgroup heading for its limit within seconds is read every 0.1 s and the
playbooks evaluated on each reading, not once a second (issue 20: 60 MiB/s into 256 MiB was
OOM-killed by the kernel 5 s after it started, before the 1 Hz trigger could hold).

The collector's half on a fixture tree (hot or not, ``cgroup.mem.eta_now_s``, what a fast
reading keeps and drops), the sampler's half with a small collector, and the daemon's ``fast``
task end to end with a recording decider. The real cgroups, leaks and the shipped playbook:
tests/test_cgroup_memory.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agent.collect.base import FastCollector
from agent.collect.cgroups import NOW_S, CgroupCollector
from agent.collect.sample import Event, Reading, Sample
from agent.collect.settings import CgroupSettings
from agent.runtime.config import load_config
from agent.runtime.daemon import Daemon
from agent.runtime.pipeline import Pipeline
from agent.runtime.sampler import Sampler
from agent.score.types import Risk

MIB = 1 << 20


def v1_tree(tmp_path: Path) -> tuple[Path, Path]:
    """Two limited v1 cgroups (100 MiB): ``app`` (the one that grows) and ``calm``."""
    base = tmp_path / "sys/fs/cgroup/memory"
    base.mkdir(parents=True)
    (base / "memory.limit_in_bytes").write_text("9223372036854771712")
    dirs = []
    for name in ("app", "calm"):
        d = base / name
        d.mkdir()
        (d / "memory.limit_in_bytes").write_text(str(100 * MIB))
        (d / "memory.stat").write_text("total_inactive_file 0\ntotal_active_file 0\n")
        (d / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
        (d / "memory.usage_in_bytes").write_text(str(10 * MIB))
        dirs.append(d)
    return dirs[0], dirs[1]


def use(d: Path, mib: float) -> None:
    (d / "memory.usage_in_bytes").write_text(str(int(mib * MIB)))


def test_a_calm_node_is_never_hot(tmp_path: Path) -> None:
    app, _ = v1_tree(tmp_path)
    c = CgroupCollector(CgroupSettings(watch_changes=False), root=str(tmp_path))
    c.start()
    for mib in (10, 10.1, 10.2, 10.3):  # 2 MiB/s into 90 MiB of room: 45 s away, not within 30 s
        use(app, mib)
        c.collect()
        time.sleep(0.05)
    assert isinstance(c, FastCollector)
    assert not c.hot
    assert not CgroupCollector(CgroupSettings(watch_changes=False, fast_interval_s=0),
                               root=str(tmp_path)).hot


def test_a_cgroup_sitting_at_its_limit_with_jitter_is_not_hot(tmp_path: Path) -> None:
    """Within 30 s of its limit by any positive step, it would keep ten evaluations a second
    going for as long as it sits there: hot needs growth of at least 2 % of the limit a second."""
    app, _ = v1_tree(tmp_path)
    c = CgroupCollector(CgroupSettings(watch_changes=False), root=str(tmp_path))
    c.start()
    for mib in (97, 97.5, 97.2, 97.7, 97.3, 97.8):  # steps of +0.5 MiB in 0.4 s: 1.25 MiB/s
        use(app, mib)
        c.collect()
        assert not c.hot, mib
        time.sleep(0.4)
    use(app, 98.8)  # +1 MiB in 0.4 s: 2.5 % of the limit a second, 1.2 MiB left: hot
    c.collect()
    assert c.hot


def test_the_second_reading_of_a_fast_leak_is_hot_and_a_fast_reading_replaces_only_its_memory(
        tmp_path: Path) -> None:
    app, calm = v1_tree(tmp_path)
    c = CgroupCollector(CgroupSettings(watch_changes=False, slope_window_s=2), root=str(tmp_path))
    c.start()
    c.collect()
    time.sleep(0.4)
    use(app, 40)  # +30 MiB in 0.4 s: 60 MiB of room left, full in under a second at this rate
    first = c.collect().metrics
    assert c.hot, "the slope needs three readings; the step since the last one is enough to be hot"
    assert "cgroup.mem.eta_s[/app]" not in first
    assert first["cgroup.mem.eta_now_s[/app]"] == pytest.approx(60 / (30 / 0.4), rel=0.1)
    use(calm, 90)  # the calm cgroup is not hot: a fast reading does not read it again
    time.sleep(0.1)
    use(app, 48)
    fast = c.collect_hot().metrics
    assert fast["cgroup.mem.used_pct[/app]"] == pytest.approx(48.0)
    assert fast["cgroup.mem.used_pct[/calm]"] == pytest.approx(10.0), "the last pass's value stands"
    assert fast["cgroup.mem.eta_s[/app]"] < 3
    # the leak stops: once the newest reading NOW_S older is as high, the "right now" ETA is gone
    # (not left over from the last reading) while the 8 s slope still remembers the growth
    time.sleep(NOW_S + 0.05)
    c.collect_hot()
    time.sleep(0.05)
    after = c.collect_hot().metrics
    assert "cgroup.mem.eta_now_s[/app]" not in after
    assert after["cgroup.mem.eta_s[/app]"] < 10
    assert c.hot, "still hot on the slope"
    time.sleep(2.05)  # the slope's window: flat since, neither it nor the last step grows
    c.collect_hot()
    assert not c.hot


def test_a_fast_reading_passes_on_a_new_oom_kill_once(tmp_path: Path) -> None:
    app, _ = v1_tree(tmp_path)
    c = CgroupCollector(CgroupSettings(watch_changes=False), root=str(tmp_path))
    c.start()
    c.collect()
    time.sleep(0.2)
    use(app, 80)
    c.collect()
    assert c.hot
    (app / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    use(app, 99)
    events = c.collect_hot().events
    assert [(e.kind, e.labels["cgroup"], e.value) for e in events] == [("cgroup.oom_kill", "/app", 1.0)]
    assert c.collect_hot().events == []


class Hot:
    """A small collector with a fast path: hot while ``hot`` is set; counts its readings."""

    name, interval_s, timeout_s, inline = "cgroups", 1.0, 0.5, True

    def __init__(self) -> None:
        self.hot = True
        self.value = 0.0
        self.passes = self.fast = 0

    def start(self) -> None:
        pass

    def collect(self) -> Reading:
        self.passes += 1
        return Reading(metrics={"x": self.value, "pass": float(self.passes)},
                       events=[Event(kind="tick", source="cgroups", wall=time.time())])

    def collect_hot(self) -> Reading:
        self.fast += 1
        self.value += 1
        return Reading(metrics={"x": self.value})

    def close(self) -> None:
        pass


def test_the_sampler_merges_a_fast_reading_without_a_new_sequence_number_or_the_events() -> None:
    col = Hot()
    sampler = Sampler("n", [col])

    async def go() -> tuple[Sample, Sample, Sample, bool]:
        await sampler.start_collector("cgroups")
        await sampler.collect_once("cgroups")
        assert sampler.hot.is_set()
        regular = sampler.assemble()
        assert sampler.fast_pass()
        fast = sampler.assemble(fast=True)
        col.hot = False
        none = not sampler.fast_pass()
        return regular, fast, sampler.assemble(), none

    regular, fast, nxt, none = asyncio.run(go())
    assert fast.seq == regular.seq
    assert nxt.seq == regular.seq + 1
    assert fast.metrics["x"] == 1.0
    assert regular.metrics["x"] == 0.0
    assert "pass" not in fast.metrics
    assert fast.events == ()
    assert regular.events != ()
    assert none
    assert col.fast == 1


def test_a_collector_moved_off_the_loop_has_no_fast_path() -> None:
    col = Hot()
    col.inline = False
    sampler = Sampler("n", [col])

    async def go() -> bool:
        await sampler.start_collector("cgroups")
        await sampler.collect_once("cgroups")
        return sampler.hot.is_set() or sampler.fast_pass()

    assert asyncio.run(go()) is False
    assert col.fast == 0


class Recording:
    def __init__(self) -> None:
        self.seen: list[tuple[int, bool, float]] = []  # seq, fast, when
        self.fast = False  # set by the pipeline below around a fast-path evaluation

    def set_connected(self, connected: bool) -> None:
        pass

    def set_auto_hold(self, held: bool) -> None:
        pass

    async def evaluate(self, sample: Sample, risk: Risk | None) -> None:
        self.seen.append((sample.seq, self.fast, time.monotonic()))


class Marking(Pipeline):
    def __init__(self, decider: Recording) -> None:
        super().__init__(decider=decider)
        self.recording = decider

    async def process_fast(self, sample: Sample) -> None:
        self.recording.fast = True
        try:
            await super().process_fast(sample)
        finally:
            self.recording.fast = False


@pytest.mark.parametrize("interval", [0.1, 0.0])
def test_the_daemon_evaluates_the_playbooks_on_each_fast_reading_while_hot(tmp_path: Path,
                                                                           interval: float) -> None:
    """The daemon's ``fast`` task: every 0.1 s while hot, the playbooks see the new reading with
    the last sample's number; nothing once it is calm; ``fast_interval_s = 0``: never."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[node]\nid = "n1"\n[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'runtime_dir = "{tmp_path / "run"}"\n[model]\nenabled = false\n'
                   f"[collect.cgroups]\nfast_interval_s = {interval}\n")
    daemon = Daemon(load_config(cfg, env={}), cfg)
    col = Hot()
    daemon.sampler = Sampler("n1", [col])
    decider = Recording()
    daemon.pipeline = Marking(decider)

    async def go() -> int:
        task = asyncio.create_task(daemon.run())
        await asyncio.sleep(2.2)
        col.hot = False
        await asyncio.sleep(1.0)
        daemon.request_stop()
        return await task

    assert asyncio.run(go()) == 0
    fast = [s for s in decider.seen if s[1]]
    regular = [s for s in decider.seen if not s[1]]
    if interval == 0:
        assert fast == []
        assert col.fast == 0
        return
    assert len(regular) == 3
    assert 12 <= len(fast) <= 24, "about ten a second from the first pass (at 0 s) until calm (2.2 s)"
    last = 0  # the number of the last sample before each fast evaluation (0: none yet)
    for seq, is_fast, _ in decider.seen:
        if is_fast:
            assert seq == last
        else:
            last = seq
    assert max(t for _, _, t in fast) < regular[-1][2], "nothing once it is calm"
