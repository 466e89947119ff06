"""The embedded MQTT broker (amqtt, optional extra ``heald[embedded]``).

Used when ``[mqtt] host`` is empty, so ``heald-coordinator`` plus ``heald run`` try the whole
system on one machine. It binds loopback only — an embedded broker has no authentication and
no TLS, so it is refused on any other address. For a fleet, run mosquitto (or any MQTT 3.1.1+
broker) and set ``mqtt.host``.

amqtt speaks MQTT 3.1.1 only, and it reads a whole CONNECT before it looks at the protocol
level: an MQTT 5 CONNECT without a will gets the 3.1.1 refusal (CONNACK 0x01, which paho
reports to a v5 client as reason 132, "Unsupported protocol version"), but one with a will or
properties — every heald agent's — is misparsed and never answered, so the client only ever
times out. So the broker listens through a front door of its own (amqtt's ``external``
listener): it reads the CONNECT's fixed header, protocol name and level, answers any level but
3.1.1 at once with CONNACK 0x01 and closes, as MQTT 3.1.1 §3.1.2.2 asks, and hands every other
connection, those bytes included, to amqtt. Clients in ``protocol = "auto"`` then fall back to
3.1.1 on the first refusal (see ``agent.report.protocol``).

The front door also holds every client but the coordinator until the coordinator has subscribed
(``first_client``): after a restart of the coordinator, and so of this broker, agents replay what
they spooled meanwhile, and a report published before anyone subscribed would be acknowledged
and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

import structlog

from coordinator.config import loopback_problem
from coordinator.errors import BrokerUnavailable

log = structlog.get_logger("coordinator.broker")

INSTALL_HINT = (
    "the embedded MQTT broker needs amqtt: pip install 'heald[embedded]' (or amqtt), "
    "or point [mqtt] host at a broker such as mosquitto"
)
#: The amqtt listener the front door hands connections to.
LISTENER: Final = "default"
#: A client that has not sent its CONNECT's first bytes within this is dropped.
CONNECT_HEAD_TIMEOUT_S: Final = 10.0
#: Other clients wait at most this long for the coordinator's subscriptions (then they go in).
HOLD_S: Final = 30.0
#: CONNACK, return code 0x01 "unacceptable protocol level" (MQTT 3.1.1 §3.2.2.3).
REFUSE_PROTOCOL: Final = b"\x20\x02\x00\x01"
#: How long the embedded broker keeps the session of a client that went away (its queued messages
#: included): the coordinator's default session expiry.
SESSION_EXPIRY_S: Final = 86400
_CONNECT: Final = 0x10
_MQTT_3_1_1: Final = 4


def check_loopback(host: str) -> None:
    """Refuse a non-loopback address for the embedded broker (the rule: :func:`loopback_problem`)."""
    if why := loopback_problem(host):
        raise BrokerUnavailable(why)


class _Replay:
    """A stream reader that gives back the CONNECT bytes the front door read, then the rest
    (what amqtt's ``StreamReaderAdapter`` reads from)."""

    def __init__(self, head: bytes, reader: asyncio.StreamReader) -> None:
        self._head = head
        self._reader = reader

    async def readexactly(self, n: int) -> bytes:
        take, self._head = self._head[:n], self._head[n:]
        if len(take) < n:
            take += await self._reader.readexactly(n - len(take))
        return take

    async def read(self, n: int = -1) -> bytes:
        if self._head:
            take, self._head = (self._head, b"") if n < 0 else (self._head[:n], self._head[n:])
            return take
        return await self._reader.read(n)

    def feed_eof(self) -> None:
        self._reader.feed_eof()


async def read_client_id(reader: asyncio.StreamReader) -> bytes:
    """The rest of a 3.1.1 CONNECT's variable header (flags, keep alive) and its client id."""
    head = await reader.readexactly(5)
    return head + await reader.readexactly(int.from_bytes(head[3:5], "big"))


async def read_connect_head(reader: asyncio.StreamReader) -> tuple[bytes, int | None]:
    """The bytes of a CONNECT up to its protocol level, and that level (None when the stream does
    not start with an MQTT 3.1.1/5 CONNECT: amqtt gets it as it is and answers it itself)."""
    head = bytearray(await reader.readexactly(1))
    if head[0] != _CONNECT:
        return bytes(head), None
    for _ in range(4):  # the remaining length: 1 to 4 bytes, 7 bits each
        head += await reader.readexactly(1)
        if not head[-1] & 0x80:
            break
    else:
        return bytes(head), None
    head += await reader.readexactly(2)
    if int.from_bytes(head[-2:], "big") != len(b"MQTT"):
        return bytes(head), None  # "MQIsdp": MQTT 3.1, which amqtt refuses properly itself
    head += await reader.readexactly(5)
    if head[-5:-1] != b"MQTT":
        return bytes(head), None
    return bytes(head), head[-1]


async def _front_door(broker: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      *, first_client: bytes | None, opened: asyncio.Event) -> None:
    from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter  # noqa: PLC0415 - optional extra

    hold = first_client is not None and not opened.is_set()
    try:
        async with asyncio.timeout(CONNECT_HEAD_TIMEOUT_S):
            head, level = await read_connect_head(reader)
            if hold and level == _MQTT_3_1_1:
                head += await read_client_id(reader)
    except (TimeoutError, asyncio.IncompleteReadError, OSError):
        writer.close()
        return
    if level is not None and level != _MQTT_3_1_1:
        log.debug("mqtt protocol level refused", protocol_level=level, peer=writer.get_extra_info("peername"))
        writer.write(REFUSE_PROTOCOL)
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()
        return
    if hold and first_client is not None and not head.endswith(first_client):
        with contextlib.suppress(TimeoutError):  # the coordinator first (see the module docstring)
            async with asyncio.timeout(HOLD_S):
                await opened.wait()
    try:
        replay = StreamReaderAdapter(_Replay(head, reader))
        await broker.external_connected(replay, StreamWriterAdapter(writer), LISTENER)
    finally:  # amqtt leaves an external connection's socket to its owner (at shutdown too)
        writer.close()


def amqtt_available() -> bool:
    try:
        import amqtt.broker  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


@contextlib.asynccontextmanager
async def embedded_broker(
    host: str, port: int, *, first_client: str | None = None
) -> AsyncIterator[asyncio.Event]:
    """Run an amqtt broker on ``host:port`` for the duration of the context.

    With ``first_client`` (the coordinator's client id), other clients are let in only once the
    event this yields is set (the coordinator sets it when it has subscribed), or after
    :data:`HOLD_S`."""
    check_loopback(host)
    try:
        from amqtt.broker import Broker  # noqa: PLC0415 - optional extra (untyped: see amqtt_available)
    except ImportError as exc:
        raise BrokerUnavailable(f"{INSTALL_HINT} ({exc})") from None
    for name in ("amqtt", "transitions"):  # amqtt logs every packet at INFO through stdlib logging
        logging.getLogger(name).setLevel(logging.WARNING)
    config: dict[str, Any] = {
        "listeners": {LISTENER: {"type": "external", "bind": f"{host}:{port}"}},
        "plugins": {"coordinator.embedded_auth.LoopbackAuthPlugin": {}},
        # 3.1.1 has no per-client session expiry: a session left this long is dropped.
        "session_expiry_interval": SESSION_EXPIRY_S,
    }
    broker = Broker(config)
    connections: set[asyncio.Task[None]] = set()
    opened = asyncio.Event()
    # the client id as the CONNECT carries it: its length, then its UTF-8 bytes
    first = None
    if first_client is not None:
        first = len(first_client.encode()).to_bytes(2, "big") + first_client.encode()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            connections.add(task)
            task.add_done_callback(connections.discard)
        await _front_door(broker, reader, writer, first_client=first, opened=opened)

    try:
        await broker.start()
        server = await asyncio.start_server(accept, host, port)
    except Exception as exc:
        with contextlib.suppress(Exception):
            await broker.shutdown()
        raise BrokerUnavailable(f"cannot start the embedded broker on {host}:{port}: {exc}") from exc
    log.info(
        "embedded mqtt broker started",
        listen=f"{host}:{port}",
        protocol="3.1.1",
        note="loopback only, anonymous; use mosquitto for a real fleet",
    )
    try:
        yield opened
    finally:
        server.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await broker.shutdown()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
