"""The fault harness's live agent: a real ``heald run`` in dry-run records the samples, and what it
would have done is kept with them (``run.py --live-agent``).

Without ``--live-agent`` the harness samples with heald's collectors in its own process and a
recording holds samples only. With it, a real daemon does the sampling: a private mosquitto on a
free loopback port, ``heald run`` with the shipped playbooks (every one forced to dry-run: nothing
is executed), and an MQTT subscriber that keeps every sample of the node's ``metrics`` messages.
The agent runs the code of a commit (``--agent-commit``, default HEAD), not the working tree: a
detached ``git worktree`` of it (with the built native kernels copied in) is put first on its
``PYTHONPATH``, so what it ran is exactly ``live_commit``. When the scenario ends the daemon is
stopped (SIGTERM) and its audit log is read: each dry-run start (``run.start``) and approval request
is stored in the recording as the *live run*: ``live_kind`` (``run`` / ``approval``),
``live_playbook``, ``live_target``, ``live_wall`` (the audit record's time), plus ``live_config``
(the agent's config text), ``live_commit`` and ``live_playbooks`` (JSON: the shipped library it
loaded, file name -> text).
``heald replay RECORDING --playbooks remediations/`` must print the same would-be actions
(tests/test_replay.py holds it for ``host3.npz``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO = next((p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).exists()), "mosquitto")
NODE = "fault-live"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_config(state: Path, port: int, watch: str, *, security: bool = False) -> str:
    """The recorder's config. ``security``: the agent's code has a ``[security]`` section, whose
    nftables table must outlive this agent's stop (a stop would delete the host's ``inet heald``)."""
    keep = "[security]\nkeep_blocks_on_stop = true\n" if security else ""
    return f"""\
# heald run as the fault harness's recorder: shipped playbooks only, all forced to dry-run.
{keep}[node]
id = "{NODE}"
[paths]
state_dir = "{state}"
runtime_dir = "{state.parent / 'run'}"
[sample]
interval_s = 1.0
[collect.gpu]
enabled = false
[collect.processes]
watch = ["{watch}"]
[playbooks]
dirs = []
load_shipped = true
force_mode = "dry-run"
[mqtt]
enabled = true
host = "127.0.0.1"
port = {port}
metrics_interval_s = 1.0
"""


@dataclass
class LiveDecision:
    kind: str  # "run" | "approval"
    playbook: str
    target: str
    wall: float


class LiveAgent:
    """mosquitto + ``heald run`` (dry-run) + a subscriber keeping every sample, by seq."""

    def __init__(self, watch: str, commit: str = "HEAD") -> None:
        self.rev = commit
        self.dir = Path(tempfile.mkdtemp(prefix="heald-fault-live-"))
        self.state = self.dir / "state"
        self.port = free_port()
        self.watch = watch
        self.config_text = ""
        self.samples: dict[int, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.broker: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.client: Any = None
        self.code = self.dir / "code"
        self.commit = ""

    def checkout(self) -> None:
        """A detached worktree of the commit for the agent to run (removed by :meth:`remove_code`)."""
        self.commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", self.rev], check=True,
                                     capture_output=True, text=True).stdout.strip()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(self.code), self.commit],
                       check=True, capture_output=True)
        for lib in (ROOT / "agent" / "native").glob("*.so"):
            shutil.copy2(lib, self.code / "agent" / "native" / lib.name)

    def playbooks(self) -> str:
        books = sorted((self.code / "remediations").glob("*.yaml"))
        return json.dumps({b.name: b.read_text() for b in books}, sort_keys=True)

    def start(self) -> None:
        import paho.mqtt.client as mqtt  # noqa: PLC0415 - only with --live-agent

        from agent import wire  # noqa: PLC0415

        user = "user root\n" if os.geteuid() == 0 else ""
        conf = self.dir / "mosquitto.conf"
        conf.write_text(f"{user}listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "max_queued_messages 100000\n")
        self.broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                       stderr=(self.dir / "mosquitto.log").open("wb"))
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not listen on {self.port}")
            time.sleep(0.1)

        def on_message(_c: object, _u: object, msg: Any) -> None:
            decoded = wire.decode(msg.payload)
            if isinstance(decoded, wire.Metrics):
                with self.lock:
                    for s in decoded.samples:
                        self.samples[s.seq] = {"seq": s.seq, "wall": s.wall, "mono": s.mono,
                                               "metrics": dict(s.metrics)}

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = on_message
        self.client.suppress_exceptions = True
        self.client.connect("127.0.0.1", self.port)
        self.client.subscribe("heald/v1/#", qos=1)
        self.client.loop_start()
        self.checkout()
        security = "keep_blocks_on_stop" in (self.code / "agent" / "decide" / "settings.py").read_text()
        self.config_text = agent_config(self.state, self.port, self.watch, security=security)
        cfg = self.dir / "agent.toml"
        cfg.write_text(self.config_text)
        # dry-run three ways: the config, the environment override and --dry-run
        env = {**os.environ, "PYTHONPATH": str(self.code), "HEALD_PLAYBOOKS__FORCE_MODE": "dry-run"}
        argv = [sys.executable, "-m", "agent", "run", "--config", str(cfg), "--dry-run"]
        self.agent = subprocess.Popen(argv, cwd=self.code, env=env, stdout=subprocess.DEVNULL,
                                      stderr=(self.dir / "agent.log").open("wb"))

    def alive(self) -> bool:
        return self.agent is not None and self.agent.poll() is None

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return [self.samples[k] for k in sorted(self.samples)]

    def stop(self) -> None:
        """SIGTERM the agent (its last samples are published on the way out), then the rest."""
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        time.sleep(1.0)  # the last metrics messages reach the subscriber
        if self.client is not None:
            self.client.loop_stop()
            with contextlib.suppress(Exception):
                self.client.disconnect()
            self.client = None
        if self.broker is not None and self.broker.poll() is None:
            self.broker.terminate()
            self.broker.wait(timeout=10)

    def remove_code(self) -> None:
        if self.code.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(self.code)],
                           check=False, capture_output=True)

    def decisions(self, last_wall: float) -> list[LiveDecision]:
        """Dry-run starts and approval requests from the agent's audit log, up to the last sample."""
        out: list[LiveDecision] = []
        audit = self.state / "audit.jsonl"
        if not audit.exists():
            return out
        for line in audit.read_text().splitlines():
            entry = json.loads(line)
            rec, ts = entry["record"], float(entry["ts"])
            if rec.get("type") == "run.start" and rec.get("dry_run") is not True:
                raise RuntimeError(f"the live agent executed a run: {rec}")
            if ts > last_wall + 1.9:  # decided on a sample the subscriber never saw
                continue
            if rec.get("type") == "run.start":
                out.append(LiveDecision("run", rec["playbook"], rec["target"], ts))
            elif rec.get("type") == "approval.requested":
                out.append(LiveDecision("approval", rec["playbook"], rec["target"], ts))
        return out

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "agent.log").read_text()[-3000:]
        return ""
