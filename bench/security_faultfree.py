"""A fault-free hour of normal activity under heald's security watch: no security action (issue 22).

    sudo python3 bench/security_faultfree.py [--minutes 60] [--learn-s 300] [--smoke]

A real ``heald run`` (this checkout, the shipped playbooks forced to dry-run: every would-be
action is counted, nothing is done) runs in a private network + PID + mount namespace
(``unshare --net --pid --fork --mount --mount-proc``): it sees only the processes, sockets and
auth log of this namespace, so other people's work on a shared machine (and their tests' fake
miners) cannot leak in. After ``--learn-s`` seconds of learning (the security collectors'
baselines: ``learn_s`` for binary hashes, ``baseline_s`` for listeners), ``--minutes`` of normal
activity run in the namespace:

* every 2 min an ssh session that succeeds (a real sshd on the namespace's loopback, key login,
  a few commands), its log the agent's auth log;
* every 10 min a package install and removal: a Debian package with ``dpkg -i`` / ``dpkg -r``
  (downloaded beforehand with ``apt-get download``), and a wheel into a fresh venv with pip
  (downloaded beforehand; the namespace has no network);
* every 10 min a compile: a small C project built with make and gcc in a temp directory, its
  test binary run for 2 s;
* every 10 min a Python test run (``python3 -m unittest``) from a temp directory.

Output: a table of the security playbooks' would-be runs, approval requests and escalations
(expected: none), every other playbook's, and the activity counts;
``bench/results/security_faultfree.txt`` (not with ``--smoke``). Needs root, sshd, ssh, gcc, make.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECURITY = ("ssh-brute-force", "new-listener", "unknown-binary-cpu", "unknown-binary-kill", "egress-burst",
            "watched-file-changed")
DEB = "hello"
WHEEL = "six"
C_PROJECT = {
    "Makefile": "all: calc test\ncalc: main.o calc.o\n\tgcc -O1 -o calc main.o calc.o\n"
                "test: test.o calc.o\n\tgcc -O1 -o test test.o calc.o\n%.o: %.c\n\tgcc -O1 -c $<\n",
    "calc.c": "long fib(long n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }\n",
    "main.c": "#include <stdio.h>\nlong fib(long);\n"
              "int main(void) { printf(\"%ld\\n\", fib(30)); return 0; }\n",
    "test.c": "#include <time.h>\nlong fib(long);\nint main(void) { time_t t = time(0);\n"
              "  while (time(0) - t < 2) { if (fib(20) != 6765) return 1; } return 0; }\n",
}
PY_TEST = ("import unittest\n\nclass T(unittest.TestCase):\n    def test_sum(self):\n"
           "        self.assertEqual(sum(range(10)), 45)\n\n"
           "if __name__ == '__main__':\n    unittest.main()\n")


def sh(*argv: str, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None) -> bool:
    done = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
                          env=env)
    if done.returncode != 0:
        print(f"  ! {' '.join(argv)} -> {done.returncode}: {done.stderr.strip()[-300:]}", flush=True)
    return done.returncode == 0


# ------------------------------------------------------------------------------------ outside
def prepare(work: Path) -> dict[str, Any]:
    """What the namespace cannot fetch: a .deb, a wheel, ssh keys."""
    (work / "debs").mkdir()
    (work / "wheels").mkdir()
    have_deb = sh("apt-get", "download", DEB, cwd=work / "debs")
    have_wheel = sh(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(work / "wheels"),
                    WHEEL)
    for name in ("hostkey", "userkey"):
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / name))
    (work / "authorized_keys").write_text((work / "userkey.pub").read_text())
    return {"deb": next((str(p) for p in (work / "debs").glob("*.deb")), "") if have_deb else "",
            "wheels": str(work / "wheels") if have_wheel else ""}


def outer(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("security_faultfree.py needs root (namespaces, sshd)", file=sys.stderr)
        return 2
    missing = [t for t in ("sshd", "ssh", "ssh-keygen", "unshare", "gcc", "make") if not shutil.which(t)
               and not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        print(f"skipped: missing {', '.join(missing)}", flush=True)
        return 0
    work = Path(tempfile.mkdtemp(prefix="heald-secff-"))
    try:
        spec = {"work": str(work), "minutes": args.minutes, "learn_s": args.learn_s, **prepare(work)}
        (work / "spec.json").write_text(json.dumps(spec))
        t0 = time.time()
        done = subprocess.run(["unshare", "--net", "--pid", "--kill-child", "--mount", "--mount-proc",
                               sys.executable, __file__, "--inner", str(work / "spec.json")],
                              timeout=args.learn_s + args.minutes * 60 + 600, check=False)
        if done.returncode != 0 or not (work / "result.json").exists():
            print(f"the namespace run failed ({done.returncode})", file=sys.stderr)
            return 1
        result = json.loads((work / "result.json").read_text())
        copy_to = os.environ.get("HEALD_BENCH_AUDIT_DIR")  # tests/test_bench_smoke.py re-reads it
        if copy_to and (work / "state" / "audit.jsonl").exists():
            Path(copy_to).mkdir(parents=True, exist_ok=True)
            shutil.copy2(work / "state" / "audit.jsonl", Path(copy_to) / "security-faultfree-audit.jsonl")
        text = report(result, t0, args)
        print(text, flush=True)
        if not args.smoke:
            out = ROOT / "bench" / "results" / "security_faultfree.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
        security = [r for r in result["decisions"] if r["playbook"] in SECURITY]
        return 1 if security or result["enforced"] else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(result: dict[str, Any], t0: float, args: argparse.Namespace) -> str:
    when = dt.datetime.fromtimestamp(t0, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    smoke = " --smoke" if args.smoke else ""
    lines = [(f"# sudo python3 bench/security_faultfree.py --minutes {args.minutes:g} "
             f"--learn-s {args.learn_s:g}{smoke}"),
             (f"# {when}, {platform.node()}, {os.cpu_count()} cpu, {platform.release()}; heald run (this "
              "checkout, shipped playbooks, forced dry-run) in a private net+pid+mount namespace"),
             (f"# learning {args.learn_s:g} s, then {result['activity_s'] / 60:.1f} min of activity; "
              f"{result['samples_s'] / 60:.1f} min of the agent running"),
             "", "| activity | times | failed |", "|---|---|---|"]
    for name, (n, bad) in sorted(result["activities"].items()):
        lines.append(f"| {name} | {n} | {bad} |")
    lines += ["", "| playbook | would-be runs | approval requests | kind |", "|---|---|---|---|"]
    counts: dict[str, list[int]] = {}
    for d in result["decisions"]:
        c = counts.setdefault(d["playbook"], [0, 0])
        c[0 if d["kind"] == "run" else 1] += 1
    for name in SECURITY:
        runs, asks = counts.pop(name, [0, 0])
        lines.append(f"| {name} | {runs} | {asks} | security |")
    for name, (runs, asks) in sorted(counts.items()):
        lines.append(f"| {name} | {runs} | {asks} | other |")
    sec = sum(1 for d in result["decisions"] if d["playbook"] in SECURITY)
    lines += ["", (f"security actions (would-be runs + approval requests): {sec}; "
                   f"{result['enforced']} enforced runs; escalations from security playbooks: "
                   f"{result['escalations']}")]
    for d in result["decisions"]:
        lines.append(f"#   {d['kind']} {d['playbook']} {d['target']} at +{d['at_s']:.0f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- inside
def inner(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    work = Path(spec["work"])
    assert os.getpid() == 1, "run in a private PID namespace"
    sh("ip", "link", "set", "lo", "up")
    authlog = work / "auth.log"
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    (work / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:2222\nHostKey {work / 'hostkey'}\nPidFile none\nUsePAM no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        f"LogLevel INFO\nAuthorizedKeysFile {work / 'authorized_keys'}\nStrictModes no\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = [subprocess.Popen([sshd, "-f", str(work / "sshd_config"),
                                                              "-E", str(authlog), "-D"])]
    state = work / "state"
    learn = float(spec["learn_s"])
    cfg = work / "agent.toml"
    cfg.write_text(f"""
[node]
id = "security-faultfree"
[paths]
state_dir = "{state}"
runtime_dir = "{work / 'run'}"
[sample]
interval_s = 1.0
[collect.gpu]
enabled = false
[collect.security_net]
auth_source = "files"
auth_files = ["{authlog}"]
baseline_s = {learn}
[collect.security_proc]
learn_s = {learn}
[playbooks]
dirs = []
load_shipped = true
force_mode = "dry-run"
[security]
keep_blocks_on_stop = true
[mqtt]
enabled = false
""")
    env = {**os.environ, "HEALD_PLAYBOOKS__FORCE_MODE": "dry-run"}
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg), "--dry-run"],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=(work / "agent.log").open("wb"))
    procs.append(agent)
    started = time.time()
    activities: dict[str, list[int]] = {}

    def did(name: str, ok: bool) -> None:
        a = activities.setdefault(name, [0, 0])
        a[0] += 1
        a[1] += 0 if ok else 1

    def ssh_session() -> None:
        did("ssh session (key login, succeeds)", sh(
            "ssh", "-i", str(work / "userkey"), "-p", "2222", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "root@127.0.0.1",
            "uname -a; id; ls /etc | wc -l", timeout=60))

    def packages() -> None:
        if spec["deb"]:
            ok = sh("dpkg", "-i", spec["deb"]) and sh("hello") and sh("dpkg", "-r", DEB)
            did(f"dpkg -i / -r {DEB}", ok)
        if spec["wheels"]:
            venv = Path(tempfile.mkdtemp(prefix="venv-", dir=work))
            pip = str(venv / "bin" / "pip")
            ok = sh(sys.executable, "-m", "venv", str(venv)) and sh(
                pip, "install", "-q", "--no-index", "--find-links", spec["wheels"], WHEEL)
            ok = ok and sh(str(venv / "bin" / "python"), "-c", f"import {WHEEL}")
            did(f"pip install {WHEEL} into a new venv", ok)
            shutil.rmtree(venv, ignore_errors=True)

    def compile_project() -> None:
        proj = Path(tempfile.mkdtemp(prefix="proj-", dir="/tmp"))
        for name, text in C_PROJECT.items():
            (proj / name).write_text(text)
        ok = sh("make", "-j2", cwd=proj) and sh(str(proj / "calc"), cwd=proj)
        ok = ok and sh(str(proj / "test"), cwd=proj)
        did("make (gcc) + run its test binary 2 s", ok)
        shutil.rmtree(proj, ignore_errors=True)

    def unit_tests() -> None:
        d = Path(tempfile.mkdtemp(prefix="pytests-", dir="/tmp"))
        (d / "test_x.py").write_text(PY_TEST)
        did("python3 -m unittest", sh(sys.executable, "-m", "unittest", "-q", "test_x", cwd=d))
        shutil.rmtree(d, ignore_errors=True)

    plan = [(120.0, 0.0, ssh_session), (600.0, 60.0, packages), (600.0, 240.0, compile_project),
            (600.0, 420.0, unit_tests)]
    try:
        time.sleep(learn)
        if agent.poll() is not None:
            raise RuntimeError("heald exited: " + (work / "agent.log").read_text()[-2000:])
        t_act = time.time()
        end = t_act + float(spec["minutes"]) * 60
        nxt = {i: t_act + offset for i, (_, offset, _) in enumerate(plan)}
        if float(spec["minutes"]) < 5:  # smoke: each activity once, now
            nxt = dict.fromkeys(nxt, t_act)
        while time.time() < end:
            for i, (every, _, fn) in enumerate(plan):
                if time.time() >= nxt[i]:
                    fn()
                    nxt[i] += every if float(spec["minutes"]) >= 5 else 1e9
            time.sleep(1.0)
        activity_s = time.time() - t_act
    finally:
        agent.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.wait(timeout=60)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    decisions, enforced, escalations = [], 0, 0
    audit = state / "audit.jsonl"
    for line in audit.read_text().splitlines() if audit.exists() else []:
        e = json.loads(line)
        r = e["record"]
        if r.get("type") == "run.start":
            enforced += 0 if r.get("dry_run") else 1
            decisions.append({"kind": "run", "playbook": r["playbook"], "target": r["target"],
                              "at_s": e["ts"] - started})
        elif r.get("type") == "approval.requested":
            decisions.append({"kind": "approval", "playbook": r["playbook"], "target": r["target"],
                              "at_s": e["ts"] - started})
        elif r.get("type") == "escalate" and r.get("playbook") in SECURITY:
            escalations += 1
    result = {"decisions": decisions, "enforced": enforced, "escalations": escalations,
              "activities": activities, "activity_s": activity_s, "samples_s": time.time() - started}
    (work / "result.json").write_text(json.dumps(result))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0, help="minutes of activity after learning")
    ap.add_argument("--learn-s", type=float, default=300.0, help="the baselines' learning time, seconds")
    ap.add_argument("--smoke", action="store_true", help="seconds, not an hour: each activity once")
    ap.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner is not None:
        return inner(args.inner)
    if args.smoke:
        args.minutes, args.learn_s = 0.5, 15.0
    return outer(args)


if __name__ == "__main__":
    raise SystemExit(main())
