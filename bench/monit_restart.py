"""Time to heal for Monit, measured the way bench/time_to_heal.py measures heald.

    python3 bench/monit_restart.py [--kills 30] [--smoke]

Monit (Debian's `monit`, installed when missing) runs in the foreground with ``set daemon 1`` and
``check process ... matching ... start program``, on its own control file in a temp dir. A
worker (a python interpreter symlinked as ``heald-bw``) is SIGKILLed 30 times; the time from the
SIGKILL to a new process whose /proc/PID/comm is ``heald-bw`` (i.e. after exec) is measured by
polling /proc every 0.5 ms. Prints p50/p95 and writes bench/results/monit_restart.json.
Like time_to_heal.py it re-runs itself in a private PID+mount namespace first (``unshare``): the
kills and the clean-up by name see only the bench's own worker. ``--smoke``: 3 kills, no file,
and it installs nothing (monit missing: exit 1).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import healdbench as hb

RESULTS = Path(__file__).parent / "results" / "monit_restart.json"
WORKER = "heald-bw"


def comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def alive(pid: str) -> bool:
    """Not a zombie (a killed orphan lingers until PID 1 reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def workers() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and comm(p) == WORKER and alive(p)]


def become_subreaper() -> None:
    """Adopt orphans and reap them at once, as a real PID 1 (systemd) would.

    On these machines PID 1 reaps orphans only every few seconds; the killed worker (orphaned by
    monit's start script) would linger as a zombie whose pid still "exists" for monit's pidfile
    check, adding seconds that a real host does not have.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

    def reap() -> None:
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(0.001)

    threading.Thread(target=reap, daemon=True).start()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--smoke", action="store_true", help="3 kills, installs nothing, no results file")
    args = ap.parse_args()
    if args.smoke:
        args.kills = 3
        if not shutil.which("monit"):
            raise SystemExit("monit is not installed; --smoke installs nothing")
    if not hb.confined():
        raise SystemExit("monit_restart.py runs only inside its private PID+mount namespace")
    if not shutil.which("monit"):
        if os.geteuid() != 0:
            raise SystemExit("monit is missing; run as root to install it with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "monit"],
                       check=True, env=env)
    if workers():
        raise SystemExit(f"a {WORKER} process is already running; stop it first")
    with tempfile.TemporaryDirectory(prefix="monit-bench-") as tmp:
        d = Path(tmp)
        exe = d / WORKER
        exe.symlink_to(sys.executable)
        start = d / "start.sh"
        pidfile = d / "worker.pid"
        start.write_text(f'#!/bin/sh\n"{exe}" -c "import time; time.sleep(3600)" '
                         f'</dev/null >/dev/null 2>&1 &\necho $! > "{pidfile}"\n')
        start.chmod(0o755)
        rc = d / "monitrc"
        rc.write_text(f"""set daemon 1
set pidfile {d}/monit.pid
set idfile {d}/monit.id
set statefile {d}/monit.state
set logfile {d}/monit.log
check process {WORKER} with pidfile "{pidfile}"
  start program = "{start}"
""")
        rc.chmod(0o600)
        become_subreaper()
        monit = subprocess.Popen(["monit", "-I", "-c", str(rc)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        latencies: list[float] = []
        try:
            deadline = time.monotonic() + 20
            while not workers():
                if time.monotonic() > deadline:
                    raise SystemExit("monit did not start the worker: " + (d / "monit.log").read_text())
                time.sleep(0.05)
            for _ in range(args.kills):
                # Random phase against monit's 1 s cycle, after the previous restart settled.
                time.sleep(1.0 + random.random())
                (old,) = workers()
                t0 = time.monotonic()
                os.kill(old, signal.SIGKILL)
                while True:
                    pids = [p for p in workers() if p != old]
                    if pids:
                        break
                    if time.monotonic() - t0 > 15:
                        raise RuntimeError("monit did not restart the worker within 15 s")
                    time.sleep(0.0005)
                latencies.append(time.monotonic() - t0)
                print(f"  restart {len(latencies):2d}: {latencies[-1] * 1000:7.1f} ms", file=sys.stderr)
        finally:
            monit.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            while monit.poll() is None and time.monotonic() < deadline:  # the reaper thread may win
                time.sleep(0.05)
            for p in workers():
                os.kill(p, signal.SIGKILL)
    ms = [v * 1000 for v in latencies]
    result = {"what": f"SIGKILL -> new {WORKER} running (monit, set daemon 1)", "n": len(ms),
              "p50_ms": round(pct(ms, 0.5), 1), "p95_ms": round(pct(ms, 0.95), 1),
              "min_ms": round(min(ms), 1), "max_ms": round(max(ms), 1),
              "mean_ms": round(statistics.fmean(ms), 1)}
    print(f"\n{'tool':<8}{'n':>4}{'p50 ms':>10}{'p95 ms':>10}{'min':>8}{'max':>8}")
    print(f"{'monit':<8}{result['n']:>4}{result['p50_ms']:>10}{result['p95_ms']:>10}"
          f"{result['min_ms']:>8}{result['max_ms']:>8}")
    print("confined: a private PID+mount namespace (monit and the kills see only the bench's own worker)")
    if args.smoke:
        print(f"smoke run: {RESULTS} left as it was")
        return 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                                   "cpus": os.cpu_count(), "monit": result, "samples_ms": ms}, indent=1))
    return 0


if __name__ == "__main__":
    hb.confine()
    sys.exit(main())
