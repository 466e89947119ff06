"""Lead time on a memory leak inside a limited cgroup: the shipped playbook vs the static line.

    sudo python3 bench/cgroup_leak_lead.py [--rates 10,30,60,100] [--limits 256,512]

For each (rate, limit): a real cgroup (v2 when its memory controller is there, else v1) with a
memory limit and no swap, a process leaking ``rate`` MiB/s of touched memory into it, and the
real cgroup collector read as the daemon reads it: once a second, and, while the collector says
the cgroup is hot (its limit within ``fast_eta_s`` at its rate: agent.collect.cgroups), again
every ``fast_interval_s`` (0.1 s). Each reading (only this cgroup's metrics) goes to the real playbook
engine with the shipped ``cgroup-memory-leak`` playbook forced into DRY-RUN: the engine decides as
the daemon's does and records its would-be run, and nothing is remediated; the leak runs into the
kernel's OOM kill. Recorded:

- predicted: the engine's would-be run (its ``run.start``), and which of the playbook's lines
  held (``eta_s``: full within 10 s for 2 s; ``eta_now``: full within 3 s right now past 60 %;
  ``forecast``; ``95%``: the backstop);
- threshold: the first reading with ``cgroup.mem.used_pct[CG] >= 95`` (the static line alone,
  read as often as the fast path reads).

Lead time = OOM kill - trigger time (seconds). A threshold that never held before the kill
(the leak jumped past 95 % between two readings) has no lead time (``-``). Prints a table with
the date and the machine. Needs root; cleans up its cgroups. It starts no agent, and its engine
is in dry-run (``force_mode``): nothing can be remediated (its own leak is ended by the kernel).
``--smoke``: one 60 MiB/s leak into 64 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structlog

from agent.act.engine import Engine
from agent.collect.cgroups import CgroupCollector
from agent.collect.sample import Metrics, Sample
from agent.collect.settings import CgroupSettings
from agent.decide.loader import load_playbooks
from agent.decide.settings import PlaybookSettings

MIB = 1 << 20
PLAYBOOK = "cgroup-memory-leak"


LEAK = """
import sys, time
rate = float(sys.argv[1])
sys.stdin.readline()
blocks, t0 = [], time.monotonic()
while True:
    blocks.append(bytearray(b"m" * (1 << 20)))
    time.sleep(max(0.0, t0 + len(blocks) / rate - time.monotonic()))
"""


def make_cgroup(name: str, limit_mib: int) -> tuple[Path, bool]:
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").exists() and "memory" in (v2 / "cgroup.subtree_control").read_text():
        d = v2 / name
        d.mkdir()
        (d / "memory.max").write_text(str(limit_mib * MIB))
        with contextlib.suppress(OSError):
            (d / "memory.swap.max").write_text("0")
        return d, True
    d = Path("/sys/fs/cgroup/memory") / name
    d.mkdir()
    (d / "memory.limit_in_bytes").write_text(str(limit_mib * MIB))
    (d / "memory.swappiness").write_text("0")
    return d, False


def branch(inputs: dict[str, object]) -> str:
    """Which of the playbook's lines held, from the would-be run's inputs."""
    keys = " ".join(inputs)
    if "eta_now_s" in keys and "eta_s[" in keys:
        return "eta_s"
    if "eta_now_s" in keys:
        return "eta_now"
    if "forecast" in keys:
        return "forecast"
    return "95%"


async def watch(rate: int, limit: int, d: Path, proc: subprocess.Popen[bytes],
                state: Path) -> tuple[float | None, float | None, float, float, str]:
    """(predicted at, threshold at, OOM at: seconds since the leak started; used % and branch when
    predicted)."""
    label = f"/{d.name}"
    col = CgroupCollector(CgroupSettings(rescan_s=0.5))
    col.start()
    runs: list[tuple[float, float, dict[str, object]]] = []  # (at s, used %, inputs)
    last_pct = 0.0
    enforced: list[dict[str, object]] = []
    settings = PlaybookSettings(dirs=(), force_mode="dry-run")
    playbooks = [pb for pb in load_playbooks(settings) if pb.name == PLAYBOOK]
    t0 = time.monotonic()

    def on_action(record: dict[str, object]) -> None:
        if record.get("type") == "run.start" and record.get("dry_run") is not True:
            enforced.append(record)  # never: force_mode is dry-run (checked below)
        if record.get("type") == "run.start" and not runs:
            inputs = record.get("inputs")
            runs.append((time.monotonic() - t0, last_pct, dict(inputs) if isinstance(inputs, dict) else {}))

    engine = Engine(settings, state, "bench", playbooks, on_action)
    task = asyncio.create_task(engine.run(), name="engine")
    seq = 0
    threshold: float | None = None

    async def feed(metrics: Metrics) -> None:
        nonlocal seq, threshold, last_pct
        ours = {k: v for k, v in metrics.items() if k.endswith(f"[{label}]")}
        last_pct = ours.get(f"cgroup.mem.used_pct[{label}]") or 0.0
        if threshold is None and last_pct >= 95:
            threshold = time.monotonic() - t0
        seq += 1
        await engine.evaluate(Sample(node="bench", seq=seq, wall=time.time(), mono=time.monotonic(),
                                     metrics=ours), None)

    try:
        (d / "cgroup.procs").write_text(str(proc.pid))
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        t0 = time.monotonic()
        def wait_end() -> float:  # when the OOM kill ended the leak (a thread waits on it)
            proc.wait()
            return time.monotonic()

        waiter = asyncio.create_task(asyncio.to_thread(wait_end))
        n = 0
        interval = col.settings.fast_interval_s
        while proc.poll() is None and time.monotonic() - t0 < 4 * limit / rate + 30:
            await feed(col.collect().metrics)
            n += 1
            while interval > 0 and col.hot and time.monotonic() + interval < t0 + n and proc.poll() is None:
                await asyncio.sleep(interval)
                await feed(col.collect_hot().metrics)
            await asyncio.sleep(max(0.0, t0 + n - time.monotonic()))
        async with asyncio.timeout(30):
            oom = await waiter - t0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        col.close()
    if enforced:
        raise SystemExit(f"an enforced run, the bench is void: {enforced[0]}")
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit(f"the leak ended with {proc.returncode}, not the OOM kill")
    if not runs:
        return None, threshold, oom, 0.0, "-"
    at, pct, inputs = runs[0]
    return at, threshold, oom, pct, branch(inputs)


def one(rate: int, limit: int) -> tuple[float | None, float | None, float, float, str]:
    """(predicted lead, threshold lead, OOM time since the leak started, used % and the line that
    held when predicted)."""
    name = f"heald-bench-leak-{os.getpid()}-{rate}-{limit}"
    d, _ = make_cgroup(name, limit)
    proc = subprocess.Popen([sys.executable, "-c", LEAK, str(rate)], stdin=subprocess.PIPE)
    try:
        with tempfile.TemporaryDirectory() as state:
            pred, thr, oom, pct, line = asyncio.run(watch(rate, limit, d, proc, Path(state)))
        return (None if pred is None else oom - pred, None if thr is None else oom - thr, oom, pct, line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for _ in range(100):
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="10,30,60,100", help="MiB/s, comma-separated")
    ap.add_argument("--limits", default="256,512", help="MiB, comma-separated")
    ap.add_argument("--smoke", action="store_true", help="one 60 MiB/s leak into 64 MiB")
    args = ap.parse_args()
    if args.smoke:
        args.rates, args.limits = "60", "64"
    if os.geteuid() != 0:
        raise SystemExit("needs root (it creates cgroups)")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and errors
    print(f"# cgroup leak lead time, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} cpu, {platform.release()}")
    print("| leak MiB/s | limit MiB | OOM kill at s | lead predicted s (at % of limit, line) "
          "| lead threshold 95% s | ratio |")
    print("|---|---|---|---|---|---|")
    for limit in (int(x) for x in args.limits.split(",")):
        for rate in (int(x) for x in args.rates.split(",")):
            pred, thr, oom, pct, line = one(rate, limit)
            ratio = "-" if pred is None or not thr else f"{pred / thr:.1f}x"
            print(f"| {rate} | {limit} | {oom:.1f} | "
                  f"{'-' if pred is None else f'{pred:.1f} ({pct:.0f}%, {line})'} | "
                  f"{'-' if thr is None else f'{thr:.1f}'} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
