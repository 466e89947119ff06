"""Run by tests/test_predictive_edges.py: memory-exhaustion-predicted's edge siblings on a scaled host.

``unshare --pid --fork --mount --mount-proc python3 tests/predictive_edges_namespace.py SPEC.json``

PID 1 of a private PID + mount namespace (this script, the *driver*) plays the host: a fixture
``meminfo`` (MemTotal ``total_mib``; MemAvailable ``total_mib - base_mib - RSS of the workload``, its
real resident memory, rewritten every 0.2 s) bind-mounted over ``/proc/meminfo``, so the collector
and the process selection (``min_memory_pct`` of MemTotal) both see the scaled host, and the
shipped playbooks, which act host-wide, can only pick processes of this namespace. The workload
really allocates (and touches) memory at ``rate_mib_s``; on SIGTERM it stops growing, writes
``TERM`` to ``<dir>/terms`` and shuts down for ``term_exit_s`` seconds (a service flushing its
state), then dies of the TERM. At MemAvailable 0 the driver kills it (the OOM killer).

The *agent* is a separate process (``agent`` mode of this script): the engine with the shipped
memory playbooks, the real memory collector and the daemon's forecaster, one sample a second,
its state dir ``<dir>/state``; every audit record it hands on (what the daemon would publish) is
appended to ``<dir>/records.jsonl`` with the agent's pid. ``mode``:

* ``plain``: nothing else happens;
* ``kill``: SIGKILL to the agent ``kill_after_term_s`` after the workload got its TERM (the step is
  waiting out its grace), then the agent is started again on the same state dir;
* ``full``: the state dir is a 2 MiB tmpfs, filled to the last byte when the host passes
  ``fill_at_pct`` (before the trigger's 85 %).

The episode ends when the agent has recorded a ``run.end`` and the workload is gone (or after
``seconds``). SPEC: ``{"dir", "mode", "total_mib", "base_mib", "rate_mib_s", "term_exit_s",
"kill_after_term_s", "fill_at_pct", "seconds"}``. Writes ``<dir>/out.json``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKLOAD = """
import os, signal, sys, time
rate, exit_s, marks = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
stopping = []
def on_term(signum, frame):
    with open(marks, "a") as fh:
        fh.write(f"TERM {time.time()}\\n")
    stopping.append(time.monotonic())
signal.signal(signal.SIGTERM, on_term)
blocks, t0 = [], time.monotonic()
while not stopping:  # +1 MiB at a time, every page touched, at `rate` MiB/s
    blocks.append(bytearray(b"m" * (1 << 20)))
    time.sleep(max(0.0, t0 + len(blocks) / rate - time.monotonic()))
while time.monotonic() < stopping[0] + exit_s:  # a clean shutdown takes its time
    time.sleep(0.05)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
os.kill(os.getpid(), signal.SIGTERM)
"""


# ----------------------------------------------------------------------------------------- agent


async def agent(d: Path) -> None:
    sys.path[:0] = [str(HERE.parent), str(HERE)]  # this tree's agent, whatever is installed
    from playbook_kit import risk, sample  # noqa: PLC0415

    from agent.act.engine import Engine  # noqa: PLC0415
    from agent.cli.base import configure_logging  # noqa: PLC0415
    from agent.collect.memory import MemoryCollector  # noqa: PLC0415
    from agent.decide.loader import load_playbooks  # noqa: PLC0415
    from agent.decide.settings import PlaybookSettings  # noqa: PLC0415
    from agent.score.forecast import Forecaster  # noqa: PLC0415

    configure_logging("info", "json")  # JSON lines in agent.log, as the daemon's journal gets them
    settings = PlaybookSettings(dirs=())
    books = [pb for pb in load_playbooks(settings)
             if pb.name in ("memory-exhaustion-predicted", "memory-exhaustion")]
    out = (d / "records.jsonl").open("a")

    def on_action(record: dict[str, Any]) -> None:
        out.write(json.dumps({"agent": os.getpid(), **record}, default=str) + "\n")
        out.flush()

    eng = Engine(settings, d / "state", "n1", books, on_action, lambda _e: None)
    col = MemoryCollector(root=str(d / "root"))
    col.start()
    fc = Forecaster()  # the daemon's settings; a restart starts it empty, as the daemon's does
    async with asyncio.TaskGroup() as tg:
        tg.create_task(eng.run(), name="engine")
        t0, n = time.monotonic(), 0
        while True:
            m = col.collect().metrics
            fc.push(m, time.monotonic())
            await eng.evaluate(sample(m), risk(forecasts=fc.forecasts))
            n += 1
            await asyncio.sleep(max(0.0, t0 + n - time.monotonic()))


# ---------------------------------------------------------------------------------------- driver


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def records(d: Path) -> list[dict[str, Any]]:
    path = d / "records.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fill(mnt: Path) -> None:
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 16, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)


def start_agent(d: Path) -> subprocess.Popen[bytes]:
    with (d / "agent.log").open("ab") as log:
        return subprocess.Popen([sys.executable, __file__, "--agent", str(d)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)


def drive(spec: dict[str, Any]) -> dict[str, Any]:
    d = Path(spec["dir"])
    total, base = int(spec["total_mib"]), int(spec["base_mib"])
    meminfo = d / "root" / "proc" / "meminfo"
    meminfo.parent.mkdir(parents=True)

    def write(avail_mib: float) -> None:
        kb = int(max(avail_mib, 0) * 1024)
        text = (f"MemTotal: {total * 1024:>12} kB\nMemFree: {kb:>12} kB\nMemAvailable: {kb:>12} kB\n"
                + "".join(f"{k}: 0 kB\n" for k in ("Buffers", "Cached", "Shmem", "Active", "Inactive",
                                                    "SReclaimable")))
        fd = os.open(meminfo, os.O_WRONLY | os.O_CREAT, 0o644)  # the same inode (bind-mounted), same length
        try:
            os.pwrite(fd, text.encode(), 0)
        finally:
            os.close(fd)

    write(total - base)
    subprocess.run(["mount", "--bind", str(meminfo), "/proc/meminfo"], check=True)
    state = d / "state"
    state.mkdir()
    if spec["mode"] == "full":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(state)], check=True)
    terms = d / "terms"
    work = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(spec["rate_mib_s"]),
                             str(spec["term_exit_s"]), str(terms)])
    agents = [start_agent(d)]
    series: list[dict[str, float]] = []
    oom_at = filled_at = killed_at = ended_at = None
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < float(spec["seconds"]):
            now = time.monotonic() - t0
            alive = work.poll() is None
            avail = total - base - (rss_mib(work.pid) if alive else 0.0)
            write(avail)
            used = 100.0 * (total - avail) / total
            series.append({"t": now, "used_pct": used, "alive": float(alive)})
            if alive and avail <= 0 and oom_at is None:
                oom_at = now
                work.send_signal(signal.SIGKILL)
            if spec["mode"] == "full" and filled_at is None and used >= float(spec["fill_at_pct"]):
                fill(state)
                filled_at = now
            if spec["mode"] == "kill" and killed_at is None and terms.exists():
                first_term = float(terms.read_text().split()[1])
                if time.time() - first_term >= float(spec["kill_after_term_s"]):
                    agents[-1].send_signal(signal.SIGKILL)
                    agents[-1].wait()
                    killed_at = now
                    agents.append(start_agent(d))
            assert agents[-1].poll() is None, (d / "agent.log").read_text()[-3000:]
            if ended_at is None and not alive and any(r["type"] == "run.end" for r in records(d)):
                ended_at = now
            # the run's end is handed on before its journal file goes: wait for that too
            if ended_at is not None and (not list((state / "journal").glob("*.jsonl")) or now - ended_at > 3):
                break
            time.sleep(0.2)
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
            a.wait()
        if work.poll() is None:
            work.kill()
    code = work.wait()
    from agent.act.audit import verify  # noqa: PLC0415

    audit = state / "audit.jsonl"
    lines = audit.read_text().splitlines() if audit.exists() else []
    on_disk = [json.loads(line)["record"] for line in lines]
    return {"audit": on_disk, "audit_ok": verify(audit).ok if audit.exists() else None,
            "journal": sorted(p.name for p in (state / "journal").glob("*")),
            "records": records(d), "series": series, "oom_at": oom_at, "filled_at": filled_at,
            "killed_at": killed_at, "returncode": code, "pid": work.pid, "agents": [a.pid for a in agents],
            "terms": terms.read_text().splitlines() if terms.exists() else []}


if __name__ == "__main__":
    sys.path[:0] = [str(HERE.parent), str(HERE)]  # this tree's agent, whatever is installed; playbook_kit
    from playbook_kit import namespace_main

    namespace_main(drive, agent)
