"""``heald status`` and the local controls against a real ``heald run`` (issue 19).

One daemon, no coordinator, no MQTT: its own playbook fires while a process of a name only this
test starts exists; the playbook's step touches a marker in the test's directory and its
verification never holds, so every run escalates and two in a row open the target's breaker.
Through ``heald`` on the command line (the control socket in the test's runtime dir):

- ``heald status`` shows the breaker open; ``heald breaker reset`` closes it, audited as a local
  command with the caller's uid;
- ``heald silence`` holds automatic runs (the worker runs, nothing starts), ``heald unsilence``
  lifts it (a run starts at once);
- ``heald run-playbook`` is a dry run by default (the step is only described, the marker is not
  touched); an unknown playbook exits 2;
- with the daemon stopped, ``heald status`` says so and shows the state dir's last runs and
  guards, and a control exits 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from playbook_kit import idle, make_engine, playbook, running, sample

from agent import wire
from agent.cli.local import render_status
from agent.control.dispatcher import CommandDispatcher
from agent.control.local import LocalControl, NoCoordinator
from agent.control.silence import Silence
from agent.control.status import live_status
from agent.report.build import playbook_record
from agent.wire import signing

REPO = Path(__file__).resolve().parent.parent
WORKER = "heald-lctl-wk"
PLAYBOOK = """
name: lctl-worker
description: touch a marker while the test's worker runs (verification never holds)
mode: enforce
trigger:
  metric: "proc.count[{worker}]"
  op: ">="
  value: 1
steps:
  - action: run_command
    params: {{argv: ["/usr/bin/touch", "{marker}"]}}
    timeout: 10s
verify:
  settle: 0s
  expect: {{metric: "proc.count[{worker}]", op: "<", value: 0}}
guards:
  cooldown: 0s
  max_runs: {{count: 1000, window: 1h}}
  breaker: {{failures: 2, reset_after: 1h}}
"""
TARGET = "lctl-worker"


@dataclass
class Node:
    dir: Path
    config: Path
    marker: Path
    proc: subprocess.Popen[bytes]

    def heald(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", *args, "--config", str(self.config)],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))

    def status(self) -> dict[str, Any]:
        done = self.heald("status", "--json")
        assert done.returncode == 0, done.stderr
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    def target(self) -> dict[str, Any]:
        rows = {r["playbook"]: r for r in self.status()["playbooks"]}
        targets = {t["target"]: t for t in rows[TARGET]["targets"]}
        return targets.get(TARGET, {})

    def audit(self) -> list[dict[str, Any]]:
        path = self.dir / "state" / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line)["record"] for line in path.read_text().splitlines() if line.strip()]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


class Worker:
    """A process named WORKER (a symlink to sleep): the playbook's trigger."""

    def __init__(self, directory: Path) -> None:
        self.exe = directory / WORKER
        if not self.exe.exists():
            self.exe.symlink_to("/bin/sleep")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([str(self.exe), "600"])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    marker = tmp_path / "marker"
    pbdir = tmp_path / "playbooks.d"
    pbdir.mkdir()
    (pbdir / "worker.yaml").write_text(PLAYBOOK.format(worker=WORKER, marker=marker))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[node]
id = "lctl"
site = "lab"
[paths]
state_dir = "{tmp_path / 'state'}"
runtime_dir = "{tmp_path / 'run'}"
[collect.gpu]
enabled = false
[collect.processes]
interval_s = 1.0
watch = ["{WORKER}"]
[model]
enabled = false
[playbooks]
dirs = ["{pbdir}"]
load_shipped = false
""")
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO)))
    n = Node(tmp_path, cfg, marker, proc)
    try:
        wait_for("the control socket", (tmp_path / "run" / "control.sock").exists)
        yield n
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


@pytest.mark.slow
def test_status_breaker_silence_and_dry_run_against_a_real_daemon(node: Node) -> None:
    worker = Worker(node.dir)
    try:
        assert (node.dir / "run" / "control.sock").stat().st_mode & 0o777 == 0o600
        first = node.status()
        assert first["daemon"] == "running"
        assert first["mqtt"] == {"enabled": False}
        assert first["model"]["enabled"] is False
        assert first["silenced_until"] is None
        assert [r["playbook"] for r in first["playbooks"]] == [TARGET]
        assert first["playbooks"][0]["armed"] is True

        # -- a breaker tripped by two escalated runs, then reset by root
        worker.start()
        wait_for("the breaker to open", lambda: node.target().get("breaker_open") is True)
        worker.stop()
        table = node.heald("status")
        assert table.returncode == 0, table.stderr
        assert "daemon running" in table.stdout
        assert "OPEN" in table.stdout
        assert "escalated" in table.stdout
        reset = node.heald("breaker", "reset", TARGET)
        assert reset.returncode == 0, reset.stderr
        assert TARGET in reset.stdout
        assert node.target()["breaker_open"] is False
        records = node.audit()
        control = [r for r in records if r["type"] == "control" and r["command"] == "breaker_reset"]
        assert control
        assert control[-1]["origin"] == "local"
        assert control[-1]["uid"] == os.getuid()
        assert control[-1]["status"] == "done"
        assert any(r["type"] == "breaker.reset" and r["target"] == TARGET for r in records)

        # -- a silence set (automatic runs held) and lifted (they resume)
        silence = node.heald("silence", "10m")
        assert silence.returncode == 0, silence.stderr
        status = node.status()
        assert status["silenced_until"] > time.time() + 500
        assert status["playbooks"][0]["holds"] == ["silenced"]
        assert status["playbooks"][0]["armed"] is False
        runs_before = sum(r["type"] == "run.start" for r in node.audit())
        worker.start()
        wait_for("the silenced trigger to be held",
                 lambda: any(r["type"] == "held" and r["reason"] == "silenced" for r in node.audit()))
        time.sleep(3)  # a few more samples: still nothing starts
        assert sum(r["type"] == "run.start" for r in node.audit()) == runs_before
        unsilence = node.heald("unsilence")
        assert unsilence.returncode == 0, unsilence.stderr
        assert "silence lifted" in unsilence.stdout
        wait_for("an automatic run after the silence",
                 lambda: sum(r["type"] == "run.start" and r["trigger"] == "auto" for r in node.audit())
                 > runs_before)
        worker.stop()
        lifted = [r for r in node.audit()
                  if r["type"] == "control" and r["command"] in {"silence", "unsilence"}]
        assert [(r["command"], r["origin"], r["uid"]) for r in lifted] == \
            [("silence", "local", os.getuid()), ("unsilence", "local", os.getuid())]
        wait_for("the run after the silence to end", lambda: node.target().get("running") is None)

        # -- a manual run: a dry run unless --enforce; the marker is not touched by it
        node.heald("breaker", "reset", TARGET)
        node.marker.unlink(missing_ok=True)
        run = node.heald("run-playbook", TARGET)
        assert run.returncode == 0, run.stderr
        assert "dry run" in run.stdout

        def dry_run_ended() -> bool:
            return any(r["type"] == "run.end" and r["outcome"] == "dry-run" for r in node.audit())

        wait_for("the dry run to end", dry_run_ended)
        start = next(r for r in node.audit() if r["type"] == "run.start" and r["trigger"] == "manual")
        assert start["dry_run"] is True
        assert start["approved_by"].startswith("local:")
        steps = [r for r in node.audit() if r["type"] == "step" and r["run_id"] == start["run_id"]]
        assert steps
        assert all(s["status"] == "dry-run" for s in steps)
        assert not node.marker.exists()
        unknown = node.heald("run-playbook", "no-such-playbook")
        assert unknown.returncode == 2
        assert "no playbook named 'no-such-playbook'" in unknown.stderr
        assert unknown.stderr.count("heald:") == 1, unknown.stderr  # one program prefix
        assert "Traceback" not in unknown.stderr
        bad = node.heald("silence", "soon")
        assert bad.returncode == 2
    finally:
        worker.stop()

    # -- the daemon stopped: status still answers from the state dir; a control cannot
    node.proc.send_signal(signal.SIGTERM)
    node.proc.wait(30)
    assert not (node.dir / "run" / "control.sock").exists()
    offline = node.heald("status")
    assert offline.returncode == 0, offline.stderr
    assert "daemon NOT running" in offline.stdout
    assert "dry-run" in offline.stdout
    data = node.status()
    assert data["daemon"] == "not running"
    assert any(r["outcome"] == "escalated" for r in data["last_runs"])
    assert any(r["outcome"] == "dry-run" for r in data["last_runs"])
    assert data["playbooks"][0]["targets"][0]["total_runs"] >= 3
    down = node.heald("unsilence")
    assert down.returncode == 1
    assert "daemon NOT running" in down.stderr


class Outbox:
    def __init__(self) -> None:
        self.acks: list[wire.CommandAck] = []
        self.connected = True

    def submit(self, message: wire.Envelope) -> bool:
        if isinstance(message, wire.CommandAck):
            self.acks.append(message)
        return True


@pytest.mark.asyncio
async def test_a_coordinator_command_is_audited_like_a_local_one(tmp_path: Path) -> None:
    """The same dispatch path: a signed silence and a signed run of an unknown playbook are
    ``control`` audit records too, with origin ``coordinator``, the operator and no uid; the
    unknown playbook is ``rejected`` (bad input), as it is locally (exit 2)."""
    text = PLAYBOOK.format(worker=WORKER, marker=tmp_path / "marker")
    eng, rec = make_engine(tmp_path, [playbook(text)])
    key = Ed25519PrivateKey.generate()
    signer = signing.CommandSigner(key, issuer="coordinator")
    verifier = signing.CommandVerifier([key.public_key()], node="n1", site="lab",
                                       nonces=signing.NonceCache(tmp_path / "nonces"))
    outbox = Outbox()
    dispatcher = CommandDispatcher(verifier, eng, outbox)
    async with running(eng), asyncio.TaskGroup() as tg:
        commands = tg.create_task(dispatcher.run(), name="commands")
        dispatcher(signer.make(node="n1", site="lab", name=wire.CommandName.SILENCE,
                               args={"duration_s": 600, "by": "alice"}))
        dispatcher(signer.make(node="n1", site="lab", name=wire.CommandName.RUN,
                               args={"playbook": "no-such-playbook", "by": "alice"}))
        for _ in range(250):
            if len(outbox.acks) >= 4:
                break
            await asyncio.sleep(0.02)
        commands.cancel()
    assert [a.status for a in outbox.acks] == ["accepted", "accepted", "done", "rejected"]
    control = rec.of("control")
    assert [(r["command"], r["origin"], r["by"], r["uid"], r["status"]) for r in control] == [
        ("silence", "coordinator", "alice", None, "done"),
        ("run", "coordinator", "alice", None, "rejected"),
    ]
    assert dispatcher.silence.holds(time.time() + 500)
    # what the coordinator gets of them: a finished action named after the command
    sent = [playbook_record(r) for r in control]
    assert [(m.action, m.phase, m.outcome) for m in sent] == [("silence", "finished", "ok"),
                                                           ("run", "finished", "refused")]
    assert sent[0].result["origin"] == "coordinator"


CLIENT = """
import json, socket, sys
for request in ({"command": "silence", "args": {"duration_s": 600}}, {"command": "status", "args": {}}):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sys.argv[1])
        s.sendall(json.dumps(request).encode() + b"\\n")
        print(s.makefile().readline().strip())
"""


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
@pytest.mark.asyncio
async def test_the_socket_gives_controls_to_root_only_by_peer_uid(tmp_path: Path) -> None:
    """Even with the socket's mode opened up (0666), SO_PEERCRED keeps the controls for root (and
    the daemon's user): ``nobody`` gets status but its silence is refused and not carried out."""
    text = PLAYBOOK.format(worker=WORKER, marker=tmp_path / "marker")
    eng, rec = make_engine(tmp_path, [playbook(text)])
    dispatcher = CommandDispatcher(None, eng, NoCoordinator())
    python = "/usr/bin/python3"  # the client runs as nobody: a Python it may execute (not one under /root)
    if not os.access(python, os.X_OK):
        pytest.skip(f"no {python} for the client run as nobody")
    public = Path(tempfile.mkdtemp(prefix="heald-lctl-"))  # tmp_path is 0700: nobody cannot reach it
    try:
        os.chmod(public, 0o711)  # noqa: S103 - traversable (not listable) for the client run as nobody
        async def status() -> dict[str, Any]:
            return {"node": "n1"}

        server = LocalControl(public / "control.sock", dispatcher, status)
        async with running(eng), asyncio.TaskGroup() as tg:
            serving = tg.create_task(server.serve(), name="local-control")
            for _ in range(100):
                if server.path.exists():
                    break
                await asyncio.sleep(0.02)
            assert server.path.stat().st_mode & 0o777 == 0o600
            server.path.chmod(0o666)
            child = await asyncio.create_subprocess_exec(
                python, "-I", "-c", CLIENT, str(server.path), user="nobody", cwd="/",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(child.communicate(), 30)
            assert child.returncode == 0, err.decode()
            refused, status = (json.loads(line) for line in out.decode().splitlines())
            assert refused["status"] == "rejected"
            assert "for root" in refused["message"]
            assert status == {"status": "done", "message": "", "result": {"node": "n1"}}
            assert not dispatcher.silence.holds(time.time())
            assert rec.of("control") == []
            reader, writer = await asyncio.open_unix_connection(str(server.path))
            writer.write(b'{"command": "silence", "args": {"duration_s": 600}}\n')
            answer = json.loads(await reader.readline())
            writer.close()
            assert answer["status"] == "done"
            assert dispatcher.silence.holds(time.time() + 500)
            records = [(r["origin"], r["uid"], r["by"]) for r in rec.of("control")]
            assert records == [("local", 0, "local:root")]
            serving.cancel()
        assert not server.path.exists()
    finally:
        shutil.rmtree(public, ignore_errors=True)


@pytest.mark.asyncio
async def test_a_second_daemon_does_not_take_over_a_live_socket(tmp_path: Path) -> None:
    """Two daemons on one runtime dir: the second's local control gives up (logged), the first
    keeps its socket and answers; a stale socket (nobody listening) is replaced."""
    text = PLAYBOOK.format(worker=WORKER, marker=tmp_path / "marker")
    eng, _rec = make_engine(tmp_path, [playbook(text)])
    dispatcher = CommandDispatcher(None, eng, NoCoordinator())

    def server(name: str) -> LocalControl:
        async def status() -> dict[str, Any]:
            return {"node": name}
        return LocalControl(tmp_path / "run" / "control.sock", dispatcher, status)

    async def ask(path: Path) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"command": "status"}\n')
        answer: dict[str, Any] = json.loads(await reader.readline())
        writer.close()
        return answer

    stale = server("stale")
    stale.path.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as dead:  # bound, never listening: an earlier run's leftover
        dead.bind(str(stale.path))
    first, second = server("first"), server("second")
    async with asyncio.TaskGroup() as tg:
        one = tg.create_task(first.serve(), name="first")
        for _ in range(100):
            if first._inode is not None:  # bound
                break
            await asyncio.sleep(0.02)
        assert (await ask(first.path))["result"] == {"node": "first"}
        await asyncio.wait_for(second.serve(), 5)  # returns at once: the socket is taken
        assert (await ask(first.path))["result"] == {"node": "first"}
        one.cancel()
    assert not first.path.exists()


COOLING = """
name: cooling
description: touch a marker while app.bad holds; then an hour's cooldown
mode: enforce
trigger: {{metric: "app.bad", op: ">", value: 0}}
steps:
  - action: run_command
    params: {{argv: ["/usr/bin/touch", "{marker}"]}}
    timeout: 10s
verify: {{settle: 0s}}
guards: {{cooldown: 1h}}
"""
MODEL_DRIVEN = """
name: model-driven
description: reads the model, so it is held while the model is cold
mode: dry-run
trigger: {risk: anomaly}
steps:
  - action: notify
    params: {message: anomalous}
"""


@pytest.mark.asyncio
async def test_status_shows_cooldowns_cold_start_and_silence_holds(tmp_path: Path) -> None:
    eng, _rec = make_engine(tmp_path, [playbook(COOLING.format(marker=tmp_path / "marker")),
                                       playbook(MODEL_DRIVEN)])
    silence = Silence()
    async with running(eng):
        for _ in range(3):
            await eng.evaluate(sample({"app.bad": 1.0}), None)
        for _ in range(500):  # new samples, the problem gone: the run verifies and ends
            await eng.evaluate(sample({"app.bad": 0.0}), None)
            if not any(r["running"] for r in eng.status()):
                break
            await asyncio.sleep(0.02)
        await idle(eng)
        ended = time.time()
        data = await live_status(eng, silence, None)
        rows = {r["playbook"]: r for r in data["playbooks"]}
        (target,) = rows["cooling"]["targets"]
        assert ended + 3500 < target["cooldown_until"] <= ended + 3600
        assert target["total_runs"] == 1
        assert rows["cooling"]["armed"] is True
        assert rows["model-driven"]["holds"] == ["cold-start"]  # no risk yet: the model is cold
        assert rows["model-driven"]["armed"] is False
        assert data["model"] == {"model_version": None, "anomaly": None, "cold": None, "enabled": True}
        assert [(r["playbook"], r["outcome"]) for r in data["last_runs"]] == [("cooling", "succeeded")]
        table = render_status(data)
        assert "cooling down" in table
        assert "held: cold-start" in table
        silence.until = time.time() + 600
        data = await live_status(eng, silence, None)
        rows = {r["playbook"]: r for r in data["playbooks"]}
        assert rows["cooling"]["holds"] == ["silenced"]
        assert rows["model-driven"]["holds"] == ["silenced", "cold-start"]
        assert data["silenced_until"] == silence.until
