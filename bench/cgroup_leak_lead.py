"""Lead time on a memory leak inside a limited cgroup: the predictive trigger vs the static line.

    sudo python3 bench/cgroup_leak_lead.py [--rates 10,30,60] [--limits 256,512]

For each (rate, limit): a real cgroup (v2 when its memory controller is there, else v1) with a
memory limit and no swap, a process leaking ``rate`` MiB/s of touched memory into it, and the
real cgroup collector read once a second, as the daemon does. Nothing is remediated: the leak
runs into the kernel's OOM kill, and the bench records when each trigger of the shipped
``cgroup-memory-leak`` playbook would first have held:

- predicted: ``cgroup.mem.eta_s[CG] < LINE`` held for 2 s with ``cgroup.mem.used_pct[CG] >= 50``
  (the playbook's first condition; LINE read from the shipped playbook, 10 s);
- threshold: ``cgroup.mem.used_pct[CG] >= 95`` (the static backstop, like memory-exhaustion's).

Lead time = OOM kill - trigger time (seconds). A threshold that never held before the kill
(the leak jumped past 95 % between two samples) has no lead time (``-``). Prints a table with
the date and the machine. Needs root; cleans up its cgroups. It starts no agent and loads no
playbook: nothing can be remediated (its own leak is ended by the kernel's OOM kill).
``--smoke``: one 60 MiB/s leak into 64 MiB.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.collect.cgroups import CgroupCollector
from agent.collect.settings import CgroupSettings

MIB = 1 << 20
PLAYBOOK = Path(__file__).resolve().parents[1] / "remediations" / "cgroup-memory-leak.yaml"


def eta_line() -> float:
    """The shipped playbook's fast-leak line (``cgroup.mem.eta_s[...] < LINE``), read from its YAML."""
    import yaml  # noqa: PLC0415 - only the bench needs it

    fast = yaml.safe_load(PLAYBOOK.read_text())["trigger"]["any"][0]["all"][0]
    if not fast["metric"].startswith("cgroup.mem.eta_s") or fast["op"] != "<":
        raise SystemExit(f"{PLAYBOOK}: its first fast-leak condition is not cgroup.mem.eta_s < LINE")
    return float(fast["value"])


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


def one(rate: int, limit: int) -> tuple[float | None, float | None, float, float]:
    """(predicted lead, threshold lead, OOM time since the leak started, used % when predicted)."""
    name = f"heald-bench-leak-{os.getpid()}-{rate}-{limit}"
    d, _ = make_cgroup(name, limit)
    label = f"/{name}"
    col = CgroupCollector(CgroupSettings(rescan_s=0.5))
    col.start()
    proc = subprocess.Popen([sys.executable, "-c", LEAK, str(rate)], stdin=subprocess.PIPE)
    try:
        (d / "cgroup.procs").write_text(str(proc.pid))
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        t0 = time.monotonic()
        eta_since: float | None = None
        predicted = threshold = None
        pct_at_predicted = 0.0
        n = 0
        line = eta_line()
        while proc.poll() is None and time.monotonic() - t0 < 4 * limit / rate + 30:
            m = col.collect().metrics
            now = time.monotonic() - t0
            eta = m.get(f"cgroup.mem.eta_s[{label}]")
            pct = m.get(f"cgroup.mem.used_pct[{label}]") or 0.0
            if eta is not None and eta < line:
                eta_since = now if eta_since is None else eta_since
                if predicted is None and now - eta_since >= 2 and pct >= 50:
                    predicted, pct_at_predicted = now, pct
            else:
                eta_since = None
            if threshold is None and pct >= 95:
                threshold = now
            n += 1
            time.sleep(max(0.0, t0 + n - time.monotonic()))
        proc.wait(30)
        oom = time.monotonic() - t0
        if proc.returncode != -signal.SIGKILL:
            raise SystemExit(f"the leak ended with {proc.returncode}, not the OOM kill")
        return (None if predicted is None else oom - predicted,
                None if threshold is None else oom - threshold, oom, pct_at_predicted)
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
    ap.add_argument("--rates", default="10,30,60", help="MiB/s, comma-separated")
    ap.add_argument("--limits", default="256,512", help="MiB, comma-separated")
    ap.add_argument("--smoke", action="store_true", help="one 60 MiB/s leak into 64 MiB")
    args = ap.parse_args()
    if args.smoke:
        args.rates, args.limits = "60", "64"
    if os.geteuid() != 0:
        raise SystemExit("needs root (it creates cgroups)")
    print(f"# cgroup leak lead time, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} cpu, {platform.release()}")
    print("| leak MiB/s | limit MiB | OOM kill at s | lead predicted s (at % of limit) "
          "| lead threshold 95% s | ratio |")
    print("|---|---|---|---|---|---|")
    for limit in (int(x) for x in args.limits.split(",")):
        for rate in (int(x) for x in args.rates.split(",")):
            pred, thr, oom, pct = one(rate, limit)
            ratio = "-" if pred is None or not thr else f"{pred / thr:.1f}x"
            print(f"| {rate} | {limit} | {oom:.1f} | "
                  f"{'-' if pred is None else f'{pred:.1f} ({pct:.0f}%)'} | "
                  f"{'-' if thr is None else f'{thr:.1f}'} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
