"""Run by tests/test_table_leak_heal.py: a leak that fills a host-wide kernel table, healed by
stop_leaker after the shipped playbook's first step (issue 20 line 2).

``unshare --pid --fork --mount --mount-proc python3 tests/table_leak_namespace.py SPEC.json``

PID 1 of a private PID + mount namespace (this script, the *driver*) keeps a fixture table under
``root/``: the file table (``proc/sys/fs/file-nr``: ``base`` + the fds the leakers hold, against
``fs/file-max``) or the task table (``proc/loadavg``'s task count: ``base`` + the leakers'
threads, against ``kernel/pid_max``), and ``extra_per_s`` more a second that no process shows (held
by the kernel). The fixture files are bind-mounted over the real ones (/proc/sys/fs/file-nr,
file-max, /proc/loadavg, kernel/pid_max, threads-max) in this mount namespace only, and rewritten
in place. The *agent* (``--agent`` mode) runs the engine with the shipped playbook (``settle``
and stop_leaker's ``window`` shortened to the test's scale), the default ``sysctl_root``
(/proc/sys: stop_leaker scans this namespace's /proc) and a recording ``systemctl``: its
``restart UNIT`` waits while ``hold`` exists, then TERMs every process in the unit's cgroup (as
systemd's restart would stop it) and exits 0. The processes the scan sees are this namespace's
only: the driver, the agent, its tools and the leakers.

``leakers``: a list of {"kind": "fds"|"threads", "rate": per second, "unit": bool (in the test's
``.service`` cgroup), "argv0": its name}. ``kill``: SIGKILL to the agent while its systemctl
holds the restart, a new agent on the same state dir, then the hold is lifted. ``state_full``: the
agent's state dir is a 2 MiB tmpfs (this mount namespace's), filled to the last byte once the
first step is recorded (the records themselves go to ``records.jsonl`` outside it).

Writes ``out.json``: the records (with the agent's pid), the systemctl log, each leaker's exit
status (None: still running) and the agents' pids.
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
SYSTEMCTL = """#!/bin/bash
echo "$*" >> "{d}/systemctl.log"
[[ $# -eq 2 && $1 == restart ]] || exit 1
while [[ -e "{d}/hold" ]]; do sleep 0.05; done
for pid in $(cat "{procs}"); do kill -TERM "$pid" 2>/dev/null; done
echo "restarted $2" >> "{d}/systemctl.log"
"""
LEAK = """
import os, resource, sys, threading, time
kind, rate = sys.argv[1], float(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
threading.stack_size(256 * 1024)
stop = threading.Event()
held, n, t0 = [], 0, time.monotonic()
while n < 4000:
    if kind == "fds":
        held.append(os.open("/dev/null", os.O_RDONLY))
    else:
        threading.Thread(target=stop.wait, daemon=True).start()
    n += 1
    time.sleep(max(0.0, t0 + n / rate - time.monotonic()))
stop.wait(3600)
"""


async def agent(d: Path) -> None:
    sys.path[:0] = [str(HERE.parent), str(HERE)]  # this tree's agent, whatever is installed
    import yaml  # noqa: PLC0415
    from playbook_kit import sample  # noqa: PLC0415

    from agent.act.engine import Engine  # noqa: PLC0415
    from agent.cli.base import configure_logging  # noqa: PLC0415
    from agent.collect.limits import LimitCollector  # noqa: PLC0415
    from agent.collect.settings import LimitSettings  # noqa: PLC0415
    from agent.decide.loader import parse_playbook  # noqa: PLC0415
    from agent.decide.settings import PlaybookSettings  # noqa: PLC0415

    spec = json.loads((d / "spec.json").read_text())
    configure_logging("info", "json")
    settings = PlaybookSettings(
        dirs=(), load_shipped=False, systemctl=(str(d / "systemctl"),),
        protected_processes=(*PlaybookSettings().protected_processes, *spec.get("protect", ())))
    src = HERE.parent / "remediations" / f"{spec['playbook']}.yaml"
    data = yaml.safe_load(src.read_text())
    data["verify"]["settle"] = "2.5s"  # past the collector's 2 s rate window (shipped: 10 s past 8 s)
    for step in data["steps"]:
        if step["action"] == "stop_leaker":
            step["params"]["window"] = "2s"
    pb, problems = parse_playbook(yaml.safe_dump(data), str(src), settings, shipped=True)
    assert pb is not None, [str(p) for p in problems]
    out = (d / "records.jsonl").open("a")

    def on_action(record: dict[str, Any]) -> None:
        out.write(json.dumps({"agent": os.getpid(), **record}, default=str) + "\n")
        out.flush()

    eng = Engine(settings, d / "state", "n1", [pb], on_action, lambda _e: None)
    col = LimitCollector(LimitSettings(fd_top_n=1, slope_window_s=2.0), root=str(d / "root"))
    col.start()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(eng.run(), name="engine")
        t0, n = time.monotonic(), 0
        while True:
            m = {k: v for k, v in col.collect().metrics.items() if "[" not in k}
            await eng.evaluate(sample(m), None)
            n += 1
            await asyncio.sleep(max(0.0, t0 + n * 0.5 - time.monotonic()))


def records(d: Path) -> list[dict[str, Any]]:
    path = d / "records.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def start_agent(d: Path) -> subprocess.Popen[bytes]:
    with (d / "agent.log").open("ab") as log:
        return subprocess.Popen([sys.executable, __file__, "--agent", str(d)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)


def count(pid: int, kind: str) -> int:
    try:
        if kind == "fds":
            return len(os.listdir(f"/proc/{pid}/fd"))
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def put(path: Path, text: str) -> None:
    """Rewrite a fixture in place (a bind mount holds its inode), one fixed-width write."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text.rstrip("\n").ljust(63) + "\n").encode())
    finally:
        os.close(fd)


def fill(path: Path) -> int:
    """Grow a filler file in ``path`` until its filesystem refuses one more byte; bytes left."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
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
    return free_bytes(path)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def drive(spec: dict[str, Any]) -> dict[str, Any]:
    d = Path(spec["dir"])
    root = d / "root/proc"
    (root / "sys/fs").mkdir(parents=True)
    (root / "sys/kernel").mkdir(parents=True)
    files = spec["playbook"] == "file-table-full"
    limit, base, extra = int(spec["limit"]), int(spec["base"]), float(spec.get("extra_per_s", 0))
    (root / "sys/fs/file-max").write_text(f"{limit}\n")
    (root / "sys/kernel/pid_max").write_text(f"{limit}\n")
    (root / "sys/kernel/threads-max").write_text(f"{8 * limit}\n")
    put(root / "sys/fs/file-nr", f"{base}\t0\t{limit}")
    put(root / "loadavg", f"0.50 0.40 0.30 1/{base} 4242")
    for rel in ("sys/fs/file-nr", "sys/fs/file-max", "loadavg", "sys/kernel/pid_max",
                "sys/kernel/threads-max"):
        subprocess.run(["mount", "--bind", str(root / rel), f"/proc/{rel}"], check=True)  # ours only
    unit_procs = Path(spec["unit_dir"]) / "cgroup.procs" if spec.get("unit_dir") else d / "none"
    (d / "systemctl").write_text(SYSTEMCTL.format(d=d, procs=unit_procs))
    (d / "systemctl").chmod(0o755)
    if spec.get("kill"):
        (d / "hold").touch()
    filled_at, avail = None, None
    if spec.get("state_full"):
        (d / "state").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(d / "state")],
                       check=True)

    def tick(t: float) -> None:
        used = base + int(extra * t) + sum(count(p.pid, lk["kind"]) for p, lk in zip(leaks, spec["leakers"],
                                                                                 strict=False))
        if files:
            put(root / "sys/fs/file-nr", f"{used}\t0\t{(root / 'sys/fs/file-max').read_text().split()[0]}")
        else:
            put(root / "loadavg", f"0.50 0.40 0.30 1/{used} 4242")

    leaks: list[subprocess.Popen[bytes]] = []
    tick(0.0)
    agents = [start_agent(d)]
    for lk in spec["leakers"]:
        p = subprocess.Popen([lk.get("argv0", "heald-test-leak"), "-c", LEAK, lk["kind"], str(lk["rate"])],
                             executable=sys.executable, stdin=subprocess.DEVNULL)
        if lk.get("unit"):
            unit_procs.write_text(str(p.pid))
        leaks.append(p)
    killed_at = ended_at = None
    t0 = time.monotonic()
    try:
        while (now := time.monotonic() - t0) < float(spec["seconds"]):
            tick(now)
            log = (d / "systemctl.log").read_text().splitlines() if (d / "systemctl.log").exists() else []
            if spec.get("kill") and killed_at is None and log:
                agents[-1].send_signal(signal.SIGKILL)
                agents[-1].wait()
                killed_at = now
                agents.append(start_agent(d))
            if killed_at is not None and (d / "hold").exists() and now - killed_at >= 2.0:
                (d / "hold").unlink()
            assert agents[-1].poll() is None, (d / "agent.log").read_text()[-3000:]
            if spec.get("state_full") and filled_at is None and any(r["type"] == "step" for r in records(d)):
                avail, filled_at = fill(d / "state"), now
            if ended_at is None and any(r["type"] == "run.end" for r in records(d)):
                ended_at = now
            if ended_at is not None and now - ended_at >= float(spec.get("linger_s", 1.0)):
                break
            time.sleep(0.2)
    finally:
        codes = [p.poll() for p in leaks]
        for p in [*agents, *leaks]:
            if p.poll() is None:
                p.kill()
            p.wait()
    log = (d / "systemctl.log").read_text().splitlines() if (d / "systemctl.log").exists() else []
    return {"records": records(d), "systemctl": log, "leaks": codes, "ended_at": ended_at,
            "killed_at": killed_at, "filled_at": filled_at, "avail_after_fill": avail,
            "state_avail_at_end": free_bytes(d / "state") if spec.get("state_full") else None,
            "agents": [a.pid for a in agents], "leak_pids": [p.pid for p in leaks],
            "log": (d / "agent.log").read_text()[-3000:]}


if __name__ == "__main__":
    sys.path[:0] = [str(HERE.parent), str(HERE)]  # this tree's agent, whatever is installed; playbook_kit
    from playbook_kit import namespace_main

    namespace_main(drive, agent)
