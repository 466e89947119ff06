"""Fault-free under varied benign load: would-be actions and risk-alert episodes per load (issue 20).

    sudo python3 bench/faultfree_load.py [--minutes-per-load 25] [--loads compile,tests,...]
        [--gap-s 60] [--settle-s 120] [--disk-cap-gib 8] [--dir /var/tmp] [--smoke]
        [--samples X.jsonl] [--fit-from RECORDING [--fit-from RECORDING ...]]
    python3 bench/faultfree_load.py --combine [--product TREE] [--fit-from RECORDING ...]

A real ``heald run`` (this checkout) as a fleet node, through ``bench/healdbench.py``: MQTT on to a
private mosquitto on a free loopback port, the anomaly detector fitted before the start (1800
recorded fault-free samples through ``heald model train``: scoring is live from the first sample;
``--fit-from`` below),
ALL shipped playbooks loaded and forced to dry-run three ways (every would-be action is written to
the audit log, nothing is done), the shipped unit's environment. The whole bench runs in a
private PID + mount namespace (``unshare --pid --fork --mount --mount-proc``, with
``--kill-child``): the agent can see and signal only the bench's own processes, and when the
bench's PID 1 ends, every process it started ends with it. After the run the start summary and
the audit log are checked (healdbench.check_agent): one enforced run voids the bench (exit 3).

While it runs, benign loads run one after another, each ``--minutes-per-load`` minutes, with
``--gap-s`` of idle between them. Each is a function here, started and stopped cleanly; its
processes run in their own session inside a cgroup the bench creates (``heald-ffload-PID``: a
memory limit of half the RAM and a PIDs limit of 4096, v2 or v1) and write only under the bench's
temporary directory:

* ``compile``: a generated C project (48 files) built with ``make -j2``, cleaned, built again;
* ``tests``: ``python3 -m unittest discover`` of a generated test package (24 modules), repeated;
* ``stress-io``: ``stress-ng --hdd 1 --io 1`` on a temp dir (``--hdd-bytes`` capped by free space);
* ``stress-vm``: ``stress-ng --vm 1 --vm-keep`` with 25 % of the RAM (at most half of what is free);
* ``stress-cpu``: ``stress-ng --cpu <ncpu> --cpu-load 75``;
* ``proc-burst``: bursts of 200-500 short process starts (``true``/``sleep 0.05``), every 2-10 s;
* ``copy``: a GiB-sized file (2 GiB, less when the disk is short) copied again and again (page cache);
* ``backup``: tar archives of the Python library written into a temp dir up to a cap, then deleted.

Disk: every load's files together stay under ``--disk-cap-gib`` and a quarter of the free space
of ``--dir``'s file system; a load that does not fit is skipped (said in its row). Memory: the
cgroup limit, and ``stress-vm``'s size. Time: every child has a timeout; the whole run has a hard
one (the plan + 10 min). Ctrl-C / SIGTERM: the loads' process groups are killed, the agent
stopped, the cgroup and the temporary directory removed.

Per load (and for the settle time before the first and the idle gaps between them): minutes,
iterations (failed), would-be actions (the audit log's dry-run ``run.start`` records, with
playbook and target; approval requests apart), risk-alert episodes, alert samples per source.
A sample is a risk alert as the daemon's ``RiskStage.risk_alert`` says (anomaly at or above its
threshold; a failure-class probability >= 0.5; a forecast with ETA <= 1800 s and confidence
>= 0.5), read from the node's MQTT ``risk`` messages (``metrics_interval_s = 0.5``: one for
every 1 Hz sample; with the default 10 s only changes of the anomaly or the classifier are
sent); an episode is a run of alert samples, gaps < 30 s merged, counted in the phase it starts
in. The table (date, machine) is printed and written to ``bench/results/faultfree_load.txt``
(not with ``--smoke``: each load 12 s). Needs root, stress-ng, gcc, make, mosquitto, paho-mqtt.
``--samples X.jsonl`` also keeps the node's raw samples (its MQTT ``metrics`` messages, one sample
a line): ``heald replay X.jsonl`` replays them through features, score and decide, e.g. to study
alert lines on benign load offline.

Recordings add up: a run (not ``--smoke``) also keeps its raw result (phases, would-be actions,
risk samples) in ``bench/results/faultfree_load/`` under the PRODUCT TREE it ran: a hash of what
decides what heald does (``agent/``, ``remediations/``, ``pyproject.toml``, as committed: a run
from a tree with uncommitted changes there is marked dirty and never combined). ``--combine``
prints one table over every kept run of the current product tree (or ``--product TREE``): the
same heald on the same host type, recorded in pieces, e.g. one run per working session. Runs of
different trees are never added together, with one exception: a commit that changes product files
without changing behaviour (a file shortened, a comment) and is shown to by ``bench/same_behaviour.py
OLD NEW`` (every kept run replayed through both commits' score stage, byte for byte, every changed
file loaded by it; its record in ``bench/results/faultfree_load/same/OLDTREE-NEWTREE.json``): the
old tree's runs whose own samples that record replayed count with the new tree's, and the table's
header says so.

The node's past (``--fit-from RECORDING``): by default the agent starts as a NEW node: an empty
feature history and a detector fitted on 30 min of another recording (idle, then stress-ng
--cpu); its own refits then fit on what it has seen so far (at 10, 20, 40, 80 min: the early-life
rule), so every load it has not met yet is novel to it. A node that has run for a while has its
usual loads in its 24-h history window. ``--fit-from`` starts the agent as that node: the detector
is fitted on the whole recording (a ``--samples`` file of an EARLIER run of this bench on this
host, ``.jsonl`` or ``.jsonl.gz``, or a ``bench/faults`` ``.npz``) and the node's feature history
is seeded with it (the daemon's own on-disk format, re-timed to end at the start); from there the
daemon refits as it always does (at start, when its history has doubled, on drift). The fit
source (file and hash) is kept with the run; ``--combine`` adds up only runs fitted on the same
recording (``--fit-from`` names it there too; default: the default recording). ``--fit-from``
given several times (``.jsonl[.gz]`` recordings of this host, oldest first): the node has lived
through all of them, one after the other with the time between them kept (its 24-h window);
they are joined into one recording (sequence numbers renumbered in that order) and the source
is the list, its hash that of their hashes in that order.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gzip
import hashlib
import inspect
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import healdbench as hb  # noqa: E402

RESULT = ROOT / "bench" / "results" / "faultfree_load.txt"
RUNS = ROOT / "bench" / "results" / "faultfree_load"
PRODUCT_PATHS = ("agent", "remediations", "pyproject.toml")
LOADS = ("compile", "tests", "stress-io", "stress-vm", "stress-cpu", "proc-burst", "copy", "backup")
TOOLS = ("stress-ng", "gcc", "make", "tar", "unshare")
GAP = "idle gap"
MERGE_S = 30.0  # alert samples less than this apart are one episode
GIB = 1 << 30
MIB = 1 << 20


class Stop(Exception):
    """SIGTERM / SIGINT: stop the loads and the agent, clean up."""


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"/proc/meminfo has no {key}")


# ------------------------------------------------------------------------------------ the cgroup
class LoadCgroup:
    """The loads' cgroup: ``heald-ffload-<pid>`` in the v2 hierarchy (memory.max, pids.max) or in
    the v1 memory and pids hierarchies (memory.limit_in_bytes, pids.max)."""

    def __init__(self, name: str, memory_bytes: int, pids: int = 4096) -> None:
        base = Path("/sys/fs/cgroup")
        controllers = base / "cgroup.controllers"
        self.dirs: list[Path] = []
        if controllers.exists() and "memory" in controllers.read_text().split():
            d = base / name
            d.mkdir()
            self.dirs.append(d)
            (d / "memory.max").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):
                (d / "pids.max").write_text(str(pids))
        else:
            for ctrl, file, value in (("memory", "memory.limit_in_bytes", memory_bytes),
                                      ("pids", "pids.max", pids)):
                if not (base / ctrl).is_dir():
                    continue
                d = base / ctrl / name
                d.mkdir()
                self.dirs.append(d)
                (d / file).write_text(str(value))
        if not self.dirs:
            raise SystemExit("no cgroup memory controller (v2 or v1) under /sys/fs/cgroup")

    def join(self, pid: int = 0) -> None:
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(pid or os.getpid()))

    def pids(self) -> set[int]:
        out: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                out.update(int(x) for x in (d / "cgroup.procs").read_text().split() if x.isdigit())
        return out

    def remove(self, wait_s: float = 60.0) -> bool:
        """rmdir once empty (the namespace's processes are gone); SIGKILL leftovers after half the wait."""
        deadline = time.monotonic() + wait_s
        while self.dirs and time.monotonic() < deadline:
            left = self.pids() - {0}
            if left and time.monotonic() > deadline - wait_s / 2:
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if not left:
                for d in list(self.dirs):
                    with contextlib.suppress(FileNotFoundError):
                        d.rmdir()
                    self.dirs.remove(d)
                break
            time.sleep(0.2)
        return not self.dirs


# ------------------------------------------------------------------------------------ the loads
@dataclass
class Ctx:
    """What a load gets: its own directory, the disk it may use, the stop flag, its counters."""

    work: Path
    disk_bytes: int
    smoke: bool
    live: set[subprocess.Popen[bytes]] = field(default_factory=set)
    runs: int = 0
    failed: int = 0
    note: str = ""

    def run(self, argv: list[str], until: float, cwd: Path | None = None) -> bool:
        """One child in its own session, killed (its whole group) at ``until``; counts it."""
        ok = self.spawn_wait([self.spawn(argv, cwd)], until)
        self.runs += 1
        self.failed += 0 if ok else 1
        return ok

    def spawn(self, argv: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, cwd=cwd or self.work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        self.live.add(p)
        return p

    def spawn_wait(self, procs: list[subprocess.Popen[bytes]], until: float) -> bool:
        """Wait for every child; at ``until`` the rest are killed (a load stopped on time is not a
        failure). True when each that finished exited 0."""
        ok = True
        for p in procs:
            try:
                rc = p.wait(timeout=max(0.1, until - time.time()))
                ok = ok and rc == 0
            except subprocess.TimeoutExpired:
                kill_group(p)
            self.live.discard(p)
        return ok

    def kill_all(self) -> None:
        for p in list(self.live):
            kill_group(p)
            self.live.discard(p)


def kill_group(p: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=10)


def _c_project(d: Path, files: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    objs = []
    for i in range(files):
        body = "\n".join(
            f"double f{i}_{j}(double x) {{ double s = 0; for (int k = 0; k < {50 + j}; k++) "
            f"s += (x + k) * {j + 1}.5 / (k + 1.0); return s; }}" for j in range(60))
        (d / f"m{i}.c").write_text(f"#include <math.h>\n{body}\n")
        objs.append(f"m{i}.o")
    (d / "main.c").write_text("double f0_0(double);\nint main(void) { return f0_0(1.0) > 0 ? 0 : 1; }\n")
    (d / "Makefile").write_text(f"OBJS = main.o {' '.join(objs)}\n"
                                "prog: $(OBJS)\n\tgcc -O2 -o prog $(OBJS) -lm\n"
                                "%.o: %.c\n\tgcc -O2 -c $<\nclean:\n\trm -f prog *.o\n")


def load_compile(ctx: Ctx, until: float) -> None:
    proj = ctx.work / "cproj"
    _c_project(proj, 48)
    while time.time() < until:
        ctx.run(["make", "-s", "clean"], until, cwd=proj)
        ok = ctx.run(["make", "-s", "-j2"], until, cwd=proj)
        if ok and time.time() < until:
            ctx.run([str(proj / "prog")], until, cwd=proj)


def load_tests(ctx: Ctx, until: float) -> None:
    pkg = ctx.work / "pytests"
    pkg.mkdir()
    for i in range(24):
        tests = "\n".join(
            f"    def test_{j}(self):\n        data = [random.random() for _ in range({2000 + 100 * j})]\n"
            f"        self.assertEqual(sorted(data), sorted(sorted(data, reverse=True)))\n"
            f"        self.assertEqual(json.loads(json.dumps({{'k': data[:50]}}))['k'], data[:50])\n"
            f"        self.assertTrue(re.fullmatch(r'[a-z]+_{j}', 'abc_{j}'))\n" for j in range(20))
        (pkg / f"test_m{i}.py").write_text(f"import json\nimport random\nimport re\nimport unittest\n\n\n"
                                           f"class T{i}(unittest.TestCase):\n{tests}")
    while time.time() < until:
        ctx.run([sys.executable, "-m", "unittest", "discover", "-q", "-s", str(pkg)], until, cwd=pkg)


def load_stress_io(ctx: Ctx, until: float) -> None:
    d = ctx.work / "io"
    d.mkdir()
    hdd = max(64 * MIB, min(GIB, ctx.disk_bytes))
    ctx.note = f"--hdd-bytes {hdd // MIB}M"
    while time.time() < until:
        ctx.run(["stress-ng", "--hdd", "1", "--hdd-bytes", f"{hdd // MIB}M", "--io", "1", "--temp-path",
                 str(d),
                 "--timeout", f"{max(1, int(until - time.time()))}s", "--quiet"], until + 20)


def load_stress_vm(ctx: Ctx, until: float) -> None:
    size = min(meminfo("MemTotal") // 4, meminfo("MemAvailable") // 2)
    ctx.note = f"--vm-bytes {size // MIB}M"
    while time.time() < until:
        ctx.run(["stress-ng", "--vm", "1", "--vm-bytes", f"{size // MIB}M", "--vm-keep",
                 "--timeout", f"{max(1, int(until - time.time()))}s", "--quiet"], until + 20)


def load_stress_cpu(ctx: Ctx, until: float) -> None:
    n = os.cpu_count() or 1
    ctx.note = f"--cpu {n} --cpu-load 75"
    while time.time() < until:
        ctx.run(["stress-ng", "--cpu", str(n), "--cpu-load", "75",
                 "--timeout", f"{max(1, int(until - time.time()))}s", "--quiet"], until + 20)


def load_proc_burst(ctx: Ctx, until: float) -> None:
    rng = random.Random(20)
    true, sleep = shutil.which("true") or "/bin/true", shutil.which("sleep") or "/bin/sleep"
    starts = 0
    while time.time() < until:
        n = rng.randint(200, 500)
        procs = [ctx.spawn([true] if k % 2 else [sleep, "0.05"]) for k in range(n)]
        ok = ctx.spawn_wait(procs, until + 10)
        starts += n
        ctx.runs += 1
        ctx.failed += 0 if ok else 1
        time.sleep(min(max(0.0, until - time.time()), rng.uniform(2.0, 10.0)))
    ctx.note = f"{starts} process starts"


def _data_file(path: Path, size: int) -> None:
    block = random.Random(7).randbytes(MIB)
    with path.open("wb") as f:
        for i in range(size // MIB):
            f.write(block[i % 64:] + block[: i % 64])


def load_copy(ctx: Ctx, until: float) -> None:
    size = min(2 * GIB, ctx.disk_bytes // 2) // MIB * MIB
    if ctx.smoke:
        size = min(size, 256 * MIB)
    if size < 64 * MIB:
        ctx.note = "skipped: not enough free disk"
        return
    src, dst = ctx.work / "copy-src", ctx.work / "copy-dst"
    _data_file(src, size)
    ctx.note = f"{size // MIB} MiB file"
    while time.time() < until:
        ctx.run(["cp", str(src), str(dst)], until)
        dst.unlink(missing_ok=True)


def load_backup(ctx: Ctx, until: float) -> None:
    source = Path(os.__file__).parent  # the Python library: many small files, read-only here
    cap = min(2 * GIB, ctx.disk_bytes // 2)
    if ctx.smoke:
        cap = min(cap, 256 * MIB)
    if cap < 64 * MIB:
        ctx.note = "skipped: not enough free disk"
        return
    out = ctx.work / "backup"
    out.mkdir()
    rounds = 0
    while time.time() < until:
        used, k = 0, 0
        while used < cap and time.time() < until:  # fill
            archive = out / f"backup-{k}.tar.gz"
            ctx.run(["tar", "-czf", str(archive), "--exclude=__pycache__", "--exclude=site-packages",
                     "--exclude=dist-packages", "-C", str(source.parent), source.name], until)
            used += archive.stat().st_size if archive.exists() else 0
            k += 1
            if k > 1000:
                break
        for f in out.iterdir():  # then delete
            f.unlink()
        rounds += 1
        time.sleep(min(max(0.0, until - time.time()), 3.0 if ctx.smoke else 30.0))
    ctx.note = f"filled up to {cap // MIB} MiB then deleted, {rounds}x"


LOAD_FNS: dict[str, Callable[[Ctx, float], None]] = {
    "compile": load_compile, "tests": load_tests, "stress-io": load_stress_io, "stress-vm": load_stress_vm,
    "stress-cpu": load_stress_cpu, "proc-burst": load_proc_burst, "copy": load_copy, "backup": load_backup}


# ------------------------------------------------------------------------------------ risk alerts
def alert_lines() -> tuple[float, float, float]:
    """The daemon's alert lines: RiskStage's defaults (failure p, forecast ETA, forecast confidence)."""
    from agent.score.stage import RiskStage  # noqa: PLC0415

    p = inspect.signature(RiskStage.__init__).parameters
    return (float(p["failure_threshold"].default), float(p["forecast_alert_s"].default),
            float(p["forecast_min_confidence"].default))


class RiskListener:
    """Subscribes to the node's MQTT messages; keeps (time, reasons) of each risk message."""

    def __init__(self, port: int, samples_to: Path | None = None) -> None:
        import msgspec  # noqa: PLC0415
        import paho.mqtt.client as mqtt  # noqa: PLC0415

        from agent import wire  # noqa: PLC0415

        self.p, self.eta, self.conf = alert_lines()
        self.samples: dict[int, tuple[float, list[str]]] = {}  # sample seq -> (time, reasons)
        self.lock = threading.Lock()
        # the node's raw samples (its metrics messages), one a line as `heald replay` reads them
        self.out = None if samples_to is None else samples_to.open("wb")
        enc = msgspec.json.Encoder()

        def on_message(_c: object, _u: object, msg: Any) -> None:
            with contextlib.suppress(Exception):
                m = wire.decode(msg.payload)
                if isinstance(m, wire.Metrics) and self.out is not None:
                    with self.lock:
                        for smp in m.samples:
                            self.out.write(enc.encode({"seq": smp.seq, "wall": smp.wall, "mono": smp.mono,
                                                       "metrics": smp.metrics}) + b"\n")
                if isinstance(m, wire.Risk):
                    why = ["anomaly"] if m.alert else []
                    why += [f"failure[{c}]" for c, v in m.failure.items() if v >= self.p]
                    why += [f"forecast[{f.resource}]" for f in m.forecasts
                            if f.eta_s is not None and f.eta_s <= self.eta and f.confidence >= self.conf]
                    with self.lock:
                        self.samples[int(m.sample_seq)] = (float(m.ts), why)

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("heald/v1/#", qos=1)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()
        with self.lock:
            if self.out is not None:
                self.out.close()
                self.out = None


def episodes(samples: list[tuple[float, list[str]]]) -> list[dict[str, Any]]:
    """Runs of alert samples (gaps < MERGE_S merged): start, end, samples, reasons."""
    out: list[dict[str, Any]] = []
    for t, why in sorted(samples, key=lambda s: s[0]):
        if not why:
            continue
        if out and t - out[-1]["end"] < MERGE_S:
            ep = out[-1]
        else:
            ep = {"start": t, "end": t, "samples": 0, "reasons": {}}
            out.append(ep)
        ep["end"] = t
        ep["samples"] += 1
        for w in why:
            ep["reasons"][w] = ep["reasons"].get(w, 0) + 1
    return out


# ------------------------------------------------------------------------------------ inside
def inner(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    work = Path(spec["work"])
    if not hb.confined():
        raise hb.Unsafe("the inner bench must run in its private PID+mount namespace")

    def on_signal(_sig: int, _frame: object) -> None:
        raise Stop

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    d = work / "agent"
    d.mkdir()
    log = d / "heald.log"
    phases: list[dict[str, Any]] = []
    broker = hb.Mosquitto(d)
    agent = None
    listener = None
    ctx: Ctx | None = None
    t_start = time.time()
    try:
        if spec.get("fit_from"):  # a node that has lived through that recording (its history and model)
            fit = Path(spec["fit_from"])
            hb.fit_detector(d / "state", rows=None, recording=fit)
            hb.seed_history(d / "state", fit)
        else:
            hb.fit_detector(d / "state")
        config = hb.write_config(d, mqtt_port=broker.port, node="faultfree-load")
        os.environ["HEALD_MQTT__METRICS_INTERVAL_S"] = "0.5"  # a risk message for every 1 Hz sample
        listener = RiskListener(broker.port, Path(spec["samples"]) if spec.get("samples") else None)
        agent = hb.start_heald(d, config, log, cwd=ROOT)
        deadline = time.monotonic() + 120
        while not any(r.get("event") == "heald ready" for r in hb.log_records(log)):
            if agent.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("heald did not get ready:\n" + log.read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        cg = LoadCgroup.__new__(LoadCgroup)
        cg.dirs = [Path(p) for p in spec["cgroup"]]
        cg.join()  # from here on every child of this process is in the loads' cgroup
        t_start = time.time()

        def phase(name: str, seconds: float, fn: Callable[[Ctx, float], None] | None) -> None:
            nonlocal ctx
            ld = work / "loads" / name
            ld.mkdir(parents=True, exist_ok=True)
            ctx = Ctx(ld, int(spec["disk_bytes"]), bool(spec["smoke"]))
            t0 = time.time()
            print(f"  {dt.datetime.now(dt.UTC):%H:%M:%S} {name} for {seconds:.0f} s", flush=True)
            try:
                if fn is None:
                    time.sleep(seconds)
                else:
                    fn(ctx, t0 + seconds)
                    time.sleep(max(0.0, t0 + seconds - time.time()))
            finally:
                ctx.kill_all()
                phases.append({"name": name, "start": t0, "end": time.time(), "runs": ctx.runs,
                               "failed": ctx.failed, "note": ctx.note, "load": fn is not None})
                shutil.rmtree(ld, ignore_errors=True)
                if agent.poll() is not None:
                    raise SystemExit("heald exited during the run:\n"
                                     + log.read_text(errors="replace")[-3000:])

        phase("settle", float(spec["settle_s"]), None)
        for i, name in enumerate(spec["loads"]):
            if i:
                phase(GAP, float(spec["gap_s"]), None)
            phase(name, float(spec["minutes"]) * 60, LOAD_FNS[name])
        phase(GAP, float(spec["gap_s"]), None)
    except Stop:
        print("stopped by a signal: cleaning up", file=sys.stderr, flush=True)
        return 130
    finally:
        if ctx is not None:
            ctx.kill_all()
        if agent is not None:
            hb.stop(agent)
        if listener is not None:
            listener.stop()
        broker.stop()
    checked = hb.check_agent(d, log)  # raises Unsafe on an enforced run
    audit = []
    for path in sorted((d / "state").glob("audit.jsonl*")):
        for line in path.read_text(errors="replace").splitlines():
            e = json.loads(line)
            r = e.get("record", {})
            if r.get("type") in ("run.start", "approval.requested"):
                audit.append({"ts": e["ts"], "type": r["type"], "playbook": r.get("playbook"),
                              "target": r.get("target"), "dry_run": r.get("dry_run")})
    result = {"phases": phases, "audit": audit, "risk": list(listener.samples.values()) if listener else [],
              "checked": checked, "started": t_start, "model_loaded": hb.model_loaded(log),
              "alert_lines": alert_lines()}
    (work / "result.json").write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------ outside
def plan_s(args: argparse.Namespace, loads: list[str]) -> float:
    return args.settle_s + len(loads) * (args.minutes_per_load * 60 + args.gap_s)


def outer(args: argparse.Namespace, loads: list[str]) -> int:
    if os.geteuid() != 0:
        print("faultfree_load.py needs root (cgroups, namespaces)", file=sys.stderr)
        return 2
    missing = [t for t in TOOLS if not shutil.which(t)]
    if not Path(hb.MOSQUITTO).exists():
        missing.append(hb.MOSQUITTO)
    if missing:
        print(f"skipped: missing {', '.join(missing)}", flush=True)
        return 0
    base = Path(args.dir)
    free = shutil.disk_usage(base).free
    disk = min(int(args.disk_cap_gib * GIB), free // 4)
    product = product_tree()
    work = Path(tempfile.mkdtemp(prefix="heald-ffload-", dir=base))
    cg = LoadCgroup(f"heald-ffload-{os.getpid()}", meminfo("MemTotal") // 2)
    proc: subprocess.Popen[bytes] | None = None

    def on_signal(_sig: int, _frame: object) -> None:
        raise Stop

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        spec = {"work": str(work), "minutes": args.minutes_per_load, "loads": loads, "gap_s": args.gap_s,
                "settle_s": args.settle_s, "disk_bytes": disk, "smoke": args.smoke,
                "cgroup": [str(p) for p in cg.dirs],
                "samples": str(work / "samples.jsonl") if args.samples else None,
                "fit_from": str(join_recordings(args.fit_from, work / "fit-from.jsonl"))
                if args.fit_from else None}
        (work / "spec.json").write_text(json.dumps(spec))
        print(f"faultfree_load: {', '.join(loads)}, {args.minutes_per_load:g} min each; disk for the loads "
              f"{disk / GIB:.1f} GiB (free {free / GIB:.1f} GiB in {base}); planned "
              f"{plan_s(args, loads) / 60:.1f} min", flush=True)
        env = dict(os.environ, **{hb.NS_ENV: hb._ns()})  # the host's namespaces: hb.confined() compares
        proc = subprocess.Popen(["unshare", "--kill-child=SIGTERM", "--pid", "--fork", "--mount",
                                 "--mount-proc", "--propagation", "private", sys.executable, __file__,
                                 "--inner", str(work / "spec.json")], env=env)
        try:
            rc = proc.wait(timeout=plan_s(args, loads) + 600)
        except subprocess.TimeoutExpired:
            print("hard timeout: stopping the bench", file=sys.stderr, flush=True)
            rc = 124
        if rc != 0 or not (work / "result.json").exists():
            print(f"the namespace run failed ({rc})", file=sys.stderr)
            return 3 if rc == 3 else 1
        result = json.loads((work / "result.json").read_text())
        if args.samples:
            args.samples.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(work / "samples.jsonl", args.samples)
            print(f"the node's samples: {args.samples} (`heald replay {args.samples}` replays them)",
                  flush=True)
        after = product_tree()  # the product changed under the run: it is not one tree's recording
        result["product"] = product if after == product else f"{product}-changed-dirty"
        result["fit"] = fit_source(args.fit_from)
        text = report(result, args, loads)
    except Stop:
        print("stopped by a signal: cleaning up", file=sys.stderr, flush=True)
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc is not None and proc.poll() is None:
            stop_namespace(proc)
        if not cg.remove():
            print(f"could not remove the cgroup {cg.dirs}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    print(text, flush=True)
    if not args.smoke:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(text + "\n")
        kept = keep_run(result, args, loads)
        print(f"kept as {kept.relative_to(ROOT)} (product tree {result['product']}); "
              "`python3 bench/faultfree_load.py --combine` adds up the runs of this tree", flush=True)
    return 0


def product_tree() -> str:
    """A hash of the committed product paths (git tree ids), with ``-dirty`` when any of them has
    uncommitted changes: the identity under which runs may be added together."""
    try:
        tree = tree_id("HEAD")
        dirty = _git(ROOT, "status", "--porcelain", "--", *PRODUCT_PATHS)
    except (OSError, subprocess.SubprocessError):
        return "unknown-dirty"
    return f"{tree}-dirty" if dirty else tree


def _git(repo: Path, *a: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def tree_id(commit: str, repo: Path = ROOT) -> str:
    """The product tree of ``commit``: a hash of its product paths' git tree ids (raises
    ``subprocess.CalledProcessError`` when one is missing)."""
    ids = [_git(repo, "rev-parse", f"{commit}:{p}") for p in PRODUCT_PATHS]
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]


def keep_run(result: dict[str, Any], args: argparse.Namespace, loads: list[str]) -> Path:
    RUNS.mkdir(parents=True, exist_ok=True)
    when = dt.datetime.fromtimestamp(result["started"], dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RUNS / f"{when}-{result['product']}.json.gz"
    result = dict(result, argv={"minutes_per_load": args.minutes_per_load, "loads": loads,
                                "gap_s": args.gap_s, "settle_s": args.settle_s},
                  machine={"node": platform.node(), "cpus": os.cpu_count(), "release": platform.release(),
                           "mem_gib": round(meminfo("MemTotal") / GIB, 1)})
    out.write_bytes(gzip.compress(json.dumps(result).encode()))
    return out


def join_recordings(paths: list[Path], out: Path) -> Path:
    """One recording of several: the only one as it is; else their samples, file by file in the
    order given, into ``out`` (``.jsonl``) with sequence numbers 1, 2, ... in that order (each
    run's own start at 1; :func:`healdbench.recording_features` orders by them)."""
    if len(paths) == 1:
        return paths[0].resolve()
    seq = 0
    with out.open("w") as f:
        for path in paths:
            raw = path.read_bytes()
            for line in (gzip.decompress(raw) if path.name.endswith(".gz") else raw).splitlines():
                if not line.strip():
                    continue
                smp = json.loads(line)
                seq += 1
                smp["seq"] = seq
                f.write(json.dumps(smp) + "\n")
    return out


def fit_source(paths: list[Path] | None) -> dict[str, Any]:
    """What the node's detector was fitted on (and its history seeded with): runs are added
    together only where this is the same recording (the same recordings, in the same order)."""
    if not paths:
        return {"source": str(hb.RECORDING.relative_to(ROOT)), "sha256": file_sha(hb.RECORDING),
                "rows": 1800, "seeded": False}
    names, shas = [], []
    for path in paths:
        try:
            names.append(str(path.resolve().relative_to(ROOT)))
        except ValueError:
            names.append(str(path))
        shas.append(file_sha(path))
    if len(paths) == 1:
        return {"source": names[0], "sha256": shas[0], "seeded": True}
    return {"source": " + ".join(names), "sha256": hashlib.sha256(" ".join(shas).encode()).hexdigest()[:12],
            "seeded": True}


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def run_fit(run: dict[str, Any]) -> dict[str, Any]:
    """A kept run's fit source (runs kept before it was recorded used the default recording)."""
    return run.get("fit") or fit_source(None)


def combine(product: str | None, fit_from: list[Path] | None = None) -> int:
    """One table over every kept run of ``product`` (default: this checkout's product tree) whose
    detector was fitted on ``fit_from`` (default: the default recording)."""
    product = product or product_tree()
    if product.endswith("-dirty"):
        print(f"the product paths ({', '.join(PRODUCT_PATHS)}) have uncommitted changes: no runs to combine "
              "(commit, or name a tree with --product)", file=sys.stderr)
        return 2
    fit = fit_source(fit_from)
    same = same_as(product)
    files = sorted(RUNS.glob(f"*-{product}.json.gz"))
    files += sorted(f for tree, (_, replayed) in same.items() for f in RUNS.glob(f"*-{tree}.json.gz")
                    if f.name.removesuffix(".json.gz") in replayed)
    runs = [json.loads(gzip.decompress(f.read_bytes())) for f in sorted(files, key=lambda f: f.name)]
    runs = [r for r in runs if run_fit(r)["sha256"] == fit["sha256"]]
    if not runs:
        print(f"no kept run of product tree {product} with the detector fitted on {fit['source']} in {RUNS}",
              file=sys.stderr)
        return 1
    merged = merge(runs)
    loads = list(dict.fromkeys(n for r in runs for n in r["argv"]["loads"]))
    header = [(f"# python3 bench/faultfree_load.py --combine: {len(runs)} run(s) of product tree {product}, "
               f"detector fitted on {fit['source']} ({fit['sha256']}"
               f"{'; the history seeded with it' if fit['seeded'] else ''}):")]
    for r in runs:
        a, m = r["argv"], r["machine"]
        when = dt.datetime.fromtimestamp(r["started"], dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        header.append(f"#   {when} on {m['node']} ({m['cpus']} cpu, {m['mem_gib']} GiB, {m['release']}): "
                      f"--minutes-per-load {a['minutes_per_load']:g} --loads {','.join(a['loads'])} "
                      f"--gap-s {a['gap_s']:g} --settle-s {a['settle_s']:g}"
                      + (f" [product tree {r['product']}]" if r["product"] != product else ""))
    for tree, (rec, _) in same.items():
        if any(r["product"] == tree for r in runs):
            n = sum(row["samples"] for row in rec["runs"])
            header.append(f"# runs of product tree {tree} count with {product}: same behaviour shown by "
                          f"bench/same_behaviour.py {rec['old']['commit'][:7]} {rec['new']['commit'][:7]} "
                          f"({rec['when']}; changed: {', '.join(rec['changed'])}; every Risk of the score "
                          f"stage identical on {n} samples of {len(rec['runs'])} kept runs, "
                          f"{'native and numpy paths' if rec['native'] else 'numpy path'})")
    text = "\n".join(header) + "\n" + report(merged, None, loads)
    print(text, flush=True)
    return 0


def same_as(product: str) -> dict[str, tuple[dict[str, Any], set[str]]]:
    """Older product trees shown to behave as ``product`` (bench/same_behaviour.py's kept records
    with the verdict, over whole runs): tree -> (record, the kept runs it replayed)."""
    out: dict[str, tuple[dict[str, Any], set[str]]] = {}
    for f in sorted((RUNS / "same").glob(f"*-{product}.json")):
        try:
            rec = json.loads(f.read_text())
            ok = (rec["same"] is True and rec["new"]["tree"] == product and not rec["limit"]
                  and not rec["not_loaded"] and rec["first_difference"] is None
                  and f.name == f"{rec['old']['tree']}-{product}.json")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if ok:
            out[rec["old"]["tree"]] = (rec, {row["run"] for row in rec["runs"]})
    return out


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs as one recording: phases, would-be actions and risk samples side by side (the runs are
    hours apart, so no alert episode spans two of them), the safety counts added."""
    checked: dict[str, Any] = {}
    for r in runs:
        for k, v in r["checked"].items():
            checked[k] = checked.get(k, 0) + v if isinstance(v, int | float) and k != "playbooks" else v
    return {"phases": [ph for r in runs for ph in r["phases"]],
            "audit": [a for r in runs for a in r["audit"]],
            "risk": sorted((tuple(x) for r in runs for x in r["risk"]), key=lambda x: x[0]),
            "checked": checked, "started": min(r["started"] for r in runs),
            "model_loaded": all(r["model_loaded"] for r in runs), "alert_lines": runs[0]["alert_lines"],
            "product": runs[0]["product"], "fit": run_fit(runs[0])}


def stop_namespace(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the bench's PID 1 (``unshare --fork`` ignores SIGTERM and SIGINT itself): it stops
    the loads and the agent; SIGKILL after 90 s, which ends every process of the namespace."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    init = [int(x) for x in children.read_text().split()] if children.exists() else []
    for sig, wait_s in ((signal.SIGTERM, 90.0), (signal.SIGKILL, 10.0)):
        for pid in init:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not init:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
        if proc.poll() is not None:
            return


def report(result: dict[str, Any], args: argparse.Namespace | None, loads: list[str]) -> str:
    """The table; ``args`` None: a combination of kept runs (the caller prints their header)."""
    when = dt.datetime.fromtimestamp(result["started"], dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    p, eta, conf = result["alert_lines"]
    lines = [] if args is None else [
        (f"# sudo python3 bench/faultfree_load.py --minutes-per-load {args.minutes_per_load:g} --loads "
         f"{','.join(loads)} --gap-s {args.gap_s:g} --settle-s {args.settle_s:g}{' --smoke' * args.smoke}"),
        (f"# {when}, {platform.node()}, {os.cpu_count()} cpu, {meminfo('MemTotal') / GIB:.1f} GiB, "
         f"{platform.release()}; product tree {result.get('product', '?')}")]
    fit = run_fit(result)
    lines.append(f"# detector fitted before start on {fit['source']} ({fit['sha256']})"
                 + ("; the node's feature history seeded with it (re-timed to end at the start): the "
                    "daemon's own refits (at start, as its history doubles, on drift) fit on it plus "
                    "what it sees" if fit["seeded"] else f", its first {fit.get('rows', 1800)} samples"))
    lines += [("# heald run (this checkout) as a fleet node: MQTT on, detector fitted "
               f"before start (loaded: {result['model_loaded']}), all shipped playbooks forced dry-run, "
               "private PID+mount namespace"),
             (f"# alert = anomaly >= threshold | failure p >= {p:g} | forecast ETA <= {eta:g} s with "
              f"confidence >= {conf:g}; episode = alert samples with gaps < {MERGE_S:g} s merged, counted "
              "where it starts; a load's row counts what starts during it and in the idle gap after it"),
             "",
             ("| phase | minutes | iterations (failed) | would-be actions | approval requests "
              "| alert episodes | per 3 h | alert samples (anomaly / classifier / forecast) | risk samples "
              "| notes |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    eps = episodes([(t, w) for t, w in result["risk"]])
    rows: dict[str, dict[str, Any]] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    order: list[str] = []
    previous = ""
    for ph in result["phases"]:
        name = ph["name"]
        r = rows.get(name)
        if r is None:
            r = rows[name] = {"s": 0.0, "runs": 0, "failed": 0, "acts": 0, "asks": 0, "eps": 0,
                              "src": [0, 0, 0], "n": 0, "note": ph["note"], "load": ph["load"]}
            order.append(name)
        if ph["note"] and ph["note"] not in r["note"].split("; "):  # combined runs: each run's own
            r["note"] = f"{r['note']}; {ph['note']}" if r["note"] else ph["note"]
        r["s"] += ph["end"] - ph["start"]
        r["runs"] += ph["runs"]
        r["failed"] += ph["failed"]
        # What starts in the idle gap after a load is the load's (a classifier or a forecast lags
        # by seconds; a load's files are deleted at its end): counted in the load's row.
        owner = previous if name == GAP and previous else name
        spans.setdefault(owner, []).append((ph["start"], ph["end"]))
        previous = name if ph["load"] else ""

    def where(t: float) -> str | None:
        return next((n for n, sp in spans.items() for a, b in sp if a <= t < b), None)

    for a in result["audit"]:
        n = where(a["ts"])
        if n is not None:
            rows[n]["acts" if a["type"] == "run.start" else "asks"] += 1
    for ep in eps:
        n = where(ep["start"])
        if n is not None:
            rows[n]["eps"] += 1
    for t, why in result["risk"]:
        n = where(t)
        if n is not None:
            rows[n]["n"] += 1
            for i, src in enumerate(("anomaly", "failure", "forecast")):
                rows[n]["src"][i] += any(w.startswith(src) for w in why)
    for n in order:
        r = rows[n]
        per3h = r["eps"] * 10800 / r["s"] if r["s"] > 0 else 0.0
        lines.append(f"| {n} | {r['s'] / 60:.1f} | {r['runs'] if r['load'] else '-'} ({r['failed']}) | "
                     f"{r['acts']} | {r['asks']} | {r['eps']} | {per3h:.1f} | "
                     f"{' / '.join(str(x) for x in r['src'])} | {r['n']} | "
                     f"{'counted in the load before it' if n == GAP else r['note']} |")
    load_s = sum(rows[n]["s"] for n in order if rows[n]["load"])
    acts = sum(rows[n]["acts"] for n in order)
    total_eps = sum(rows[n]["eps"] for n in order if rows[n]["load"])
    load_acts = sum(rows[n]["acts"] for n in order if rows[n]["load"])
    lines += ["",
              (f"under load: {load_s / 60:.1f} min, {load_acts} would-be actions, {total_eps} alert episodes "
               f"({total_eps * 10800 / max(load_s, 1):.1f} per 3 h); whole run: {acts} would-be actions; "
               f"risk samples read: {len(result['risk'])}"),
              (f"safety: every playbook dry-run ({result['checked']['playbooks']} loaded); audit log: "
               f"{result['checked']['audit_records']} records, {result['checked']['dry_runs']} dry runs, "
               f"enforced runs: {result['checked']['enforced_runs']}")]
    t0 = result["started"]
    for a in result["audit"]:
        lines.append(f"#   {a['type']} {a['playbook']} {a['target']} at +{a['ts'] - t0:.0f} s "
                     f"({where(a['ts'])})")
    for ep in eps:
        top = sorted(ep["reasons"].items(), key=lambda kv: -kv[1])[:4]
        lines.append(f"#   episode at +{ep['start'] - t0:.0f} s ({where(ep['start'])}), "
                     f"{ep['end'] - ep['start'] + 1:.0f} s, {ep['samples']} samples: "
                     + ", ".join(f"{k} x{v}" for k, v in top))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes-per-load", type=float, default=None, help="default 25 (--smoke: 0.2)")
    ap.add_argument("--loads", default=",".join(LOADS), help=f"comma-separated, of: {', '.join(LOADS)}")
    ap.add_argument("--gap-s", type=float, default=60.0, help="idle seconds between loads")
    ap.add_argument("--settle-s", type=float, default=120.0, help="idle seconds before the first load")
    ap.add_argument("--disk-cap-gib", type=float, default=8.0, help="disk the loads may use at most")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the loads' temporary files go "
                    "(a disk, not a tmpfs: default the temp dir)")
    ap.add_argument("--smoke", action="store_true", help="each load 12 s (unless --minutes-per-load), gaps "
                    "3 s, settle 5 s; writes no result")
    ap.add_argument("--samples", type=Path, help="also keep the node's raw samples (its MQTT metrics "
                    "messages, one a line) in this .jsonl, for `heald replay` and alert-line studies")
    ap.add_argument("--combine", action="store_true", help="one table over the kept runs of this product "
                    "tree (bench/results/faultfree_load/); runs nothing")
    ap.add_argument("--product", help="with --combine: the product tree to combine (default: this "
                    "checkout's)")
    ap.add_argument("--fit-from", type=Path, action="append", help="a fault-free recording of this host "
                    "under its usual loads (a --samples .jsonl[.gz], or a bench/faults .npz): the "
                    "detector is fitted on all of it and the node's feature history seeded with it, so "
                    "the agent starts as a node that has lived through it (default: the first 1800 samples "
                    "of bench/faults/data/faultfree-71min.npz, idle and stress-ng --cpu, history empty); "
                    "with --combine: the runs fitted on it. Several times (.jsonl[.gz] recordings, "
                    "oldest first): a node that has lived through all of them, one after the other")
    ap.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner is not None:
        return inner(args.inner)
    if args.fit_from is not None:  # read here: a bad recording is one line, not a namespace's traceback
        from agent.errors import HealdError  # noqa: PLC0415

        for fit_from in args.fit_from:
            if not fit_from.is_file():
                ap.error(f"--fit-from {fit_from}: no such file")
            if len(args.fit_from) > 1 and not fit_from.name.endswith((".jsonl", ".jsonl.gz")):
                ap.error(f"--fit-from {fit_from}: several recordings are joined only as .jsonl[.gz]")
            try:
                x, _wall = hb.recording_features(fit_from)
            except HealdError as exc:
                ap.error(f"--fit-from: {exc}")
            except (OSError, EOFError) as exc:  # gzip: not a gzip file, truncated
                ap.error(f"--fit-from {fit_from}: {exc}")
            if not len(x):
                ap.error(f"--fit-from {fit_from}: no samples")
    if args.combine:
        return combine(args.product, args.fit_from)
    loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    unknown = [x for x in loads if x not in LOAD_FNS]
    if unknown or not loads:
        ap.error(f"unknown load(s) {unknown}; choose from {', '.join(LOADS)}")
    if args.smoke:
        args.gap_s, args.settle_s = 3.0, 5.0
    if args.minutes_per_load is None:
        args.minutes_per_load = 0.2 if args.smoke else 25.0
    return outer(args, loads)


if __name__ == "__main__":
    raise SystemExit(main())
