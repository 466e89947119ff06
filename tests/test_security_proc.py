"""Security self-healing, process side (issue 22): the security_proc collector, freeze_process, and
the shipped playbooks against real processes.

* The collector, on this host's /proc, looking only at processes the test starts: a copy of bash
  burning CPU from a temp path is a suspect with its CPU share; a binary outside the trusted
  prefixes is ``unknown_hash`` once the learning window is over, learned inside it, exempt by
  ``allow_sha256``; the baseline persists; watched authorized_keys changes are events, including
  a change made while the collector was stopped.
* freeze_process / unfreeze_process on the test's own child: forensics (same sha256 as the
  binary, metadata without environment values), frozen (the freezer group FROZEN, no CPU
  progress), thawed; never PID 1, heald itself (this process) or a protected name.
* ``heald run`` in enforce mode in a private PID + mount namespace (this file is also the helper
  that runs there: ``python3 tests/test_security_proc.py SPEC.json``):
  - cpu: a CPU-burning bash copy in a temp path is frozen by unknown-binary-cpu (the agent is
    killed -9 as the freeze starts and restarted: the freeze stands, with its record), a
    protected one (named sshd) is never frozen; the kill waits for a signed approval from the
    coordinator (a stand-in on a real mosquitto) and then happens; a change to a watched
    authorized_keys reaches the audit as an escalation;
  - egress: in a private network namespace too, a bash copy in a temp path connects to a
    receiver in a second namespace over a veth pair, trickles, then bursts: egress-burst
    freezes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BASH = shutil.which("bash") or "/bin/bash"
FREEZER = Path("/sys/fs/cgroup/freezer")
BURN = "while :; do :; done"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def _ticks(pid: int) -> int:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def _freezer_group(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrl, path = line.split(":", 2)
        if ctrl == "freezer":
            return path
    return ""


def _thaw_ours(state: Path) -> None:
    """Thaw and remove the freezer groups heald made for this test (named in its records)."""
    for rec in state.glob("forensics/*/record.json"):
        with contextlib.suppress(OSError, ValueError):
            group = Path(json.loads(rec.read_text()).get("group") or "")
            if str(group).startswith(str(FREEZER)) and group.is_dir():
                (group / "freezer.state").write_text("THAWED")
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (FREEZER / "cgroup.procs").write_text(pid)
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), signal.SIGKILL)
                for _ in range(50):
                    try:
                        group.rmdir()
                        break
                    except OSError:
                        time.sleep(0.1)
    with contextlib.suppress(OSError):  # the parent, unless another agent's freeze holds it
        (FREEZER / "heald-frozen").rmdir()


def _audit(state: Path) -> list[dict[str, Any]]:
    try:
        text = (state / "audit.jsonl").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            out.append(json.loads(line)["record"])
    return out


# ============================================================================ helper (namespace)
def _wait(pred: Any, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def _records(state: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for rec in state.glob("forensics/*/record.json"):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(rec.read_text())
            out[int(doc["pid"])] = doc | {"dir": str(rec.parent)}
    return out


def _start_agent(spec: dict[str, Any], log_name: str) -> subprocess.Popen[bytes]:
    work = Path(spec["work"])
    with (work / log_name).open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", spec["config"]],
                                cwd=spec["repo"], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=dict(os.environ))


def _helper_cpu(spec: dict[str, Any], result: dict[str, Any], procs: Procs) -> None:
    work, state = Path(spec["work"]), Path(spec["work"]) / "state"
    miner_bin, sshd_bin = Path(spec["miner"]), Path(spec["sshd"])
    miner = subprocess.Popen([str(miner_bin), "-c", BURN])
    sshd = subprocess.Popen([str(sshd_bin), "-c", BURN])
    procs += [miner, sshd]
    result |= {"miner": miner.pid, "sshd": sshd.pid}
    agent = _start_agent(spec, "agent1.log")
    procs.append(agent)
    # kill -9 the agent as soon as its freeze of the miner has begun (the record comes first)
    result["record_before_kill"] = _wait(lambda: miner.pid in _records(state), 90, 0.02)
    agent.kill()
    agent.wait()
    result["state_at_kill"] = _records(state).get(miner.pid, {}).get("state")
    agent = _start_agent(spec, "agent2.log")
    procs.append(agent)
    result["agent_pid"] = agent.pid
    # the same verdict after the restart: frozen, in the group its record names (the record may
    # still say "freezing" when the kill came between the freeze and the record's last write)
    def frozen_as_recorded() -> bool:
        rec = _records(state).get(miner.pid, {})
        group = str(rec.get("group") or "")
        return rec.get("state") in {"freezing", "frozen"} and group.endswith(_freezer_group(miner.pid)) \
            and _freezer_group(miner.pid).startswith("/heald-frozen/") \
            and Path(group, "freezer.state").read_text().strip() == "FROZEN"

    frozen = _wait(frozen_as_recorded, 60)
    result["frozen"] = frozen
    if frozen:
        group = Path(_records(state)[miner.pid]["group"])
        result["freezer_state"] = (group / "freezer.state").read_text().strip()
        t0 = _ticks(miner.pid)
        time.sleep(1.5)
        result["ticks_while_frozen"] = _ticks(miner.pid) - t0
    result["miner_state"] = _state(miner.pid)
    rec = _records(state).get(miner.pid, {})
    result["record"] = rec
    binary = Path(rec.get("dir", "/nonexistent")) / "binary"
    result["forensics_sha"] = _sha(binary) if binary.exists() else None
    result["miner_sha"] = _sha(miner_bin)
    # a watched authorized_keys changes while the agent runs
    time.sleep(2)
    with Path(spec["authorized_keys"]).open("a") as fh:
        fh.write("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIntruderKeyForTheTestOnly intruder@example\n")
    (work / "phase1.json").write_text(json.dumps(result))
    # the kill waits for the test's signed approval: the miner must still be there until then
    _wait(lambda: (work / "approving").exists() or _state(miner.pid) in {"gone", "Z"}, 120)
    result["alive_until_approval"] = (work / "approving").exists() and _state(miner.pid) not in {"gone", "Z"}
    (work / "approval-go").write_text("")  # the test sends the signed approval only now
    result["killed"] = _wait(lambda: _state(miner.pid) in {"gone", "Z"}, 60)
    with contextlib.suppress(subprocess.TimeoutExpired):
        miner.wait(5)
    result["miner_returncode"] = miner.returncode
    # The thaw moves the process out of the frozen group (the pending SIGKILL lands: it is gone),
    # then removes the group and only then updates the record: give it that moment.
    _wait(lambda: _records(state).get(miner.pid, {}).get("state") == "thawed", 15)
    after = _records(state).get(miner.pid, {})
    result["record_after_kill"] = after.get("state")
    result["group_left"] = bool(after.get("group")) and Path(after["group"]).exists()
    result["sshd_state"] = _state(sshd.pid)
    result["sshd_group"] = _freezer_group(sshd.pid) if _state(sshd.pid) != "gone" else ""
    result["agent_state"] = _state(agent.pid)
    result["agent_group"] = _freezer_group(agent.pid)
    _wait(lambda: any(r.get("type") == "run.end" and r.get("playbook") == "watched-file-changed"
                      for r in _audit(state)), 30)


Procs = list[subprocess.Popen[bytes]]


def _helper_egress(spec: dict[str, Any], result: dict[str, Any], procs: Procs) -> None:
    state = Path(spec["work"]) / "state"
    ip = ["ip"]
    for argv in (["link", "set", "lo", "up"], ["netns", "add", "h4rx"],
                 ["link", "add", "h4a", "type", "veth", "peer", "name", "h4b"],
                 ["link", "set", "h4b", "netns", "h4rx"],
                 ["addr", "add", "10.213.0.1/30", "dev", "h4a"], ["link", "set", "h4a", "up"],
                 ["netns", "exec", "h4rx", "ip", "addr", "add", "10.213.0.2/30", "dev", "h4b"],
                 ["netns", "exec", "h4rx", "ip", "link", "set", "h4b", "up"],
                 ["netns", "exec", "h4rx", "ip", "link", "set", "lo", "up"]):
        subprocess.run([*ip, *argv], check=True)
    receiver = subprocess.Popen(["ip", "netns", "exec", "h4rx", sys.executable, "-c", (
        "import socket, threading\n"
        "s = socket.create_server(('10.213.0.2', 9555))\n"
        "def drain(c):\n"
        "    while c.recv(1 << 20): pass\n"
        "while True:\n"
        "    c, _ = s.accept(); threading.Thread(target=drain, args=(c,), daemon=True).start()\n")])
    procs.append(receiver)
    time.sleep(1)
    agent = _start_agent(spec, "agent1.log")
    procs.append(agent)
    time.sleep(4)
    # connect, trickle for a while (its own average: ~0), then burst
    script = ('exec 3<>/dev/tcp/10.213.0.2/9555; for i in $(seq 8); do echo tick >&3; sleep 1; done; '
              'b=$(printf "%065536d" 0); while :; do printf "%s" "$b" >&3; done')
    result["sender_started"] = time.time()
    sender = subprocess.Popen([spec["sender"], "-c", script])
    procs.append(sender)
    result["sender"] = sender.pid
    result["frozen"] = _wait(lambda: _records(state).get(sender.pid, {}).get("state") == "frozen", 60)
    result["sender_state"] = _state(sender.pid)
    result["sender_group"] = _freezer_group(sender.pid)
    rec = _records(state).get(sender.pid, {})
    result["record"] = rec
    meta = Path(rec.get("dir", "/nonexistent")) / "metadata.json"
    result["metadata"] = json.loads(meta.read_text()) if meta.exists() else {}


def _helper(spec_path: str) -> int:
    spec: dict[str, Any] = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"])
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)  # the agent's runtime_dir
    result: dict[str, Any] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if spec["scenario"] == "cpu":
            _helper_cpu(spec, result, procs)
        else:
            _helper_egress(spec, result, procs)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for p in reversed(procs):
            if p.poll() is None and p.args[:3] == [sys.executable, "-m", "agent"]:
                p.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(20)
        _thaw_ours(work / "state")
        for p in procs:
            with contextlib.suppress(OSError):
                p.kill()
        result["audit"] = _audit(work / "state")
        (work / "result.json").write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_helper(sys.argv[1]))


# ============================================================================ tests
import paho.mqtt.client as mqtt  # noqa: E402 - the helper above runs without the test dependencies
import pytest  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from agent import wire  # noqa: E402
from agent.act.actions.freeze import freeze_process, unfreeze_process  # noqa: E402
from agent.act.base import ActionContext, ActionResult  # noqa: E402
from agent.act.supervisor import Supervisor  # noqa: E402
from agent.collect.security_proc import SecurityProcCollector, parse_ss  # noqa: E402
from agent.collect.settings import SecurityProcSettings  # noqa: E402
from agent.decide.settings import PlaybookSettings  # noqa: E402
from agent.wire import signing  # noqa: E402

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroup freezer, namespaces)")
needs_freezer = pytest.mark.skipif(not (FREEZER / "cgroup.procs").exists(), reason="no v1 freezer mounted")


@pytest.fixture
def burner(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A copy of bash in a temp path burning a CPU, killed (and thawed) at the end."""
    exe = tmp_path / "bin" / "kworkerd"
    exe.parent.mkdir()
    shutil.copy2(BASH, exe)
    proc = subprocess.Popen([str(exe), "-c", BURN])
    try:
        yield proc, exe
    finally:
        _thaw_ours(tmp_path / "state")
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def _collector(tmp_path: Path, **kw: Any) -> SecurityProcCollector:
    settings = SecurityProcSettings(**({"egress": False, "learn_s": 0.0, "watch_files": ()} | kw))
    c = SecurityProcCollector(settings, state_dir=tmp_path / "state")
    c.start()
    return c


def _row(reading: Any, pid: int) -> dict[str, Any] | None:
    return next((r for r in reading.detail["suspects"] if r["pid"] == pid), None)


def test_temp_path_burner_is_a_suspect_with_its_cpu(tmp_path: Path, burner: tuple[Any, Path]) -> None:
    proc, exe = burner
    c = _collector(tmp_path, max_suspects=256)
    c.collect()
    time.sleep(1.0)
    r = c.collect()
    row = _row(r, proc.pid)
    assert row is not None, r.detail
    assert "temp_path" in row["reasons"]
    assert row["sha256"] == _sha(exe)
    assert row["exe"] == str(exe)
    assert row["cpu_pct"] > 30, row  # a busy loop; generous for a shared CPU
    assert r.metrics[f"sec.suspect_cpu_pct[{proc.pid}]"] == row["cpu_pct"]
    assert r.metrics[f"sec.suspect_frozen[{proc.pid}]"] == 0.0
    assert _row(r, os.getpid()) is None  # the collector's own process is never listed
    try:  # where PID 1's executable is not ours to read (another user namespace), it is counted
        os.readlink("/proc/1/exe")
    except PermissionError:
        assert r.metrics["sec.exe_unreadable"] >= 1
    else:
        assert r.metrics["sec.exe_unreadable"] >= 0
    # deleted after it started: still hashed (through /proc/PID/exe), and says so
    exe.unlink()
    r = c.collect()
    row = _row(r, proc.pid)
    assert row is not None
    assert "deleted" in row["reasons"]
    assert row["sha256"] is not None
    # stopped by someone else (a shell's Ctrl-Z): not heald's freeze, not offered for a kill
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert _wait(lambda: _state(proc.pid) == "T", 5)
        assert c.collect().metrics[f"sec.suspect_frozen[{proc.pid}]"] == 0.0
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # frozen by heald (its record in the same state dir): the kill playbook's trigger
    row = _row(c.collect(), proc.pid)
    assert row is not None
    res = _act(freeze_process, {"target": {"pid": proc.pid}, "method": "sigstop"},
               _ctx(tmp_path, (proc.pid, Path(row["exe"]))))
    assert res.ok, res.detail
    assert c.collect().metrics[f"sec.suspect_frozen[{proc.pid}]"] == 1.0
    assert _act(unfreeze_process, {"target": {"pid": proc.pid}}, _ctx(tmp_path)).ok
    assert c.collect().metrics[f"sec.suspect_frozen[{proc.pid}]"] == 0.0  # thawed: the record says so


def test_unknown_hash_is_learned_then_reported_and_persisted(tmp_path: Path) -> None:
    home = tmp_path / "opt-like"
    home.mkdir(mode=0o755)
    exe = home / "tool"
    shutil.copy2(BASH, exe)
    proc = subprocess.Popen([str(exe), "-c", "sleep 30; exit 0"])  # bash stays (no exec)
    try:
        plain: dict[str, Any] = {"temp_dirs": (), "world_writable": False, "max_suspects": 256}
        # inside the learning window: learned, not reported
        learning = _collector(tmp_path, learn_s=3600.0, **plain)
        assert _row(learning.collect(), proc.pid) is None
        learning.close()
        # the baseline persisted: a new collector, its learning over, knows the hash
        knows = _collector(tmp_path, **plain)
        assert _row(knows.collect(), proc.pid) is None
        doc = json.loads((tmp_path / "state" / "security" / "baseline.json").read_text())
        assert _sha(exe) in doc["hashes"]
        # a fresh node (another state dir) that has not learned it: unknown_hash
        other = SecurityProcCollector(
            SecurityProcSettings(egress=False, learn_s=0.0, watch_files=(), **plain),
            state_dir=tmp_path / "other")
        other.start()
        row = _row(other.collect(), proc.pid)
        assert row is not None
        assert row["reasons"] == ["unknown_hash"]
        # allow_sha256 exempts it
        allowed = SecurityProcCollector(SecurityProcSettings(
            egress=False, learn_s=0.0, watch_files=(), allow_sha256=(_sha(exe),), **plain),
            state_dir=tmp_path / "third")
        allowed.start()
        assert _row(allowed.collect(), proc.pid) is None
        # in a trusted prefix: never hashed, never a suspect
        trusted = _collector(tmp_path / "t", trusted_prefixes=(str(home) + "/",), **plain)
        assert _row(trusted.collect(), proc.pid) is None
    finally:
        proc.kill()
        proc.wait()


def test_watched_authorized_keys(tmp_path: Path) -> None:
    home = tmp_path / "home" / "alice"
    (home / ".ssh").mkdir(parents=True)
    keys = home / ".ssh" / "authorized_keys"
    keys.write_text("ssh-ed25519 AAAA alice@laptop\n")
    passwd = tmp_path / "passwd"
    passwd.write_text(f"root:x:0:0:root:/nonexistent-root:/bin/sh\nalice:x:1000:1000::{home}:/bin/sh\n"
                      "garbage line without fields\n")
    sudoers = tmp_path / "sudoers.d"
    sudoers.mkdir()
    settings = {"passwd_file": str(passwd), "watch_files": (str(sudoers),), "files_interval_s": 0.001}
    c = _collector(tmp_path, **settings)
    first = c.collect()
    assert first.events == []  # the first pass learns
    assert first.metrics["sec.files_watched"] == 1.0
    keys.write_text(keys.read_text() + "ssh-rsa AAAA intruder\n")
    (sudoers / "90-intruder").write_text("intruder ALL=(ALL) NOPASSWD: ALL\n")
    got = {(e.labels["path"], e.labels["change"]) for e in c.collect().events}
    assert got == {(str(keys), "modified"), (str(sudoers / "90-intruder"), "created")}
    assert c.collect().events == []  # reported once
    # hostile but valid: a FIFO in a watched directory (never opened blocking, never reported),
    # a huge authorized_keys (one MiB read; growing it past that is still a change)
    os.mkfifo(sudoers / "fifo")
    keys.write_bytes(b"ssh-rsa AAAA x\n" * 300_000)
    assert [(e.labels["path"], e.labels["change"]) for e in c.collect().events] == [(str(keys), "modified")]
    with keys.open("ab") as fh:
        fh.write(b"ssh-ed25519 AAAA appended-past-the-first-mib\n")
    assert [(e.labels["path"], e.labels["change"]) for e in c.collect().events] == [(str(keys), "modified")]
    c.close()
    # changed while heald was stopped: reported at the next start
    keys.unlink()
    again = _collector(tmp_path, **settings)
    events = again.collect().events
    assert [(e.kind, e.labels["path"], e.labels["change"]) for e in events] == [
        ("sec.file_changed", str(keys), "removed")]


def test_hostile_paths_and_a_torn_baseline(tmp_path: Path) -> None:
    """An executable whose name holds a newline, ']' and 200 more bytes; a baseline file that is
    garbage, then valid JSON of the wrong shapes: the collector copes, reports, never raises."""
    odd = tmp_path / ("we ird]\n[name" + "x" * 200)
    shutil.copy2(BASH, odd)
    proc = subprocess.Popen([str(odd), "-c", "sleep 30; exit 0"])
    base = tmp_path / "state" / "security" / "baseline.json"
    base.parent.mkdir(parents=True)
    try:
        for text in ("{not json", '["a list"]', '{"hashes": {"zz": "nan", "%s": 1e999}, "files": 7, '
                     '"created": "yesterday"}' % ("a" * 64)):
            base.write_text(text)
            c = _collector(tmp_path, max_suspects=256)
            c._dirty = True  # make close() write what it kept, to check it
            r = c.collect()
            row = _row(r, proc.pid)
            assert row is not None, text
            assert row["exe"] == str(odd)[:256]
            assert f"sec.suspect_cpu_pct[{proc.pid}]" in r.metrics
            c.close()
            assert "Infinity" not in base.read_text()
            json.loads(base.read_text())
    finally:
        proc.kill()
        proc.wait()


def test_parse_ss_sockets() -> None:
    text = ("ESTAB 0 0 10.0.0.1:40000 10.0.0.2:443 ino:111 sk:1 cgroup:/ <->\n"
            "\t cubic wscale:7,7 rto:204 bytes_sent:5000 bytes_acked:4000 bytes_received:10\n"
            "ESTAB 0 0 127.0.0.1:5000 127.0.0.1:6000 ino:222 sk:2 <->\n"
            "\t cubic bytes_acked:99\n"
            "ESTAB 0 0 [::ffff:10.0.0.1]:22 [::ffff:127.0.0.1]:555 ino:333 sk:3 <->\n"
            "\t cubic\n"
            "ESTAB 0 0 [2001:db8::1]:22 [2001:db8::2]:555 ino:444 sk:4 <->\n"
            "\t bytes_acked:notanumber\n")
    assert parse_ss(text) == {111: (False, 4000), 222: (True, 99), 333: (True, 0), 444: (False, 0)}


def _act(fn: Any, params: dict[str, Any], ctx: ActionContext) -> ActionResult:
    result: ActionResult = asyncio.run(fn(params, ctx))
    return result


def _ctx(tmp_path: Path, *suspects: tuple[int, Path], dry: bool = False) -> ActionContext:
    """An action context whose latest sample lists ``suspects`` (pid, executable) as the collector would."""
    sup = Supervisor(lambda coro, name: asyncio.get_running_loop().create_task(coro, name=name),
                     lambda *_: None)
    rows = [{"pid": pid, "exe": str(exe), "reasons": ["temp_path"]} for pid, exe in suspects]
    return ActionContext(settings=PlaybookSettings(), node="n1", playbook="pb", run_id="r1",
                         dry_run=dry, supervisor=sup, emit=lambda e: None, bindings={"pid": "x"},
                         detail={"security_proc": {"suspects": rows}}, state_dir=tmp_path / "state")


@root_only
@needs_freezer
def test_freeze_keeps_evidence_and_thaws(tmp_path: Path, burner: tuple[Any, Path]) -> None:
    proc, exe = burner
    dry = _act(freeze_process, {"target": {"pid": proc.pid}}, _ctx(tmp_path, (proc.pid, exe), dry=True))
    assert dry.ok
    assert "would copy the binary" in dry.detail
    assert _state(proc.pid) in {"R", "S"}
    assert not (tmp_path / "state" / "forensics").exists()
    for ctx in (_ctx(tmp_path), _ctx(tmp_path, (proc.pid, tmp_path / "other-binary"))):
        refused = _act(freeze_process, {"target": {"pid": proc.pid}}, ctx)
        assert not refused.ok
        assert "not a suspect in the latest sample" in refused.detail
    assert _state(proc.pid) in {"R", "S"}
    res = _act(freeze_process, {"target": {"pid": proc.pid}}, _ctx(tmp_path, (proc.pid, exe)))
    assert res.ok, res.detail
    rec_dir = Path(res.data["frozen"][0]["record"])
    record = json.loads((rec_dir / "record.json").read_text())
    assert record["state"] == "frozen"
    assert record["method"] == "cgroup-v1-freezer"
    assert _freezer_group(proc.pid) == f"/heald-frozen/{rec_dir.name}"
    assert Path(record["group"], "freezer.state").read_text().strip() == "FROZEN"
    assert _sha(rec_dir / "binary") == _sha(exe) == record["binary_sha256"]
    meta = json.loads((rec_dir / "metadata.json").read_text())
    assert meta["exe"] == str(exe)
    assert meta["cmdline"] == f"{exe} -c {BURN}"
    assert "PATH" in meta["environ_keys"]
    assert os.environ["PATH"] not in json.dumps(meta)  # the burner's PATH is ours: names only, no values
    assert meta["parents"][0]["pid"] == os.getpid()
    t0 = _ticks(proc.pid)
    time.sleep(1.0)
    assert _ticks(proc.pid) == t0  # frozen: no CPU at all
    # SIGCONT from an accomplice does not wake it: the freezer holds it
    os.kill(proc.pid, signal.SIGCONT)
    time.sleep(0.5)
    assert _ticks(proc.pid) == t0
    # again (a repeat after a crash): the same record, the evidence not copied twice
    again = _act(freeze_process, {"target": {"pid": proc.pid}}, _ctx(tmp_path, (proc.pid, exe)))
    assert again.ok
    assert len(list((tmp_path / "state" / "forensics").iterdir())) == 1
    thawed = _act(unfreeze_process, {"target": {"pid": proc.pid}}, _ctx(tmp_path, (proc.pid, exe)))
    assert thawed.ok, thawed.detail
    assert json.loads((rec_dir / "record.json").read_text())["state"] == "thawed"
    assert not Path(record["group"]).exists()
    assert _freezer_group(proc.pid) == "/"
    assert _wait(lambda: _ticks(proc.pid) > t0, 10)  # running again


@root_only
def test_sigstop_method_stops_in_state_t(tmp_path: Path, burner: tuple[Any, Path]) -> None:
    """Where there is no freezer (or method: sigstop): SIGSTOP alone, state T, the record says so."""
    proc, exe = burner
    params = {"target": {"pid": proc.pid}, "method": "sigstop"}
    res = _act(freeze_process, params, _ctx(tmp_path, (proc.pid, exe)))
    assert res.ok, res.detail
    assert _state(proc.pid) == "T"
    record = json.loads((Path(res.data["frozen"][0]["record"]) / "record.json").read_text())
    assert (record["state"], record["method"], record["group"]) == ("frozen", "sigstop", "")
    assert _freezer_group(proc.pid) == "/"
    assert _act(unfreeze_process, {"target": {"pid": proc.pid}}, _ctx(tmp_path, (proc.pid, exe))).ok
    assert _wait(lambda: _state(proc.pid) in {"R", "S"}, 5)


@root_only
@needs_freezer
def test_unfreeze_without_its_record_thaws_by_the_group_name(
        tmp_path: Path, burner: tuple[Any, Path]) -> None:
    proc, exe = burner
    res = _act(freeze_process, {"target": {"pid": proc.pid}}, _ctx(tmp_path, (proc.pid, exe)))
    assert res.ok, res.detail
    rec_dir = Path(res.data["frozen"][0]["record"])
    group = Path(json.loads((rec_dir / "record.json").read_text())["group"])
    shutil.rmtree(rec_dir)  # lost (a wiped state dir)
    t0 = _ticks(proc.pid)
    thawed = _act(unfreeze_process, {"target": {"pid": proc.pid}}, _ctx(tmp_path))
    assert thawed.ok
    assert "no record: thawing" in json.dumps(thawed.data)
    assert not group.exists()
    assert _freezer_group(proc.pid) == "/"
    assert _wait(lambda: _ticks(proc.pid) > t0, 10)


@root_only
@needs_freezer
def test_frozen_process_dies_on_kill_then_thaw(tmp_path: Path, burner: tuple[Any, Path]) -> None:
    proc, exe = burner
    assert (_act(freeze_process, {"target": {"pid": proc.pid}}, _ctx(tmp_path, (proc.pid, exe)))).ok
    os.kill(proc.pid, signal.SIGKILL)  # what unknown-binary-kill's first step does
    time.sleep(0.5)
    assert proc.poll() is None  # pending while frozen
    assert (_act(unfreeze_process, {"target": {"pid": proc.pid}}, _ctx(tmp_path, (proc.pid, exe)))).ok
    assert proc.wait(10) == -signal.SIGKILL


@root_only
def test_freeze_refuses_pid1_itself_and_protected(tmp_path: Path) -> None:
    for pid in (1, os.getpid()):
        try:
            exe = Path(os.readlink(f"/proc/{pid}/exe"))
        except OSError:  # PID 1 of another user namespace
            exe = Path("/sbin/init")
        listed = _ctx(tmp_path, (pid, exe))  # even when listed as a suspect
        res = _act(freeze_process, {"target": {"pid": pid}}, listed)
        assert not res.ok
        assert "no process matched" in res.detail
    exe = tmp_path / "sshd"
    shutil.copy2(BASH, exe)
    proc = subprocess.Popen([str(exe), "-c", "sleep 30; exit 0"])  # bash stays (no exec)
    try:
        res = _act(freeze_process, {"target": {"pid": proc.pid}}, _ctx(tmp_path, (proc.pid, exe)))
        assert not res.ok
        assert "protected process (sshd)" in res.detail
        assert _state(proc.pid) in ("S", "R")  # sleeping or (just started) running: not stopped (T)
        assert not (tmp_path / "state" / "forensics").exists()
    finally:
        proc.kill()
        proc.wait()


@root_only
@needs_freezer
def test_the_undo_commands_in_docs_security_md_work(tmp_path: Path, burner: tuple[Any, Path]) -> None:
    """The sh block under "Process side: how to undo", run as written on a freeze of our own child."""
    doc = (REPO / "docs" / "security.md").read_text()
    block = doc.split("## Process side: how to undo", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    proc, exe = burner
    res = _act(freeze_process, {"target": {"pid": proc.pid}}, _ctx(tmp_path, (proc.pid, exe)))
    assert res.ok, res.detail
    record = json.loads((Path(res.data["frozen"][0]["record"]) / "record.json").read_text())
    lines = block.strip().splitlines()
    assert lines[0] == "G=/sys/fs/cgroup/freezer/heald-frozen/PID-STARTTIME"
    script = "\n".join([f"G={record['group']}", *lines[1:]])
    t0 = _ticks(proc.pid)
    subprocess.run(["sh", "-e", "-c", script], check=True)
    assert not Path(record["group"]).exists()
    assert _freezer_group(proc.pid) == "/"
    assert _wait(lambda: _ticks(proc.pid) > t0, 10)


# ----------------------------------------------------------------------------- heald run, namespaces
class Coordinator:
    """A stand-in coordinator on a real mosquitto: collects events, grants leases, signs commands."""

    def __init__(self, port: int, signer: signing.CommandSigner) -> None:
        self.signer = signer
        self.events: list[wire.Event] = []
        self.acks: list[wire.CommandAck] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on
        self.client.suppress_exceptions = True
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("heald/v1/#", qos=1)
        self.client.loop_start()

    def _on(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            m = wire.decode(msg.payload)
        except wire.WireError:
            return
        with self.lock:
            if isinstance(m, wire.CommandAck):
                self.acks.append(m)
            elif isinstance(m, wire.Event):
                self.events.append(m)
                if m.name == "lease_request":
                    answer = self.signer.make(node=m.node, site=m.site, name="lease_grant", args={
                        "request_id": m.labels["request_id"], "playbook": m.labels["playbook"],
                        "reason": "test", "lease_id": "L1"})
                    self.send(answer)

    def send(self, cmd: wire.Command) -> None:
        self.client.publish(wire.topic_for(cmd.site, cmd.node, "command"), wire.encode(cmd), qos=1)

    def approval_request(self, playbook: str) -> wire.Event | None:
        with self.lock:
            return next((e for e in self.events if e.name == "approval_request"
                         and e.labels.get("playbook") == playbook), None)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _playbooks(dst: Path, names: list[str], shorten: dict[str, str]) -> None:
    dst.mkdir()
    for name in names:
        text = (REPO / "remediations" / f"{name}.yaml").read_text()
        for a, b in shorten.items():
            text = text.replace(a, b)
        (dst / f"{name}.yaml").write_text(text)


def _config(tmp_path: Path, extra: str) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[node]
id = "n1"
site = "lab"
[paths]
state_dir = "{tmp_path / 'state'}"
[collect.gpu]
enabled = false
[collect.security_proc]
interval_s = 1.0
timeout_s = 1.0
egress_interval_s = 1.0
files_interval_s = 1.0
learn_s = 0
[playbooks]
dirs = ["{tmp_path / 'playbooks.d'}"]
load_shipped = false
{extra}
""")
    return cfg


def _run_ns(tmp_path: Path, spec: dict[str, Any], *, net: bool) -> subprocess.Popen[bytes]:
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    # --kill-child: if the test kills unshare, the namespace's init (and so all in it) dies too
    argv = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc",
            *(["--net"] if net else []),
            sys.executable, str(Path(__file__).resolve()), str(tmp_path / "spec.json")]
    with (tmp_path / "helper.log").open("wb") as log:
        return subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(tmp_path.glob("*.log")))


@root_only
@needs_freezer
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_heald_freezes_a_miner_and_kills_it_only_after_approval(tmp_path: Path, mosquitto: Any) -> None:
    key = Ed25519PrivateKey.generate()
    signer = signing.CommandSigner(key, issuer="test-coordinator")
    bins = tmp_path / "bins"  # below /tmp: a temp path
    bins.mkdir()
    shutil.copy2(BASH, bins / "xmrig")
    shutil.copy2(BASH, bins / "sshd")  # protected by name: suspicious, busy, never frozen
    home = tmp_path / "home" / "bob"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA bob@laptop\n")
    (tmp_path / "passwd").write_text(f"bob:x:1000:1000::{home}:/bin/sh\n")
    names = ["unknown-binary-cpu", "unknown-binary-kill", "watched-file-changed"]
    _playbooks(tmp_path / "playbooks.d", names,
               # shorter, and a lower bar: two busy loops share this (loaded, 2-core) CI machine
               {"for: 30s": "for: 3s", "for: 5s": "for: 2s", "value: 80": "value: 25"})
    cfg = _config(tmp_path, f"""
[mqtt]
enabled = true
port = {mosquitto.port}
[coordinator]
public_keys = ["{signing.public_key_text(key.public_key())}"]
""")
    cfg.write_text(cfg.read_text().replace(
        "learn_s = 0\n", f'learn_s = 0\npasswd_file = "{tmp_path / "passwd"}"\nwatch_files = []\n'))
    spec = {"scenario": "cpu", "work": str(tmp_path), "repo": str(REPO), "config": str(cfg),
            "miner": str(bins / "xmrig"), "sshd": str(bins / "sshd"),
            "authorized_keys": str(home / ".ssh" / "authorized_keys")}
    coord = Coordinator(mosquitto.port, signer)
    helper = _run_ns(tmp_path, spec, net=False)
    try:
        assert _wait(lambda: (tmp_path / "phase1.json").exists() or helper.poll() is not None, 240), \
            _logs(tmp_path)
        phase1 = json.loads((tmp_path / "phase1.json").read_text())
        assert phase1.get("frozen"), (phase1, _logs(tmp_path))
        # the kill playbook asks; nothing is killed until the signed approval
        assert _wait(lambda: coord.approval_request("unknown-binary-kill") is not None, 60), _logs(tmp_path)
        request = coord.approval_request("unknown-binary-kill")
        assert request is not None
        time.sleep(2)
        assert request.labels["pid"] == str(phase1["miner"])  # the miner, as the namespace numbers it
        (tmp_path / "approving").write_text("yes")
        assert _wait((tmp_path / "approval-go").exists, 30)
        args = {"playbook": "unknown-binary-kill", "request_id": request.labels["request_id"]}
        approve = signer.make(node="n1", site="lab", name="approve", args=args)
        coord.send(approve)
        helper.wait(200)
    finally:
        coord.close()
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        _thaw_ours(tmp_path / "state")
    result = json.loads((tmp_path / "result.json").read_text())
    assert "error" not in result, (result.get("error"), _logs(tmp_path))
    # killed -9 as the freeze began; the restarted agent kept (or completed) it, with its record
    assert result["record_before_kill"]
    assert result["state_at_kill"] in {"freezing", "frozen"}
    assert result["frozen"]
    assert result["freezer_state"] == "FROZEN"
    assert result["ticks_while_frozen"] == 0
    assert result["forensics_sha"] == result["miner_sha"]
    # killed only after the approval, by it
    assert result["alive_until_approval"], result
    assert result["killed"], _logs(tmp_path)
    assert result["miner_returncode"] == -signal.SIGKILL
    assert result["record_after_kill"] == "thawed"  # the record follows the process to its end
    assert not result["group_left"]
    audit = result["audit"]
    approved = [r for r in audit if r.get("type") == "run.start"
                and r.get("playbook") == "unknown-binary-kill"]
    assert approved, [r.get("type") for r in audit]
    assert all(r.get("trigger") == "approved" for r in approved), approved
    # the protected process and heald itself were never frozen; the refusal escalated
    refused = [r for r in audit if r.get("type") == "step" and r.get("action") == "freeze_process"
               and "protected process (sshd)" in r.get("detail", "")]
    assert refused, [r.get("detail") for r in audit if r.get("type") == "step"]
    assert not refused[0]["ok"]
    assert any(r.get("type") == "escalate" and r.get("run_id") == refused[0]["run_id"] for r in audit)
    assert result["sshd_state"] in {"R", "S"}
    assert result["sshd_group"] == "/"
    assert result["agent_group"] == "/"
    # every freeze has its record: none left frozen without one
    recs = list((tmp_path / "state" / "forensics").glob("*/record.json"))
    assert [json.loads(r.read_text())["pid"] for r in recs] == [result["miner"]]
    # the watched authorized_keys change reached the audit: an escalation.* event to the coordinator
    told = [r for r in audit if r.get("type") == "step" and r.get("playbook") == "watched-file-changed"]
    assert told, [(r.get("type"), r.get("playbook")) for r in audit]
    assert told[0]["ok"]
    assert told[0]["detail"] == "published escalation.security.file_changed"
    starts = [r for r in audit if r.get("type") == "run.start"
              and r.get("playbook") == "watched-file-changed"]
    assert starts[0]["bindings"] == {"path": spec["authorized_keys"], "change": "modified"}


@root_only
@needs_freezer
@pytest.mark.slow
def test_heald_freezes_an_egress_burst_from_a_temp_binary(tmp_path: Path) -> None:
    if shutil.which("ss") is None or shutil.which("ip") is None:
        pytest.skip("needs ss and ip (iproute2)")
    bins = tmp_path / "bins"
    bins.mkdir()
    shutil.copy2(BASH, bins / "updater")
    _playbooks(tmp_path / "playbooks.d", ["egress-burst"], {})
    cfg = _config(tmp_path, "")
    spec = {"scenario": "egress", "work": str(tmp_path), "repo": str(REPO), "config": str(cfg),
            "sender": str(bins / "updater")}
    helper = _run_ns(tmp_path, spec, net=True)
    try:
        helper.wait(150)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        _thaw_ours(tmp_path / "state")
    result = json.loads((tmp_path / "result.json").read_text())
    assert "error" not in result, (result.get("error"), _logs(tmp_path))
    assert result["frozen"], _logs(tmp_path)
    assert result["sender_group"].startswith("/heald-frozen/")
    # not while it trickled (its own baseline), only once it burst (8 s after it started)
    assert result["record"]["since"] >= result["sender_started"] + 7.5, result["record"]
    runs = [r for r in result["audit"]
            if r.get("type") == "run.start" and r.get("playbook") == "egress-burst"]
    assert runs
    conns = result["metadata"]["connections"]
    assert any(c["raddr"][:2] == ["10.213.0.2", 9555] for c in conns), conns
