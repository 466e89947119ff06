"""What each collector costs a node: CPU per pass and share of a core, each at its own interval.

    python3 bench/collector_cost.py [--seconds 60] [--smoke]

Builds the collectors a node runs with the default settings (``agent.collect.registry.build``,
a temporary state dir; a collector the host cannot serve, the GPU one here, is listed as
unavailable) and runs each ``collect()`` at its own ``interval_s`` for ``--seconds``, one
after another on one thread, the way the daemon's sampler calls them but without the daemon
around them. Per pass it takes the thread's CPU time (``time.thread_time``) and the CPU of the
children reaped meanwhile (``RUSAGE_CHILDREN``: a collector that starts a program pays for it),
and reports per collector: passes, mean and p90 µs per pass (thread), children ms over the
run, and share of one core (thread + children over the run). Each pass finds the caches the
other collectors and 50 ms of sleep left, as in the daemon; a tight loop would be 2-4x cheaper.

Nothing is acted on: collectors only read /proc, /sys and the journal (security_proc's egress
pass asks the kernel for its TCP sockets). Writes bench/results/collector_cost.json (not with
``--smoke``: 3 s, no file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.collect.registry import build  # noqa: E402
from agent.collect.settings import CollectSettings  # noqa: E402

RESULTS = REPO / "bench" / "results" / "collector_cost.json"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--smoke", action="store_true", help="3 s, no results file")
    args = parser.parse_args()
    seconds = 3.0 if args.smoke else args.seconds
    with tempfile.TemporaryDirectory(prefix="heald-collector-cost-") as state:
        live, unavailable = [], []
        for c in build(CollectSettings(), state_dir=state):
            try:
                c.start()
            except Exception as exc:  # noqa: BLE001 - CollectorUnavailable or whatever the host lacks
                unavailable.append((c.name, str(exc).splitlines()[0][:80]))
                continue
            live.append(c)
        passes: dict[str, list[float]] = {c.name: [] for c in live}
        children: dict[str, float] = dict.fromkeys(passes, 0.0)
        due = dict.fromkeys(passes, 0.0)
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            now = time.monotonic()
            for c in live:
                if now < due[c.name]:
                    continue
                due[c.name] = now + c.interval_s
                ch0, th0 = _children_cpu(), time.thread_time()
                c.collect()
                th1, ch1 = time.thread_time(), _children_cpu()
                passes[c.name].append(th1 - th0)
                children[c.name] += ch1 - ch0
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        for c in live:
            c.close()
    rows = []
    for name, times in passes.items():
        if not times:
            continue
        share = (sum(times) + children[name]) / elapsed * 100
        p90 = statistics.quantiles(times, n=10)[-1] if len(times) >= 2 else times[0]
        rows.append({"collector": name, "passes": len(times), "mean_us": statistics.fmean(times) * 1e6,
                     "p90_us": p90 * 1e6, "children_ms": children[name] * 1e3, "pct_of_core": share})
    rows.sort(key=lambda r: -r["pct_of_core"])
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{seconds:.0f} s, default settings; {stamp} on {platform.node()} ({os.cpu_count()} cpus, "
          f"{platform.platform()})")
    print(f"{'collector':16} {'passes':>6} {'mean µs':>9} {'p90 µs':>9} {'children ms':>12} "
          f"{'% of a core':>12}")
    for r in rows:
        print(f"{r['collector']:16} {r['passes']:6d} {r['mean_us']:9.0f} {r['p90_us']:9.0f} "
              f"{r['children_ms']:12.1f} {r['pct_of_core']:12.3f}")
    total = sum(r["pct_of_core"] for r in rows)
    print(f"{'all':16} {'':6} {'':9} {'':9} {'':12} {total:12.3f}")
    for name, why in unavailable:
        print(f"unavailable: {name}: {why}")
    if args.smoke:
        print(f"smoke run: {RESULTS.relative_to(REPO)} left as it was")
        return 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": stamp, "machine": platform.platform(), "cpus": os.cpu_count(),
                                   "seconds": seconds, "rows": rows, "total_pct_of_core": total,
                                   "unavailable": dict(unavailable)}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
