"""Run by tests/test_leak_scan_helper.py: stop_leaker as heald.service runs it (user heald, no
CAP_SYS_PTRACE) against a socket leak of another user, attributed through the root helper.

``unshare --pid --fork --mount --mount-proc --propagation private python3 THIS SPEC.json``

PID 1 of a private PID + mount namespace (this script, the *driver*, root):

* a tmpfs on /run with /run/heald-action (root, 0755): the helper unit's RuntimeDirectory;
* a tmpfs on /usr/local/bin whose ``heald`` links into a fake installation (``venv/bin``) whose
  ``python3`` runs this tree's agent: the real packaging/heald-action finds it as it finds a
  ``heald install-units`` installation (/usr/bin/heald must not exist: the test checks);
* a fixture conntrack table bind-mounted over /proc/sys/net/netfilter: ``base`` + the sockets the
  leaker holds, against ``limit``;
* a *broker* that does what systemd would for the agent's ``systemctl``: the agent's systemctl
  (user nobody) drops its argv in ``req/``; the broker runs ``start heald-action@NAME.service``
  as the real helper (root) and answers the exit status (anything else: 1);
* the leaker (root): a socketpair every ``2 / rate`` s.

The *agent* (``--agent``) is started as nobody with the two capabilities of heald.service that
matter here, CAP_DAC_OVERRIDE and CAP_KILL (setpriv, ambient), and no CAP_SYS_PTRACE: it runs
stop_leaker(table=sockets) once, with /proc/sys as sysctl_root, and writes ``result.json``.
Writes ``out.json``: the result, the systemctl log, the leaker's exit status and pid.
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


async def agent(d: Path) -> None:
    sys.path[:0] = [str(HERE.parent)]  # this tree's agent, whatever is installed
    from agent.act.actions.leaks import stop_leaker  # noqa: PLC0415
    from agent.act.base import ActionContext  # noqa: PLC0415
    from agent.act.supervisor import Supervisor  # noqa: PLC0415
    from agent.decide.settings import PlaybookSettings  # noqa: PLC0415

    spec = json.loads((d / "spec.json").read_text())
    sup = Supervisor(lambda coro, name: asyncio.get_running_loop().create_task(coro, name=name),
                     lambda *_: None)
    ctx = ActionContext(settings=PlaybookSettings(dirs=(), systemctl=(str(d / "systemctl"),)), node="n",
                        playbook="conntrack-table-full", run_id="r", dry_run=bool(spec.get("dry_run")),
                        supervisor=sup, emit=lambda _: None)
    res = await stop_leaker({"table": spec.get("table", "sockets"), "window": spec.get("window", "2s")}, ctx)
    (d / "result.json").write_text(json.dumps({"ok": res.ok, "changed": res.changed, "detail": res.detail,
                                               "data": res.data, "uid": os.getuid()}, default=str))


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
    leak = subprocess.Popen([sys.executable, "-c", LEAK, str(spec["rate"])], stdin=subprocess.DEVNULL)
    caps = "+dac_override,+kill"
    with (d / "agent.log").open("ab") as log:
        ag = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                               f"--inh-caps={caps}", f"--ambient-caps={caps}",
                               sys.executable, __file__, "--agent", str(d)],
                              stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while ag.poll() is None and time.monotonic() - t0 < float(spec.get("seconds", 20)):
            put(nf / "nf_conntrack_count", str(base + sockets(leak.pid)))
            leak.poll()  # reap it once TERMed: a zombie would read as alive
            time.sleep(0.1)
        time.sleep(0.3)
        code = leak.poll()
    finally:
        stop.set()
        for p in (ag, leak):
            if p.poll() is None:
                p.kill()
            p.wait()
    result = json.loads((d / "result.json").read_text()) if (d / "result.json").exists() else None
    log = (d / "systemctl.log").read_text().splitlines() if (d / "systemctl.log").exists() else []
    hlog = (d / "helper.log").read_text() if (d / "helper.log").exists() else ""
    return {"result": result, "systemctl": log, "helper_log": hlog, "leak": code, "leak_pid": leak.pid,
            "agent_log": (d / "agent.log").read_text()[-3000:]}


if __name__ == "__main__":
    if sys.argv[1] == "--agent":
        asyncio.run(agent(Path(sys.argv[2])))
    else:
        assert os.getpid() == 1, "run me in a private PID namespace (unshare --pid --fork --mount-proc)"
        spec = json.loads(Path(sys.argv[1]).read_text())
        (Path(spec["dir"]) / "out.json").write_text(json.dumps(drive(spec), default=str))
