"""Lead time on fd and PID leaks: the predictive trigger vs the static line (issue 20).

    sudo python3 bench/limits_lead.py [--fd-rates 10,50,200] [--fd-limit 1024]
                                      [--fork-rates 2,5,20] [--pids-max 128]

For each rate, a real leak runs into its wall and the real collectors are read once a second, as
the daemon does. Nothing is remediated: the bench records when each trigger of the shipped
playbook would first have held, and when the leak hit the wall.

- fd: a process with RLIMIT_NOFILE = ``--fd-limit`` opening ``rate`` fds/s until EMFILE
  (agent.collect.limits, ``fd-leak``): predicted = ``proc.fd.eta_s < 60`` for 2 s with
  ``proc.fd.used_pct >= 50``; threshold = ``proc.fd.used_pct >= 95``.
- pids: a process forking ``rate`` sleeping children a second in a cgroup with pids.max =
  ``--pids-max`` until fork fails with EAGAIN (agent.collect.cgroups, ``cgroup-pids-leak``):
  predicted = ``cgroup.pids.eta_s < 30`` for 2 s with ``cgroup.pids.used_pct >= 50``;
  threshold = ``cgroup.pids.used_pct >= 95``.

Lead time = the wall (EMFILE / EAGAIN, the leaking process exits 3 then) - trigger time, seconds;
``-`` when the trigger never held before the wall (1 Hz samples). Needs root; cleans up. It
starts no agent and loads no playbook: nothing can be remediated (each leak ends at its own wall,
the fork leak's children are killed by the PIDs in its own cgroup). ``--smoke``: one small leak
of each kind.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.collect.cgroups import CgroupCollector
from agent.collect.limits import LimitCollector
from agent.collect.settings import CgroupSettings, LimitSettings

FD_LEAK = """
import os, resource, sys, time
rate, limit = float(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
sys.stdin.readline()
held, t0 = [], time.monotonic()
while True:
    try:
        held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        sys.exit(3)
    time.sleep(max(0.0, t0 + len(held) / rate - time.monotonic()))
"""
FORK_LEAK = """
import os, sys, time
rate = float(sys.argv[1])
sys.stdin.readline()
n, t0 = 0, time.monotonic()
while True:
    try:
        pid = os.fork()
    except OSError:
        sys.exit(3)
    if pid == 0:
        time.sleep(3600)
        os._exit(0)
    n += 1
    time.sleep(max(0.0, t0 + n / rate - time.monotonic()))
"""

Row = tuple[float | None, float | None, float, float]


def race(proc: subprocess.Popen[bytes], read: Callable[[], dict[str, float | None]], eta_key: str,
         pct_key: str, *, eta_below: float, budget_s: float) -> Row:
    """(predicted lead, threshold lead, wall time since start, used % when predicted)."""
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    t0 = time.monotonic()
    eta_since: float | None = None
    predicted = threshold = None
    at_pct = 0.0
    n = 0
    while proc.poll() is None and time.monotonic() - t0 < budget_s:
        m = read()
        now = time.monotonic() - t0
        eta = m.get(eta_key)
        pct = m.get(pct_key) or 0.0
        if eta is not None and eta < eta_below:
            eta_since = now if eta_since is None else eta_since
            if predicted is None and now - eta_since >= 2 and pct >= 50:
                predicted, at_pct = now, pct
        else:
            eta_since = None
        if threshold is None and pct >= 95:
            threshold = now
        n += 1
        time.sleep(max(0.0, t0 + n - time.monotonic()))
    proc.wait(30)
    wall = time.monotonic() - t0
    if proc.returncode != 3:
        raise SystemExit(f"the leak ended with {proc.returncode}, not at its wall")
    return (None if predicted is None else wall - predicted,
            None if threshold is None else wall - threshold, wall, at_pct)


def fd_leak(rate: int, limit: int) -> Row:
    col = LimitCollector(LimitSettings(fd_rescan_s=1.0, fd_top_n=100))
    col.start()
    proc = subprocess.Popen([sys.executable, "-c", FD_LEAK, str(rate), str(limit)], stdin=subprocess.PIPE)
    try:
        return race(proc, lambda: col.collect().metrics, f"proc.fd.eta_s[{proc.pid}]",
                    f"proc.fd.used_pct[{proc.pid}]", eta_below=60, budget_s=4 * limit / rate + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def fork_leak(rate: int, pids_max: int) -> Row:
    name = f"heald-bench-forks-{os.getpid()}-{rate}"
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists() and "pids" in (root / "cgroup.subtree_control").read_text():
        dirs = [root / name]
    else:
        dirs = [root / "pids" / name] + ([root / "memory" / name] if (root / "memory").is_dir() else [])
    for d in dirs:
        d.mkdir()
    (dirs[0] / "pids.max").write_text(str(pids_max))
    col = CgroupCollector(CgroupSettings(rescan_s=0.5))
    col.start()
    proc = subprocess.Popen([sys.executable, "-c", FORK_LEAK, str(rate)], stdin=subprocess.PIPE)
    try:
        for d in dirs:
            (d / "cgroup.procs").write_text(str(proc.pid))
        return race(proc, lambda: col.collect().metrics, f"cgroup.pids.eta_s[/{name}]",
                    f"cgroup.pids.used_pct[/{name}]", eta_below=30, budget_s=4 * pids_max / rate + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for _ in range(50):
            left = (dirs[0] / "cgroup.procs").read_text().split()
            if not left:
                break
            for p in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(p), signal.SIGKILL)
            time.sleep(0.1)
        for d in dirs:
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--fd-rates", default="10,50,200", help="fds/s, comma-separated")
    ap.add_argument("--fd-limit", type=int, default=1024, help="RLIMIT_NOFILE of the leaking process")
    ap.add_argument("--fork-rates", default="2,5,20", help="forks/s, comma-separated")
    ap.add_argument("--pids-max", type=int, default=128, help="pids.max of the leaking cgroup")
    ap.add_argument("--smoke", action="store_true", help="one small leak of each kind")
    args = ap.parse_args()
    if args.smoke:
        args.fd_rates, args.fd_limit, args.fork_rates, args.pids_max = "200", 128, "20", 32
    if os.geteuid() != 0:
        raise SystemExit("needs root (it creates cgroups)")
    print(f"# fd / PID leak lead time, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} cpu, {platform.release()}")
    print("| fault | rate /s | limit | wall at s | lead predicted s (at % of limit) | lead threshold 95% s "
          "| ratio |")
    print("|---|---|---|---|---|---|---|")
    runs: list[tuple[str, int, int, Callable[[int, int], Row]]] = [
        *(("fd leak (EMFILE)", int(r), args.fd_limit, fd_leak) for r in args.fd_rates.split(",")),
        *(("fork leak (EAGAIN)", int(r), args.pids_max, fork_leak) for r in args.fork_rates.split(",")),
    ]
    for fault, rate, limit, fn in runs:
        pred, thr, wall, pct = fn(rate, limit)
        ratio = "-" if pred is None or not thr else f"{pred / thr:.1f}x"
        print(f"| {fault} | {rate} | {limit} | {wall:.1f} | "
              f"{'-' if pred is None else f'{pred:.1f} ({pct:.0f}%)'} | "
              f"{'-' if thr is None else f'{thr:.1f}'} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
