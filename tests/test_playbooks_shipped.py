"""Every shipped playbook, triggered for real: a filling tmpfs, a memory hog in a limited cgroup,
a CPU hog, a zombie storm, a failed unit (recording systemctl), a crashed supervised process,
GPU XIDs (synthetic events; FakeNVML belongs to the collector tests).

The shipped YAML is used as is except for test timing (``for``, ``verify.settle`` and
``verify.within`` shortened) and, where a playbook picks processes host-wide, a
``cmdline``/``cgroup`` scope so that a test on a shared machine can only ever touch the processes
it started.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from playbook_kit import Recorder, idle, make_engine, risk, running, sample, xid

from agent.collect.disk import DiskCollector
from agent.collect.memory import MemoryCollector
from agent.collect.processes import ProcessCollector
from agent.collect.sample import Sample
from agent.collect.settings import DiskSettings, MemorySettings, ProcessSettings
from agent.decide.loader import load_playbooks, parse_playbook, shipped_dir
from agent.decide.model import Playbook
from agent.decide.settings import PlaybookSettings
from agent.score.forecast import Forecaster

PY = sys.executable
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (mount, cgroups)")


def _speed_up(cond: dict[str, Any], fast: str) -> None:
    if "for" in cond:
        cond["for"] = fast
    for k in ("all", "any"):
        for c in cond.get(k, []):
            _speed_up(c, fast)


def shipped(
    name: str,
    settings: PlaybookSettings,
    patch: Callable[[dict[str, Any]], None] | None = None,
    fast: str = "300ms",
) -> Playbook:
    path = shipped_dir() / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    _speed_up(data["trigger"], fast)
    data.setdefault("verify", {})["settle"] = fast
    if "within" in data["verify"]:
        data["verify"]["within"] = fast
    if patch is not None:
        patch(data)
    pb, problems = parse_playbook(yaml.safe_dump(data), str(path), settings, shipped=True)
    assert pb is not None, [str(p) for p in problems]
    return pb


def scope(data: dict[str, Any], **extra: Any) -> None:
    """Restrict every step's process target (tests share the machine)."""
    for step in data["steps"]:
        if "target" in step.get("params", {}):
            step["params"]["target"].update(extra)


def test_shipped_library_loads() -> None:
    names = {pb.name for pb in load_playbooks(PlaybookSettings(dirs=()))}
    assert names == {
        "disk-nearly-full",
        "disk-nearly-full-unmanaged",
        "disk-full-predicted",
        "memory-exhaustion",
        "memory-exhaustion-predicted",
        "runaway-cpu",
        "failed-service",
        "zombie-storm",
        "gpu-xid-reset",
        "gpu-xid-reboot",
        "gpu-xid-service",
        "cgroup-memory-leak",
        "cgroup-pids-leak",
        "fd-leak",
        "fd-leak-predicted",
        "inodes-full-predicted",
        "conntrack-table-full",
        "file-table-full",
        "task-table-full",
        "ssh-brute-force",  # exercised by tests/test_security_net.py (real sshd, nftables in a netns)
        "new-listener",
        "unknown-binary-cpu",  # these four: tests/test_security_proc.py
        "unknown-binary-kill",
        "egress-burst",
        "watched-file-changed",
    }


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        for s in (p.stdout, p.stdin):
            if s is not None:
                s.close()


def spawn(children: list[subprocess.Popen[bytes]], argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(argv, **kw)
    children.append(p)
    return p


# --------------------------------------------------------------------------- disk


@pytest.fixture
def tmpfs() -> Iterator[Path]:
    if not ROOT:
        pytest.skip("needs root to mount a tmpfs")
    d = Path(tempfile.mkdtemp(prefix="heald-tmpfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()


FILLER = """
import os, sys, time
root, per_s, total = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
old = time.time() - 3 * 86400
chunk = b"c" * (1 << 20)
for i in range(total):
    p = os.path.join(root, "cache", f"blob-{i}.bin")
    try:
        with open(p, "wb") as fh:
            fh.write(chunk)
    except OSError:
        sys.exit(28)  # ENOSPC: the disk filled up
    os.utime(p, (old, old))  # cache files nobody touched for days
    time.sleep(1 / per_s)
"""


def disk_metrics(col: DiskCollector) -> dict[str, float | None]:
    return col.collect().metrics


@pytest.mark.root
@pytest.mark.slow
@needs_root
@pytest.mark.asyncio
async def test_disk_nearly_full_cleans_a_filling_tmpfs_before_it_is_full(
    tmp_path: Path, tmpfs: Path, children: list[Any]
) -> None:
    (tmpfs / "cache").mkdir()
    keep = tmpfs / "fresh-work.dat"
    keep.write_bytes(b"k" * 4096)
    settings = PlaybookSettings(dirs=(), clean_roots=(str(tmpfs),), journalctl=("true",))
    pb = shipped("disk-nearly-full", settings)
    eng, rec = make_engine(tmp_path, [pb], settings)
    col = DiskCollector(DiskSettings(include_mounts=(str(tmpfs),)))
    col.start()
    key = f"disk.used_pct[{tmpfs}]"
    filler = spawn(children, [PY, "-c", FILLER, str(tmpfs), "10", "97"])  # 97 MiB into 100 MiB at 10 MiB/s
    peak = 0.0
    crossed: float | None = None
    async with running(eng):
        t0 = time.monotonic()
        while filler.poll() is None and time.monotonic() - t0 < 40:
            m = disk_metrics(col)
            used = m[key] or 0.0
            peak = max(peak, used)
            if used >= 90 and crossed is None:
                crossed = time.monotonic()
            await eng.evaluate(
                Sample(node="n1", seq=0, wall=time.time(), mono=time.monotonic(), metrics=m), None
            )
            await asyncio.sleep(0.1)
        for _ in range(20):
            await eng.evaluate(
                Sample(node="n1", seq=0, wall=time.time(), mono=time.monotonic(), metrics=disk_metrics(col)),
                None,
            )
            await asyncio.sleep(0.05)
        await idle(eng)
    assert filler.returncode == 0, "the filler hit ENOSPC: the disk filled up before heald cleaned it"
    assert peak < 100
    assert crossed is not None
    # only this test's mount: other mounts of a shared host are not cleanable here (no clean root)
    assert {r["target"] for r in rec.actions if "target" in r} == {f"disk-nearly-full[mount={tmpfs}]"}
    steps = rec.of("step")
    assert steps[0]["action"] == "clean_paths"
    assert steps[0]["data"]["deleted"] > 0
    assert keep.exists(), "fresh files are kept (older_than: 2d)"
    assert rec.of("run.start")[0]["bindings"] == {"mount": str(tmpfs)}
    assert rec.of("run.start")[0]["inputs"][key] >= 90
    assert "succeeded" in [r["outcome"] for r in rec.of("run.end")]


@pytest.mark.root
@pytest.mark.slow
@needs_root
@pytest.mark.asyncio
async def test_disk_full_predicted_from_the_real_forecaster(
    tmp_path: Path, tmpfs: Path, children: list[Any]
) -> None:
    (tmpfs / "cache").mkdir()
    settings = PlaybookSettings(dirs=(), clean_roots=(str(tmpfs),), journalctl=("true",))

    def patch(d: dict[str, Any]) -> None:
        d["trigger"]["eta_below"] = "20s"  # the test tmpfs fills in ~20 s, not hours

    pb = shipped("disk-full-predicted", settings, patch)
    eng, rec = make_engine(tmp_path, [pb], settings)
    col = DiskCollector(DiskSettings(include_mounts=(str(tmpfs),)))
    col.start()
    fc = Forecaster(window_s=10.0, spans=(3.0,), every=2, min_points=5)
    filler = spawn(children, [PY, "-c", FILLER, str(tmpfs), "5", "90"])
    async with running(eng):
        # cold model: the forecast holds but nothing may run
        for _ in range(30):
            m = disk_metrics(col)
            fc.push(m, time.monotonic())
            await eng.evaluate(sample(m), risk(cold=True, forecasts=fc.forecasts))
            await asyncio.sleep(0.1)
        assert not rec.of("run.start")
        assert [r["reason"] for r in rec.of("held")] == ["cold-start"]
        t0 = time.monotonic()
        while not rec.of("run.end") and time.monotonic() - t0 < 30:
            m = disk_metrics(col)
            fc.push(m, time.monotonic())
            await eng.evaluate(sample(m), risk(forecasts=fc.forecasts))
            await asyncio.sleep(0.1)
        filler.kill()
    start = rec.of("run.start")[0]
    assert start["bindings"] == {"mount": str(tmpfs)}
    assert start["inputs"][f"forecast[disk.free_bytes[{tmpfs}]].eta_s"] < 20
    assert rec.of("step")[0]["data"]["deleted"] > 0


# --------------------------------------------------------------------------- memory


def _memory_cgroup(name: str) -> tuple[Path, str, Callable[[], float], Callable[[], int]]:
    """A memory-limited cgroup: v2 when the memory controller is there, else v1 (hybrid hosts).
    Returns (dir, path as /proc/PID/cgroup shows it, used %, oom kills)."""
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").exists() and "memory" in (v2 / "cgroup.subtree_control").read_text():
        d = v2 / name
        d.mkdir()
        (d / "memory.max").write_text(str(300 << 20))
        (d / "memory.swap.max").write_text("0")
        limit = 300 << 20

        def used() -> float:
            return 100.0 * int((d / "memory.current").read_text()) / limit

        def ooms() -> int:
            ev = dict(line.split() for line in (d / "memory.events").read_text().splitlines())
            return int(ev.get("oom_kill", 0))

        return d, f"/{name}", used, ooms
    v1 = Path("/sys/fs/cgroup/memory")
    if not (v1 / "memory.limit_in_bytes").exists():
        pytest.skip("no memory cgroup controller")
    d = v1 / name
    d.mkdir()
    (d / "memory.limit_in_bytes").write_text(str(300 << 20))
    limit = 300 << 20

    def used1() -> float:
        return 100.0 * int((d / "memory.usage_in_bytes").read_text()) / limit

    def ooms1() -> int:
        ev = dict(line.split() for line in (d / "memory.oom_control").read_text().splitlines())
        return int(ev.get("oom_kill", 0))

    return d, f"/{name}", used1, ooms1


HOG = """
import sys, time
sys.stdin.readline()  # wait until we are in the cgroup
blocks = []
while True:
    blocks.append(bytearray(b"m" * (2 << 20)))  # +2 MiB every 50 ms, touched, no swap
    time.sleep(0.05)
"""


@pytest.mark.root
@pytest.mark.slow
@needs_root
@pytest.mark.asyncio
async def test_memory_hog_killed_before_the_oom_killer(tmp_path: Path, children: list[Any]) -> None:
    name = f"heald-test-{os.getpid()}"
    d, cg_path, used, ooms = _memory_cgroup(name)
    try:
        hog = spawn(children, [PY, "-c", HOG, "heald-memory-hog"], stdin=subprocess.PIPE)
        (d / "cgroup.procs").write_text(str(hog.pid))
        settings = PlaybookSettings(dirs=())

        def patch(data: dict[str, Any]) -> None:
            scope(data, cgroup=cg_path)  # the "node" of this test is the 300 MiB cgroup
            for step in data["steps"]:
                step["params"]["target"].pop(
                    "min_memory_pct", None
                )  # % of host RAM; the node here is 300 MiB

        pb = shipped("memory-exhaustion", settings, patch, fast="0s")
        eng, rec = make_engine(tmp_path, [pb], settings)
        assert hog.stdin is not None
        hog.stdin.write(b"go\n")
        hog.stdin.flush()
        peak = 0.0
        async with running(eng):
            t0 = time.monotonic()
            while hog.poll() is None and time.monotonic() - t0 < 30:
                pct = used()
                peak = max(peak, pct)
                await eng.evaluate(sample({"mem.used_pct": pct, "psi.some_avg10_pct[memory]": 0.0}), None)
                await asyncio.sleep(0.05)
            for _ in range(20):
                await eng.evaluate(sample({"mem.used_pct": used(), "psi.some_avg10_pct[memory]": 0.0}), None)
                await asyncio.sleep(0.05)
            await idle(eng)
        assert hog.wait(5) == -signal.SIGTERM, "stopped by heald's TERM, not by the OOM killer's KILL"
        assert ooms() == 0, "the kernel OOM killer never acted"
        step = rec.of("step")[0]
        assert step["ok"] is True
        assert step["data"]["pids"] == [hog.pid]
        assert rec.of("run.start")[0]["inputs"]["mem.used_pct"] >= 95
        assert rec.of("run.end")[0]["outcome"] == "succeeded"
        print(f"peak cgroup usage {peak:.1f}%")
    finally:
        with contextlib.suppress(OSError):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- cpu, zombies


@pytest.mark.slow
@pytest.mark.asyncio
async def test_cpu_hog_stopped_after_approval(tmp_path: Path, children: list[Any]) -> None:
    """The hog and a second busy loop share one CPU: each gets about half of it and one always
    waits, so the host's real CPU pressure (``/proc/pressure/cpu``, read by the memory
    collector) rises while the hog is the top CPU process; heald asks, then stops the hog."""
    cpu = min(os.sched_getaffinity(0))
    hog = spawn(children, [PY, "-c", "while True: pass", "heald-cpu-hog"])
    rival = spawn(children, [PY, "-c", "while True: pass", "heald-cpu-rival"])
    os.sched_setaffinity(hog.pid, {cpu})
    os.sched_setaffinity(rival.pid, {cpu})
    settings = PlaybookSettings(dirs=())
    def patch(d: dict[str, Any]) -> None:
        scope(d, cmdline="heald-cpu-hog", measure="500ms", min_cpu_pct=20)
        top, pressure = d["trigger"]["all"]
        assert top["metric"] == "proc.top_cpu_pct"
        assert pressure["metric"] == "psi.some_avg60_pct[cpu]"
        # half a core each on one CPU; the 10 s average rises within seconds (avg60 needs a minute)
        top.update(value=35, clear_below=20)
        pressure.update(metric="psi.some_avg10_pct[cpu]")

    pb = shipped("runaway-cpu", settings, patch, fast="1s")
    eng, rec = make_engine(tmp_path, [pb], settings)
    col = ProcessCollector(ProcessSettings(top_n=3))
    col.start()
    mem = MemoryCollector(MemorySettings())
    mem.start()
    def metrics() -> dict[str, float]:
        m = dict(col.collect().metrics)
        m.update(mem.collect().metrics)
        return m

    async with running(eng):
        t0 = time.monotonic()
        while not eng.pending_approvals() and time.monotonic() - t0 < 40:
            await eng.evaluate(sample(metrics()), None)
            await asyncio.sleep(0.25)
        assert eng.pending_approvals(), "runaway-cpu ships in approval mode: it asks first"
        assert hog.poll() is None
        await eng.trigger_manual("runaway-cpu", approved_by="test-operator")
        while hog.poll() is None and time.monotonic() - t0 < 50:
            await eng.evaluate(sample(metrics()), None)
            await asyncio.sleep(0.25)
        await idle(eng)
    assert hog.wait(5) == -signal.SIGTERM
    assert rival.poll() is None, "only the top CPU process (scoped to the hog) is stopped"
    assert rec.of("step")[0]["data"]["pids"] == [hog.pid]
    assert rec.of("run.start")[0]["approved_by"] == "test-operator"


def _runaway(psi: float) -> dict[str, float | None]:
    return {"proc.top_cpu_pct": 99.0, "psi.some_avg60_pct[cpu]": psi}


@pytest.mark.asyncio
async def test_cpu_hog_alone_is_not_a_runaway(tmp_path: Path) -> None:
    """A process pegging a core that nobody else wants (CPU pressure 0-2 %: the stress-ng --vm
    worker of bench/faultfree_load.py) is a batch job: the shipped runaway-cpu never asks. The
    same samples with tasks waiting for a CPU (pressure 20 % and over, as long) do ask; pressure
    alone, with no process pegging a core, does not."""
    settings = PlaybookSettings(dirs=())
    for case, (stream, asks) in enumerate((([_runaway(2.0)] * 30, False),
                         ([_runaway(35.0)] * 30, True),
                         ([{"proc.top_cpu_pct": 60.0, "psi.some_avg60_pct[cpu]": 80.0}] * 30, False),
                         # pressure through only part of the window: the clock starts again
                         ([_runaway(35.0)] * 6 + [_runaway(5.0)] + [_runaway(35.0)] * 6, False))):
        pb = shipped("runaway-cpu", settings, fast="2s")
        eng, _rec = make_engine(tmp_path / f"case{case}", [pb], settings)  # a state dir each
        async with running(eng):
            t0 = time.time() - len(stream) * 0.25  # samples 250 ms apart, the last one now
            for i, m in enumerate(stream):
                s = sample(m)
                await eng.evaluate(Sample(node=s.node, seq=s.seq, wall=t0 + i * 0.25,
                                          mono=s.mono - (len(stream) - i) * 0.25, metrics=s.metrics), None)
                await asyncio.sleep(0.01)
            await idle(eng)
            assert bool(eng.pending_approvals()) is asks, (stream[0], asks)


REAPER = """
import ctypes, os, subprocess, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us
maker = subprocess.Popen([sys.executable, "-c", sys.argv[1], "heald-zombie-maker"])
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.05)
"""

MAKER = """
import os, time
for _ in range(80):
    if os.fork() == 0:
        os._exit(0)
time.sleep(120)  # never reaps: SIGCHLD keeps its default disposition
"""


def _zombies_of(name: str) -> int:
    n = 0
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if name in " ".join(p.cmdline()):
                n += sum(1 for c in p.children() if c.status() == psutil.STATUS_ZOMBIE)
    return n


@pytest.mark.slow
@pytest.mark.asyncio
async def test_zombie_storm_parent_signalled_then_stopped(tmp_path: Path, children: list[Any]) -> None:
    spawn(children, [PY, "-c", REAPER, MAKER])
    for _ in range(100):
        if _zombies_of("heald-zombie-maker") == 80:
            break
        await asyncio.sleep(0.05)
    assert _zombies_of("heald-zombie-maker") == 80
    settings = PlaybookSettings(dirs=())
    pb = shipped("zombie-storm", settings, lambda d: scope(d, cmdline="heald-zombie-maker"))
    eng, rec = make_engine(tmp_path, [pb], settings)
    col = ProcessCollector(ProcessSettings(top_n=0))
    col.start()
    async with running(eng):
        t0 = time.monotonic()
        while not rec.of("run.end") and time.monotonic() - t0 < 30:
            await eng.evaluate(sample(col.collect().metrics), None)
            await asyncio.sleep(0.1)
    steps = rec.of("step")
    assert [s["action"] for s in steps] == ["signal_process", "stop_process"]
    assert rec.of("verify")[0]["ok"] is False, "SIGCHLD alone did not make the parent reap"
    assert rec.of("run.end")[0]["outcome"] == "succeeded"
    assert _zombies_of("heald-zombie-maker") == 0


# --------------------------------------------------------------------------- systemd, supervisor

FAKE_SYSTEMCTL = """#!{py}
import sys
state, log, restart_works = {state!r}, {log!r}, {works!r}
open(log, "a").write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] == "restart" and restart_works:
    open(state, "w").write("active")
sys.exit(0 if restart_works else 1)
"""


def fake_systemctl(tmp: Path, works: bool) -> tuple[Path, Path, Path]:
    state, log, script = tmp / "unit.state", tmp / "systemctl.log", tmp / "systemctl"
    state.write_text("failed")
    script.write_text(FAKE_SYSTEMCTL.format(py=PY, state=str(state), log=str(log), works=works))
    script.chmod(0o755)
    return script, state, log


def unit_metrics(state: Path) -> dict[str, float | None]:
    s = state.read_text()
    return {
        "unit.failed[app.service]": float(s == "failed"),
        "unit.active[app.service]": float(s == "active"),
    }


@pytest.mark.asyncio
async def test_failed_service_restarted_through_recording_systemctl(tmp_path: Path) -> None:
    script, state, log = fake_systemctl(tmp_path, works=True)
    settings = PlaybookSettings(dirs=(), systemctl=(str(script),))
    eng, rec = make_engine(tmp_path, [shipped("failed-service", settings)], settings)
    async with running(eng):
        t0 = time.monotonic()
        while not rec.of("run.end") and time.monotonic() - t0 < 20:
            await eng.evaluate(sample(unit_metrics(state)), None)
            await asyncio.sleep(0.05)
    assert log.read_text().splitlines() == ["restart app.service"]
    assert rec.of("run.end")[0]["outcome"] == "succeeded"
    assert rec.of("verify")[0]["reason"] == "verify.expect holds"


@pytest.mark.asyncio
async def test_failing_restart_backs_off_escalates_and_trips_the_breaker(tmp_path: Path) -> None:
    script, state, log = fake_systemctl(tmp_path, works=False)
    settings = PlaybookSettings(dirs=(), systemctl=(str(script),))

    def patch(d: dict[str, Any]) -> None:
        d["guards"].update(cooldown="200ms", max_cooldown="5s")

    rec = Recorder()
    eng, rec = make_engine(tmp_path, [shipped("failed-service", settings, patch, fast="50ms")], settings, rec)
    async with running(eng):
        t0 = time.monotonic()
        while time.monotonic() - t0 < 6:  # far longer than three backed-off runs need
            await eng.evaluate(sample(unit_metrics(state)), None)
            await asyncio.sleep(0.05)
        await idle(eng)
    assert [r["outcome"] for r in rec.of("run.end")] == ["escalated"] * 3
    assert len(log.read_text().splitlines()) == 6, "two restarts per run, three runs, then suspended"
    kinds = [e["kind"] for e in rec.events]
    assert kinds.count("unit.failed.unresolved") == 3
    assert kinds.count("playbook.suspended") == 1
    assert "app.service" in rec.events[0]["message"]
    gaps = [
        b["audit_seq"] - a["audit_seq"]
        for a, b in zip(rec.of("run.end"), rec.of("run.start")[1:], strict=False)
    ]
    assert all(g > 0 for g in gaps)


WORKER = "import time; time.sleep(600)"


@pytest.mark.slow
@pytest.mark.asyncio
async def test_crashed_process_restarted_by_the_supervisor(tmp_path: Path) -> None:
    exe = tmp_path / "heald-worker"
    exe.symlink_to(PY)  # comm becomes "heald-worker"
    text = f"""
name: worker-supervised
description: keep heald-worker running (non-systemd supervision)
trigger:
  any:
    - event: proc.exited
      labels: {{name: heald-worker}}
      within: 1m
    - metric: "proc.count[heald-worker]"
      op: "<"
      value: 1
steps:
  - action: restart_process
    params: {{name: heald-worker, argv: [{str(exe)!r}, "-c", {WORKER!r}]}}
    timeout: 10s
verify: {{settle: 100ms}}
guards: {{cooldown: 0s, max_runs: {{count: 1000, window: 1h}}}}
"""
    pb, problems = parse_playbook(text, "worker.yaml")
    assert pb is not None, problems
    eng, _rec = make_engine(tmp_path, [pb])
    col = ProcessCollector(ProcessSettings(top_n=0, watch=("heald-worker",)))
    col.start()
    pids: list[int] = []
    latencies: list[float] = []

    async def sampler() -> None:  # the daemon's cadence: one sample a second
        while True:
            await eng.evaluate(sample(await asyncio.to_thread(lambda: col.collect().metrics)), None)
            await asyncio.sleep(1.0)

    async with running(eng):
        feeder = asyncio.create_task(sampler(), name="sampler")
        try:
            for _ in range(300):  # not running at all: the first sample starts it
                if eng.supervisor.alive("heald-worker"):
                    break
                await asyncio.sleep(0.01)
            for _ in range(3):
                await idle(eng)
                child = eng.supervisor.alive("heald-worker")
                assert child is not None
                pids.append(child.pid)
                t0 = time.monotonic()
                os.kill(child.pid, signal.SIGKILL)  # crash
                while (c := eng.supervisor.alive("heald-worker")) is None or c.pid == child.pid:
                    assert time.monotonic() - t0 < 5
                    await asyncio.sleep(0.002)
                latencies.append(time.monotonic() - t0)
            await idle(eng)
            last = eng.supervisor.alive("heald-worker")
            assert last is not None
            pids.append(last.pid)
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
    assert len(set(pids)) == 4
    assert max(latencies) < 0.5, f"the restart must not wait for the next 1 Hz sample: {latencies}"
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


# --------------------------------------------------------------------------- GPU


def recording_tool(tmp: Path, name: str) -> tuple[str, Path]:
    log = tmp / f"{name}.log"
    script = tmp / name
    script.write_text(f"#!{PY}\nimport sys\nopen({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n")
    script.chmod(0o755)
    return str(script), log


def gpu_sample(events: list[Any]) -> Sample:
    s = sample({"gpu.util_pct[1]": 0.0}, events)
    detail = {"gpu": {"devices": {"1": {"uuid": "GPU-1", "name": "H100", "pci": "00000000:3B:00.0"}}}}
    return Sample(
        node=s.node, seq=s.seq, wall=s.wall, mono=s.mono, metrics=s.metrics, events=s.events, detail=detail
    )  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_gpu_xid_drain_reset_undrain_and_xid45_flood_ignored(tmp_path: Path) -> None:
    smi, log = recording_tool(tmp_path, "nvidia-smi")
    settings = PlaybookSettings(
        dirs=(),
        gpu_reset_argv=(smi, "--gpu-reset", "-i", "{gpu}"),
        gpu_drain_argv=(smi, "drain", "-p", "{pci}", "-m", "1"),
        gpu_undrain_argv=(smi, "drain", "-p", "{pci}", "-m", "0"),
    )
    eng, rec = make_engine(tmp_path, [shipped("gpu-xid-reset", settings)], settings)
    async with running(eng):
        for _ in range(20):  # an Xid 45 flood is noise
            await eng.evaluate(
                gpu_sample([xid(45, gpu="1", wall=time.time() - i * 1e-3) for i in range(200)]), None
            )
        assert not rec.of("run.start")
        await eng.evaluate(gpu_sample([xid(79, gpu="1")]), None)
        t0 = time.monotonic()
        while not rec.of("run.end") and time.monotonic() - t0 < 10:
            await eng.evaluate(gpu_sample([]), None)
            await asyncio.sleep(0.05)
    assert log.read_text().splitlines() == [
        "drain -p 00000000:3B:00.0 -m 1",
        "--gpu-reset -i 1",
        "drain -p 00000000:3B:00.0 -m 0",
    ]
    assert rec.of("run.start")[0]["bindings"] == {"gpu": "1"}
    assert rec.of("run.end")[0]["outcome"] == "succeeded"


@pytest.mark.asyncio
async def test_gpu_xids_continue_after_reset_escalate_and_suspend(tmp_path: Path) -> None:
    smi, log = recording_tool(tmp_path, "nvidia-smi")
    settings = PlaybookSettings(
        dirs=(),
        gpu_reset_argv=(smi, "--gpu-reset", "-i", "{gpu}"),
        gpu_drain_argv=(smi, "drain", "-p", "{pci}", "-m", "1"),
        gpu_undrain_argv=(smi, "drain", "-p", "{pci}", "-m", "0"),
    )
    eng, rec = make_engine(tmp_path, [shipped("gpu-xid-reset", settings, fast="500ms")], settings)
    async with running(eng):
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4:  # the GPU keeps reporting double-bit ECC errors
            await eng.evaluate(gpu_sample([xid(48, gpu="1")]), None)
            await asyncio.sleep(0.1)
        await idle(eng)
    assert [r["outcome"] for r in rec.of("run.end")] == ["escalated"]
    kinds = [e["kind"] for e in rec.events]
    assert kinds == ["gpu.needs_service", "playbook.suspended"]
    assert len(log.read_text().splitlines()) == 3, "one ladder, then the breaker (failures: 1) holds it"
