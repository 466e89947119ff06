"""The security actions' siblings (CONTRIBUTING: "the daemon kill -9'd and restarted mid-run, ... the
agent's own disk full"), on real ``heald run`` processes, nft and the cgroup freezer.

* block_address, kill -9 between ``nft add element`` and the step's journal result and audit
  record (an nft wrapper kills its caller once the element is in), then a restart: the run is
  resumed, the block is not added twice, the run's verdict is the uninterrupted run's, the audit
  chain verifies; the element expires by its own timeout; the table is gone at stop. (It used to
  escalate: the restarted collector had forgotten the source the resumed run verifies against;
  its failure window is now kept in the state dir, tested alone below with hostile files.)
* block_address with the state dir on a full 2 MiB tmpfs: the block happens, nothing crashes, and
  once there is room the audit says what happened.
* freeze_process with a full state dir: the process is frozen all the same (containment first),
  the action says which evidence could not be kept, the collector still reads it frozen by heald,
  and it can be thawed; and the same through a real ``heald run`` in a private PID + mount
  namespace with the shipped unknown-binary-cpu (shortened): verified, in the audit once there is
  room.
* the audit records a full disk refuses are held (bounded) and chained late, in order.

The agents run in a network namespace of their own (nft acts there only); the processes frozen are
this test's own children.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from heald_kit import Heald, audit, wait
from test_degraded_storage import Tmpfs, mount_tmpfs, unmount

from agent.act import records
from agent.act.actions.freeze import freeze_process, unfreeze_process
from agent.act.actions.nftables import element
from agent.act.audit import AuditLog, verify
from agent.act.base import ActionContext
from agent.act.records import Recorder
from agent.collect.security_net import SecurityNetCollector
from agent.collect.security_proc import SecurityProcCollector
from agent.collect.settings import SecurityNetSettings, SecurityProcSettings
from agent.decide.loader import shipped_dir
from agent.decide.settings import PlaybookSettings, SecuritySettings

NFT = shutil.which("nft")
IP = shutil.which("ip")
SRC = "192.0.2.50"  # TEST-NET-1: never a real peer
# Real sshd 9.2 lines (as in tests/test_security_net.py), a source failing to log in.
FAILED = "Failed password for root from {src} port {port} ssh2\n"


def _why_not() -> str:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables, tmpfs)"
    if NFT is None or IP is None:
        return "needs nft and ip (apt-get install nftables iproute2)"
    return ""


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tmpfs)")
needs_netns = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")


@contextlib.contextmanager
def netns(name: str) -> Iterator[str]:
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def nft_in(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", *args], capture_output=True, text=True,
                          check=False, timeout=30)


def in_set(ns: str, addr: str) -> bool:
    return nft_in(ns, "get", "element", "inet", "heald", "blocked4", "{", addr, "}").returncode == 0


def seconds(text: str | None) -> float:
    """nft's ``1m39s976ms`` -> 99.976."""
    total = 0.0
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    for part in re.findall(r"(\d+)(ms|d|h|m|s)", text or ""):
        num, unit = part
        total += int(num) * units[unit]
    return total


def verify_chain(state: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "audit", "verify", str(state / "audit.jsonl")],
                       capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def config(tmp: Path, state: Path, auth_log: Path, pbdir: Path, nft: list[str], *, timeout_s: int) -> Path:
    cfg = tmp / "agent.toml"
    cfg.write_text(f"""
[node]
id = "edge1"
[paths]
state_dir = "{state}"
runtime_dir = "{tmp / 'run'}"
[log]
format = "json"
[collect.gpu]
enabled = false
[collect.security_net]
auth_source = "files"
auth_files = ["{auth_log}"]
listeners = false
[security]
block_timeout_s = {timeout_s}
nft = {json.dumps(nft)}
[playbooks]
dirs = ["{pbdir}"]
load_shipped = false
[model]
enabled = false
""")
    return cfg


def shipped(tmp: Path, *names: str) -> Path:
    pbdir = tmp / "playbooks"
    pbdir.mkdir()
    for name in names:  # the shipped files, unchanged
        shutil.copy(shipped_dir() / f"{name}.yaml", pbdir)
    return pbdir


def attack(auth_log: Path, n: int, src: str = SRC) -> None:
    with auth_log.open("a") as f:
        for i in range(n):
            f.write(FAILED.format(src=src, port=40000 + i))


KILLER = """#!/bin/sh
# nft, then (once) kill -9 the caller (heald) right after the element went in: before heald has
# read nft's answer, journaled the step's result or appended its audit record.
nft "$@"
rc=$?
case " $* " in
  *" add element "*" {src} "*) if [ ! -e {mark} ]; then : > {mark}; kill -9 $PPID; sleep 1; fi ;;
esac
exit $rc
"""


def run_records(state: Path, src: str) -> list[dict[str, Any]]:
    """The audit records of the ssh-brute-force run for ``src``, in order."""
    recs = [r for r in audit(state) if r.get("playbook") == "ssh-brute-force"]
    ids = {r["run_id"] for r in recs if r["type"] == "run.start" and r["bindings"] == {"src": src}}
    return [r for r in recs if r.get("run_id") in ids]


def shape(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for r in records:
        if r["type"] == "step":
            out.append(("step", r["status"], r["ok"]))
        elif r["type"] == "verify":
            out.append(("verify", r["ok"]))
        elif r["type"] == "run.end":
            out.append(("run.end", r["outcome"]))
        else:
            out.append((r["type"],))
    return out


@pytest.mark.slow
@pytest.mark.root
@needs_netns
def test_block_address_kill9_after_the_add_then_restart_keeps_the_verdict(tmp_path: Path) -> None:
    """The uninterrupted run (another source, same agent) is the reference; then the agent is
    killed -9 inside the step of a second source's run, right after nft added the element."""
    base = "192.0.2.51"
    with netns(f"hedge{os.getpid()}") as ns:
        mark = tmp_path / "killed"
        wrapper = tmp_path / "nft-killer"
        wrapper.write_text(KILLER.format(mark=mark, src=SRC))
        wrapper.chmod(0o755)
        state, auth_log = tmp_path / "state", tmp_path / "auth.log"
        auth_log.write_text("")
        cfg = config(tmp_path, state, auth_log, shipped(tmp_path, "ssh-brute-force"), [str(wrapper)],
                     timeout_s=30)
        sec = SecuritySettings(nft=("ip", "netns", "exec", ns, "nft"))
        first = Heald(cfg, tmp_path / "agent-1.log", ns=ns)
        second: Heald | None = None
        try:
            first.wait_started()
            attack(auth_log, 12, base)
            wait("the reference run's end", lambda: any(
                r["type"] == "run.end" for r in run_records(state, base)), 60, 0.3)
            reference = shape(run_records(state, base))
            assert reference == [("run.start",), ("step", "done", True), ("verify", True),
                                 ("run.end", "succeeded")], reference
            attack(auth_log, 12)
            assert first.proc.wait(60) == -signal.SIGKILL, first.text()[-3000:]
            assert mark.exists()
            added, added_at = element(sec, ipaddress.ip_address(SRC)), time.monotonic()
            assert added is not None, "the element was not added before the kill"
            (journal,) = (state / "journal").glob("*.jsonl")
            kinds = [json.loads(x)["t"] for x in journal.read_text().splitlines()]
            assert kinds == ["run", "intent"], kinds  # killed between the add and the step's result
            assert shape(run_records(state, SRC)) == [("run.start",)]

            second = Heald(cfg, tmp_path / "agent-2.log", ns=ns)
            second.wait_started()
            wait("the resumed run's end",
                 lambda: any(r["type"] == "run.end" for r in run_records(state, SRC)), 60, 0.3)
            assert in_set(ns, SRC)  # verified while the block stands
            resumed = run_records(state, SRC)
            # The verdict is the uninterrupted run's; the audit says the step was cut off and that
            # the run was resumed, and the step was not run again (its element is not renewed).
            assert shape(resumed) == [("run.start",), ("run.recovered",), ("step", "interrupted", False),
                                      ("verify", True), ("run.end", "succeeded")], resumed
            assert resumed[1]["interrupted_step"] == 0
            assert "renewed the block" not in json.dumps(resumed)
            after = element(sec, ipaddress.ip_address(SRC))
            assert after is not None
            # the same element the killed agent added: its countdown went on (no renewal)
            elapsed = time.monotonic() - added_at
            assert seconds(after["expires"]) <= seconds(added["expires"]) - elapsed + 1.5
            assert not list((state / "journal").glob("*.jsonl"))
            verify_chain(state)
            assert not [x for x in second.lines() if x.get("level") in {"error", "critical"}
                        or x["event"] == "(not json)"], second.text()[-3000:]
            # Both blocks end by their own timeout (30 s), heald does not touch them.
            wait("the reference block to expire", lambda: not in_set(ns, base), 30, 0.5)
            wait("the resumed block to expire", lambda: not in_set(ns, SRC), 45, 0.5)
            # the table stays while heald runs, and goes when it stops
            assert nft_in(ns, "list", "table", "inet", "heald").returncode == 0
            assert second.stop() == 0, second.text()[-3000:]
            assert nft_in(ns, "list", "table", "inet", "heald").returncode != 0, "the table outlived heald"
        finally:
            for a in (first, second):
                if a is not None:
                    a.stop()


@pytest.mark.slow
@pytest.mark.root
@needs_netns
def test_block_address_with_the_state_dir_full_blocks_and_the_audit_catches_up(tmp_path: Path) -> None:
    """The state dir is a 2 MiB tmpfs filled to the last byte before the attack: the block does not
    need the disk and happens (a full disk never stops a run); no crash, one error line a streak;
    once there is room the audit chain holds the run, each late record saying when it happened."""
    with netns(f"hedgf{os.getpid()}") as ns:
        state, auth_log = tmp_path / "state", tmp_path / "auth.log"
        auth_log.write_text("")
        cfg = config(tmp_path, state, auth_log, shipped(tmp_path, "ssh-brute-force"), ["nft"], timeout_s=60)
        mount_tmpfs(state)
        agent: Heald | None = None
        try:
            disk = Tmpfs(state)
            agent = Heald(cfg, tmp_path / "agent.log", ns=ns)
            agent.wait_started()
            # No record yet: the audit file is empty, so no page of it has room left for one (a
            # file's last page takes bytes on a tmpfs filled to its last block).
            assert audit(state) == []
            disk.fill()
            t_attack = time.time()
            attack(auth_log, 12)
            try:
                wait("the block", lambda: in_set(ns, SRC), 10, 0.1)
            except AssertionError as exc:  # a CI failure once: say what the agent did meanwhile
                raise AssertionError(f"{exc}\n{agent.text()[-6000:]}") from None
            finished = wait("the run's end in the log", lambda: [
                x for x in agent.lines() if x["event"] == "playbook run finished"], 40, 0.3)
            assert finished[0]["outcome"] == "succeeded", agent.text()[-3000:]
            assert agent.proc.poll() is None
            assert audit(state) == []  # nothing could be appended
            assert disk.avail() == 0
            disk.free()
            late = wait("the run in the audit", lambda: run_records(state, SRC), 30, 0.3)
            wait("the whole run in the audit", lambda: any(
                r["type"] == "run.end" for r in run_records(state, SRC)), 30, 0.3)
            late = run_records(state, SRC)
            assert shape(late) == [("run.start",), ("step", "done", True), ("verify", True),
                                   ("run.end", "succeeded")], late
            assert all(t_attack <= r["late"]["wall"] <= time.time() for r in late), late
            assert "No space left" in late[0]["late"]["error"]
            verify_chain(state)
            lines = agent.lines()
            assert not [x for x in lines if x["event"] == "(not json)"], agent.text()[-3000:]
            errors: dict[str, int] = {}
            for x in lines:
                if x.get("level") in {"error", "critical"}:
                    errors[x["event"]] = errors.get(x["event"], 0) + 1
            assert all(n == 1 for n in errors.values()), errors  # one line a streak
            assert agent.stop() == 0, agent.text()[-3000:]
            assert nft_in(ns, "list", "table", "inet", "heald").returncode != 0, "the table outlived heald"
        finally:
            if agent is not None:
                agent.stop()
            unmount(state)


# --------------------------------------------------------------------------- freeze_process, disk full

FREEZER = Path("/sys/fs/cgroup/freezer")
BASH = shutil.which("bash") or "/bin/bash"
needs_freezer = pytest.mark.skipif(os.geteuid() != 0 or not (FREEZER / "cgroup.procs").exists(),
                                   reason="needs root and the v1 cgroup freezer")


def ticks(pid: int) -> int:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def freezer_group(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrl, path = line.split(":", 2)
        if ctrl == "freezer":
            return path
    return ""


@pytest.fixture
def burners(tmp_path: Path) -> Iterator[list[tuple[subprocess.Popen[bytes], Path]]]:
    """Copies of bash in a temp path burning CPU; at the end thawed out of heald's freezer groups
    (found from the process itself: with a full disk there may be no record naming the group)."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    for i in range(2):
        exe = tmp_path / "bin" / f"kworkerd{i}"
        exe.parent.mkdir(exist_ok=True)
        shutil.copy2(BASH, exe)
        procs.append((subprocess.Popen([str(exe), "-c", "while :; do :; done"]), exe))
    try:
        yield procs
    finally:
        for proc, _ in procs:
            with contextlib.suppress(OSError):
                group = freezer_group(proc.pid)
                if group.startswith("/heald-frozen/"):
                    (FREEZER / group.lstrip("/") / "freezer.state").write_text("THAWED")
                    (FREEZER / "cgroup.procs").write_text(str(proc.pid))
                    (FREEZER / group.lstrip("/")).rmdir()
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(10)


def action_ctx(state: Path, *suspects: tuple[int, Path]) -> ActionContext:
    rows = [{"pid": pid, "exe": str(exe), "reasons": ["temp_path"]} for pid, exe in suspects]
    return ActionContext(settings=PlaybookSettings(), node="n1", playbook="unknown-binary-cpu", run_id="r1",
                         dry_run=False, supervisor=None,  # type: ignore[arg-type]  # not used by these actions
                         emit=lambda _e: None, bindings={}, detail={"security_proc": {"suspects": rows}},
                         state_dir=state)


def frozen_still(pid: int) -> bool:
    t0 = ticks(pid)
    time.sleep(0.5)
    return ticks(pid) == t0


@pytest.mark.root
@needs_freezer
def test_freeze_with_the_state_dir_full_contains_first_and_says_what_it_could_not_keep(
        tmp_path: Path, burners: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    """Containment does not wait for the disk: with no byte free the process is frozen all the same
    (its freezer group is named like the record would be, so the thaw finds it without one); with
    room for the record but not the binary, the record says so and no partial copy is left."""
    state = tmp_path / "state"
    mount_tmpfs(state)
    try:
        disk = Tmpfs(state)
        (p0, exe0), (p1, exe1) = burners
        disk.fill()
        res = asyncio.run(freeze_process({"target": {"pid": p0.pid}}, action_ctx(state, (p0.pid, exe0))))
        assert res.ok, res.detail
        assert res.changed
        (done,) = res.data["frozen"]
        assert freezer_group(p0.pid).startswith("/heald-frozen/")
        assert frozen_still(p0.pid)
        assert done["binary_sha256"] is None
        assert any("No space left" in n for n in done["unsaved"]), done
        assert done["exe"] == str(exe0)  # the evidence that could not be kept is in the result (the audit)
        assert "not kept" in res.detail
        # some room (64 KiB): the record and the metadata fit, the 1.2 MiB binary does not
        disk.free(64 * 1024)
        res1 = asyncio.run(freeze_process({"target": {"pid": p1.pid}}, action_ctx(state, (p1.pid, exe1))))
        assert res1.ok, res1.detail
        assert frozen_still(p1.pid)
        rdir = Path(res1.data["frozen"][0]["record"])
        record = json.loads((rdir / "record.json").read_text())
        assert record["state"] == "frozen"
        assert record["binary_sha256"] is None
        assert "not copied" in record["binary"] or "over the forensics budget" in record["binary"], record
        assert not (rdir / "binary").exists()  # no partial copy
        assert json.loads((rdir / "metadata.json").read_text())["exe"] == str(exe1)
        # What unknown-binary-cpu verifies (and unknown-binary-kill triggers on): both read frozen by
        # heald, the first without its record (its freezer group is named after it); a process
        # only SIGSTOPped without a record is not heald's.
        collector = SecurityProcCollector(SecurityProcSettings(egress=False, learn_s=0.0, watch_files=(),
                                                               max_suspects=256), state_dir=state)
        collector.start()
        try:
            m = collector.collect().metrics
        finally:
            collector.close()
        assert m[f"sec.suspect_frozen[{p0.pid}]"] == 1
        assert m[f"sec.suspect_frozen[{p1.pid}]"] == 1
        # space back: both thaw (the first by its group's name)
        disk.free()
        for proc, exe in burners:
            thawed = asyncio.run(unfreeze_process({"target": {"pid": proc.pid}},
                                                  action_ctx(state, (proc.pid, exe))))
            assert thawed.ok, thawed.detail
            assert freezer_group(proc.pid) == "/"
            t0 = ticks(proc.pid)
            wait("running again", lambda p=proc.pid, t=t0: ticks(p) > t, 10)  # type: ignore[misc]
    finally:
        unmount(state)


# --------------------------------------------------------------------------- the audit, disk full


@pytest.mark.root
@needs_root
def test_audit_records_refused_by_a_full_disk_are_chained_late_in_order_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    mount_tmpfs(state)
    try:
        disk = Tmpfs(state)
        log = AuditLog(state / "audit.jsonl")
        handed: list[dict[str, Any]] = []
        rec = Recorder("n1", log, structlog.get_logger("test"), handed.append)

        def abandon(i: int) -> None:
            rec.record(records.RunAbandoned(playbook="p", run_id=f"r{i}", reason="test"))

        abandon(0)
        disk.fill()
        monkeypatch.setattr(records, "MAX_LATE_RECORDS", 3)
        n = 1
        while rec.held == 0:  # a tmpfs filled to the last block still takes a few bytes in the file's page
            abandon(n)
            n += 1
        first = n - 1  # the first refused
        for i in range(n, first + 200):
            abandon(i)
        last = first + 199
        assert rec.held == 3
        assert log._failures.total == 1  # a full disk is tried once a LATE_RETRY_S, not once a record
        assert [h["audit_seq"] for h in handed[first:]] == [None] * 200  # handed on at once, unchained
        disk.free()
        assert not rec.retry()  # under LATE_RETRY_S since the last try
        assert rec.retry(force=True)
        abandon(last + 1)
        log.close()
        lines = [json.loads(x) for x in (state / "audit.jsonl").read_text().splitlines()]
        assert [e["record"]["run_id"] for e in lines] == [f"r{i}" for i in range(first)] + [
            f"r{last - 2}", f"r{last - 1}", f"r{last}", f"r{last + 1}"]
        assert [e["seq"] for e in lines] == list(range(1, first + 5))
        late = [e["record"].get("late") for e in lines[first - 1:]]
        assert late[0] is None
        assert late[4] is None
        assert late[1]["lost_before"] == 197  # the oldest held, dropped to stay bounded, are counted
        assert "lost_before" not in late[2]
        assert all("No space left" in x["error"] for x in late[1:4]), late
        assert late[1]["wall"] <= late[2]["wall"] <= late[3]["wall"] < lines[first]["ts"]
        assert verify(state / "audit.jsonl").ok
    finally:
        unmount(state)


# --------------------------------------------------------------------------- the failure window, restarted


def test_the_failure_window_of_reported_sources_survives_a_restart_and_hostile_files(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    log.write_text("")
    settings = SecurityNetSettings(auth_source="files", auth_files=(str(log),), listeners=False, max_series=2)
    saved = tmp_path / "state" / "security" / "auth_window.json"

    def collector() -> SecurityNetCollector:
        c = SecurityNetCollector(settings, state_dir=tmp_path / "state")
        c.start()
        return c

    c = collector()
    assert c.collect().metrics["sec.auth_sources"] == 0
    assert not saved.exists()  # nothing failing: nothing written
    attack(log, 12)
    attack(log, 5, "192.0.2.52")
    attack(log, 1, "192.0.2.53")  # past max_series: counted, not kept
    m = c.collect().metrics
    assert m[f"sec.auth_failures[{SRC}]"] == 12
    written = saved.stat().st_mtime_ns
    c.collect()
    assert saved.stat().st_mtime_ns == written  # the same counts: not written again
    c.close()  # as after kill -9: nothing more is written at close
    again = collector()
    m = again.collect().metrics
    assert (m[f"sec.auth_failures[{SRC}]"], m["sec.auth_failures[192.0.2.52]"]) == (12, 5)
    assert m[f"sec.auth_failures_recent[{SRC}]"] == 12  # a few ms ago, still recent
    assert "sec.auth_failures[192.0.2.53]" not in m
    assert again.window.kinds(SRC) == {"failed": 12}
    again.close()
    # Saved long ago (a reboot, a stopped node): past the window, forgotten.
    doc = json.loads(saved.read_text())
    doc["wall"] -= 3600
    saved.write_text(json.dumps(doc))
    old = collector()
    assert old.collect().metrics["sec.auth_sources"] == 0
    old.close()
    # Hostile or torn files: ignored or bounded, never a crash.
    hostile = [
        "{", "[]", '{"wall": "x"}', '{"wall": 1e308, "sources": []}',
        json.dumps({"wall": time.time(), "sources": {"x" * 10_000: {"ages": [[0, 1]], "kinds": {}}}}),
        json.dumps({"wall": time.time(), "sources": {SRC: {"ages": [[-5, 1], [0, "nan"], [1e308, 1], [0]],
                                                           "kinds": {"failed": -3}}}}),
        json.dumps({"wall": time.time(), "sources": {f"2001:db8::{i:x}": {"ages": [[0, 1]] * 100}
                                                     for i in range(5000)}}),  # 2 MiB: over the cap
        json.dumps({"wall": time.time(), "sources": {f"2001:db8::{i:x}": {"ages": [[0, 1]] * 2, "kinds": {}}
                                                     for i in range(5000)}}),  # more than max_sources
    ]
    for text in hostile:
        saved.write_text(text)
        h = collector()
        m = h.collect().metrics
        assert m["sec.auth_sources"] <= settings.max_sources, text[:80]
        assert len(h.window) <= settings.max_sources
        h.close()


# --------------------------------------------------------------------------- freeze, disk full, the daemon

FREEZE_HELPER = r'''
import contextlib, json, os, signal, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_degraded_storage import Tmpfs
spec = json.loads(Path(sys.argv[1]).read_text())
work, state, FREEZER = Path(spec["work"]), Path(spec["work"]) / "state", Path("/sys/fs/cgroup/freezer")
result = {}
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
state.mkdir(exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(state)], check=True)
disk = Tmpfs(state)
miner = subprocess.Popen([spec["miner"], "-c", "while :; do :; done"])
result["miner"] = miner.pid
log = (work / "agent.log").open("wb")
agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", spec["config"]], cwd=spec["repo"],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

def wait(pred, within, tick=0.2):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(tick)
    return bool(pred())

def lines():
    out = []
    for line in (work / "agent.log").read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"event": "(not json)", "raw": line})
    return out

def audit():
    try:
        return [json.loads(x)["record"] for x in (state / "audit.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return []

def group_of(pid):
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrl, path = line.split(":", 2)
        if ctrl == "freezer":
            return path
    return ""

try:
    result["started"] = wait(lambda: any(x["event"] == "playbooks loaded" for x in lines()), 60)
    disk.fill()
    result["audit_at_fill"] = len(audit())
    result["finished"] = wait(lambda: [x for x in lines() if x["event"] == "playbook run finished"], 60)
    result["log"] = [x for x in lines() if x.get("level") in {"error", "critical"} or x["event"] in {
        "(not json)", "step finished", "verification", "playbook run finished"}]
    result["group"] = group_of(miner.pid)
    result["records_on_disk"] = [str(p) for p in state.glob("forensics/*/record.json")]
    result["audit_full"] = len(audit())
    disk.free()
    result["late"] = wait(lambda: any(r["type"] == "run.end" for r in audit()), 30)
    result["audit"] = audit()
finally:
    agent.send_signal(signal.SIGTERM)
    try:
        result["agent_rc"] = agent.wait(30)
    except subprocess.TimeoutExpired:
        agent.kill()
        result["agent_rc"] = "stalled"
    g = group_of(miner.pid)
    if g.startswith("/heald-frozen/"):
        with contextlib.suppress(OSError):
            (FREEZER / g.lstrip("/") / "freezer.state").write_text("THAWED")
            (FREEZER / "cgroup.procs").write_text(str(miner.pid))
            (FREEZER / g.lstrip("/")).rmdir()
    miner.kill()
    miner.wait(10)
    subprocess.run(["umount", str(state)], check=False)
    (work / "result.json").write_text(json.dumps(result, default=str))
'''


@pytest.mark.slow
@pytest.mark.root
@needs_freezer
def test_heald_freezes_with_the_state_dir_full_and_the_audit_catches_up(tmp_path: Path) -> None:
    """A real ``heald run`` in a private PID + mount namespace (it sees only this test's miner), its
    state dir a 2 MiB tmpfs filled before the trigger: the miner is frozen, the run is verified
    (sec.suspect_frozen reads 1 without the record the full disk refused), the step's audit record
    names what was not kept, and it is in the chain once there is room."""
    repo = Path(__file__).resolve().parents[1]
    miner = tmp_path / "bin" / "kworkerd"
    miner.parent.mkdir()
    shutil.copy2(BASH, miner)
    pbdir = tmp_path / "playbooks"
    pbdir.mkdir()
    text = (shipped_dir() / "unknown-binary-cpu.yaml").read_text()
    # shorter, a lower bar: the miner shares a loaded 2-core machine (as tests/test_security_proc.py)
    (pbdir / "unknown-binary-cpu.yaml").write_text(text.replace("for: 30s", "for: 3s").replace("value: 80",
                                                                                              "value: 25"))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[node]
id = "edge2"
[paths]
state_dir = "{tmp_path / 'state'}"
runtime_dir = "{tmp_path / 'run'}"
[log]
format = "json"
[collect.gpu]
enabled = false
[collect.security_proc]
interval_s = 1.0
egress = false
learn_s = 0
watch_files = []
authorized_keys = false
[playbooks]
dirs = ["{pbdir}"]
load_shipped = false
[model]
enabled = false
""")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"work": str(tmp_path), "repo": str(repo), "config": str(cfg),
                                "miner": str(miner)}))
    helper = tmp_path / "helper.py"
    helper.write_text(FREEZE_HELPER)
    # --kill-child: if the test is killed, the namespace's init (and all in it) dies too
    done = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc",
                           sys.executable, str(helper), str(spec), str(repo / "tests")],
                          cwd=repo, capture_output=True, text=True, timeout=240, check=False)
    assert (tmp_path / "result.json").exists(), done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    log = (tmp_path / "agent.log").read_text(errors="replace")[-4000:]
    assert result["started"], log
    assert result["audit_at_fill"] == 0, result  # an empty audit file: no page of it has room left
    assert result["finished"], log
    assert result["group"].startswith("/heald-frozen/"), result
    assert result["records_on_disk"] == [], result
    assert result["audit_full"] == 0, result
    assert not [x for x in result["log"] if x["event"] == "(not json)"], result["log"]
    assert result["late"], log
    recs = [r for r in result["audit"] if r.get("playbook") == "unknown-binary-cpu"]
    assert shape(recs) == [("run.start",), ("step", "done", True), ("verify", True),
                           ("run.end", "succeeded")], recs
    assert all("No space left" in r["late"]["error"] for r in recs), recs
    (frozen,) = recs[1]["data"]["frozen"]
    assert frozen["pid"] == result["miner"]
    assert frozen["exe"] == str(miner)
    assert any("No space left" in u for u in frozen["unsaved"]), frozen
    assert result["agent_rc"] == 0, log
