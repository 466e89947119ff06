"""Run by tests/test_predictive_edges.py: file-table-full's raise_limit through the root helper, with
the agent killed mid-step or its state dir full.

``unshare --pid --fork --mount --mount-proc python3 tests/raise_limit_namespace.py SPEC.json``

PID 1 of a private PID + mount namespace (this script, the *driver*) keeps a fixture file table:
``root/proc/sys/fs/file-max`` (1000 at the start) and ``file-nr``, 950 handles of the current
file-max (95 %: file-table-full's static line holds at once). The *agent* (``--agent`` mode of this
script, a separate process) runs the engine with the shipped file-table-full, as heald.service
does (``use_helper_units``: the write goes to ``systemctl start heald-action@sysctl-file-max-V``,
then the value is read back), and the real limits collector on the fixture tree, one sample a
second. Its ``systemctl`` records its argv and runs the real packaging/heald-action in a private
mount namespace where /proc/sys/fs/file-max is the fixture (bind-mounted: the host's value is
never touched); while ``hold-before`` (or ``hold-before-N``, N its call) exists it waits before the
helper runs, while ``hold-after`` exists it waits after the helper ran (the agent cannot read the
value back yet). Every audit
record the agent hands on is appended to ``records.jsonl`` with the agent's pid. ``mode``:

* ``plain``: nothing else;
* ``kill-before-write`` / ``kill-after-write``: SIGKILL to the agent while its systemctl waits
  before / after the helper, the agent started again on the same state dir, then the wait ends
  (the unit runs on without the agent, as systemd's would);
* ``full``: the state dir is a 2 MiB tmpfs filled to the last byte before the agent starts;
* ``full-kill``: both: the kill comes while nothing of the run is on disk, so the restarted agent
  starts a run of its own; the killed run's unit is let go first, then the new run's.

Writes ``out.json``: the records, the systemctl log, every file-max value seen (in order), the
audit chain on disk and the journal files left.
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
HELPER = HERE.parent / "packaging" / "heald-action"
SYSTEMCTL = """#!/bin/bash
echo "start $*" >> "{d}/systemctl.log"
[[ $# -eq 2 && $1 == start && $2 =~ ^heald-action@(.+)\\.service$ ]] || exit 1
name=${{BASH_REMATCH[1]}}
n=$(grep -c '^start ' "{d}/systemctl.log")
while [[ -e "{d}/hold-before" || -e "{d}/hold-before-$n" ]]; do sleep 0.05; done
unshare --mount --propagation private \\
    bash -c 'mount --bind "$0" /proc/sys/fs/file-max && exec "$1" "$2"' \\
    "{d}/root/proc/sys/fs/file-max" "{helper}" "$name" 2>> "{d}/helper.err"
rc=$?
echo "helper $name $rc" >> "{d}/systemctl.log"
while [[ -e "{d}/hold-after" ]]; do sleep 0.05; done
echo "exit $rc" >> "{d}/systemctl.log"
exit $rc
"""


async def agent(d: Path) -> None:
    sys.path[:0] = [str(HERE.parent), str(HERE)]  # this tree's agent, whatever is installed
    from playbook_kit import sample  # noqa: PLC0415

    from agent.act.engine import Engine  # noqa: PLC0415
    from agent.cli.base import configure_logging  # noqa: PLC0415
    from agent.collect.limits import LimitCollector  # noqa: PLC0415
    from agent.collect.settings import LimitSettings  # noqa: PLC0415
    from agent.decide.loader import load_playbooks  # noqa: PLC0415
    from agent.decide.settings import PlaybookSettings  # noqa: PLC0415

    configure_logging("info", "json")
    settings = PlaybookSettings(dirs=(), sysctl_root=str(d / "root/proc/sys"), use_helper_units=True,
                                systemctl=(str(d / "systemctl"),))
    books = [pb for pb in load_playbooks(settings) if pb.name == "file-table-full"]
    out = (d / "records.jsonl").open("a")

    def on_action(record: dict[str, Any]) -> None:
        out.write(json.dumps({"agent": os.getpid(), **record}, default=str) + "\n")
        out.flush()

    eng = Engine(settings, d / "state", "n1", books, on_action, lambda _e: None)
    col = LimitCollector(LimitSettings(fd_top_n=1), root=str(d / "root"))
    col.start()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(eng.run(), name="engine")
        t0, n = time.monotonic(), 0
        while True:
            m = {k: v for k, v in col.collect().metrics.items() if k.startswith("fd.")}
            await eng.evaluate(sample(m), None)
            n += 1
            await asyncio.sleep(max(0.0, t0 + n - time.monotonic()))


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def records(d: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in read_lines(d / "records.jsonl") if line.strip()]


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
    d, mode = Path(spec["dir"]), str(spec["mode"])
    fs = d / "root/proc/sys/fs"
    fs.mkdir(parents=True)
    (fs / "file-max").write_text("1000\n")
    (d / "systemctl").write_text(SYSTEMCTL.format(d=d, helper=HELPER))
    (d / "systemctl").chmod(0o755)
    state = d / "state"
    state.mkdir()
    if mode.startswith("full"):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(state)], check=True)
        fill(state)
    kill = "kill" in mode
    # the holds, in the order they are lifted (full-kill: the killed run's unit runs first)
    holds = {"kill-before-write": ["hold-before"], "kill-after-write": ["hold-after"],
             "full-kill": ["hold-before-1", "hold-before-2"]}.get(mode, [])
    for name in holds:
        (d / name).touch()
    waiting_for = "helper " if mode == "kill-after-write" else "start "
    seen: list[int] = []
    agents = [start_agent(d)]
    killed_at = ended_at = None
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < float(spec["seconds"]):
            now = time.monotonic() - t0
            value = int((fs / "file-max").read_text().split()[0])
            if not seen or seen[-1] != value:
                seen.append(value)
            (fs / "file-nr").write_text(f"950\t0\t{value}\n")
            log = read_lines(d / "systemctl.log")
            if kill and killed_at is None and any(line.startswith(waiting_for) for line in log):
                agents[-1].send_signal(signal.SIGKILL)
                agents[-1].wait()
                killed_at = now
                agents.append(start_agent(d))
            if killed_at is not None and holds and now - killed_at >= float(spec["release_after_s"]):
                starts = sum(line.startswith("start ") for line in log)
                exits = sum(line.startswith("exit ") for line in log)
                if mode != "full-kill" or (len(holds) == 2 and (starts == 2 or now - killed_at >= 10)) \
                        or (len(holds) == 1 and exits == 1):
                    (d / holds.pop(0)).unlink()
            assert agents[-1].poll() is None, (d / "agent.log").read_text()[-3000:]
            done = sum(x.startswith("exit ") for x in log) == sum(x.startswith("start ") for x in log)
            if ended_at is None and done and any(r["type"] == "run.end" for r in records(d)):
                ended_at = now
            if ended_at is not None and now - ended_at >= float(spec["linger_s"]):
                break
            time.sleep(0.2)
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
            a.wait()
    from agent.act.audit import verify  # noqa: PLC0415

    audit = state / "audit.jsonl"
    return {"records": records(d), "systemctl": read_lines(d / "systemctl.log"), "file_max": seen,
            "helper_err": read_lines(d / "helper.err"), "killed_at": killed_at, "ended_at": ended_at,
            "agents": [a.pid for a in agents], "audit_ok": verify(audit).ok if audit.exists() else None,
            "audit": [json.loads(line)["record"] for line in read_lines(audit)],
            "journal": sorted(p.name for p in (state / "journal").glob("*")),
            "log": (d / "agent.log").read_text()}


if __name__ == "__main__":
    sys.path[:0] = [str(HERE.parent), str(HERE)]  # this tree's agent, whatever is installed; playbook_kit
    from playbook_kit import namespace_main

    namespace_main(drive, agent)
