"""The coordinator's receive path: PUBLISH packets from the socket into a bounded batch, no queue hop.

At 10,000 reports/s the cost of receiving a report is the cost of ingest. paho (under aiomqtt)
spends most of it on objects nobody reads: an ``MQTTMessage`` with a ``threading.Condition`` per
message, an MQTT 5 ``Properties`` object, aiomqtt's own ``Message`` and queue, and three
``recv`` calls plus one event-loop wake-up per packet. :func:`install` replaces three of paho's
methods *on one client object* (nothing global) with lean ones:

- ``_handle_publish``: the topic, packet id and payload are sliced out of the packet (the MQTT 5
  properties are skipped: the coordinator reads none, and asks for no topic aliases), handed to
  the sink, and a QoS 1 message is acknowledged as paho would (after the sink returned);
- ``_sock_recv``: reads up to 64 KiB at once and serves paho's small reads from that buffer;
- ``loop_read``: reads up to :data:`PACKETS_PER_WAKEUP` packets per wake-up, and schedules
  itself again while the buffer holds data (the socket would not wake the loop for it).

Every other packet (CONNACK, SUBACK, PUBACK of the commands, PINGRESP, DISCONNECT) goes through
paho unchanged, and so does a QoS 2 PUBLISH (the coordinator subscribes at QoS 0 and 1). When the
installed paho lacks what this relies on (:func:`supported`), nothing is replaced and messages
arrive through aiomqtt's iterator as before: slower, same results.

The sink runs on the event loop's thread (aiomqtt reads the socket from a loop reader callback).
:class:`Intake` is the sink's destination: reports in arrival order, bounded, shedding metrics
before anything else when full (see its docstring).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import aiomqtt
import paho.mqtt.client as paho
import structlog

from coordinator.model import Incoming
from coordinator.rejects import RejectTable

log = structlog.get_logger("coordinator.ingest")

#: Bytes read from the socket at once.
RECV_BYTES: Final = 65536
#: Packets handled per event-loop wake-up before the loop gets a turn (then it resumes at once).
PACKETS_PER_WAKEUP: Final = 512
#: How often (at most) the shedding is logged, in seconds.
SHED_LOG_INTERVAL_S: Final = 10.0

_PUBLISH: Final = 0x30
_U16: Final = struct.Struct("!H")

Sink = Callable[[bytes, bytes], None]


def supported(client: Any) -> bool:
    """Whether ``client`` (a paho client) has the internals :func:`install` replaces and uses."""
    need = ("_handle_publish", "_sock_recv", "_packet_read", "_loop_rc_handle", "_send_puback",
            "_protocol", "loop_read")
    return all(hasattr(client, name) for name in need) and isinstance(getattr(client, "_in_packet", None),
                                                                       dict)


def install(client: aiomqtt.Client, sink: Sink) -> bool:
    """Route the PUBLISH packets ``client`` receives to ``sink(topic, payload)``; False when this
    paho cannot (then nothing was changed)."""
    inner: Any = client._client
    if not supported(inner):
        log.warning("mqtt fast receive unavailable", paho=getattr(paho, "__version__", "?"),
                    reason="this paho lacks the internals it uses; receiving through aiomqtt instead")
        return False
    _Reader(inner, sink, asyncio.get_running_loop())
    return True


class _Reader:
    """The replaced methods of one paho client, and their read buffer."""

    def __init__(self, client: Any, sink: Sink, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.sink = sink
        self.loop = loop
        self.v5 = client._protocol == paho.MQTTv5
        self.buffer = b""
        self.offset = 0
        self.resume_scheduled = False
        self._sock_recv = client._sock_recv
        self._handle_slow = client._handle_publish
        client._sock_recv = self.sock_recv
        client._handle_publish = self.handle_publish
        client.loop_read = self.loop_read

    def sock_recv(self, bufsize: int) -> bytes:
        """paho's ``_sock_recv``, served from a 64 KiB read (its errors are paho's own)."""
        if self.offset >= len(self.buffer):
            data = self._sock_recv(RECV_BYTES)  # raises BlockingIOError when there is nothing
            if len(data) <= bufsize:
                return bytes(data)  # b"" (connection closed) included
            self.buffer, self.offset = bytes(data), 0
        start = self.offset
        self.offset = end = min(start + bufsize, len(self.buffer))
        return self.buffer[start:end]

    def buffered(self) -> int:
        return len(self.buffer) - self.offset

    def loop_read(self, max_packets: int = 1) -> int:
        """paho's ``loop_read``, up to :data:`PACKETS_PER_WAKEUP` packets a call."""
        client = self.client
        rc: int = paho.MQTT_ERR_SUCCESS
        for _ in range(PACKETS_PER_WAKEUP):
            if client._sock is None:
                return paho.MQTT_ERR_NO_CONN
            rc = client._packet_read()
            if rc > 0:
                return int(client._loop_rc_handle(rc))
            if rc == paho.MQTT_ERR_AGAIN and not self.buffered():
                return paho.MQTT_ERR_SUCCESS
        if self.buffered() and not self.resume_scheduled:
            self.resume_scheduled = True  # the socket will not wake the loop for what is buffered
            self.loop.call_soon(self._resume)
        return paho.MQTT_ERR_SUCCESS

    def _resume(self) -> None:
        self.resume_scheduled = False
        if self.client._sock is not None:
            self.loop_read()

    def handle_publish(self) -> int:
        """paho's ``_handle_publish`` without its message objects (see the module docstring)."""
        client = self.client
        packet = client._in_packet
        header: int = packet["command"]
        qos = (header & 0x06) >> 1
        if qos > 1:
            return int(self._handle_slow())
        data = packet["packet"]
        try:
            (length,) = _U16.unpack_from(data, 0)
            pos = 2 + length
            topic = bytes(data[2:pos])
            mid = 0
            if qos:
                (mid,) = _U16.unpack_from(data, pos)
                pos += 2
            if self.v5:  # skip the properties: a variable byte integer length, then the bytes
                size = mult = 0
                for _ in range(4):
                    byte = data[pos]
                    pos += 1
                    size += (byte & 127) << mult
                    mult += 7
                    if not byte & 128:
                        break
                pos += size
            if pos > len(data) or not topic:
                return paho.MQTT_ERR_PROTOCOL
            payload = bytes(data[pos:])
        except (struct.error, IndexError):
            return paho.MQTT_ERR_PROTOCOL  # a malformed packet from the broker: paho reconnects
        self.sink(topic, payload)
        if qos:
            return int(client._send_puback(mid))
        return paho.MQTT_ERR_SUCCESS


class Intake:
    """The reports received and not yet handed to the store: arrival order, bounded, metrics shed first.

    A metrics report is admitted while fewer than ``capacity`` reports wait; any other report
    (events, actions, acks, presence, risk, cost) while fewer than ``capacity + reserve`` do. So
    when the store falls behind, metrics are shed first (they are superseded by the next batch a
    second later, and an agent counts what it sheds itself), and the reserve keeps room for the
    reports that carry events, the audit trail and command acks. Only when the reserve is full
    too are those shed. Shedding costs almost nothing (the payload is not even decoded), so the
    coordinator never stalls: it keeps receiving, acknowledging and committing at the store's
    pace. What is shed is counted per node and kind (``/api/info`` → ``ingest.shed``), and
    logged at most once per :data:`SHED_LOG_INTERVAL_S`.
    """

    def __init__(self, capacity: int, batch_max: int, shed: RejectTable) -> None:
        self.capacity = capacity
        self.limit = capacity + max(100, capacity // 4)
        self.batch_max = batch_max
        self.items: deque[Incoming] = deque()
        self.nonempty = asyncio.Event()
        self.full = asyncio.Event()  # at least batch_max waiting
        self.shed = shed  # per node (as the topic names it) and kind
        self._shed_logged_at = 0.0
        self._shed_unlogged = 0

    def qsize(self) -> int:
        return len(self.items)

    def admits(self, topic: bytes) -> bool:
        """Whether a report on ``topic`` fits; if not it is counted as shed (and maybe logged)."""
        depth = len(self.items)
        if depth < self.capacity:
            return True
        is_metrics = topic.endswith(b"/metrics")
        if not is_metrics and depth < self.limit:
            return True
        parts = topic.split(b"/")
        node = parts[3].decode(errors="replace")[:128] if len(parts) == 5 else None
        self.shed.add(node, "metrics" if is_metrics else parts[-1].decode(errors="replace")[:32])
        self._shed_unlogged += 1
        now = time.monotonic()
        if now - self._shed_logged_at >= SHED_LOG_INTERVAL_S:
            log.warning("ingest behind: shedding reports", shed=self._shed_unlogged,
                        shed_total=self.shed.total, by_kind=dict(self.shed.by_reason), waiting=depth,
                        capacity=self.capacity,
                        note="metrics first; events, actions and acks only once the reserve is full too")
            self._shed_logged_at, self._shed_unlogged = now, 0
        return False

    def put(self, item: Incoming) -> None:
        items = self.items
        items.append(item)
        n = len(items)
        if n == 1:
            self.nonempty.set()
        if n == self.batch_max:
            self.full.set()

    def take(self) -> list[Incoming]:
        """Up to ``batch_max`` reports, oldest first."""
        items = self.items
        n = min(len(items), self.batch_max)
        batch = [items.popleft() for _ in range(n)]
        if not items:
            self.nonempty.clear()
        if len(items) < self.batch_max:
            self.full.clear()
        return batch
