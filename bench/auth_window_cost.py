"""What keeping the auth failure window across restarts costs the security_net collector.

    python3 bench/auth_window_cost.py [--passes 300] [--smoke]

Times :meth:`SecurityNetCollector.collect` (auth log files, listeners off) four ways: a quiet
node (no failure) and an attack (32 sources failing every pass, so the reported counts change
and ``STATE/security/auth_window.json`` is rewritten every pass, one durable atomic write), each
without a state dir (nothing kept) and with one (on the disk under ``/var/tmp``). Prints a table
with the date and the machine; ``bench/results/auth_window_cost.txt`` (not with ``--smoke``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.collect.security_net import SecurityNetCollector
from agent.collect.settings import SecurityNetSettings


def measure(tmp: Path, state: Path | None, attack: bool, passes: int) -> list[float]:
    log = tmp / f"auth-{attack}-{state is not None}.log"
    log.write_text("")
    settings = SecurityNetSettings(auth_source="files", auth_files=(str(log),), listeners=False)
    c = SecurityNetCollector(settings, state_dir=state)
    c.start()
    out = []
    try:
        for i in range(passes):
            if attack:
                with log.open("a") as f:
                    f.writelines(f"Failed password for root from 192.0.2.{s} port {i} ssh2\n"
                                 for s in range(32))
            started = time.perf_counter()
            c.collect()
            out.append((time.perf_counter() - started) * 1e6)
    finally:
        c.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--passes", type=int, default=300)
    ap.add_argument("--smoke", action="store_true", help="a few passes, nothing written to bench/results")
    args = ap.parse_args()
    passes = 20 if args.smoke else args.passes
    lines = [(f"auth_window_cost: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
              f"{platform.machine()}, Python {platform.python_version()}, {passes} passes a case"),
             "", "| case | median µs | p90 µs | max µs |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory(dir="/var/tmp") as name:
        tmp = Path(name)
        for label, attack in (("quiet", False), ("32 sources failing every pass", True)):
            for kept in (False, True):
                t = sorted(measure(tmp, tmp / f"state-{attack}" if kept else None, attack, passes))
                where = "state dir (window kept)" if kept else "no state dir"
                lines.append(f"| {label}, {where} | {statistics.median(t):.0f} | "
                             f"{t[int(0.9 * (len(t) - 1))]:.0f} | {t[-1]:.0f} |")
    text = "\n".join(lines)
    print(text)
    if not args.smoke:
        out = Path(__file__).resolve().parent / "results" / "auth_window_cost.txt"
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
