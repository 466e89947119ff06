"""Run inside a private PID + mount namespace by tests/test_memory_predicted.py:

``unshare --pid --fork --mount --mount-proc python3 tests/memory_predicted_namespace.py SPEC.json``

Host memory is the one thing a test cannot fill on a shared machine, so the host here is scaled
down: a fixture ``/proc/meminfo`` whose MemTotal is ``total_mib`` and whose MemAvailable is
``total_mib - base_mib - RSS of the workload`` — the workload's *real* resident memory, read from
its ``/proc/PID/status`` each second, bind-mounted over ``/proc/meminfo`` so the process selection
(``min_memory_pct``: a share of MemTotal, from psutil) sees the scaled host too, not this
machine's RAM (before, the workload was 10 % of the scaled host but had to be 10 % of the real one
as well: it passed here at 24 GiB with 2.9 GiB, and would find no process on a 32 GiB machine).
Everything else is real: a process that really allocates
(and touches) memory at a set rate, the memory collector read once a second as the daemon does,
the daemon's forecaster with its default settings, the engine with the playbooks as shipped, and
``stop_process`` sending real signals. The private PID namespace means "the largest process" can
only be one this script started (the shipped playbooks act host-wide).

The scaled host is out of memory when MemAvailable reaches 0 (``oom_at``, seconds): the workload
is then killed by this script (SIGKILL, as the kernel's OOM killer would) unless heald stopped it
first. SPEC: ``{"out": path, "state": dir, "rate_mib_s": float, "cap_mib": int, "total_mib": int,
"base_mib": int, "seconds": float}`` (the workload grows at ``rate_mib_s`` up to ``cap_mib``, then
holds it). Writes ``out`` (JSON).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's agent, whatever is installed
from playbook_kit import idle, make_engine, risk, running, sample

from agent.collect.memory import MemoryCollector
from agent.decide.loader import load_playbooks
from agent.decide.settings import PlaybookSettings
from agent.score.forecast import Forecaster

WORKLOAD = """
import sys, time
rate, cap = float(sys.argv[1]), int(sys.argv[2])
blocks, t0 = [], time.monotonic()
while len(blocks) < cap:  # +1 MiB at a time, every page touched, at `rate` MiB/s, up to `cap`
    blocks.append(bytearray(b"m" * (1 << 20)))
    time.sleep(max(0.0, t0 + len(blocks) / rate - time.monotonic()))
time.sleep(3600)  # then holds it (a plateau: a big compile, a cache warmed up)
"""


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def main(spec: dict[str, object]) -> dict[str, object]:
    total, base = int(spec["total_mib"]), int(spec["base_mib"])  # type: ignore[call-overload]
    root = Path(str(spec["state"])) / "root"
    (root / "proc").mkdir(parents=True)
    meminfo = root / "proc" / "meminfo"

    def write(avail_mib: float) -> None:
        kb = int(max(avail_mib, 0) * 1024)
        text = (f"MemTotal: {total * 1024:>12} kB\nMemFree: {kb:>12} kB\nMemAvailable: {kb:>12} kB\n"
                + "".join(f"{k}: 0 kB\n" for k in ("Buffers", "Cached", "Shmem", "Active", "Inactive",
                                                    "SReclaimable")))
        fd = os.open(meminfo, os.O_WRONLY | os.O_CREAT, 0o644)  # the bind-mounted inode, one length
        try:
            os.pwrite(fd, text.encode(), 0)
        finally:
            os.close(fd)

    write(total - base)
    subprocess.run(["mount", "--bind", str(meminfo), "/proc/meminfo"], check=True)  # noqa: ASYNC221 - once
    books = [pb for pb in load_playbooks(PlaybookSettings(dirs=()))
             if pb.name in ("memory-exhaustion-predicted", "memory-exhaustion")]
    assert len(books) == 2, [pb.name for pb in books]
    eng, rec = make_engine(Path(str(spec["state"])), books, PlaybookSettings(dirs=()))
    col = MemoryCollector(root=str(root))
    col.start()
    fc = Forecaster()  # the daemon's settings (agent.score.stage.RiskStage)
    argv = [sys.executable, "-c", WORKLOAD, str(spec["rate_mib_s"]), str(spec["cap_mib"])]
    work = subprocess.Popen(argv)  # noqa: ASYNC220 - one start (milliseconds), before the loop
    series: list[dict[str, float | None]] = []
    oom_at: float | None = None
    t0 = time.monotonic()
    n = 0
    async with running(eng):
        while time.monotonic() - t0 < float(spec["seconds"]):  # type: ignore[arg-type]
            alive = work.poll() is None
            avail = total - base - (rss_mib(work.pid) if alive else 0.0)
            write(avail)
            m = col.collect().metrics
            fc.push(m, time.monotonic())
            series.append({"t": time.monotonic() - t0, "used_pct": m.get("mem.used_pct"),
                           "eta_s": m.get("mem.eta_s"), "alive": float(alive)})
            await eng.evaluate(sample(m), risk(forecasts=fc.forecasts))
            if alive and avail <= 0 and oom_at is None:
                oom_at = time.monotonic() - t0  # the scaled host is out of memory: the OOM kill
                work.send_signal(signal.SIGKILL)
            if not alive and rec.of("run.end"):
                break
            n += 1
            await asyncio.sleep(max(0.0, t0 + n - time.monotonic()))
        await idle(eng)
    if work.poll() is None:
        work.kill()
    code = work.wait()
    return {"records": rec.actions, "events": rec.events, "series": series, "oom_at": oom_at,
            "returncode": code, "pid": work.pid, "t0_wall": time.time() - (time.monotonic() - t0)}


if __name__ == "__main__":
    from playbook_kit import namespace_main

    namespace_main(main)
