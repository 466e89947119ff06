"""Agent overhead, side by side: heald vs Netdata, node_exporter (scraped at 1 Hz) and collectd.

    python3 bench/agent_overhead.py [--seconds 120] [--repeats 3] [--only heald,netdata,...] [--smoke]

heald runs as fleet nodes run it: MQTT on (reporting to a private mosquitto on a free loopback
port; the broker is not in heald's process tree, so its CPU and RSS are not counted for heald),
the anomaly detector fitted before the agent starts (bench/healdbench.py: recorded fault-free
samples through ``heald model train`` into the state dir, loaded at start: scoring is live from
the first sample), the shipped playbooks loaded and forced into dry-run. After each heald run the
script reads the agent's start summary and audit log and fails (exit 3) if any playbook could
act or any run was enforced: the benchmark never remediates the host. ``--smoke``: heald only,
3 s, one run, no peers installed.

Each agent runs alone, in the foreground, bound to loopback, one after another for the same
duration; every second the script reads /proc/<pid>/stat and /proc/<pid>/status of the agent's
whole process tree. Reported per agent: CPU seconds per hour of running (and % of one core),
peak RSS of the tree (MiB), each the median of the repeats with min..max, and the ratio to heald.
Peers missing on this machine are installed from Debian's packages (as root) and stopped by PID
afterwards. Writes bench/results/agent_overhead.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import healdbench as hb

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
START_S = 5.0


def ensure_packages(packages: dict[str, str]) -> None:
    """Install missing peers from Debian (binary -> package)."""
    missing = [pkg for binary, pkg in packages.items() if not shutil.which(binary)
               and not Path(binary).exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing {missing}; run as root to install them with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   check=True, env=env)


def tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc/*/stat ppid fields."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_rss(pids: list[int]) -> tuple[float, float]:
    """(cpu seconds incl. reaped children, RSS MiB) summed over pids."""
    cpu = rss = 0.0
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()
        # utime stime cutime cstime are fields 14-17 (1-based); f[0] is field 3 (state)
        cpu += sum(int(x) for x in f[11:15]) / CLK_TCK
        rss += int(f[21]) * PAGE
    return cpu, rss / 2**20


@dataclass
class Peer:
    name: str
    argv: Callable[[Path], list[str]]
    setup: Callable[[Path], None] = lambda _d: None
    during: Callable[[], None] | None = None  # called once a second (scraping)
    env: Callable[[Path], dict[str, str]] = lambda _d: dict(os.environ)
    check: Callable[[Path, Path], dict[str, Any]] | None = None  # (dir, log) after the run: safety


@dataclass
class HealdFleet:
    """heald as a fleet node runs it: MQTT to ``port``, the fitted ``model`` copied in, dry-run."""

    port: int = 0
    model: Path | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)

    def setup(self, d: Path) -> None:
        hb.write_config(d, mqtt_port=self.port)
        if self.model is not None:
            (d / "state" / "models").mkdir(parents=True)
            shutil.copy2(self.model, d / "state" / "models" / self.model.name)

    def check(self, d: Path, log: Path) -> dict[str, Any]:
        checked = hb.check_agent(d, log)
        if self.model is not None and not hb.model_loaded(log):
            raise SystemExit(f"heald did not load the fitted detector: {log.read_text()[-2000:]}")
        if not any(r.get("event") == "mqtt.connected" for r in hb.log_records(log)):
            raise SystemExit(f"heald never connected to the bench's broker: {log.read_text()[-2000:]}")
        self.checks.append(checked)
        return checked


FLEET = HealdFleet()


def netdata_setup(d: Path) -> None:
    for sub in ("cache", "lib", "log"):
        (d / sub).mkdir()
    (d / "netdata.conf").write_text(f"""[global]
    update every = 1
    run as user = root
[directories]
    cache = {d}/cache
    lib = {d}/lib
    log = {d}/log
[web]
    bind to = 127.0.0.1:19999
[logs]
    debug log = none
    error log = {d}/log/error.log
    access log = none
""")


def collectd_setup(d: Path) -> None:
    (d / "collectd.conf").write_text(f"""Interval 1
BaseDir "{d}"
PIDFile "{d}/collectd.pid"
TypesDB "/usr/share/collectd/types.db"
LoadPlugin cpu
LoadPlugin memory
LoadPlugin disk
LoadPlugin df
LoadPlugin interface
LoadPlugin load
LoadPlugin processes
LoadPlugin swap
LoadPlugin csv
<Plugin csv>
  DataDir "{d}/csv"
</Plugin>
""")


def scrape_node_exporter() -> None:
    try:
        with urllib.request.urlopen("http://127.0.0.1:19100/metrics", timeout=1) as r:
            r.read()
    except OSError:
        pass


PEERS = {
    "heald": Peer("heald", lambda d: hb.heald_argv(d / "agent.toml"), FLEET.setup, env=hb.heald_env,
                  check=FLEET.check),
    "netdata": Peer("netdata", lambda d: ["/usr/sbin/netdata", "-D", "-c", str(d / "netdata.conf")],
                    netdata_setup),
    "node_exporter": Peer("node_exporter", lambda _d: ["/usr/bin/prometheus-node-exporter",
                                                       "--web.listen-address=127.0.0.1:19100"],
                          during=scrape_node_exporter),
    "collectd": Peer("collectd", lambda d: ["/usr/sbin/collectd", "-f", "-C", str(d / "collectd.conf")],
                     collectd_setup),
}
PACKAGES = {"/usr/sbin/netdata": "netdata", "/usr/bin/prometheus-node-exporter": "prometheus-node-exporter",
            "/usr/sbin/collectd": "collectd-core"}


def run_once(peer: Peer, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{peer.name}-") as tmp:
        d = Path(tmp)
        peer.setup(d)
        env = peer.env(d)
        log = (d / "out.log").open("w")
        proc = subprocess.Popen(peer.argv(d), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=d,
                                start_new_session=True)
        stop = threading.Event()
        scraper = None
        if peer.during is not None:
            during = peer.during

            def loop() -> None:
                while not stop.wait(1.0):
                    during()
            scraper = threading.Thread(target=loop, daemon=True)
        try:
            time.sleep(START_S)  # start-up is not steady state
            if proc.poll() is not None:
                raise SystemExit(f"{peer.name} exited: {(d / 'out.log').read_text()[-2000:]}")
            if scraper:
                scraper.start()
            cpu0, _ = cpu_rss(tree(proc.pid))
            t0 = time.monotonic()
            peak = 0.0
            while time.monotonic() - t0 < seconds:
                time.sleep(1)
                _, rss = cpu_rss(tree(proc.pid))
                peak = max(peak, rss)
            cpu1, _ = cpu_rss(tree(proc.pid))
            elapsed = time.monotonic() - t0
        finally:
            stop.set()
            pids = tree(proc.pid)
            for p in reversed(pids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                for p in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
                proc.wait(timeout=10)
            log.close()
        if peer.check is not None:
            peer.check(d, d / "out.log")
    cpu_h = (cpu1 - cpu0) / elapsed * 3600
    return {"cpu_s_per_h": cpu_h, "cpu_pct": cpu_h / 36, "peak_rss_mib": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=",".join(PEERS))
    ap.add_argument("--fit-rows", type=int, default=1800, help="recorded samples the detector is fitted on")
    ap.add_argument("--smoke", action="store_true", help="heald only, 3 s, one run: checks the bench works")
    args = ap.parse_args()
    if args.smoke:
        args.seconds, args.repeats, args.only, args.fit_rows = 3.0, 1, "heald", 600
    names = [n for n in args.only.split(",") if n]
    if "heald" in names:
        with tempfile.TemporaryDirectory(prefix="bench-heald-fleet-") as fleet_dir, \
                hb.Mosquitto(Path(fleet_dir)) as broker:
            FLEET.port = broker.port
            FLEET.model = hb.fit_detector(Path(fleet_dir) / "state", rows=args.fit_rows)
            return measure(args, names, broker)
    return measure(args, names, None)


def measure(args: argparse.Namespace, names: list[str], broker: hb.Mosquitto | None) -> int:
    ensure_packages({b: p for b, p in PACKAGES.items() if any(n in b.replace("prometheus-", "")
                                                               for n in names)})
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for rep in range(args.repeats):
        for n in names:  # interleaved, so drift in the machine's load hits every agent alike
            r = run_once(PEERS[n], args.seconds)
            runs[n].append(r)
            print(f"[{rep + 1}/{args.repeats}] {n:<14} cpu {r['cpu_pct']:.3f}% of a core  "
                  f"peak rss {r['peak_rss_mib']:.1f} MiB", file=sys.stderr, flush=True)

    def med(n: str, k: str) -> tuple[float, float, float]:
        v = [r[k] for r in runs[n]]
        return statistics.median(v), min(v), max(v)

    table = {n: {k: med(n, k) for k in ("cpu_s_per_h", "cpu_pct", "peak_rss_mib")} for n in names}
    base = table.get("heald")
    print(f"\n{args.seconds:.0f} s per run, {args.repeats} runs each, median [min..max]; "
          f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({os.cpu_count()} cpus)")
    if broker is not None:
        print(f"heald as fleet nodes run it: MQTT on (private mosquitto 127.0.0.1:{broker.port}, pid "
              f"{broker.pid}: the broker's CPU and RSS are not counted for heald), detector fitted before "
              f"start ({args.fit_rows} recorded samples, heald model train), shipped playbooks loaded, "
              "forced dry-run")
        hb.print_safety({k: sum(c[k] for c in FLEET.checks) if k != "playbooks" else FLEET.checks[-1][k]
                         for k in FLEET.checks[-1]})
    print(f"{'agent':<14}{'CPU s/hour':>24}{'% of a core':>24}{'peak RSS MiB':>24}{'CPU x heald':>12}"
          f"{'RSS x heald':>12}")
    for n, row in table.items():
        def cell(k: str, fmt: str, row: dict[str, tuple[float, float, float]] = row) -> str:
            m, lo, hi = row[k]
            return f"{m:{fmt}} [{lo:{fmt}}..{hi:{fmt}}]"
        nan = float("nan")
        rc = row["cpu_s_per_h"][0] / base["cpu_s_per_h"][0] if base and base["cpu_s_per_h"][0] else nan
        rr = row["peak_rss_mib"][0] / base["peak_rss_mib"][0] if base else float("nan")
        print(f"{n:<14}{cell('cpu_s_per_h', '.1f'):>24}{cell('cpu_pct', '.3f'):>24}"
              f"{cell('peak_rss_mib', '.1f'):>24}{rc:>12.2f}{rr:>12.2f}")
    if args.smoke:
        print("smoke run: bench/results/agent_overhead.json left as it was")
        return 0
    out = ROOT / "bench" / "results" / "agent_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                               "cpus": os.cpu_count(), "seconds": args.seconds, "repeats": args.repeats,
                               "runs": runs, "median_min_max": table,
                               "heald": {"mqtt": broker is not None, "detector_fitted_rows": args.fit_rows,
                                         "playbooks": "shipped, forced dry-run",
                                         "safety_checks": FLEET.checks}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
