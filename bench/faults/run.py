"""Fault-injection harness: run heald's real collectors at 1 Hz while injecting real faults.

    python3 bench/faults/run.py --out bench/faults/data/NAME.npz [--minutes N] [--only disk,memory]
                                [--live-agent [--agent-commit REV]]

With ``--live-agent`` a real ``heald run`` (the shipped playbooks of the last commit, forced to
dry-run) does the sampling and its would-be actions are kept in the recording (``live.py``).

Needs root (loop mounts, cgroups, network namespaces). Faults, all confined to objects this
script creates (and removes again, also on Ctrl-C / SIGTERM):

* ``disk_full``: a loop-mounted ext4 (and a tmpfs, and an inode-starved ext4) written until ENOSPC;
* ``memory_exhaustion``: a process growing its memory inside a memory-limited cgroup until the OOM
  killer fires (cgroup v2 ``memory.max`` + ``memory.events`` where the memory controller is on
  the unified hierarchy, else cgroup v1 ``memory.limit_in_bytes`` + ``memory.oom_control``);
* ``cpu_runaway``: ``stress-ng --cpu N --cpu-load 100`` (python busy loops without stress-ng);
* ``network_degradation``: random packet drop with iptables inside a private network namespace,
  on a steady TCP flow between the host and that namespace (10.251.0.0/30 only);
* ``service_down``: a watched process (``heald-fault-svc``) is killed and stays down a while.

Fault-free stretches (idle and steady ``stress-ng`` load) are recorded before and after the faults.

Output (``.npz``, loadable with ``allow_pickle=False``): ``keys`` (metric keys), ``X`` (samples x
keys, NaN = missing), ``wall``, ``mono``, ``seq``, ``label`` (0 = none, i = ``classes[i-1]``),
``phase`` (per-sample phase name), ``classes``, and the fault table ``fault_class``,
``fault_name``, ``fault_start``, ``fault_failure`` (ENOSPC / OOM kill time, NaN when the fault
has no single failure instant), ``fault_end``; ``phase_names``/``phase_start``/``phase_end``.
A sample is labelled with a fault's class from the moment the fault is injected until it is
cleared (for disk and memory: until the failure, ENOSPC or OOM kill, and while the disk stays
full) — i.e. the class whose failure occurs within the horizon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from live import LiveAgent  # noqa: E402

from agent.collect import registry  # noqa: E402
from agent.collect.base import Collector  # noqa: E402
from agent.collect.settings import CollectSettings, ProcessSettings  # noqa: E402
from agent.runtime.sampler import Sampler  # noqa: E402
from agent.score.classifier import FAILURE_CLASSES  # noqa: E402

WORKERS = str(Path(__file__).with_name("workers.py"))
PY = sys.executable
BASE = Path("/var/tmp/heald-fault")  # noqa: S108 - root-only scratch, removed at exit
DISK_MNT = Path("/mnt/heald-fault-disk")
INODE_MNT = Path("/mnt/heald-fault-inodes")
TMPFS_MNT = Path("/mnt/heald-fault-tmpfs")
NETNS = "heald-fault-ns"
VETH_HOST, VETH_NS = "hfv0", "hfv1"
HOST_IP, NS_IP, PORT = "10.251.0.1", "10.251.0.2", 5201
SVC_NAME = "heald-fault-svc"


class Stop(Exception):
    pass


@dataclass
class Fault:
    cls: str
    name: str
    start: float
    failure: float = float("nan")
    end: float = float("nan")


@dataclass
class State:
    phase: str = "setup"
    phases: list[tuple[str, float, float]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    error: str = ""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, timeout=60)


class Children:
    """Every process this harness starts, so that each one is killed and reaped by pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *argv: str, stdout: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
        p = subprocess.Popen(list(argv), stdout=stdout, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def kill(self, p: subprocess.Popen[str]) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)
        if p in self.procs:
            self.procs.remove(p)

    def kill_all(self) -> None:
        for p in list(self.procs):
            self.kill(p)


# --------------------------------------------------------------------------------------- cgroups
class MemCgroup:
    def __init__(self, name: str, limit: int) -> None:
        v2 = Path("/sys/fs/cgroup")
        ctrl = v2 / "cgroup.controllers"
        if ctrl.exists() and "memory" in ctrl.read_text().split():
            self.v2 = True
            self.path = v2 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "memory.max").write_text(str(limit))
            (self.path / "memory.swap.max").write_text("0") if (self.path / "memory.swap.max").exists() \
                else None
        else:
            self.v2 = False
            self.path = Path("/sys/fs/cgroup/memory") / name
            self.path.mkdir(exist_ok=True)
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            sw = self.path / "memory.memsw.limit_in_bytes"
            if sw.exists():
                with contextlib.suppress(OSError):
                    sw.write_text(str(limit))

    @property
    def procs(self) -> str:
        return str(self.path / "cgroup.procs")

    def oom_kills(self) -> int:
        f = self.path / ("memory.events" if self.v2 else "memory.oom_control")
        for line in f.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
            else:
                return


# --------------------------------------------------------------------------------------- scenario
class Scenario:
    def __init__(self, st: State, kids: Children, minutes: float, only: set[str]) -> None:
        self.st = st
        self.kids = kids
        self.minutes = minutes
        self.only = only
        self.cgroups: list[MemCgroup] = []
        self.stress = shutil.which("stress-ng")
        self.svc: subprocess.Popen[str] | None = None
        self.svc_bin = BASE / SVC_NAME

    # -- helpers
    def wait(self, seconds: float) -> None:
        if self.st.stop.wait(seconds):
            raise Stop

    def phase(self, name: str) -> None:
        now = time.time()
        if self.st.phases:
            n, s, _ = self.st.phases[-1]
            self.st.phases[-1] = (n, s, now)
        self.st.phases.append((name, now, float("nan")))
        self.st.phase = name
        print(f"[{time.strftime('%H:%M:%S')}] phase {name}", flush=True)

    def cpu_load(self, load: int, seconds: float) -> subprocess.Popen[str] | None:
        if self.stress:
            return self.kids.start(self.stress, "--cpu", "2", "--cpu-load", str(load),
                                   "--timeout", f"{int(seconds)}s", "--quiet")
        if load >= 100:
            p = self.kids.start(PY, WORKERS, "spin", str(seconds))
            self.kids.start(PY, WORKERS, "spin", str(seconds))
            return p
        return None

    # -- setup / teardown
    def setup(self) -> None:
        BASE.mkdir(parents=True, exist_ok=True)
        img = BASE / "disk.img"
        sh("truncate", "-s", "256M", str(img))
        sh("mkfs.ext4", "-q", "-F", "-m", "0", str(img))
        DISK_MNT.mkdir(parents=True, exist_ok=True)
        sh("mount", "-o", "loop", str(img), str(DISK_MNT))
        iimg = BASE / "inodes.img"
        sh("truncate", "-s", "64M", str(iimg))
        sh("mkfs.ext4", "-q", "-F", "-m", "0", "-N", "4096", str(iimg))
        INODE_MNT.mkdir(parents=True, exist_ok=True)
        sh("mount", "-o", "loop", str(iimg), str(INODE_MNT))
        TMPFS_MNT.mkdir(parents=True, exist_ok=True)
        sh("mount", "-t", "tmpfs", "-o", "size=192M", "heald-fault", str(TMPFS_MNT))
        # network namespace + veth + a steady TCP flow through it
        sh("ip", "netns", "add", NETNS)
        sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS)
        sh("ip", "link", "set", VETH_NS, "netns", NETNS)
        sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", VETH_HOST)
        sh("ip", "link", "set", VETH_HOST, "up")
        ns = ("ip", "netns", "exec", NETNS)
        sh(*ns, "ip", "addr", "add", f"{NS_IP}/30", "dev", VETH_NS)
        sh(*ns, "ip", "link", "set", VETH_NS, "up")
        sh(*ns, "ip", "link", "set", "lo", "up")
        self.kids.start(*ns, PY, WORKERS, "sink", NS_IP, str(PORT))
        time.sleep(0.5)
        self.kids.start(PY, WORKERS, "source", NS_IP, str(PORT), "200")
        # the watched service
        shutil.copy2("/bin/sleep", self.svc_bin)
        self.svc = self.kids.start(str(self.svc_bin), "infinity")

    def teardown(self) -> None:
        self.kids.kill_all()
        for cg in self.cgroups:
            cg.remove()
        with contextlib.suppress(Exception):
            sh("ip", "netns", "del", NETNS, check=False)
            sh("ip", "link", "del", VETH_HOST, check=False)
        for m in (DISK_MNT, INODE_MNT, TMPFS_MNT):
            if os.path.ismount(m):
                sh("umount", "-l", str(m), check=False)
            with contextlib.suppress(OSError):
                m.rmdir()
        shutil.rmtree(BASE, ignore_errors=True)

    # -- faults
    def fault_free(self, name: str, seconds: float) -> None:
        self.phase(name)
        p = self.cpu_load(50, seconds) if name.startswith("stress") else None
        self.wait(seconds)
        if p is not None:
            self.kids.kill(p)

    def disk_fill(self, where: Path, rate: float, inodes: bool = False, hold: float = 8.0) -> None:
        name = f"disk_fill:{where.name}:{rate:g}{'/s' if inodes else 'MB/s'}"
        self.phase(name)
        f = Fault("disk_full", name, time.time())
        self.st.faults.append(f)
        target = where / ("many" if inodes else "fill.bin")
        p = self.kids.start(PY, WORKERS, "inodes" if inodes else "fill", str(target), str(rate),
                            stdout=subprocess.PIPE)
        assert p.stdout is not None
        deadline = time.monotonic() + 300
        line = ""
        while time.monotonic() < deadline:
            if self.st.stop.is_set():
                raise Stop
            line = p.stdout.readline()
            if line.startswith("ENOSPC") or not line:
                break
        if line.startswith("ENOSPC"):
            f.failure = float(line.split()[1])
        self.wait(hold)
        self.kids.kill(p)
        if inodes:
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        sh("sync")
        f.end = time.time()
        self.phase("recover")
        self.wait(15)

    def memory(self, rate: float, limit_mb: int = 1536) -> None:
        name = f"memory:{rate:g}MB/s:{limit_mb}MB"
        cg = MemCgroup(f"heald-fault-{len(self.cgroups)}", limit_mb * 1024 * 1024)
        self.cgroups.append(cg)
        before = cg.oom_kills()
        self.phase(name)
        f = Fault("memory_exhaustion", name, time.time())
        self.st.faults.append(f)
        p = self.kids.start(PY, WORKERS, "grow", cg.procs, str(rate))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and p.poll() is None:
            if self.st.stop.is_set():
                raise Stop
            if cg.oom_kills() > before:
                break
            time.sleep(0.05)
        f.failure = time.time() if cg.oom_kills() > before else float("nan")
        self.kids.kill(p)
        f.end = time.time()
        self.phase("recover")
        self.wait(15)
        cg.remove()

    def cpu(self, seconds: float) -> None:
        self.phase(f"cpu_runaway:{seconds:g}s")
        f = Fault("cpu_runaway", self.st.phase, time.time())
        self.st.faults.append(f)
        p = self.cpu_load(100, seconds)
        self.wait(seconds)
        if p is not None:
            self.kids.kill(p)
        f.end = time.time()
        self.phase("recover")
        self.wait(15)

    def network(self, prob: float, seconds: float) -> None:
        self.phase(f"network_drop:{prob:g}")
        f = Fault("network_degradation", self.st.phase, time.time())
        self.st.faults.append(f)
        rule = ("INPUT", "-m", "statistic", "--mode", "random", "--probability", f"{prob}", "-j", "DROP")
        sh("ip", "netns", "exec", NETNS, "iptables", "-A", *rule)
        try:
            self.wait(seconds)
        finally:
            sh("ip", "netns", "exec", NETNS, "iptables", "-D", *rule, check=False)
        f.end = time.time()
        self.phase("recover")
        self.wait(15)

    def service(self, down_s: float) -> None:
        self.phase(f"service_down:{down_s:g}s")
        f = Fault("service_down", self.st.phase, time.time())
        f.failure = f.start
        self.st.faults.append(f)
        if self.svc is not None:
            self.kids.kill(self.svc)
        self.wait(down_s)
        self.svc = self.kids.start(str(self.svc_bin), "infinity")
        f.end = time.time()
        self.phase("recover")
        self.wait(15)

    def run(self) -> None:
        try:
            self.setup()
            self.phase("warmup")
            self.wait(10)
            plan = [
                ("disk", lambda: self.disk_fill(DISK_MNT, 6)),
                ("memory", lambda: self.memory(40)),
                ("cpu", lambda: self.cpu(40)),
                ("network", lambda: self.network(0.3, 45)),
                ("disk", lambda: self.disk_fill(TMPFS_MNT, 4)),
                ("service", lambda: self.service(30)),
                ("memory", lambda: self.memory(70)),
                ("disk", lambda: self.disk_fill(DISK_MNT, 10)),
                ("network", lambda: self.network(0.6, 40)),
                ("disk", lambda: self.disk_fill(INODE_MNT / "x", 80, inodes=True)),
                ("cpu", lambda: self.cpu(40)),
                ("memory", lambda: self.memory(25)),
                ("service", lambda: self.service(30)),
                ("disk", lambda: self.disk_fill(DISK_MNT, 3)),
            ]
            plan = [p for p in plan if not self.only or p[0] in self.only]
            fault_s = 850.0 * len(plan) / 14
            free = max(60.0, self.minutes * 60 - fault_s - 10)
            pre, post = 0.55 * free, 0.45 * free
            self.fault_free("idle", pre / 2)
            self.fault_free("stress", pre / 2)
            for _, step in plan:
                step()
            self.fault_free("idle_post", post / 2)
            self.fault_free("stress_post", post / 2)
            self.phase("end")
        except Stop:
            pass
        except Exception as exc:  # noqa: BLE001 - reported, then the recording is still saved
            self.st.error = f"{type(exc).__name__}: {exc}"
            print(f"scenario failed: {self.st.error}", file=sys.stderr, flush=True)
        finally:
            self.st.done.set()


# --------------------------------------------------------------------------------------- recorder
def build_collectors() -> list[Collector]:
    settings = CollectSettings(processes=ProcessSettings(watch=(SVC_NAME,), interval_s=1.0))
    return list(registry.build(settings))


class Recorder:
    def __init__(self) -> None:
        self.cols: dict[str, int] = {}
        self.rows: list[dict[int, float]] = []
        self.wall: list[float] = []
        self.mono: list[float] = []
        self.seq: list[int] = []
        self.phase: list[str] = []

    def add(self, sample: object, phase: str) -> None:
        row: dict[int, float] = {}
        for k, v in sample.metrics.items():  # type: ignore[attr-defined]
            j = self.cols.setdefault(k, len(self.cols))
            row[j] = float("nan") if v is None else float(v)
        self.rows.append(row)
        self.wall.append(sample.wall)  # type: ignore[attr-defined]
        self.mono.append(sample.mono)  # type: ignore[attr-defined]
        self.seq.append(sample.seq)  # type: ignore[attr-defined]
        self.phase.append(phase)

    def save(self, out: Path, st: State, live: dict[str, np.ndarray] | None = None) -> None:
        n, k = len(self.rows), len(self.cols)
        x = np.full((n, k), np.nan)
        absent = np.ones((n, k), dtype=bool)  # the key was not in the sample (NaN alone: a None value)
        for i, row in enumerate(self.rows):
            for j, v in row.items():
                x[i, j] = v
                absent[i, j] = False
        if live is not None:
            live = {**live, "absent": np.packbits(absent, axis=1), "absent_cols": np.asarray(k)}
        keys = sorted(self.cols, key=self.cols.__getitem__)
        wall = np.asarray(self.wall)
        label = np.zeros(n, dtype=np.int64)
        faults = list(st.faults)
        for f in faults:
            end = f.end if np.isfinite(f.end) else (wall[-1] if n else f.start)
            label[(wall >= f.start) & (wall <= end)] = FAILURE_CLASSES.index(f.cls) + 1
        phases = list(st.phases)
        tmp = out.with_name(out.name + ".tmp.npz")
        np.savez_compressed(
            tmp, keys=np.asarray(keys, dtype=str), X=x, wall=wall, mono=np.asarray(self.mono),
            seq=np.asarray(self.seq, dtype=np.int64), label=label,
            phase=np.asarray(self.phase, dtype=str), classes=np.asarray(FAILURE_CLASSES, dtype=str),
            fault_class=np.asarray([f.cls for f in faults], dtype=str),
            fault_name=np.asarray([f.name for f in faults], dtype=str),
            fault_start=np.asarray([f.start for f in faults], dtype=np.float64),
            fault_failure=np.asarray([f.failure for f in faults], dtype=np.float64),
            fault_end=np.asarray([f.end for f in faults], dtype=np.float64),
            phase_names=np.asarray([p[0] for p in phases], dtype=str),
            phase_start=np.asarray([p[1] for p in phases], dtype=np.float64),
            phase_end=np.asarray([p[2] for p in phases], dtype=np.float64),
            **(live or {}),
        )
        os.replace(tmp, out)


async def record(st: State, out: Path) -> None:
    collectors = build_collectors()
    sampler = Sampler("fault-bench", collectors)
    rec = Recorder()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(sampler.run_collector(n), name=f"collect-{n}") for n in sampler.names]
        await asyncio.sleep(2.0)  # first rates
        nxt = time.monotonic()
        last_save = time.monotonic()
        while not st.done.is_set():
            nxt += 1.0
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))
            if st.phase != "setup":
                rec.add(sampler.assemble(), st.phase)
            if time.monotonic() - last_save > 60:
                await asyncio.to_thread(rec.save, out, st)
                last_save = time.monotonic()
        for t in tasks:
            t.cancel()
    sampler.close()
    rec.save(out, st)
    print(f"saved {len(rec.rows)} samples x {len(rec.cols)} metrics, {len(st.faults)} faults -> {out}",
          flush=True)


def phase_at(st: State, wall: float) -> str:
    for name, start, end in st.phases:
        if start <= wall < (end if np.isfinite(end) else float("inf")):
            return name
    return "setup"


def live_arrays(agent: LiveAgent, last_wall: float) -> dict[str, np.ndarray]:
    found = agent.decisions(last_wall)
    return {
        "live_kind": np.asarray([d.kind for d in found], dtype=str),
        "live_playbook": np.asarray([d.playbook for d in found], dtype=str),
        "live_target": np.asarray([d.target for d in found], dtype=str),
        "live_wall": np.asarray([d.wall for d in found], dtype=np.float64),
        "live_config": np.asarray(agent.config_text),
        "live_commit": np.asarray(agent.commit),
        "live_playbooks": np.asarray(agent.playbooks()),
    }


def record_live(st: State, out: Path, agent: LiveAgent) -> None:
    """Every sample the live agent published, phases by wall time, and its dry-run decisions."""

    def build() -> tuple[Recorder, float]:
        rec = Recorder()
        rows = agent.snapshot()
        for r in rows:
            rec.add(SimpleNamespace(**r), phase_at(st, r["wall"]))
        return rec, (rows[-1]["wall"] if rows else 0.0)

    last_save = time.monotonic()
    while not st.done.wait(1.0):
        if not agent.alive():
            st.error = "the live agent exited: " + agent.log_tail()
            st.stop.set()
            break
        if time.monotonic() - last_save > 60:
            rec, _ = build()
            rec.save(out, st)
            last_save = time.monotonic()
    agent.stop()
    rec, last_wall = build()
    live = live_arrays(agent, last_wall)
    agent.remove_code()
    seqs = rec.seq
    if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
        st.error = f"the subscriber lost samples: {len(seqs)} of {seqs[-1] - seqs[0] + 1}"
    rec.save(out, st, live)
    print(f"saved {len(rec.rows)} live samples x {len(rec.cols)} metrics, {len(st.faults)} faults, "
          f"{live['live_kind'].size} live dry-run decisions -> {out}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--minutes", type=float, default=23.0, help="total recording time (faults take ~14)")
    ap.add_argument("--only", default="", help="comma list of fault kinds: disk,memory,cpu,network,service")
    ap.add_argument("--live-agent", action="store_true",
                    help="a real `heald run` (shipped playbooks, dry-run) records the samples; its would-be "
                         "actions are kept in the recording (live.py)")
    ap.add_argument("--agent-commit", default="HEAD", metavar="REV",
                    help="with --live-agent: the commit whose code the agent runs (default HEAD)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run.py needs root (mounts, cgroups, network namespaces)", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    st = State()
    kids = Children()
    sc = Scenario(st, kids, args.minutes, {s for s in args.only.split(",") if s})

    def on_signal(signum: int, _frame: object) -> None:
        print(f"signal {signum}: stopping and cleaning up", file=sys.stderr, flush=True)
        st.stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    th = threading.Thread(target=sc.run, name="scenario", daemon=True)
    agent = LiveAgent(SVC_NAME, args.agent_commit) if args.live_agent else None
    try:
        if agent is not None:
            agent.start()
            deadline = time.monotonic() + 120
            while len(agent.snapshot()) < 10:  # the daemon samples before the scenario starts
                if not agent.alive() or time.monotonic() > deadline:
                    print("the live agent did not start:\n" + agent.log_tail(), file=sys.stderr)
                    return 1
                time.sleep(0.5)
            th.start()
            record_live(st, args.out, agent)
        else:
            th.start()
            asyncio.run(record(st, args.out))
    finally:
        st.stop.set()
        if th.is_alive():
            th.join(timeout=30)
        sc.teardown()
        if agent is not None:
            agent.stop()
            agent.remove_code()
    if st.error:
        print(st.error, file=sys.stderr)
    return 1 if st.error else 0


if __name__ == "__main__":
    raise SystemExit(main())
