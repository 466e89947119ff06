"""SIGHUP, section by section, on a real `heald run --dry-run`: each change is applied (seen from
outside: the new broker gets the birth, the new port answers /metrics, the new key verifies
commands, the new classifier path is loaded) or refused with the key named in the log and in
the sd_notify STATUS."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from broker import Broker, free_port
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import wire
from agent.runtime import reload as policy
from agent.runtime.config import Settings
from agent.wire import signing

BASE = """
[node]
id = "n1"
site = "lab"
[paths]
state_dir = "{state}"
runtime_dir = "{runtime}"
[collect.gpu]
enabled = false
[playbooks]
load_shipped = false
"""


class Agent:
    """`heald run --dry-run` with a private config, state dir and NOTIFY_SOCKET; killed at the end.

    The model is off (through the environment, which a reload re-reads) unless ``model`` is None:
    then the config's own ``[model]`` says.
    """

    def __init__(self, tmp: Path, extra: str, *, model: bool | None = False) -> None:
        self.tmp = tmp
        self.base = BASE.format(state=tmp / "state", runtime=tmp / "run")
        self.config = tmp / "agent.toml"
        self.config.write_text(self.base + extra)
        self.statuses: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(tmp / "notify.sock"))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.log = (tmp / "agent.log").open("w+")
        env = dict(os.environ, NOTIFY_SOCKET=str(tmp / "notify.sock"))
        if model is not None:
            env["HEALD_MODEL__ENABLED"] = str(model).lower()
        argv = [sys.executable, "-m", "agent", "run", "--dry-run", "--config", str(self.config)]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            self.statuses += [line[7:] for line in data.split("\n") if line.startswith("STATUS=")]

    def lines(self) -> list[dict[str, Any]]:
        self.log.flush()
        out = []
        for line in Path(self.log.name).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"raw": line})
        return out

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.lines() if r.get("event") == event]

    def wait(self, what: Callable[[], Any], timeout: float = 30.0, message: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = what()
            if got:
                return got
            assert self.proc.poll() is None, f"heald exited: {self.lines()[-20:]}"
            time.sleep(0.1)
        raise AssertionError(f"timed out: {message}; log tail: {self.lines()[-20:]}")

    def reload(self, extra: str) -> dict[str, Any]:
        """Rewrite the config, SIGHUP, and return the reload's 'configuration reloaded' record."""
        self.wait(lambda: any(s == "sampling" for s in self.statuses), message="READY")
        before = len(self.events("configuration reloaded"))
        self.config.write_text(self.base + extra)
        self.proc.send_signal(signal.SIGHUP)
        self.wait(lambda: len(self.events("configuration reloaded")) > before, message="the reload")
        return self.events("configuration reloaded")[-1]

    def refused_keys(self) -> list[str]:
        return [k for r in self.events("reload.restart_required") for k in r["keys"]]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._stop.set()
        self.sock.close()
        self._reader.join(timeout=2)
        self.log.close()


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(extra: str, *, model: bool | None = False) -> Agent:
        agents.append(Agent(tmp_path, extra, model=model))
        return agents[-1]

    yield make
    for a in agents:
        a.close()


class Listener:
    """Every heald message a broker carries (a paho client on heald/v1/#)."""

    def __init__(self, broker: Broker) -> None:
        self.messages: list[tuple[str, wire.Message]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on
        self.client.connect("127.0.0.1", broker.port)
        self.client.subscribe("heald/v1/#", qos=1)
        self.client.loop_start()

    def _on(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with contextlib.suppress(wire.WireError):
            self.messages.append((msg.topic, wire.decode(msg.payload)))

    def of(self, cls: type[Any]) -> list[Any]:
        return [m for _, m in list(self.messages) if isinstance(m, cls)]

    def send(self, cmd: wire.Command) -> None:
        self.client.publish(wire.topic_for(cmd.site, cmd.node, "command"), wire.encode(cmd),
                            qos=1).wait_for_publish(timeout=10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# ------------------------------------------------------------------------------ the policy as data
def test_every_key_has_a_policy_and_plan_keeps_restart_keys() -> None:
    def leaves(struct: type[msgspec.Struct], prefix: str = "") -> list[str]:
        out = []
        for f in msgspec.structs.fields(struct):
            sub = f.type if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct) else None
            out += leaves(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"]
        return out

    for key in leaves(Settings):
        assert policy.policy(key) in {"live", "restart"}, key
    restart = set(policy.restart_keys())
    assert {"paths", "node", "mqtt.enabled", "model.enabled", "prometheus.enabled"} <= restart
    assert policy.policy("prometheus.listen") == "live"
    assert policy.policy("coordinator.public_keys") == "live"

    old = Settings()
    new = msgspec.convert({"paths": {"state_dir": "/elsewhere"}, "mqtt": {"port": 1999, "enabled": True},
                           "prometheus": {"listen": "127.0.0.1:9999"}}, Settings)
    effective, sections, refused = policy.plan(old, new)
    assert refused == ["paths", "mqtt.enabled"]
    assert effective.paths == old.paths
    assert effective.mqtt.enabled is False
    assert effective.mqtt.port == 1999
    assert effective.prometheus.listen == "127.0.0.1:9999"
    assert sections == ["mqtt", "prometheus"]
    assert policy.plan(old, old) == (old, [], [])


def test_heald_check_names_the_restart_only_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(BASE.format(state=tmp_path / "state", runtime=tmp_path / "run"))
    out = subprocess.run([sys.executable, "-m", "agent", "check", "--config", str(cfg)],
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("needs a restart to change"))
    assert "paths" in line
    assert "mqtt.enabled" in line
    assert "prometheus.listen" not in line
    argv = [sys.executable, "-m", "agent", "check", "--json", "--config", str(cfg)]
    as_json = json.loads(subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60).stdout)
    assert as_json["restart_required"] == policy.restart_keys()


# ------------------------------------------------------------------------------ one section each
@pytest.mark.slow
def test_mqtt_switches_broker_live_and_refuses_the_spool_layout(
        agent_factory: Callable[..., Agent], mosquitto_factory: Callable[..., Broker]) -> None:
    a_broker, b_broker = mosquitto_factory(), mosquitto_factory()
    on_a, on_b = Listener(a_broker), Listener(b_broker)
    try:
        agent = agent_factory(f"[mqtt]\nenabled = true\nport = {a_broker.port}\n")
        agent.wait(lambda: on_a.of(wire.Birth), message="the birth on broker A")
        reloaded = agent.reload(f"[mqtt]\nenabled = true\nport = {b_broker.port}\n")
        assert "mqtt" in reloaded["applied"]
        births_b = agent.wait(lambda: on_b.of(wire.Birth), timeout=20, message="the birth on broker B")
        agent.wait(lambda: on_b.of(wire.Metrics), timeout=30, message="metrics on broker B")
        # The same run (same incarnation), its sequence numbers going on, not starting over.
        birth_a = on_a.of(wire.Birth)[-1]
        assert births_b[0].inc == birth_a.inc
        assert births_b[0].seq > birth_a.seq
        # Broker A was left cleanly: the retained status says offline, and nothing new arrives there.
        offline = [s for s in on_a.of(wire.Status) if s.state == "offline"]
        assert offline, on_a.of(wire.Status)
        assert offline[-1].reason == "reconfigured"
        seen_a = len(on_a.messages)
        time.sleep(2.0)
        assert len(on_a.messages) == seen_a

        # The spool's layout needs a restart: refused by name, the rest of [mqtt] still applied.
        agent.reload(f"[mqtt]\nenabled = true\nport = {b_broker.port}\nmax_publish_per_s = 50.0\n"
                     "[mqtt.spool]\nquota_bytes = 1000000\n")
        assert agent.refused_keys() == ["mqtt.spool.quota_bytes"]
        agent.wait(lambda: any("restart required for mqtt.spool.quota_bytes" in s for s in agent.statuses),
                   message="the STATUS naming the key")
    finally:
        on_a.close()
        on_b.close()


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - a loopback http URL we built
        return int(r.status)


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - a loopback http URL we built
        text = r.read().decode()
    return {name: float(value) for name, _, value in
            (line.rpartition(" ") for line in text.splitlines() if line and not line.startswith("#"))}


def _refused(url: str) -> bool:
    try:
        _get(url)
    except OSError:
        return True
    return False


@pytest.mark.slow
def test_prometheus_moves_to_the_new_port_and_closes_the_old(agent_factory: Callable[..., Agent]) -> None:
    p1, p2 = free_port(), free_port()
    url1, url2 = f"http://127.0.0.1:{p1}/metrics", f"http://127.0.0.1:{p2}/metrics"
    agent = agent_factory(f'[prometheus]\nenabled = true\nlisten = "127.0.0.1:{p1}"\n')
    agent.wait(lambda: not _refused(url1), message="/metrics on the first port")
    moved = agent.reload(f'[prometheus]\nenabled = true\nlisten = "127.0.0.1:{p2}"\n')
    assert "prometheus" in moved["applied"]
    assert _get(url2) == 200
    assert _refused(url1)

    # A port that cannot be bound: that section is said to have failed, the running port kept.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        p3 = taken.getsockname()[1]
        reloaded = agent.reload(f'[prometheus]\nenabled = true\nlisten = "127.0.0.1:{p3}"\n')
    assert "prometheus" not in reloaded["applied"]
    assert [r["section"] for r in agent.events("reload.section_failed")] == ["prometheus"]
    assert any("not applied: [prometheus]" in s for s in agent.statuses)
    assert _get(url2) == 200

    # Switching the endpoint off needs a restart: refused by name, still serving.
    agent.reload(f'[prometheus]\nenabled = false\nlisten = "127.0.0.1:{p2}"\n')
    assert agent.refused_keys() == ["prometheus.enabled"]
    assert _get(url2) == 200


@pytest.mark.slow
def test_coordinator_key_rotation_is_live(agent_factory: Callable[..., Agent],
                                          mosquitto_factory: Callable[..., Broker]) -> None:
    broker = mosquitto_factory()
    old_key, new_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    old_signer = signing.CommandSigner(old_key, issuer="coord")
    new_signer = signing.CommandSigner(new_key, issuer="coord")
    listener = Listener(broker)

    def mqtt_with(key: Ed25519PrivateKey) -> str:
        return (f"[mqtt]\nenabled = true\nport = {broker.port}\n"
                f'[coordinator]\npublic_keys = ["{signing.public_key_text(key.public_key())}"]\n')

    def ack(signer: signing.CommandSigner) -> str:
        cmd = signer.make(node="n1", site="lab", name="status")
        listener.send(cmd)
        acks = agent.wait(lambda: [a for a in listener.of(wire.CommandAck) if a.command_id == cmd.id],
                          timeout=20, message=f"an ack for {cmd.id}")
        return str(acks[0].status)

    try:
        agent = agent_factory(mqtt_with(old_key))
        agent.wait(lambda: listener.of(wire.Birth), message="the birth")
        assert ack(old_signer) == "accepted"
        assert ack(new_signer) == "rejected"
        assert "coordinator" in agent.reload(mqtt_with(new_key))["applied"]
        assert ack(new_signer) == "accepted"
        assert ack(old_signer) == "rejected"
        assert agent.refused_keys() == []
    finally:
        listener.close()


@pytest.mark.slow
def test_model_settings_apply_at_the_next_load_and_enabled_is_refused(
        agent_factory: Callable[..., Agent], tmp_path: Path) -> None:
    agent = agent_factory("[model]\nenabled = true\n", model=None)
    agent.wait(lambda: agent.events("score stage ready"), message="the score stage")
    missing = tmp_path / "no-such-classifier.npz"
    reloaded = agent.reload(f'[model]\nenabled = true\nclassifier_path = "{missing}"\ncold_start_s = 60\n')
    assert "model" in reloaded["applied"]
    event = "failure classifier refused; running without failure probabilities"
    agent.wait(lambda: [r for r in agent.events(event) if r.get("path") == str(missing)],
               message="the new classifier_path loaded")
    agent.reload(f'[model]\nenabled = false\nclassifier_path = "{missing}"\ncold_start_s = 60\n')
    assert agent.refused_keys() == ["model.enabled"]


@pytest.mark.slow
def test_node_paths_and_log_need_a_restart(agent_factory: Callable[..., Agent], tmp_path: Path) -> None:
    agent = agent_factory("[sample]\ninterval_s = 1.0\n")
    agent.base = agent.base.replace('id = "n1"', 'id = "n2"').replace(str(tmp_path / "state"),
                                                                     str(tmp_path / "state2"))
    reloaded = agent.reload('[sample]\ninterval_s = 0.5\n[log]\nlevel = "debug"\n')
    assert agent.refused_keys() == ["node", "paths", "log"]
    assert reloaded["applied"] == ["sample"]
    assert reloaded["node"] == "n1"
    agent.wait(lambda: any("restart required for node, paths, log" in s for s in agent.statuses),
               message="the STATUS naming the keys")
    assert not (tmp_path / "state2").exists()
    # The periodic STATUS (every 30 s) keeps saying it until a restart or the config is put back.
    agent.wait(lambda: any(s.startswith("seq ") and s.endswith("; restart required for node, paths, log")
                           for s in agent.statuses), timeout=45, message="the periodic STATUS")


@pytest.mark.slow
def test_sample_and_collect_apply_live(agent_factory: Callable[..., Agent]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    prom = f'[prometheus]\nenabled = true\nlisten = "127.0.0.1:{port}"\n'
    cpu_ok = 'heald_collector_status{collector="cpu",status="ok"}'
    agent = agent_factory(prom)
    agent.wait(lambda: not _refused(url) and "heald_sample_seq" in _metrics(url), message="/metrics")
    agent.wait(lambda: _metrics(url).get(cpu_ok) == 1.0, message="the cpu collector ok")

    def rate() -> float:
        first = _metrics(url)["heald_sample_seq"]
        time.sleep(3.0)
        return (_metrics(url)["heald_sample_seq"] - first) / 3.0

    assert rate() < 1.5  # 1 Hz
    reloaded = agent.reload(prom + "[sample]\ninterval_s = 0.25\n[collect.cpu]\nenabled = false\n")
    assert set(reloaded["applied"]) == {"sample", "collect"}
    agent.wait(lambda: _metrics(url).get(cpu_ok) == 0.0, message="the cpu collector switched off")
    assert rate() > 2.5  # 4 Hz


@pytest.mark.slow
def test_mqtt_reload_cuts_the_reconnect_backoff_short(
        agent_factory: Callable[..., Agent], mosquitto_factory: Callable[..., Broker]) -> None:
    # No broker on the first port: the reporter waits up to 60 s between attempts (full jitter).
    dead = free_port()
    slow = "backoff_initial_s = 60.0\nbackoff_max_s = 60.0\nconnect_timeout_s = 2.0\n"
    agent = agent_factory(f"[mqtt]\nenabled = true\nport = {dead}\n{slow}")
    agent.wait(lambda: agent.events("mqtt.connect_failed"), message="the first failed connect")
    live = mosquitto_factory()
    listener = Listener(live)
    try:
        agent.reload(f"[mqtt]\nenabled = true\nport = {live.port}\n{slow}")
        t0 = time.monotonic()
        agent.wait(lambda: listener.of(wire.Birth), timeout=10, message="the birth on the new broker")
        assert time.monotonic() - t0 < 10
    finally:
        listener.close()


PLAYBOOK = """
name: {name}
description: never fires (a CPU over 1000 %)
mode: enforce
trigger: {{metric: cpu.util_pct, op: ">=", value: 1000}}
steps:
  - action: notify
    params: {{message: "{name}"}}
"""


@pytest.mark.slow
def test_playbooks_apply_live(agent_factory: Callable[..., Agent], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """[playbooks]: a new directory's playbooks replace the old ones at SIGHUP (and a broken
    playbook in it keeps the running set, named)."""
    dirs = {}
    for name in ("first", "second"):
        dirs[name] = tmp_path / f"playbooks-{name}"
        dirs[name].mkdir()
        (dirs[name] / f"{name}.yaml").write_text(PLAYBOOK.format(name=name))
    monkeypatch.setattr(sys.modules[__name__], "BASE", BASE.replace(
        "load_shipped = false", f'load_shipped = false\ndirs = ["{dirs["first"]}"]'))
    agent = agent_factory("")

    def loaded() -> list[list[str]]:
        return [r["names"] for r in agent.events("playbooks loaded")]

    agent.wait(lambda: loaded() == [["first"]], message="the first set")
    agent.base = agent.base.replace(str(dirs["first"]), str(dirs["second"]))
    reloaded = agent.reload("")
    assert "playbooks" in reloaded["applied"]
    agent.wait(lambda: loaded()[-1:] == [["second"]], message="the second set after SIGHUP")
    (dirs["second"] / "broken.yaml").write_text("name: broken\nsteps: 3\n")
    agent.reload("")
    agent.wait(lambda: any("broken.yaml" in json.dumps(r) for r in agent.lines()
                           if r.get("level") == "error"), message="the broken playbook named")
    assert loaded()[-1] == ["second"]
    assert agent.proc.poll() is None
