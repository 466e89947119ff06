"""MQTT 5 and 3.1.1 (issue 18, item 8): what the embedded broker (amqtt, 3.1.1 only) answers to an
MQTT 5 CONNECT, the agent's and the coordinator's fallback to 3.1.1 (``protocol = "auto"``), and
every feature the agent relies on, on both: retained birth and status, the last will, QoS 1
publishes, command subscriptions and the persistent session that queues commands while a node
is away. The peers are real: amqtt, mosquitto, the Reporter, ``heald run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog
from broker import Broker

from agent import wire
from agent.report import build
from agent.report.protocol import protocol_refused, session_options
from agent.report.settings import MqttSettings, SpoolSettings
from agent.report.transport import Reporter
from coordinator.broker import REFUSE_PROTOCOL, amqtt_available, embedded_broker
from devtools.coordinator_proc import REPO_ROOT, free_port

needs_amqtt = pytest.mark.skipif(not amqtt_available(), reason="amqtt is not installed: the embedded "
                                 "broker is an optional extra (heald[embedded])")
SITE, NODE = "lab", "n1"
CMD_TOPIC = wire.topic_for(SITE, NODE, "command")


def connect_packet(level: int, client_id: str, *, will: bool, properties: bool = True) -> bytes:
    """A CONNECT as paho sends it: MQTT 5 (``level`` 5; with ``properties`` a session expiry
    interval) and an empty will property block, or MQTT 3.1.1 (``level`` 4)."""
    flags = 0x04 | 0x08 | 0x20 if will else 0x02  # will, will QoS 1, will retain / clean session
    body = b"\x00\x04MQTT" + bytes([level, flags]) + b"\x00\x1e"
    if level == 5:
        body += b"\x05\x11" + struct.pack("!I", 3600) if properties else b"\x00"
    cid = client_id.encode()
    body += struct.pack("!H", len(cid)) + cid
    if will:
        body += b"\x00" if level == 5 else b""
        body += struct.pack("!H", 8) + b"will/top" + struct.pack("!H", 3) + b"bye"
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


def raw_connect(port: int, packet: bytes, timeout: float = 3.0) -> tuple[bytes, bool]:
    """Send ``packet``; (what the broker answered within ``timeout``, whether it then closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(packet)
        try:
            answer = sock.recv(4)
        except TimeoutError:
            return b"", False
        sock.settimeout(0.5)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        return answer, closed


def settings(port: int, **over: Any) -> MqttSettings:
    base: dict[str, Any] = {"enabled": True, "host": "127.0.0.1", "port": port, "backoff_initial_s": 0.1,
                            "backoff_max_s": 0.5, "connect_timeout_s": 2.0, "ack_timeout_s": 3.0,
                            "spool": SpoolSettings(fsync_interval_s=0.2)}
    return MqttSettings(**base | over)


class Inbox:
    """An Inbound that records what arrives on the node's command topics."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def topics(self) -> list[str]:
        return wire.command_topics(SITE, NODE)

    def on_message(self, topic: str, payload: object) -> None:
        self.messages.append((topic, payload if isinstance(payload, bytes) else b""))


@contextlib.asynccontextmanager
async def running(reporter: Reporter) -> AsyncIterator[None]:
    task = asyncio.create_task(reporter.run(), name="test-reporter")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(predicate: Callable[[], object], within: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        await asyncio.sleep(0.02)


async def retained(port: int, topic: str = f"heald/v1/{SITE}/{NODE}/+") -> dict[str, wire.Message]:
    """The retained messages a new 3.1.1 subscriber gets at once."""
    got: dict[str, wire.Message] = {}
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V311, timeout=10) as c:
        await c.subscribe(topic, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for m in c.messages:
                    if m.retain:  # a live agent's metrics may arrive too
                        got[m.topic.value] = wire.decode(m.payload if isinstance(m.payload, bytes) else b"")
    return got


async def publish_command(port: int, payload: bytes, protocol: aiomqtt.ProtocolVersion) -> None:
    async with aiomqtt.Client("127.0.0.1", port, protocol=protocol, timeout=10) as c:
        await c.publish(CMD_TOPIC, payload, qos=1)


# ------------------------------------------------------------------------- what amqtt answers
@needs_amqtt
@pytest.mark.slow
@pytest.mark.asyncio
async def test_bare_amqtt_answers_mqtt5_only_without_a_will() -> None:
    """amqtt parses the whole CONNECT as 3.1.1 before it checks the protocol level. A bare MQTT 5
    CONNECT (no will, no properties) gets the 3.1.1 refusal (CONNACK 0x01; paho: reason 132
    "Unsupported protocol version"); one with a will or properties is misparsed, and what happens
    then depends on its bytes: the agent's (a will and a session expiry) is never answered, so the
    agent only ever times out. This is why the embedded broker has a front door. (Should amqtt
    ever answer them all, the front door in coordinator/broker.py is no longer needed.)

    amqtt's own connection handler reads the stream here, as behind its tcp listener; the test
    owns the sockets so that it can close the ones amqtt leaves hanging."""
    from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter  # noqa: PLC0415 - optional extra
    from amqtt.broker import Broker as AmqttBroker  # noqa: PLC0415

    port = free_port()
    broker = AmqttBroker({
        "listeners": {"default": {"type": "external", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })

    async def amqtt_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reads = StreamReaderAdapter(reader)
            await broker.external_connected(reads, StreamWriterAdapter(writer), "default")
        finally:
            writer.close()

    await broker.start()
    server = await asyncio.start_server(amqtt_reads, "127.0.0.1", port)
    try:
        bare = connect_packet(5, "bare", will=False, properties=False)
        assert await asyncio.to_thread(raw_connect, port, bare) == (REFUSE_PROTOCOL, True)
        persistent = connect_packet(5, "persistent", will=False, properties=True)
        answer, _ = await asyncio.to_thread(raw_connect, port, persistent, 2.0)
        assert answer == b"", "no CONNACK at all: the client can only time out"
        # the agent's own CONNECT: its will, its persistent session
        version = aiomqtt.ProtocolVersion.V5
        with pytest.raises(aiomqtt.MqttError, match="timed out"):
            async with aiomqtt.Client(
                    "127.0.0.1", port, identifier=f"heald-{SITE}-{NODE}", protocol=version, timeout=2,
                    will=aiomqtt.Will(wire.topic_for(SITE, NODE, "status"), b"offline", qos=1, retain=True),
                    **session_options(version, clean_start=False, session_expiry_s=3600)):
                pass
    finally:
        server.close()
        await broker.shutdown()
        await asyncio.sleep(0.1)  # the handlers see their clients gone and close their sockets


@needs_amqtt
@pytest.mark.asyncio
async def test_embedded_broker_refuses_mqtt5_at_once_and_speaks_3_1_1() -> None:
    port = free_port()
    async with embedded_broker("127.0.0.1", port):
        for will in (False, True):
            started = time.monotonic()
            answer = await asyncio.to_thread(raw_connect, port, connect_packet(5, "v5", will=will))
            assert answer == (REFUSE_PROTOCOL, True)
            assert time.monotonic() - started < 1.0
        answer, closed = await asyncio.to_thread(raw_connect, port, connect_packet(4, "v311", will=True))
        assert (answer, closed) == (b"\x20\x02\x00\x00", False)  # accepted, connection kept
        with pytest.raises(aiomqtt.MqttError) as refused:
            async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, timeout=2,
                                      will=aiomqtt.Will("t/w", b"x", qos=1, retain=True)):
                pass
        assert protocol_refused(refused.value), refused.value  # paho: reason code 132
        assert "Unsupported protocol version" in str(refused.value)


def timed_connect(port: int, packet: bytes) -> tuple[bytes, float]:
    """Connect and send ``packet``: the CONNACK and how long it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(packet)
        return sock.recv(4), time.monotonic() - started


@needs_amqtt
@pytest.mark.asyncio
async def test_embedded_broker_lets_agents_in_once_the_coordinator_has_subscribed() -> None:
    """After the coordinator restarts (and the embedded broker with it), agents replay their
    spools at once: the front door holds them until the coordinator has subscribed, so that none
    of it reaches a broker with no subscriber (acknowledged, then dropped)."""
    port = free_port()
    accepted = b"\x20\x02\x00\x00"
    async with embedded_broker("127.0.0.1", port, first_client="heald-coordinator-x") as subscribed:
        agent_connect = connect_packet(4, "n1", will=True)
        agent = asyncio.create_task(asyncio.to_thread(timed_connect, port, agent_connect))
        await asyncio.sleep(1.0)
        assert not agent.done(), "held"
        coordinator_connect = connect_packet(4, "heald-coordinator-x", will=False)
        answer, waited = await asyncio.to_thread(timed_connect, port, coordinator_connect)
        assert (answer, waited < 0.5) == (accepted, True)  # the coordinator goes in at once
        subscribed.set()
        answer, waited = await asyncio.wait_for(agent, 5)
        assert answer == accepted
        assert waited >= 1.0
        # once open, nobody waits
        assert (await asyncio.to_thread(timed_connect, port, connect_packet(4, "n2", will=False)))[1] < 0.5


# ------------------------------------------------------------------------- the agent's fallback
@needs_amqtt
@pytest.mark.asyncio
async def test_reporter_falls_back_once_and_keeps_every_feature_on_3_1_1(tmp_path: Path) -> None:
    port = free_port()
    inbox = Inbox()
    with structlog.testing.capture_logs() as logs:
        async with embedded_broker("127.0.0.1", port):
            reporter = Reporter(settings(port), node=NODE, site=SITE, state_dir=tmp_path, inbound=inbox)
            async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V311,
                                      timeout=10) as sub, running(reporter):
                await sub.subscribe("heald/v1/#", qos=1)
                await asyncio.wait_for(reporter.wait_connected(), 5)
                reporter.submit(build.report_event("probe", value=1.0))
                seen: list[tuple[wire.Message, int]] = []
                async with asyncio.timeout(5):
                    async for m in sub.messages:
                        seen.append((wire.decode(m.payload if isinstance(m.payload, bytes) else b""), m.qos))
                        if any(isinstance(x, wire.Event) for x, _ in seen):
                            break
                assert {type(x) for x, _ in seen} >= {wire.Status, wire.Birth, wire.Event}
                assert all(qos == 1 for _, qos in seen)  # QoS 1 end to end
                # retained birth and online status, for a coordinator that subscribes later
                kept = await retained(port)
                assert {type(m) for m in kept.values()} == {wire.Status, wire.Birth}
                assert next(m for m in kept.values() if isinstance(m, wire.Status)).state == "online"
                # the command subscription
                await publish_command(port, b"cmd-1", aiomqtt.ProtocolVersion.V311)
                await until(lambda: (CMD_TOPIC, b"cmd-1") in inbox.messages, what="command 1")
            # a command sent while the node is away waits in its persistent session ...
            await publish_command(port, b"cmd-2", aiomqtt.ProtocolVersion.V311)
            stopped = await retained(port)
            assert next(m for m in stopped.values() if isinstance(m, wire.Status)).reason == "agent stopped"
            # ... and reaches it when it is back (a new agent run: v5 is tried again, refused again)
            again = Reporter(settings(port), node=NODE, site=SITE, state_dir=tmp_path, inbound=inbox)
            async with running(again):
                await until(lambda: (CMD_TOPIC, b"cmd-2") in inbox.messages, what="the queued command")
                await asyncio.sleep(0.3)
    fallbacks = [e for e in logs if e["event"] == "mqtt.protocol_fallback"]
    assert len(fallbacks) == 2, "one per agent run"
    assert all(e["log_level"] == "info" and e["protocol"] == "3.1.1" for e in fallbacks)
    connected = [e for e in logs if e["event"] == "mqtt.connected"]
    assert [e["protocol"] for e in connected] == ["3.1.1", "3.1.1"]
    assert not [e for e in logs if e["event"] == "mqtt.connect_failed"], "a refusal is not a failure"


@needs_amqtt
@pytest.mark.asyncio
async def test_fallback_is_kept_across_reconnects_of_one_run(tmp_path: Path) -> None:
    port = free_port()
    # with an inbound (the daemon's command receiver), a dropped connection is seen at once
    reporter = Reporter(settings(port), node=NODE, site=SITE, state_dir=tmp_path, inbound=Inbox())
    with structlog.testing.capture_logs() as logs:
        async with running(reporter):
            for _ in range(2):  # the broker restarts under the agent
                async with embedded_broker("127.0.0.1", port):
                    await asyncio.wait_for(reporter.wait_connected(), 10)
                    reporter.submit(build.report_event("tick"))
                    await asyncio.wait_for(reporter.wait_drained(), 10)
                await until(lambda: not reporter.connected, what="the disconnect")
    assert [e["event"] for e in logs].count("mqtt.protocol_fallback") == 1
    assert [e["protocol"] for e in logs if e["event"] == "mqtt.connected"] == ["3.1.1", "3.1.1"]
    assert reporter.counters.connects == 2


@needs_amqtt
@pytest.mark.asyncio
async def test_protocol_5_is_never_downgraded(tmp_path: Path) -> None:
    port = free_port()
    reporter = Reporter(settings(port, protocol="5"), node=NODE, site=SITE, state_dir=tmp_path)
    with structlog.testing.capture_logs() as logs:
        async with embedded_broker("127.0.0.1", port), running(reporter):
            await until(lambda: reporter.counters.connect_failures >= 2, what="two refused connects")
    assert reporter.counters.connects == 0
    assert "mqtt.protocol_fallback" not in [e["event"] for e in logs]
    failed = [e for e in logs if e["event"] == "mqtt.connect_failed"]
    assert "Unsupported protocol version" in failed[0]["error"]


# ------------------------------------------------------------------------- mosquitto: MQTT 5
@pytest.mark.asyncio
@pytest.mark.parametrize(("protocol", "level"), [("auto", "p5"), (5, "p5"), ("3.1.1", "p2")])
async def test_persistent_session_queues_commands_while_the_node_is_away(
        mosquitto: Broker, tmp_path: Path, protocol: str | int, level: str) -> None:
    inbox = Inbox()
    reporter = Reporter(settings(mosquitto.port, protocol=protocol), node=NODE, site=SITE, state_dir=tmp_path,
                        inbound=inbox)
    async with running(reporter):
        await asyncio.wait_for(reporter.wait_connected(), 5)
        await asyncio.sleep(0.2)  # subscribed
    # mosquitto's log: p5 = MQTT 5, p2 = MQTT 3.1.1; c0 = clean start (clean session) off
    assert f"as heald-{SITE}-{NODE} ({level}, c0, k30)" in mosquitto.log_text()
    await publish_command(mosquitto.port, b"while-away", aiomqtt.ProtocolVersion.V5)
    async with running(Reporter(settings(mosquitto.port, protocol=protocol), node=NODE, site=SITE,
                                state_dir=tmp_path, inbound=inbox)):
        await until(lambda: (CMD_TOPIC, b"while-away") in inbox.messages, what="the queued command")


@pytest.mark.asyncio
async def test_clean_start_forgets_what_was_sent_while_away(mosquitto: Broker, tmp_path: Path) -> None:
    inbox = Inbox()
    make = lambda: Reporter(settings(mosquitto.port, clean_start=True), node=NODE, site=SITE,  # noqa: E731
                            state_dir=tmp_path, inbound=inbox)
    async with running(make()) as _:
        await asyncio.sleep(0.5)
    await publish_command(mosquitto.port, b"lost", aiomqtt.ProtocolVersion.V5)
    reporter = make()
    async with running(reporter):
        await asyncio.wait_for(reporter.wait_connected(), 5)
        for _ in range(50):  # until the new session has subscribed
            await publish_command(mosquitto.port, b"after", aiomqtt.ProtocolVersion.V5)
            with contextlib.suppress(AssertionError):
                await until(lambda: (CMD_TOPIC, b"after") in inbox.messages, within=0.2)
                break
        assert (CMD_TOPIC, b"after") in inbox.messages, "the live command"
    assert (CMD_TOPIC, b"lost") not in inbox.messages
    assert f"as heald-{SITE}-{NODE} (p5, c1, k30)" in mosquitto.log_text()


# ------------------------------------------------------------------------- a real agent
@needs_amqtt
@pytest.mark.slow
@pytest.mark.asyncio
async def test_heald_run_on_the_embedded_broker_birth_retained_and_will(tmp_path: Path) -> None:
    """``heald run`` with the default [mqtt] settings against the embedded broker: it connects
    (3.1.1 after the refusal), its birth and online status are retained, and a SIGKILL publishes
    its last will (offline, the same bdseq)."""
    port = free_port()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[node]\nid = "{NODE}"\nsite = "{SITE}"\n[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'runtime_dir = "{tmp_path / "run"}"\n[collect.gpu]\nenabled = false\n'
                   f"[playbooks]\nload_shipped = false\ndirs = []\n"
                   f'[mqtt]\nenabled = true\nport = {port}\n')
    async with embedded_broker("127.0.0.1", port):
        with (tmp_path / "agent.log").open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent", "run", "--config", str(cfg), stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
        try:
            async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V311,
                                      timeout=10) as sub:
                await sub.subscribe(f"heald/v1/{SITE}/{NODE}/status", qos=1)

                async def next_status() -> wire.Status:
                    async with asyncio.timeout(60):
                        async for m in sub.messages:
                            msg = wire.decode(m.payload if isinstance(m.payload, bytes) else b"")
                            assert isinstance(msg, wire.Status)
                            return msg
                    raise AssertionError("no status")

                online = await next_status()
                assert online.state == "online"
                # The birth follows the online status (each QoS 1, acknowledged in turn): under
                # load a first look can come between them.
                for _ in range(10):
                    kept = await retained(port)
                    if wire.Birth in {type(m) for m in kept.values()}:
                        break
                assert {type(m) for m in kept.values()} == {wire.Status, wire.Birth}
                proc.send_signal(signal.SIGKILL)
                await asyncio.wait_for(proc.wait(), 10)
                will = await next_status()
            assert (will.state, will.reason, will.bdseq) == ("offline", "connection lost", online.bdseq)
            kept = await retained(port)
            assert next(m for m in kept.values() if isinstance(m, wire.Status)).state == "offline"
        finally:
            if proc.returncode is None:
                proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
    text = (tmp_path / "agent.log").read_text()
    assert text.count('"mqtt.protocol_fallback"') == 1, text[-3000:]
