"""Run by tests/test_leak_scan_helper.py and tests/test_leak_scan_helper_edges.py: stop_leaker as
heald.service runs it (user heald, no CAP_SYS_PTRACE) against socket leaks of another user,
attributed through the root helper.

``unshare --pid --fork --mount --mount-proc --propagation private python3 THIS SPEC.json``

PID 1 of a private PID + mount namespace (this script, the *driver*, root):

* a tmpfs on /run with /run/heald-action (root, 0755): the helper unit's RuntimeDirectory;
* a tmpfs on /usr/local/bin whose ``heald`` links into a fake installation (``venv/bin``) whose
  ``python3`` runs this tree's agent: the real packaging/heald-action finds it as it finds a
  ``heald install-units`` installation (/usr/bin/heald must not exist: the test checks);
* a fixture conntrack table bind-mounted over /proc/sys/net/netfilter: ``base`` + the sockets the
  leakers hold, against ``limit``;
* a *broker* that does what systemd would for the agent's ``systemctl``: the agent's systemctl
  (user nobody) drops its argv in ``req/``; the broker runs ``start heald-action@NAME.service``
  as the real helper (root) and answers the exit status (anything else: 1);
* the leakers (root): each a socketpair every ``2 / rate`` s, named ``argv0`` (``leakers``: a list
  of ``{"rate", "argv0"}``; else one at ``rate``).

The *agent* (``--agent``) is started as nobody with the two capabilities of heald.service that
matter here, CAP_DAC_OVERRIDE and CAP_KILL (setpriv, ambient), and no CAP_SYS_PTRACE, with
``protect`` as ``[playbooks] protected_processes`` (besides the defaults). Without ``engine`` it
runs stop_leaker(table=sockets) once, with /proc/sys as sysctl_root, and writes ``result.json``.
With ``engine``: the engine with :data:`PLAYBOOK` (stop_leaker through the helper, then a verify
that the table stopped growing) on the state dir ``DIR/state``, fed by the real limits collector (the
fixture table) every 0.5 s, every audit record it hands on appended to ``records.jsonl`` with its
pid, until the run has ended (``linger_s`` more). ``kill``: SIGKILL to that agent between the
helper's two scans (``kill_after_s`` after the first one is written, inside the step's window), a
new agent on the same state dir.

Writes ``out.json``: the result or the records, the systemctl log, the helper runs, the leakers'
exit statuses (None: still running) and pids (``leak``, ``leak_pid``: the first's), the agents'
pids, when the kill came and how many helper scans had run by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HELPER = HERE.parent / "packaging" / "heald-action"
SYSTEMCTL = """#!/bin/bash
id=$$.$RANDOM
printf '%s\\n' "$*" > "{req}/.$id.tmp" && mv "{req}/.$id.tmp" "{req}/$id.argv"
while [[ ! -e "{req}/$id.rc" ]]; do sleep 0.02; done
exit "$(cat "{req}/$id.rc")"
"""
# What `python3 -I -m agent.act.procscan TABLE OUT` runs in this fake installation: this tree's
# module (the argv is checked: the helper must ask for exactly that).
PYTHON = """#!/bin/sh
[ "$1" = -I ] && [ "$2" = -m ] && [ "$3" = agent.act.procscan ] || exit 3
shift 3
exec {py} -I -c 'import sys; sys.path.insert(0, "{repo}"); from agent.act.procscan import main
sys.exit(main(sys.argv[1:]))' "$@"
"""
LEAK = """
import socket, sys, time
rate = float(sys.argv[1])
held, n, t0 = [], 0, time.monotonic()
while n < 2000:
    held.extend(socket.socketpair())
    n += 2
    time.sleep(max(0.0, t0 + n / rate - time.monotonic()))
time.sleep(3600)
"""


# The engine's playbook (``engine``): the step of the shipped conntrack-table-full, at the test's
# scale (a 1.5 s window, verified 2.5 s after it: past the collector's 2 s rate window).
PLAYBOOK = """
name: conntrack-leak-test
description: stop the local process behind the conntrack table's growth, through the root helper
mode: enforce
trigger:
  metric: net.conntrack.used_pct
  op: ">="
  value: 50
  for: 1s
steps:
  - name: stop-the-leaker
    action: stop_leaker
    params: {table: sockets, window: 1.5s, min_share_pct: 50, term_eta_below: 10m}
    timeout: 30s
verify:
  settle: 2.5s
  expect:
    metric: net.conntrack.growth_per_s
    op: "<="
    value: 0
guards:
  cooldown: 10m
  cold_start: act
"""


async def agent(d: Path) -> None:
    sys.path[:0] = [str(HERE.parent), str(HERE)]  # this tree's agent, whatever is installed
    from agent.act.actions.leaks import stop_leaker  # noqa: PLC0415
    from agent.act.base import ActionContext  # noqa: PLC0415
    from agent.act.supervisor import Supervisor  # noqa: PLC0415
    from agent.decide.settings import PlaybookSettings  # noqa: PLC0415

    spec = json.loads((d / "spec.json").read_text())
    settings = PlaybookSettings(
        dirs=(), load_shipped=False, systemctl=(str(d / "systemctl"),),
        protected_processes=(*PlaybookSettings().protected_processes, *spec.get("protect", ())))
    if spec.get("engine"):
        await engine(d, settings)
        return
    sup = Supervisor(lambda coro, name: asyncio.get_running_loop().create_task(coro, name=name),
                     lambda *_: None)
    ctx = ActionContext(settings=settings, node="n", playbook="conntrack-table-full", run_id="r",
                        dry_run=bool(spec.get("dry_run")), supervisor=sup, emit=lambda _: None)
    res = await stop_leaker({"table": spec.get("table", "sockets"), "window": spec.get("window", "2s")}, ctx)
    (d / "result.json").write_text(json.dumps({"ok": res.ok, "changed": res.changed, "detail": res.detail,
                                               "data": res.data, "uid": os.getuid()}, default=str))


async def engine(d: Path, settings: Any) -> None:
    """The engine with :data:`PLAYBOOK` on ``d/state``, one sample of the limits collector (this
    namespace's /proc/sys, the fixture table) every 0.5 s, until killed."""
    from playbook_kit import sample  # noqa: PLC0415

    from agent.act.engine import Engine  # noqa: PLC0415
    from agent.cli.base import configure_logging  # noqa: PLC0415
    from agent.collect.limits import LimitCollector  # noqa: PLC0415
    from agent.collect.settings import LimitSettings  # noqa: PLC0415
    from agent.decide.loader import parse_playbook  # noqa: PLC0415

    configure_logging("info", "json")
    pb, problems = parse_playbook(PLAYBOOK, "conntrack-leak-test.yaml", settings)
    assert pb is not None, [str(p) for p in problems]
    out = (d / "records.jsonl").open("a")

    def on_action(record: dict[str, Any]) -> None:
        out.write(json.dumps({"agent": os.getpid(), **record}, default=str) + "\n")
        out.flush()

    eng = Engine(settings, d / "state", "n1", [pb], on_action, lambda _e: None)
    col = LimitCollector(LimitSettings(fd_top_n=1, slope_window_s=2.0))
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
    """The agent as heald.service runs it: user nobody, CAP_DAC_OVERRIDE and CAP_KILL only."""
    caps = "+dac_override,+kill"
    with (d / "agent.log").open("ab") as log:
        return subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                                 f"--inh-caps={caps}", f"--ambient-caps={caps}",
                                 sys.executable, __file__, "--agent", str(d)],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL)


def helper_runs(d: Path) -> list[str]:
    path = d / "helper.log"
    return [x for x in path.read_text().splitlines() if x.startswith("leakscan-")] if path.exists() else []


def sockets(pid: int) -> int:
    n = 0
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
    except OSError:
        pass
    return n


def put(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text.rstrip("\n").ljust(31) + "\n").encode())
    finally:
        os.close(fd)


def broker(d: Path, stop: threading.Event) -> None:
    req = d / "req"
    while not stop.is_set():
        for f in sorted(req.glob("*.argv")):
            argv = f.read_text().split()
            with (d / "systemctl.log").open("a") as log:
                log.write(" ".join(argv) + "\n")
            rc = 1
            if len(argv) == 2 and argv[0] == "start" and argv[1].startswith("heald-action@") \
                    and argv[1].endswith(".service"):
                name = argv[1][len("heald-action@"):-len(".service")]
                done = subprocess.run([str(HELPER), name], capture_output=True, text=True, timeout=60,
                                      check=False)
                with (d / "helper.log").open("a") as log:
                    log.write(f"{name}: {done.returncode} {done.stdout}{done.stderr}")
                rc = done.returncode
            (req / f"{f.name[:-5]}.rc").write_text(str(rc))
            f.unlink()
        time.sleep(0.02)


def drive(spec: dict[str, Any]) -> dict[str, Any]:
    d = Path(spec["dir"])
    for mnt in ("/run", "/usr/local/bin"):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", mnt], check=True)
    Path("/run/heald-action").mkdir(mode=0o755)
    venv = d / "venv/bin"
    venv.mkdir(parents=True)
    (venv / "heald").write_text("#!/bin/sh\nexit 0\n")
    (venv / "python3").write_text(PYTHON.format(py=sys.executable, repo=HERE.parent))
    for f in ("heald", "python3"):
        (venv / f).chmod(0o755)
    Path("/usr/local/bin/heald").symlink_to(venv / "heald")
    nf = d / "nf"
    nf.mkdir()
    limit, base = int(spec["limit"]), int(spec["base"])
    put(nf / "nf_conntrack_max", str(limit))
    put(nf / "nf_conntrack_count", str(base))
    Path("/proc/sys/net/netfilter").is_dir() or sys.exit("no /proc/sys/net/netfilter")
    subprocess.run(["mount", "--bind", str(nf), "/proc/sys/net/netfilter"], check=True)
    req = d / "req"
    req.mkdir()
    req.chmod(0o777)
    (d / "systemctl").write_text(SYSTEMCTL.format(req=req))
    (d / "systemctl").chmod(0o755)
    stop = threading.Event()
    th = threading.Thread(target=broker, args=(d, stop), daemon=True)
    th.start()
    leakers = spec.get("leakers") or [{"rate": spec["rate"]}]
    leaks = [subprocess.Popen([lk.get("argv0", "heald-test-leak"), "-c", LEAK, str(lk["rate"])],
                              executable=sys.executable, stdin=subprocess.DEVNULL) for lk in leakers]
    agents = [start_agent(d)]
    killed_at = scans_at_kill = ended_at = None
    t0 = time.monotonic()
    try:
        while (now := time.monotonic() - t0) < float(spec.get("seconds", 20)):
            put(nf / "nf_conntrack_count", str(base + sum(sockets(p.pid) for p in leaks)))
            for p in leaks:
                p.poll()  # reap it once TERMed: a zombie would read as alive
            if not spec.get("engine"):
                if agents[-1].poll() is not None:
                    break
            else:
                assert agents[-1].poll() is None, (d / "agent.log").read_text()[-3000:]
                scans = helper_runs(d)
                if spec.get("kill") and killed_at is None and scans:
                    time.sleep(float(spec.get("kill_after_s", 0.4)))
                    agents[-1].kill()
                    agents[-1].wait()
                    killed_at, scans_at_kill = now, len(helper_runs(d))
                    agents.append(start_agent(d))
                if ended_at is None and any(r["type"] == "run.end" for r in records(d)):
                    ended_at = now
                if ended_at is not None and now - ended_at >= float(spec.get("linger_s", 0.5)):
                    break
            time.sleep(0.1)
        time.sleep(0.3)
        codes = [p.poll() for p in leaks]
    finally:
        stop.set()
        for p in (*agents, *leaks):
            if p.poll() is None:
                p.kill()
            p.wait()
    result = json.loads((d / "result.json").read_text()) if (d / "result.json").exists() else None
    log = (d / "systemctl.log").read_text().splitlines() if (d / "systemctl.log").exists() else []
    hlog = (d / "helper.log").read_text() if (d / "helper.log").exists() else ""
    return {"result": result, "records": records(d), "systemctl": log, "helper_log": hlog,
            "helper_runs": helper_runs(d), "leak": codes[0], "leak_pid": leaks[0].pid, "leaks": codes,
            "leak_pids": [p.pid for p in leaks], "agents": [a.pid for a in agents], "killed_at": killed_at,
            "scans_at_kill": scans_at_kill, "ended_at": ended_at,
            "agent_log": (d / "agent.log").read_text()[-3000:]}


if __name__ == "__main__":
    sys.path[:0] = [str(HERE.parent), str(HERE)]  # this tree's agent, whatever is installed; playbook_kit
    from playbook_kit import namespace_main

    namespace_main(drive, agent)
