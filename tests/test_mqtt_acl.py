"""The documented mosquitto ACL (packaging/mosquitto/acl.example) against a real broker.

A private mosquitto on a free loopback port, with a per-listener password file made by
``mosquitto_passwd`` and the ACL file exactly as shipped. Real MQTT v5 clients (paho-mqtt,
which aiomqtt is built on): a node may publish its own reports; publishing as another node, or
publishing any command, is refused -- with QoS 1 the PUBACK says "Not authorized" and the
coordinator never sees the message.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.wire.topics import SUFFIX

mqtt = pytest.importorskip("paho.mqtt.client")
from paho.mqtt.packettypes import PacketTypes  # noqa: E402 - after the importorskip above
from paho.mqtt.reasoncodes import ReasonCode  # noqa: E402

TOP = Path(__file__).resolve().parents[1]
ACL = TOP / "packaging" / "mosquitto" / "acl.example"
DOC = TOP / "docs" / "mqtt-tls-acl.md"
MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto",) if os.access(p, os.X_OK)), None)
PASSWD = shutil.which("mosquitto_passwd")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MOSQUITTO is None or PASSWD is None,
                       reason="mosquitto and mosquitto_passwd are not installed (apt-get install mosquitto)"),
]
USERS = {"node-a": "pw-a", "node-b": "pw-b", "heald-coordinator": "pw-coord"}
WAIT = 10.0


@dataclass
class Broker:
    port: int
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def documented_listener(port: int, passwd: Path, acl: Path) -> list[str]:
    """The broker config of docs/mqtt-tls-acl.md (`/etc/mosquitto/conf.d/heald.conf`) as written,
    on a loopback port, with the test's password and ACL files and without TLS (the TLS settings
    are tested elsewhere: tests/test_report_transport.py)."""
    text = DOC.read_text()
    block = text.split("`/etc/mosquitto/conf.d/heald.conf`:", 1)[1].split("```", 2)[1]
    out = []
    for line in block.strip().splitlines():
        key = line.split(" ", 1)[0]
        if key in ("cafile", "certfile", "keyfile", "tls_version"):
            continue
        out.append({"listener": f"listener {port} 127.0.0.1", "password_file": f"password_file {passwd}",
                    "acl_file": f"acl_file {acl}"}.get(key, line))
    assert "use_username_as_clientid true" in out, "the documented listener binds client ids to users"
    return out


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    assert MOSQUITTO is not None
    assert PASSWD is not None
    passwd = tmp_path / "passwd"
    first = True
    for user, password in USERS.items():
        subprocess.run([PASSWD, "-b", *(["-c"] if first else []), str(passwd), user, password],
                       check=True, capture_output=True, timeout=30)
        first = False
    acl = tmp_path / "acl"
    shutil.copy(ACL, acl)
    port = _free_port()
    log = tmp_path / "mosquitto.log"
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("\n".join([
        *(["user root"] if os.geteuid() == 0 else []),  # else it drops to `mosquitto`, who cannot read tmp
        "persistence false",
        f"log_dest file {log}",
        "log_type all",
        *documented_listener(port, passwd, acl),
        "",
    ]))
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + WAIT
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                pytest.fail(f"mosquitto exited {proc.returncode}: {err}")
            with socket.socket() as s, contextlib.suppress(OSError):
                s.settimeout(0.2)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail("mosquitto did not start listening")
            time.sleep(0.05)
        yield Broker(port, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


class Client:
    """A blocking MQTT v5 client for tests: connect, subscribe, publish QoS 1, collect messages."""

    def __init__(self, port: int, user: str, password: str, *, client_id: str = "",
                 will: tuple[str, bytes] | None = None) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._acks: dict[int, queue.Queue[ReasonCode]] = {}
        self._subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self._connected: queue.Queue[ReasonCode] = queue.Queue()
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=client_id or f"{user}-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self.c.username_pw_set(user, password)
        if will is not None:
            self.c.will_set(will[0], will[1], qos=1)
        self.c.on_connect = lambda _c, _u, _f, rc, _p: self._connected.put(rc)
        self.c.on_disconnect = lambda _c, _u, _f, rc, _p: self.disconnects.put(rc)
        self.c.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, msg.payload))
        self.c.on_publish = lambda _c, _u, mid, rc, _p: self._acks.setdefault(mid, queue.Queue()).put(rc)
        self.c.on_subscribe = lambda _c, _u, _mid, rcs, _p: self._subacks.put(list(rcs))
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        self.connect_rc = self._connected.get(timeout=WAIT)

    def subscribe(self, topic: str) -> ReasonCode:
        self.c.subscribe(topic, qos=1)
        return self._subacks.get(timeout=WAIT)[0]

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """QoS 1 publish; returns the PUBACK reason code."""
        info = self.c.publish(topic, payload, qos=1)
        return self._acks.setdefault(info.mid, queue.Queue()).get(timeout=WAIT)

    def received(self, until: bytes) -> list[tuple[str, bytes]]:
        """Messages up to and including the one whose payload is ``until``."""
        out = []
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                item = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            out.append(item)
            if item[1] == until:
                return out
        raise AssertionError(f"{until!r} never arrived; got {out}")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def clients(broker: Broker) -> Iterator[dict[str, Client]]:
    made: dict[str, Client] = {}
    try:
        for user, password in USERS.items():
            made[user] = Client(broker.port, user, password)
            assert not made[user].connect_rc.is_failure, (user, str(made[user].connect_rc))
        yield made
    finally:
        for c in made.values():
            c.close()


def _sentinel() -> bytes:
    return f"sentinel-{uuid.uuid4().hex}".encode()


def test_node_cannot_report_as_another_node(clients: dict[str, Client]) -> None:
    coord, a = clients["heald-coordinator"], clients["node-a"]
    assert not coord.subscribe("heald/v1/#").is_failure
    rc = a.publish("heald/v1/site1/node-b/metrics", b"forged")
    assert rc.is_failure
    assert rc == ReasonCode(PacketTypes.PUBACK, "Not authorized")
    # The same node's own topic is delivered; the broker handles one client's publishes in
    # order, so by the time the sentinel arrives the forged message would have too.
    end = _sentinel()
    assert not a.publish("heald/v1/site1/node-a/metrics", end).is_failure
    got = coord.received(until=end)
    assert ("heald/v1/site1/node-b/metrics", b"forged") not in got
    assert got[-1] == ("heald/v1/site1/node-a/metrics", end)


def test_node_may_publish_every_report_kind_of_its_own(clients: dict[str, Client]) -> None:
    """Drift check against the wire protocol: every non-command kind is in the ACL."""
    coord, a = clients["heald-coordinator"], clients["node-a"]
    coord.subscribe("heald/v1/#")
    for kind, suffix in SUFFIX.items():
        if kind == "command":
            continue
        topic = f"heald/v1/site1/node-a/{suffix}"
        payload = f"{kind}-{uuid.uuid4().hex}".encode()
        rc = a.publish(topic, payload)
        assert not rc.is_failure, f"{topic}: {rc}"
        assert coord.received(until=payload)[-1] == (topic, payload)


@pytest.mark.parametrize("topic", [
    "heald/v1/site1/node-a/cmd",  # not even to itself
    "heald/v1/site1/node-b/cmd",
    "heald/v1/site1/_all/cmd",
    "heald/v1/_all/_all/cmd",
    "heald/v1/site1/node-a/metrics/extra",
    "heald/v1/site1/node-a",
    "other/topic",
])
def test_node_cannot_publish_commands_or_elsewhere(clients: dict[str, Client], topic: str) -> None:
    coord, a, b = clients["heald-coordinator"], clients["node-a"], clients["node-b"]
    coord.subscribe("#")
    b.subscribe("heald/v1/+/node-b/cmd")
    rc = a.publish(topic, b"nope")
    assert rc == ReasonCode(PacketTypes.PUBACK, "Not authorized"), topic
    end = _sentinel()
    a.publish("heald/v1/site1/node-a/status", end)
    assert all(payload != b"nope" for _, payload in coord.received(until=end))


def test_commands_reach_only_their_node(clients: dict[str, Client]) -> None:
    coord, a, b = clients["heald-coordinator"], clients["node-a"], clients["node-b"]
    # node-a tries to eavesdrop on node-b's commands. mosquitto 2.0 grants the SUBACK and then
    # checks the read ACL on every delivery: nothing of node-b's may arrive.
    a.subscribe("heald/v1/+/node-b/cmd")
    assert not a.subscribe("heald/v1/+/node-a/cmd").is_failure
    assert not a.subscribe("heald/v1/site1/_all/cmd").is_failure
    assert not a.subscribe("heald/v1/_all/_all/cmd").is_failure
    assert not b.subscribe("heald/v1/+/node-b/cmd").is_failure
    assert not b.subscribe("heald/v1/_all/_all/cmd").is_failure

    assert not coord.publish("heald/v1/site1/node-b/cmd", b"for-b").is_failure
    assert b.received(until=b"for-b")[-1] == ("heald/v1/site1/node-b/cmd", b"for-b")
    assert not coord.publish("heald/v1/site1/node-a/cmd", b"for-a").is_failure
    got = a.received(until=b"for-a")
    assert ("heald/v1/site1/node-b/cmd", b"for-b") not in got
    # Broadcasts reach every node.
    assert not coord.publish("heald/v1/_all/_all/cmd", b"fleet").is_failure
    assert a.received(until=b"fleet")[-1][1] == b"fleet"
    assert b.received(until=b"fleet")[-1][1] == b"fleet"


def test_node_cannot_read_other_nodes_reports(clients: dict[str, Client]) -> None:
    a, b = clients["node-a"], clients["node-b"]
    rc = a.subscribe("heald/v1/#")
    assert not b.publish("heald/v1/site1/node-b/metrics", b"b-metrics").is_failure
    assert not a.publish("heald/v1/site1/node-a/status", b"a-own").is_failure
    # node-a has no read grant on reports at all (not even its own), so nothing arrives.
    time.sleep(0.5)
    leaked: list[Any] = []
    with contextlib.suppress(queue.Empty):
        while True:
            leaked.append(a.messages.get_nowait())
    assert leaked == [], (str(rc), leaked)


def test_wrong_password_is_refused(broker: Broker) -> None:
    c = Client(broker.port, "node-a", "wrong")
    try:
        assert c.connect_rc.is_failure
    finally:
        c.close()


def test_doc_contains_the_acl_verbatim() -> None:
    assert ACL.read_text().strip() in DOC.read_text()


def test_a_node_cannot_take_over_another_nodes_client_id(broker: Broker) -> None:
    """With the documented listener, node A connecting with node B's client id (an agent's default
    is heald-<site>-<node>) neither knocks B off nor makes the broker publish B's last will."""
    coord = Client(broker.port, "heald-coordinator", USERS["heald-coordinator"])
    victim_id = "heald-site1-node-b"
    b = Client(broker.port, "node-b", USERS["node-b"], client_id=victim_id,
               will=("heald/v1/site1/node-b/status", b"node-b offline"))
    try:
        assert not coord.subscribe("heald/v1/#").is_failure
        assert not b.connect_rc.is_failure
        for _ in range(3):
            a = Client(broker.port, "node-a", USERS["node-a"], client_id=victim_id)
            assert not a.connect_rc.is_failure  # the broker takes its username as its id instead
            a.close()
        end = _sentinel()
        assert not b.publish("heald/v1/site1/node-b/status", end).is_failure  # b is still connected
        got = coord.received(until=end)
        assert all(payload != b"node-b offline" for _, payload in got), "b's will was published"
        assert b.disconnects.empty(), f"node-b was disconnected: {b.disconnects.get_nowait()}"
    finally:
        b.close()
        coord.close()
