"""stop_leaker under the shipped unit: heald.service runs as user heald without CAP_SYS_PTRACE, so
other users' /proc/PID/fd links (sockets) -- and, without CAP_DAC_*, the fd directories -- are
closed to it. Its scan then says how many processes it could not read, and the same scan runs as
root in heald-action@leakscan-{file,conntrack}.service (packaging/heald-action ->
``python3 -I -m agent.act.procscan``), whose result file the agent checks before trusting it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from agent.act import procscan
from agent.act.actions import leaks
from agent.act.base import ActionContext
from agent.act.procscan import FORMAT, ScanRefused, load, parse_stat, survey
from agent.act.supervisor import Supervisor
from agent.decide.settings import PlaybookSettings

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "packaging" / "heald-action"
SCRIPT = Path(__file__).with_name("leak_scan_namespace.py")
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT or shutil.which("setpriv") is None,
                                reason="needs root and setpriv (another user's view of /proc)")
needs_ns = pytest.mark.skipif(not ROOT or shutil.which("unshare") is None or shutil.which("setpriv") is None
                              or not Path("/proc/sys/net/netfilter").is_dir()
                              or Path("/usr/bin/heald").exists(),
                              reason="needs root, unshare, setpriv, /proc/sys/net/netfilter and no "
                                     "/usr/bin/heald (the helper would take that installation)")
SYSTEM_PYTHON = "/usr/bin/python3"


def _as_nobody(code: str, caps: str = "") -> dict[str, Any]:
    """Run ``code`` (stdlib + agent.act.procscan) as user nobody, optionally with ambient caps.

    From a world-readable copy of the package: the checkout may sit in a 0700 directory (a CI
    clone in ``mktemp -d``), which nobody cannot enter."""
    extra = [f"--inh-caps={caps}", f"--ambient-caps={caps}"] if caps else []
    with tempfile.TemporaryDirectory(prefix="heald-nobody-") as tmp:
        top = Path(tmp)
        shutil.copytree(REPO / "agent", top / "agent", ignore=shutil.ignore_patterns("__pycache__"))
        for d, _dirs, files in os.walk(top):
            os.chmod(d, 0o755)  # noqa: S103 - nobody must enter the copy
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        prog = f"import sys, json; sys.path.insert(0, {tmp!r})\n{code}"
        done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *extra,
                               SYSTEM_PYTHON, "-I", "-c", prog], capture_output=True, text=True, timeout=30,
                              check=False, cwd="/")
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


@needs_root
@pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason="needs /usr/bin/python3")
def test_another_user_without_ptrace_is_denied_root_fds_and_says_so() -> None:
    """As nobody (no capability), a root process's fd directory is closed: the scan counts it as
    denied instead of silently leaving it out (stop_leaker's cue to ask the helper). With
    CAP_DAC_OVERRIDE, as heald.service holds, the fds can be listed (file table: no helper needed)
    but their links cannot be read (sockets: still denied). Old: no denial was reported at all."""
    child = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL)
    try:
        code = (f"from agent.act.procscan import survey\nfrom pathlib import Path\n"
                f"out = {{}}\nfor t in ('files', 'sockets', 'tasks'):\n"
                f"    procs, denied = survey(t, Path('/proc'))\n"
                f"    out[t] = [{child.pid} in procs, denied]\nprint(json.dumps(out))")
        bare = _as_nobody(code)
        assert bare["files"][0] is False
        assert bare["files"][1] >= 1
        assert bare["sockets"][0] is False
        assert bare["sockets"][1] >= 1
        assert bare["tasks"] == [True, 0]  # threads come from world-readable stat
        unit_like = _as_nobody(code, "+dac_override")
        assert unit_like["files"][0] is True
        assert unit_like["sockets"][0] is False
        assert unit_like["sockets"][1] >= 1
    finally:
        child.kill()
        child.wait()


@pytest.mark.root
@pytest.mark.slow
@needs_ns
def test_stop_leaker_as_the_unit_runs_it_attributes_through_the_root_helper(tmp_path: Path) -> None:
    """The agent as heald.service runs it (nobody + CAP_DAC_OVERRIDE + CAP_KILL, no ptrace), a root
    process leaking sockets, the conntrack table (fixture) heading for full: the agent's own scan
    is denied the links, starts heald-action@leakscan-conntrack twice (a broker runs the real
    helper as root, as systemd would), reads its files and TERMs the leaker. Old: every socket
    count read 0, the table's growth was nobody's, nothing was stopped."""
    spec = {"dir": str(tmp_path), "limit": 2000, "base": 1100, "rate": 40, "window": "2s"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    argv = ["unshare", "--pid", "--kill-child", "--mount", "--mount-proc", "--propagation", "private",
            sys.executable, str(SCRIPT), str(tmp_path / "spec.json")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    res = out["result"]
    assert res is not None, out
    assert res["uid"] != 0
    assert out["systemctl"] == ["start heald-action@leakscan-conntrack.service"] * 2, out
    assert res["data"].get("helper") == "heald-action@leakscan-conntrack.service", res
    assert res["data"]["denied"] >= 1
    assert res["ok"], res
    assert res["data"]["pids"] == [out["leak_pid"]]
    assert res["data"]["share_pct"] >= 50
    assert out["leak"] == -signal.SIGTERM
    print(res["detail"])


def test_the_helper_accepts_only_its_two_scan_names() -> None:
    """packaging/heald-action --dry-run: leakscan-file / leakscan-conntrack run heald's own scan
    into the unit's runtime directory; anything near them is rejected (exit 2, nothing run)."""
    for name, table in (("leakscan-file", "files"), ("leakscan-conntrack", "sockets")):
        done = subprocess.run([str(HELPER), "--dry-run", name], capture_output=True, text=True, timeout=30,
                              check=False)
        assert done.returncode == 0, done.stderr
        assert f"-I -m agent.act.procscan {table} /run/heald-action/{name}.json" in done.stdout
    for bad in ("leakscan-files", "leakscan-tasks", "leakscan-sockets", "leakscan-", "leakscan",
                "leakscan-file ", " leakscan-file", "leakscan-file-1", "leakscan-File", "LEAKSCAN-FILE",
                "leakscan-file.service", "../leakscan-file", "leakscan-file\n", "leakscan-conntrack;id",
                "leakscan-$(id)", "leakscan-file/../x"):
        done = subprocess.run([str(HELPER), "--dry-run", bad], capture_output=True, text=True, timeout=30,
                              check=False)
        assert done.returncode == 2, (bad, done.stdout, done.stderr)
        assert done.stdout == "", bad
    done = subprocess.run([str(HELPER), "--dry-run", "leakscan-file", "/tmp/x"], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 2


def _payload(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"format": FORMAT, "table": "sockets", "monotonic": time.monotonic(), "denied": 0,
                            "pids": {"10": [5, 700], "11": [0, 800]}}
    base.update(kw)
    return base


def test_hostile_helper_output_is_refused(tmp_path: Path) -> None:
    """The result file is checked before it is trusted: stale, from the future, another table's,
    not the format, NaN/Infinity, negative or huge counts, bools, bad pids, oversize, a symlink,
    a directory, another owner's or group-writable file: each refused with one clear line."""
    me = os.geteuid()
    f = tmp_path / "leakscan-conntrack.json"
    since = time.monotonic()

    def write(data: Any, raw: str | None = None) -> None:
        f.unlink(missing_ok=True)
        f.write_text(raw if raw is not None else json.dumps(data))
        f.chmod(0o644)

    write(_payload())
    when, pids = load(f, "sockets", since, owner=me)
    assert pids == {10: (5, 700), 11: (0, 800)}
    assert when >= since
    hostile: list[tuple[Any, str | None, str]] = [
        (_payload(monotonic=since - 1.0), None, "stale"),
        (_payload(monotonic=time.monotonic() + 3600), None, "future"),
        (_payload(table="files"), None, "not 'sockets'"),
        (_payload(format="heald-leakscan/0"), None, "not a heald-leakscan/1"),
        ([1, 2], None, "not a heald-leakscan/1"),
        (None, '{"format": "heald-leakscan/1", "table": "sockets", "monotonic": NaN, "pids": {}}',
         "not the helper's JSON"),
        (None, json.dumps(_payload()).replace("[5, 700]", "[Infinity, 700]"), "not the helper's JSON"),
        (None, "{" * 100000, "not the helper's JSON"),
        (None, "\xff\xfe garbage", "not the helper's JSON"),
        (_payload(monotonic=None), None, "no scan time"),
        (_payload(monotonic=True), None, "no scan time"),
        (_payload(pids={"10": [-1, 700]}), None, "not [count, start]"),
        (_payload(pids={"10": [1 << 40, 700]}), None, "not [count, start]"),
        (_payload(pids={"10": [1.5, 700]}), None, "not [count, start]"),
        (_payload(pids={"10": [True, 700]}), None, "not [count, start]"),
        (_payload(pids={"10": [5, -700]}), None, "not [count, start]"),
        (_payload(pids={"10": [5]}), None, "not [count, start]"),
        (_payload(pids={"10": {"count": 5}}), None, "not [count, start]"),
        (_payload(pids={"0": [5, 700]}), None, "not a pid"),
        (_payload(pids={"-3": [5, 700]}), None, "not a pid"),
        (_payload(pids={"010": [5, 700]}), None, "not a pid"),
        (_payload(pids={"99999999": [5, 700]}), None, "not a pid"),
        (_payload(pids={"\uff11\uff12": [5, 700]}), None, "not a pid"),  # fullwidth 12
        (_payload(pids=[[10, 5, 700]]), None, "no valid pid map"),
    ]
    for data, raw, why in hostile:
        write(data, raw)
        with pytest.raises(ScanRefused, match=re.escape(why)):
            load(f, "sockets", since, owner=me)
    # oversize, without writing 32 MiB: a sparse file
    f.unlink()
    with f.open("wb") as fh:
        fh.truncate(procscan.MAX_BYTES + 1)
    f.chmod(0o644)
    with pytest.raises(ScanRefused, match="bytes, over"):
        load(f, "sockets", since, owner=me)
    # not the helper's file
    write(_payload())
    f.chmod(0o666)
    with pytest.raises(ScanRefused, match="not trusted"):
        load(f, "sockets", since, owner=me)
    f.chmod(0o644)
    with pytest.raises(ScanRefused, match="not trusted"):
        load(f, "sockets", since, owner=me + 1)
    real = tmp_path / "real.json"
    f.rename(real)
    f.symlink_to(real)
    with pytest.raises(ScanRefused, match="no helper scan"):
        load(f, "sockets", since, owner=me)
    f.unlink()
    f.mkdir()
    with pytest.raises(ScanRefused, match="not a regular file"):
        load(f, "sockets", since, owner=me)
    with pytest.raises(ScanRefused, match="no helper scan"):
        load(tmp_path / "missing.json", "sockets", since, owner=me)


FAKE_SYSTEMCTL = """#!/bin/bash
echo "$*" >> "{log}"
[[ $# -eq 2 && $1 == start && $2 =~ ^heald-action@(leakscan-(file|conntrack))\\.service$ ]] || exit 1
exec "{py}" "{writer}" "{out}/${{BASH_REMATCH[1]}}.json"
"""
# What the fake helper writes: a real scan of /proc (procscan.dump), then altered per MODE.
WRITER = """import json, os, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from agent.act.procscan import dump
out = Path(sys.argv[1])
mode = {mode!r}
if mode == "stale":
    if not out.exists():
        dump("files", Path("/proc"), out)
    sys.exit(0)
dump("files", Path("/proc"), out)
data = json.loads(out.read_text())
if mode == "nan":
    raw = json.dumps(data).replace('"monotonic":', '"monotonic": NaN, "x":', 1)
elif mode == "other-table":
    data["table"] = "tasks"; raw = json.dumps(data)
elif mode == "negative":
    data["pids"] = {{k: [-v[0] - 1, v[1]] for k, v in data["pids"].items()}}; raw = json.dumps(data)
elif mode == "reused":
    data["pids"] = {{k: [v[0], v[1] + 1] for k, v in data["pids"].items()}}; raw = json.dumps(data)
else:
    raw = json.dumps(data)
tmp = out.with_suffix(".tmp")
tmp.write_text(raw)
tmp.chmod(0o644)
os.replace(tmp, out)
"""


@pytest.mark.asyncio
@pytest.mark.skipif(not ROOT, reason="needs root (the helper's file must be root's)")
@pytest.mark.parametrize(("mode", "why"), [
    ("stale", "stale or from the future"), ("nan", "not the helper's JSON"),
    ("other-table", "holds a scan of 'tasks', not 'files'"), ("negative", "is not [count, start] in range"),
    ("reused", "no process to attribute"), ("fail", "the root helper's scan failed"),
])
async def test_stop_leaker_refuses_a_bad_helper_result_and_stops_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, why: str) -> None:
    """The agent's scan is denied (forced here: the test runs as root), so stop_leaker takes the
    helper's result: a stale file, NaN, another table, negative counts, or start times that are
    not the processes' (every pid reused) are refused or leave nothing to attribute, the helper
    failing likewise: the step fails with the reason, nothing is stopped, the run escalates."""
    real = procscan.survey

    def denied_survey(table: str, proc: Path, counts: bool = True) -> tuple[dict[int, Any], int]:
        procs, n = real(table, proc, counts)
        return procs, n + 1 if counts else n

    out = tmp_path / "run"
    out.mkdir()
    writer = tmp_path / "writer.py"
    writer.write_text(WRITER.format(repo=str(REPO), mode=mode))
    log = tmp_path / "systemctl.log"
    tool = tmp_path / "systemctl"
    tool.write_text(FAKE_SYSTEMCTL.format(log=log, py=sys.executable, writer=writer, out=out)
                    if mode != "fail" else f"#!/bin/bash\necho \"$*\" >> {log}\nexit 1\n")
    tool.chmod(0o755)
    if mode == "stale":  # a complete, valid scan from before the request
        argv = [sys.executable, str(writer), str(out / "leakscan-file.json")]
        await asyncio.to_thread(subprocess.run, argv, check=True)
    monkeypatch.setattr(leaks, "survey", denied_survey)
    monkeypatch.setattr(procscan, "HELPER_DIR", out)
    sup = Supervisor(lambda coro, name: asyncio.get_running_loop().create_task(coro, name=name),
                     lambda *_: None)
    ctx = ActionContext(settings=PlaybookSettings(dirs=(), systemctl=(str(tool),)), node="n", playbook="pb",
                        run_id="r", dry_run=False, supervisor=sup, emit=lambda _: None)
    res = await leaks.stop_leaker({"table": "files", "window": "0.2s"}, ctx)
    assert not res.ok, res.detail
    assert not res.changed
    assert why in res.detail, res.detail
    assert "nothing stopped" in res.detail
    assert log.read_text().splitlines()[0] == "start heald-action@leakscan-file.service"
    if mode not in ("fail", "reused"):
        assert res.data["helper"] == "heald-action@leakscan-file.service"
    # a dry run never starts the helper
    log.unlink()
    dry = ActionContext(settings=ctx.settings, node="n", playbook="pb", run_id="r", dry_run=True,
                        supervisor=sup, emit=lambda _: None)
    res = await leaks.stop_leaker({"table": "files", "window": "0.2s"}, dry)
    assert not res.ok
    assert "a dry run does not start" in res.detail
    assert not log.exists()


def test_a_hostile_proc_tree_is_scanned_without_a_crash(tmp_path: Path) -> None:
    """A /proc-like tree with garbage, truncated, huge, negative, non-UTF-8 or absurd stat lines,
    a huge cgroup file, an fd "directory" that is a file, names that only look like pids: the
    scan keeps what is well-formed and never raises; reused() reads such a stat as gone. Old: a
    non-numeric ppid raised ValueError out of the scan (and the step)."""
    proc = tmp_path / "proc"

    def pid(n: str, stat: bytes, cgroup: bytes = b"0::/\n", fds: int | None = 2) -> None:
        d = proc / n
        d.mkdir(parents=True)
        (d / "stat").write_bytes(stat)
        (d / "cgroup").write_bytes(cgroup)
        if fds is None:
            (d / "fd").write_text("not a dir")
        else:
            (d / "fd").mkdir()
            for i in range(fds):
                (d / "fd" / str(i)).symlink_to("/dev/null")

    def line(n: int, name: str = "ok", ppid: str = "1", threads: str = "1", start: str = "100") -> bytes:
        fields = ["S", ppid, *["0"] * 15, threads, "0", start, "0"]
        return f"{n} ({name}) {' '.join(fields)}\n".encode()

    pid("10", line(10))
    pid("11", line(11, name="a) (b) S 1 2"))  # a name with ") " in it: the last ") " counts
    pid("12", line(12, ppid="abc"))
    pid("13", line(13, threads="-5"))
    pid("14", line(14, start="9" * 400))
    pid("15", b"15 (short) S 1 2 3\n")
    pid("16", b"garbage without parentheses " * 10)
    pid("17", b"17 (" + b"x" * 100000 + b") S 1\n")
    pid("18", b"\xff\xfe\x00" * 50)
    pid("19", line(19), cgroup=b"0::/" + b"a/" * 100000 + b"x.service\n")
    pid("20", line(20), fds=None)
    pid("21", line(21, name="svc"), cgroup=b"0::/system.slice/good.service\n", fds=5)
    pid("22", b"")
    pid("0023", line(23))  # not how /proc names a pid, but digits: read as 23
    pid("99999999999", line(1))
    (proc / "self").mkdir()
    (proc / "abc").write_text("x")
    for table in ("files", "sockets", "tasks"):
        procs, denied = survey(table, proc)
        assert denied == 0
        assert {10, 11, 21} <= set(procs), procs
        assert not {12, 13, 14, 15, 16, 17, 18, 19, 22} & set(procs), procs
        assert (20 in procs) == (table == "tasks")  # an fd "dir" that is a file: gone
    files, _ = survey("files", proc)
    assert files[10].count == 2
    assert files[21].count == 5
    assert files[21].unit == "good.service"
    assert files[11].name == "a) (b) S 1 2"
    assert parse_stat("1 (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20") is not None
    assert parse_stat("") is None
    from agent.act.procscan import Proc, reused  # noqa: PLC0415

    assert reused(12, {}, {12: Proc(1, 0, None, "x", 100)}, proc)
    assert reused(17, {}, {17: Proc(1, 0, None, "x", 100)}, proc)
    assert not reused(10, {}, {10: Proc(1, 0, None, "ok", 100)}, proc)
    # the whole step on that tree (a fixture sysctl_root: nothing is ever stopped)
    sysctl = proc / "sys"
    (sysctl / "fs").mkdir(parents=True)
    (sysctl / "fs/file-nr").write_text("nan\tx\n")
    (sysctl / "fs/file-max").write_text("-1e999\n")
    sup = Supervisor(lambda coro, name: asyncio.get_running_loop().create_task(coro, name=name),
                     lambda *_: None)

    async def go() -> Any:
        ctx = ActionContext(settings=PlaybookSettings(dirs=(), sysctl_root=str(sysctl)), node="n",
                            playbook="pb", run_id="r", dry_run=False, supervisor=sup, emit=lambda _: None)
        return await leaks.stop_leaker({"table": "files", "window": "0.1s"}, ctx)

    res = asyncio.run(go())
    assert not res.ok
    assert not res.changed
    assert "nothing stopped" in res.detail
