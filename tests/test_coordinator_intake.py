"""The coordinator's receive path (coordinator/intake.py): PUBLISH packets parsed without paho's
message objects, a bounded intake that sheds metrics before anything else, and the shed and lag
figures in /api/info. The flood runs a real coordinator against a real mosquitto."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from broker import Broker
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.wire import encode, topic_of
from coordinator.intake import Intake, _Reader
from coordinator.model import Incoming
from coordinator.rejects import RejectTable
from devtools.coordinator_proc import CoordinatorProcess, free_port, write_config
from devtools.fleet_sim import SimNode


def _incoming(node: SimNode, kind: str) -> Incoming:
    message = node.metrics() if kind == "metrics" else node.event("disk.full", {"mount": "/"})
    return Incoming(message=message, kind=kind, received_at=time.time())


def _topic(item: Incoming) -> bytes:
    return topic_of(item.message).encode()


def test_a_full_intake_sheds_metrics_first_and_counts_them_per_node() -> None:
    shed = RejectTable()
    intake = Intake(100, 50, shed)
    a, b = SimNode("node-a"), SimNode("node-b")
    for _ in range(100):
        item = _incoming(a, "metrics")
        assert intake.admits(_topic(item))
        intake.put(item)
    late = _incoming(b, "metrics")
    assert not intake.admits(_topic(late))  # full: a metrics report is shed...
    events = [_incoming(b, "event") for _ in range(100)]
    for item in events:  # ...while events still fit, in the reserve (a quarter of the capacity, >= 100)
        assert intake.admits(_topic(item))
        intake.put(item)
    beyond = _incoming(a, "event")
    assert not intake.admits(_topic(beyond))  # the reserve full too: now events are shed, and counted
    assert shed.as_dict()["nodes"] == {"node-b": {"total": 1, "metrics": 1},
                                       "node-a": {"total": 1, "event": 1}}
    assert shed.by_reason == {"metrics": 1, "event": 1}
    taken = []
    while intake.qsize():
        batch = intake.take()
        assert len(batch) <= 50
        taken += batch
    assert [i.kind for i in taken] == ["metrics"] * 100 + ["event"] * 100  # arrival order kept
    assert not intake.nonempty.is_set()
    assert not intake.full.is_set()


class _StubPaho:
    """What :class:`_Reader` takes from a paho client, recording what it would have done."""

    def __init__(self, protocol: int) -> None:
        self._protocol = protocol
        self._in_packet: dict[str, Any] = {}
        self.pubacks: list[int] = []
        self.slow = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        raise BlockingIOError

    def _handle_publish(self) -> int:
        self.slow += 1
        return paho.MQTT_ERR_SUCCESS

    def _send_puback(self, mid: int) -> int:
        self.pubacks.append(mid)
        return paho.MQTT_ERR_SUCCESS

    def loop_read(self, max_packets: int = 1) -> int:
        return paho.MQTT_ERR_SUCCESS


def _publish_packet(topic: bytes, payload: bytes, *, qos: int, mid: int, properties: bytes | None) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"")
    if properties is not None:
        body += properties
    return body + payload


@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311])
@pytest.mark.parametrize("qos", [0, 1])
def test_the_lean_publish_handler_reads_topic_payload_and_acknowledges(protocol: int, qos: int) -> None:
    got: list[tuple[bytes, bytes]] = []
    client = _StubPaho(protocol)
    reader = _Reader(client, lambda t, p: got.append((t, p)), loop=None)  # type: ignore[arg-type]
    props = None
    if protocol == paho.MQTTv5:
        p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        p.UserProperty = [("trace", "x" * 200)]  # > 127 bytes: a two-byte property length
        props = p.pack()  # type: ignore[no-untyped-call]
    payload = b"\x81\xa1v\x01" + bytes(range(256))
    client._in_packet = {"command": 0x30 | (qos << 1),
                         "packet": bytearray(_publish_packet(b"heald/v1/s/n/event", payload, qos=qos,
                                                             mid=4242, properties=props))}
    assert reader.handle_publish() == paho.MQTT_ERR_SUCCESS
    assert got == [(b"heald/v1/s/n/event", payload)]
    assert client.pubacks == ([4242] if qos else [])
    client._in_packet = {"command": 0x30 | (2 << 1), "packet": bytearray(b"")}
    reader.handle_publish()  # QoS 2 (never subscribed to): paho's own handler
    assert client.slow == 1
    client._in_packet = {"command": 0x30 | (qos << 1), "packet": bytearray(b"\x00\x10abc")}
    assert reader.handle_publish() == paho.MQTT_ERR_PROTOCOL  # a topic longer than the packet
    assert len(got) == 1


# ------------------------------------------------------------------------------ a real flood

NODES = 20
REPORTS = 6000  # per node... in all: metrics, every EVENT_EVERY-th an event
EVENT_EVERY = 40


@pytest.fixture
def coord(mosquitto: Broker, tmp_path: Path) -> Iterator[CoordinatorProcess]:
    port = free_port()
    # the smallest intake, so that a burst from one publisher overruns it
    store = {"queue_max": 100, "batch_max": 50, "batch_interval_s": 0.05}
    config = write_config(tmp_path, mqtt_port=mosquitto.port, web_port=port, store=store)
    proc = CoordinatorProcess(config, port)
    proc.start()
    yield proc
    proc.stop()


def _flood(port: int) -> tuple[int, int]:
    """Publish REPORTS reports from NODES nodes as fast as paho can: metrics at QoS 0, events at
    QoS 1 with an MQTT 5 user property. Returns (published, events)."""
    nodes = [SimNode(f"flood-{i:02d}") for i in range(NODES)]
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [("origin", "flood")]
        pending = []
        events = 0
        for i in range(REPORTS):
            node = nodes[i % NODES]
            if i % EVENT_EVERY == 0:
                message: Any = node.event("disk.full", {"mount": "/", "i": str(i)})
                pending.append(client.publish(topic_of(message), encode(message), qos=1, properties=props))
                events += 1
            else:
                message = node.metrics()
                client.publish(topic_of(message), encode(message), qos=0)
        for info in pending:
            info.wait_for_publish(30)
            assert info.is_published()
    finally:
        client.loop_stop()
        client.disconnect()
    return REPORTS, events


def _events_stored(coord: CoordinatorProcess) -> int:
    db = coord.config.parent / "state" / "coordinator.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT count(*) FROM events WHERE name = 'disk.full'").fetchone()[0])


def test_a_flood_sheds_metrics_counts_them_and_stores_every_event(mosquitto: Broker,
                                                                   coord: CoordinatorProcess) -> None:
    errors: list[BaseException] = []
    result: list[tuple[int, int]] = []

    def run() -> None:
        try:
            result.append(_flood(mosquitto.port))
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    if errors:
        raise errors[0]
    published, events = result[0]

    def done(c: CoordinatorProcess) -> dict[str, Any] | None:
        ingest = c.api("GET", "/api/info")[1]["ingest"]
        handled = ingest["processed"] + ingest["duplicates"] + ingest["shed"]["total"]
        return ingest if ingest["received"] == published and handled == published else None

    ingest = coord.wait_for(done, timeout=60)
    assert ingest["fast_receive"] is True
    shed = ingest["shed"]
    assert shed["total"] > 0, "the flood never filled the intake: nothing tested"
    assert shed["by_reason"] == {"metrics": shed["total"]}  # events were never shed
    assert set(shed["nodes"]) <= {f"flood-{i:02d}" for i in range(NODES)}
    assert sum(n["total"] for n in shed["nodes"].values()) + shed["other"]["total"] == shed["total"]
    assert ingest["malformed_total"] == 0
    assert ingest["store_rejected"] == 0
    assert _events_stored(coord) == events  # every event stored, once
    assert ingest["processed"] == published - shed["total"]
    # the lag is measured, as quantiles and for the latest batch
    assert ingest["lag_s"]["p99"] is not None
    assert ingest["lag_last_batch_s"] is not None
    lines = [line for line in coord.log_text().splitlines() if "shedding reports" in line]
    assert 1 <= len(lines) <= 3  # said so, without a line per report
