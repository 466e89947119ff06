"""Run `heald run` for a while and watch its memory and CPU: does RSS grow?

    python3 bench/soak_memory.py --minutes 10 [--smoke]

heald runs as a fleet node runs it and can act on nothing (bench/healdbench.py): MQTT on to a
private mosquitto on a free loopback port (not in heald's tree: not counted), the detector fitted
before start, the shipped playbooks forced into dry-run, state and audit log in a temporary
directory. After the run the start summary and the audit log are checked: an enforced run, or a
playbook that could have acted, fails the bench (exit 3). ``--smoke``: 15 s, one reading every 2 s.

Prints a table of RSS over time, the RSS slope after warm-up (least squares, MiB/hour) and CPU
seconds per hour (from /proc/<pid>/stat of the process tree), and writes
bench/results/soak_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import healdbench as hb

ROOT = Path(__file__).resolve().parents[1]


def tree_stats(pid: int) -> tuple[float, float]:
    """(RSS MiB, CPU seconds) of a process and its children."""
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0.0
    rss = cpu = 0.0
    for q in procs:
        try:
            rss += q.memory_info().rss
            t = q.cpu_times()
            cpu += t.user + t.system
        except psutil.Error:
            continue
    return rss / 2**20, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds ignored for the slope")
    ap.add_argument("--every", type=float, default=10.0)
    ap.add_argument("--fit-rows", type=int, default=1800, help="recorded samples the detector is fitted on")
    ap.add_argument("--smoke", action="store_true", help="15 s, a reading every 2 s: checks the bench works")
    args = ap.parse_args()
    if args.smoke:
        args.minutes, args.every, args.warmup, args.fit_rows = 0.25, 2.0, 0.0, 600

    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        d = Path(tmp)
        log = d / "heald.log"
        with hb.Mosquitto(d) as broker:
            config = hb.write_config(d, mqtt_port=broker.port)
            hb.fit_detector(d / "state", rows=args.fit_rows)
            proc = hb.start_heald(d, config, log, cwd=ROOT)
            t0 = time.monotonic()
            rows: list[tuple[float, float, float]] = []
            try:
                while time.monotonic() - t0 < args.minutes * 60:
                    time.sleep(args.every)
                    if proc.poll() is not None:
                        print(log.read_text()[-3000:], file=sys.stderr)
                        raise SystemExit(f"heald exited with {proc.returncode}")
                    rss, cpu = tree_stats(proc.pid)
                    rows.append((time.monotonic() - t0, rss, cpu))
                    print(f"{rows[-1][0]:7.0f}s  rss {rss:6.1f} MiB  cpu {cpu:7.2f}s", flush=True)
            finally:
                stop_s = hb.stop(proc)
        checked = hb.check_agent(d, log)
        if not hb.model_loaded(log):
            raise SystemExit("heald did not load the fitted detector")

    steady = [r for r in rows if r[0] >= args.warmup]
    n = len(steady)
    slope = 0.0
    if n >= 2:
        mx = sum(r[0] for r in steady) / n
        my = sum(r[1] for r in steady) / n
        sxx = sum((r[0] - mx) ** 2 for r in steady)
        slope = sum((r[0] - mx) * (r[1] - my) for r in steady) / sxx * 3600 if sxx else 0.0
    dur = rows[-1][0] - rows[0][0] if len(rows) > 1 else 1.0
    cpu_per_h = (rows[-1][2] - rows[0][2]) / dur * 3600 if len(rows) > 1 else 0.0
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpu",
        "minutes": args.minutes, "rss_first_mib": steady[0][1] if steady else None,
        "rss_last_mib": steady[-1][1] if steady else None,
        "rss_peak_mib": max(r[1] for r in rows), "rss_slope_mib_per_h": slope,
        "cpu_s_per_h": cpu_per_h, "cpu_pct_of_core": cpu_per_h / 36, "sigterm_stop_s": stop_s,
    }
    print()
    print(f"heald as a fleet node: MQTT on (private broker, not counted), detector fitted before start "
          f"({args.fit_rows} recorded samples), shipped playbooks forced dry-run; "
          f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}")
    hb.print_safety(checked)
    print(f"{'metric':<26}{'value':>12}")
    for k, v in result.items():
        print(f"{k:<26}{v:>12.3f}" if isinstance(v, float) else f"{k:<26}{v!s:>12}")
    if args.smoke:
        print("smoke run: bench/results/soak_memory.json left as it was")
        return 0
    out = ROOT / "bench" / "results" / "soak_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"result": result, "series": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
