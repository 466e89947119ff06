"""A leak inside a memory-limited cgroup is healed before the kernel OOM-kills in it (issue 20).

Real cgroups (v2 when its memory controller is there, else v1), real leaking processes, the real
cgroup collector read once a second as the daemon does, and the shipped ``cgroup-memory-leak``
playbook exactly as shipped (no timing shortened). Host memory stays calm throughout: the old
memory trigger (host ``mem.used_pct``, host PSI) never fires here.

Only the cgroups this test creates are fed to the engine (another limited cgroup on a shared
machine is never acted on), and every process the test starts is in one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playbook_kit import idle, make_engine, risk, running, sample

from agent.collect.cgroups import CgroupCollector
from agent.collect.counters import slope
from agent.collect.sample import Event
from agent.collect.settings import CgroupSettings
from agent.decide.loader import load_playbooks
from agent.decide.settings import PlaybookSettings
from agent.score.forecast import Forecaster

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups)"),
]

PY = sys.executable
MIB = 1 << 20

LEAK = """
import sys, time
rate, cap = float(sys.argv[1]), int(sys.argv[2])
sys.stdin.readline()  # wait until we are in the cgroup
blocks, t0 = [], time.monotonic()
while len(blocks) < cap:  # +1 MiB at a time, touched (no swap here), at `rate` MiB/s
    blocks.append(bytearray(b"m" * (1 << 20)))
    time.sleep(max(0.0, t0 + len(blocks) / rate - time.monotonic()))
time.sleep(3600)
"""
STEADY = """
import sys, time
size = int(sys.argv[1])
sys.stdin.readline()
block = bytearray(size << 20)  # holds its share (every page touched) and never grows
for i in range(0, len(block), 4096):
    block[i] = 1
time.sleep(3600)
"""
CACHE = """
import os, sys, time
path, total = sys.argv[1], int(sys.argv[2])
sys.stdin.readline()
chunk = b"c" * (1 << 20)
while True:  # a backup-like job: writes far more than the limit through the page cache
    with open(path, "wb") as fh:
        for _ in range(total):
            fh.write(chunk)
            time.sleep(0.01)
    os.unlink(path)
"""
REREAD = """
import sys
sys.stdin.readline()
while True:  # reads the same file again and again: its pages go to the ACTIVE file list
    with open(sys.argv[1], "rb") as fh:
        while fh.read(1 << 20):
            pass
"""


def cold_file(path: Path, mib: int) -> Path:
    """A file of ``mib`` MiB on disk and not in the page cache, so that its pages are charged to
    the cgroup of the process that reads them."""
    with path.open("wb") as fh:
        fh.write(os.urandom(mib * MIB))
        fh.flush()
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path


@dataclass
class Cgroup:
    dir: Path
    label: str  # as /proc/PID/cgroup shows it
    v2: bool

    def oom_kills(self) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        fields = dict(line.split() for line in (self.dir / name).read_text().splitlines())
        return int(fields.get("oom_kill", 0))

    def enter(self, proc: subprocess.Popen[bytes]) -> None:
        (self.dir / "cgroup.procs").write_text(str(proc.pid))
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()


@contextlib.contextmanager
def memory_cgroup(name: str, limit_mib: int) -> Iterator[Cgroup]:
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").exists() and "memory" in (v2 / "cgroup.subtree_control").read_text():
        cg = Cgroup(v2 / name, f"/{name}", True)
        cg.dir.mkdir()
        (cg.dir / "memory.max").write_text(str(limit_mib * MIB))
        with contextlib.suppress(OSError):
            (cg.dir / "memory.swap.max").write_text("0")
    else:
        v1 = Path("/sys/fs/cgroup/memory")
        if not (v1 / "memory.limit_in_bytes").exists():
            pytest.skip("no memory cgroup controller")
        cg = Cgroup(v1 / name, f"/{name}", False)
        cg.dir.mkdir()
        (cg.dir / "memory.limit_in_bytes").write_text(str(limit_mib * MIB))
        (cg.dir / "memory.swappiness").write_text("0")
    try:
        yield cg
    finally:
        for p in (cg.dir / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(p), signal.SIGKILL)
        for _ in range(100):
            try:
                cg.dir.rmdir()
                break
            except OSError:
                time.sleep(0.05)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        if p.stdin is not None:
            p.stdin.close()


def spawn(children: list[subprocess.Popen[bytes]], code: str, *args: str) -> subprocess.Popen[bytes]:
    """A child that waits on its stdin (``Cgroup.enter``) before it does anything."""
    p = subprocess.Popen([PY, "-c", code, *args], stdin=subprocess.PIPE)
    children.append(p)
    return p


def start(children: list[subprocess.Popen[bytes]], cg: Cgroup, code: str,
          *args: str) -> subprocess.Popen[bytes]:
    p = spawn(children, code, *args)
    cg.enter(p)
    return p


def shipped_playbook() -> list[object]:
    pbs = [pb for pb in load_playbooks(PlaybookSettings(dirs=())) if pb.name == "cgroup-memory-leak"]
    assert len(pbs) == 1
    return pbs  # type: ignore[return-value]


async def watch(collector: CgroupCollector, eng: object, ours: list[Cgroup], seconds: float, *,
                done: object = None, after: float = 8.0, forecast: bool = False) -> dict[str, float]:
    """Feed the engine one sample a second for ``seconds`` (as the daemon's 1 Hz sampler does),
    with only our cgroups' metrics and events, and between two samples, while the collector says
    a cgroup is hot, its fast path every ``fast_interval_s`` (the daemon's ``fast`` task: the
    last sample's metrics with the hot cgroups' read anew, evaluated with the last risk); and
    ``after`` seconds more once ``done()`` (the run verifies on samples newer than its step); with
    ``forecast``, the daemon's forecaster (its settings) reads the same metrics and its forecasts go
    with each sample, as the risk stage sends them; returns each cgroup's peak used %."""
    fc = Forecaster() if forecast else None
    labels = {cg.label for cg in ours}
    peak = dict.fromkeys(labels, 0.0)
    interval = collector.settings.fast_interval_s

    def ours_only(metrics: dict[str, float | None]) -> dict[str, float | None]:
        return {k: v for k, v in metrics.items() if k.partition("[")[2][:-1] in labels}

    def note_peaks(metrics: dict[str, float | None]) -> None:
        for label in labels:
            peak[label] = max(peak[label], metrics.get(f"cgroup.mem.used_pct[{label}]") or 0.0)

    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds:
        reading = collector.collect()  # inline, on the event loop, as the daemon runs it
        metrics = ours_only(reading.metrics)
        events = [e for e in reading.events if e.labels.get("cgroup") in labels]
        note_peaks(metrics)
        if fc is not None:
            fc.push(dict(metrics), time.monotonic())
        last_risk = None if fc is None else risk(forecasts=fc.forecasts)
        await eng.evaluate(sample(metrics, events), last_risk)  # type: ignore[attr-defined]
        if callable(done) and done():
            seconds = min(seconds, time.monotonic() - t0 + after)
            done = None
        n += 1
        while interval > 0 and collector.hot and time.monotonic() + interval < t0 + n:
            await asyncio.sleep(interval)
            metrics = ours_only(collector.collect_hot().metrics)
            note_peaks(metrics)
            await eng.evaluate(sample(metrics), last_risk)  # type: ignore[attr-defined]
        await asyncio.sleep(max(0.0, t0 + n - time.monotonic()))
    return peak


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize(("rate", "limit"), [(20, 256), (60, 512), (60, 256), (100, 256)])
async def test_a_leak_in_a_limited_cgroup_is_stopped_before_the_oom_kill(
        tmp_path: Path, children: list[subprocess.Popen[bytes]], rate: int, limit: int) -> None:
    """Old: every memory trigger was host-wide; a unit leaking inside MemoryMax= was OOM-killed
    by the kernel while heald saw host memory at a few percent and never ran. The collector runs
    with its defaults (a 30 s rescan) and has made its first pass before the cgroup exists, as a
    container started after heald: the cgroup is found through the inotify watch, at once.
    60 and 100 MiB/s into 256 MiB (the OOM kill 4-5 s and 2.6 s after the start) are stopped
    only with the fast path (the cgroup read every 0.1 s while it is hot) and, at 100 MiB/s, the
    playbook's "full within 3 s right now, past 60 %" branch; old (once a second, the 2 s branch
    only): both OOM-killed by the kernel."""
    collector = CgroupCollector(CgroupSettings())
    collector.start()
    collector.collect()
    with memory_cgroup(f"heald-test-leak-{os.getpid()}-{rate}", limit) as cg:
        eng, rec = make_engine(tmp_path, shipped_playbook(), PlaybookSettings(dirs=()))  # type: ignore[arg-type]
        leak = start(children, cg, LEAK, str(rate), str(2 * limit))
        async with running(eng):
            peak = await watch(collector, eng, [cg], 3 * limit / rate, done=lambda: leak.poll() is not None)
            await idle(eng)
        assert leak.wait(10) == -signal.SIGTERM, "stopped by heald's TERM, not by the OOM killer's KILL"
        assert cg.oom_kills() == 0, "the kernel OOM-killed in the cgroup"
        (started,) = rec.of("run.start")
        assert started["playbook"] == "cgroup-memory-leak"
        assert started["bindings"] == {"cgroup": cg.label}
        step = rec.of("step")[0]
        assert step["ok"] is True
        assert step["data"]["pids"] == [leak.pid]
        assert rec.of("run.end")[0]["outcome"] == "succeeded"
        collector.close()
        print(f"{rate} MiB/s into {limit} MiB: acted at {peak[cg.label]:.0f}% of the limit, "
              f"eta input {started['inputs']}")


@pytest.mark.slow
@pytest.mark.asyncio
async def test_only_the_leaking_cgroup_is_touched(tmp_path: Path,
                                                  children: list[subprocess.Popen[bytes]]) -> None:
    """Five limited cgroups at once: one leaking (healed), one that jumps to 80% of its limit in one
    step, 4.5 s in (between two readings, as a heap pre-touched at start), and holds there (left
    alone: the fast path reads it every 0.1 s while it looks hot, and both fast branches need it to
    grow right now, over the last 0.3 s; on the 8 s slope alone it was "full in 1.3 s" 2 s after the
    jump, and stopped), one writing ten times its limit through the page cache like a backup job and
    one re-reading a file of 60% of its limit (both left alone: cache the kernel reclaims is not a
    leak, whether on the inactive or the active file list), and one ramping up to 55% of its limit at
    8 MiB/s and holding there, as a JVM heap or `stress-ng --vm` does (left alone: at that rate the
    limit is still 14 s away when it stops). The daemon's forecaster runs beside (the slow-leak
    branch). Old: the re-reader's active file pages counted as used (66% in a second: "a leak"); the
    ramp was stopped as it crossed half its limit, by the fast line ("full within 60 s") and, with
    that line at 10 s, by the forecast branch (a forecast fitted on the ramp, "full in 14 s", still
    shown as it stopped: the branch now needs 20 s past half the limit)."""
    pid = os.getpid()
    with (tempfile.TemporaryDirectory(dir="/var/tmp") as scratch,  # removed after the cgroups' processes
          memory_cgroup(f"heald-test-leaky-{pid}", 256) as leaky,
          memory_cgroup(f"heald-test-steady-{pid}", 256) as steady,
          memory_cgroup(f"heald-test-cache-{pid}", 128) as cache,
          memory_cgroup(f"heald-test-reread-{pid}", 128) as reread,
          memory_cgroup(f"heald-test-ramp-{pid}", 256) as ramp):
        collector = CgroupCollector(CgroupSettings(rescan_s=0.5))
        collector.start()
        eng, rec = make_engine(tmp_path, shipped_playbook(), PlaybookSettings(dirs=()))  # type: ignore[arg-type]
        holder = spawn(children, STEADY, "205")  # enters its cgroup 4.5 s into the watch
        writer = start(children, cache, CACHE, str(Path(scratch) / "backup.bin"), "1280")
        reader = start(children, reread, REREAD, str(cold_file(Path(scratch) / "data.bin", 80)))
        ramper = start(children, ramp, LEAK, "8", "140")
        await asyncio.sleep(3)
        leak = start(children, leaky, LEAK, "25", "512")
        ours = [leaky, steady, cache, reread, ramp]
        async with running(eng):
            asyncio.get_running_loop().call_later(4.5, steady.enter, holder)
            peak = await watch(collector, eng, ours, 40, forecast=True)
            await idle(eng)
        assert leak.wait(10) == -signal.SIGTERM
        assert holder.poll() is None, "the steady cgroup was touched"
        assert writer.poll() is None, "the page-cache writer was touched"
        assert reader.poll() is None, "the re-reader was touched"
        assert ramper.poll() is None, "the ramp that stopped at 55% was touched"
        assert [r["bindings"] for r in rec.of("run.start")] == [{"cgroup": leaky.label}]
        assert [cg.oom_kills() for cg in ours] == [0] * len(ours)
        assert peak[steady.label] > 70
        assert peak[ramp.label] > 50, "the ramp must cross the fast line's 50% floor (or this means nothing)"
        print(f"peaks (used % of limit): {peak}")


def test_file_cache_on_the_active_list_is_not_used_memory() -> None:
    """A process re-reading an 80 MiB file in a 128 MiB cgroup: the kernel charges the file's
    pages to the cgroup (usage ~85 MiB) and puts them on the ACTIVE file list (read twice).
    Old: working set = usage - inactive file = 66% of the limit, reached within a second."""
    name = f"heald-test-active-{os.getpid()}"
    with (memory_cgroup(name, 128) as cg, tempfile.TemporaryDirectory(dir="/var/tmp") as scratch):
        reader = subprocess.Popen([PY, "-c", REREAD, str(cold_file(Path(scratch) / "data.bin", 80))],
                                  stdin=subprocess.PIPE)
        try:
            cg.enter(reader)
            collector = CgroupCollector(CgroupSettings(rescan_s=0.5))
            collector.start()
            stat = "memory.current" if cg.v2 else "memory.usage_in_bytes"
            deadline = time.monotonic() + 15
            while int((cg.dir / stat).read_text()) < 70 * MIB:  # the file read once, charged here
                assert time.monotonic() < deadline, "the reader never brought its file into the cache"
                time.sleep(0.2)
            time.sleep(1)  # read again: active
            metrics = collector.collect().metrics
            collector.close()
            assert int((cg.dir / stat).read_text()) >= 70 * MIB
            used = metrics[f"cgroup.mem.used_pct[{cg.label}]"]
            assert used is not None
            assert used < 20
        finally:
            reader.kill()
            reader.wait()
            assert reader.stdin is not None
            reader.stdin.close()


def test_growth_slope_and_eta_from_a_fixture_tree(tmp_path: Path) -> None:
    """The v1 file formats, read from a fixture tree: working set = usage - file cache (inactive
    and active), the
    OOM-kill event once per increase, no ETA while the working set does not grow."""
    cg = tmp_path / "sys/fs/cgroup/memory/app"
    cg.mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/memory/memory.limit_in_bytes").write_text(str(9223372036854771712))
    (cg / "memory.limit_in_bytes").write_text(str(100 * MIB))
    unlimited = tmp_path / "sys/fs/cgroup/memory/free"
    unlimited.mkdir()
    (unlimited / "memory.limit_in_bytes").write_text("9223372036854771712")

    def write(usage_mib: int, inactive_mib: int, kills: int) -> None:
        (cg / "memory.usage_in_bytes").write_text(str(usage_mib * MIB))
        (cg / "memory.stat").write_text(f"cache 1\ntotal_inactive_file {inactive_mib * MIB}\n"
                                        f"total_active_file {5 * MIB}\n")
        (cg / "memory.oom_control").write_text(f"oom_kill_disable 0\nunder_oom 0\noom_kill {kills}\n")

    c = CgroupCollector(CgroupSettings(), root=str(tmp_path))
    c.start()
    write(60, 20, 0)
    r = c.collect()
    assert r.detail == {"watched": ["/app"]}  # not the unlimited one
    assert all(isinstance(v, float | None) for v in r.metrics.values())  # what the wire and engine take
    assert r.metrics["cgroup.mem.used_bytes[/app]"] == 35 * MIB
    assert r.metrics["cgroup.mem.used_pct[/app]"] == pytest.approx(35.0)
    assert r.metrics["cgroup.mem.headroom_bytes[/app]"] == 65 * MIB
    assert "cgroup.mem.eta_s[/app]" not in r.metrics
    for _ in range(3):
        c.collect()
    assert "cgroup.mem.eta_s[/app]" not in c.collect().metrics  # flat: no ETA
    write(60, 20, 2)
    events: list[Event] = c.collect().events
    assert [(e.kind, e.labels, e.value) for e in events] == [("cgroup.oom_kill", {"cgroup": "/app"}, 2.0)]
    assert c.collect().events == []


def test_slope() -> None:
    from collections import deque  # noqa: PLC0415 - only here
    assert slope(deque([(0.0, 1.0), (1.0, 3.0)])) is None
    assert slope(deque([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)])) == pytest.approx(2.0)
    assert slope(deque([(1.0, 1.0), (1.0, 3.0), (1.0, 5.0)])) is None


def test_a_cgroup_created_after_start_is_watched_at_the_next_pass() -> None:
    """With the defaults (rescan every 30 s) a limited cgroup created after the collector's first
    pass is found at the next pass through the inotify watch; without the watch it would wait for
    the rescan (a fault recording found cgroups 19-29 s late). A removed one is dropped at once."""
    watched = CgroupCollector(CgroupSettings())
    polled = CgroupCollector(CgroupSettings(watch_changes=False))
    for c in (watched, polled):
        c.start()
        c.collect()
    name = f"heald-test-new-{os.getpid()}"
    try:
        with memory_cgroup(name, 64) as cg:
            time.sleep(0.05)
            assert cg.label in watched.collect().detail["watched"]
            assert cg.label not in polled.collect().detail["watched"]
        time.sleep(0.05)
        assert cg.label not in watched.collect().detail["watched"]
    finally:
        watched.close()
        polled.close()


def test_a_limit_set_after_the_mkdir_is_seen_at_the_follow_up_walk(tmp_path: Path) -> None:
    """Runtimes mkdir a cgroup and set its limit a moment later: the walk after the mkdir sees no
    limit yet, the follow-up walk settle_s later does."""
    col = CgroupCollector(CgroupSettings(settle_s=0.3))
    col.start()
    col.collect()
    name = f"heald-test-late-{os.getpid()}"
    v2 = Path("/sys/fs/cgroup")
    unified = (v2 / "cgroup.controllers").exists() and "memory" in (v2 / "cgroup.subtree_control").read_text()
    top = v2 if unified else v2 / "memory"
    d = top / name
    d.mkdir()
    try:
        time.sleep(0.05)
        assert f"/{name}" not in col.collect().detail["watched"]  # no limit yet
        (d / ("memory.max" if unified else "memory.limit_in_bytes")).write_text(str(64 * MIB))
        time.sleep(0.35)
        assert f"/{name}" in col.collect().detail["watched"]
    finally:
        d.rmdir()
        col.close()
