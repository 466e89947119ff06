"""MQTT side of the coordinator: subscribe, decode, batch into the store, publish signed commands.

Subscriptions: one filter per report kind (``heald/v1/+/+/<kind>``) rather than ``heald/v1/+/+/+``,
so the coordinator never receives the commands it (or another replica) publishes. With
``mqtt.share_group`` set, the high-volume kinds (metrics, risk, event, action, cmd_ack) are
subscribed as ``$share/<group>/...`` so replicas split them; ``birth`` and ``status`` stay
plain subscriptions because brokers do not deliver *retained* messages to shared subscriptions,
and every replica must see the fleet's retained presence at start. The store's ``(node, seq)``
keys make the resulting double delivery harmless: each message is processed exactly once.

A malformed message (bad topic, bad payload, a value outside the wire's bounds such as a NaN,
topic/payload mismatch) is counted by reason and, per node, in :class:`~coordinator.rejects.RejectTable`
(logged at most once a minute per node), and dropped; so is a report the store refuses
(:mod:`coordinator.store.reports` leaves it out of its batch). Nothing a node sends can stop the
loop or cost another node's reports.

Received reports go straight from the socket to a bounded intake (:mod:`coordinator.intake`):
no queue hop, and when the store falls behind, metrics are shed (counted per node, logged)
before any other report, so the coordinator degrades by shedding and never by stalling.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import aiomqtt
import structlog

from agent.errors import WireError
from agent.wire import (
    WireTooLarge,
    WireTopicError,
    WireVersionError,
    decode,
    encode,
    parse_topic,
    topic_of,
)
from agent.wire.messages import Command
from coordinator import intake
from coordinator.config import MqttSection, read_secret_file
from coordinator.model import BatchResult, Incoming
from coordinator.mqtt_session import ProtocolChoice, command_properties, session_options
from coordinator.rejects import NO_NODE, RejectTable

log = structlog.get_logger("coordinator.ingest")

REPORT_SUFFIXES: Final = ("birth", "status", "metrics", "risk", "event", "action", "cmd_ack", "cost")
RETAINED_SUFFIXES: Final = frozenset({"birth", "status"})


def subscription_qos(topic: str) -> int:
    """Metrics are published at QoS 0 (superseded by the next batch): subscribing at QoS 1 would only
    add a PUBACK per report for messages that are delivered at QoS 0 anyway."""
    return 0 if topic.endswith("/metrics") else 1


def subscriptions(share_group: str) -> list[str]:
    """The topic filters this replica subscribes to."""
    out = []
    for suffix in REPORT_SUFFIXES:
        topic = f"heald/v1/+/+/{suffix}"
        out.append(
            f"$share/{share_group}/{topic}" if share_group and suffix not in RETAINED_SUFFIXES else topic
        )
    return out


@dataclass
class IngestStats:
    received: int = 0
    processed: int = 0
    duplicates: int = 0
    malformed: Counter[str] = field(default_factory=Counter)
    ignored: int = 0
    batches: int = 0
    store_errors: int = 0
    dropped_batches: int = 0
    commands_sent: int = 0
    connected: bool = False
    connects: int = 0
    last_batch_s: float = 0.0
    lags: deque[float] = field(default_factory=lambda: deque(maxlen=20_000))
    lag_last_batch_s: float | None = None  # the oldest report's lag in the latest committed batch
    fast_receive: bool = False  # PUBLISH packets go straight to the intake (coordinator.intake)
    store_rejected: int = 0  # reports the store refused (left out of their batch, which was stored)
    rejected: RejectTable = field(default_factory=RejectTable)  # malformed and store_rejected, per node
    shed: RejectTable = field(default_factory=RejectTable)  # not admitted: the intake was full

    def reject(self, node: str | None, reason: str, detail: str | Callable[[], str]) -> None:
        """Count one rejected report for ``node`` (from the topic); log it unless this node, or the
        log as a whole, had its share of lines lately. ``detail`` is only made when logged."""
        unlogged = self.rejected.add(node, reason)
        if unlogged is not None:
            error = detail if isinstance(detail, str) else detail()
            log.warning("report rejected", node=node or NO_NODE, reason=reason, error=error[:500],
                        not_logged_since=unlogged)

    def lag_quantiles(self) -> dict[str, float | None]:
        if not self.lags:
            return {"p50": None, "p99": None, "max": None}
        ordered = sorted(self.lags)
        return {
            "p50": ordered[len(ordered) // 2],
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "max": ordered[-1],
        }

    def as_dict(self, queue_depth: int = 0) -> dict[str, Any]:
        return {
            "received": self.received,
            "processed": self.processed,
            "duplicates": self.duplicates,
            "malformed": dict(self.malformed),
            "malformed_total": sum(self.malformed.values()),
            "ignored": self.ignored,
            "batches": self.batches,
            "store_errors": self.store_errors,
            "dropped_batches": self.dropped_batches,
            "commands_sent": self.commands_sent,
            "connected": self.connected,
            "connects": self.connects,
            "queue_depth": queue_depth,
            "last_batch_s": self.last_batch_s,
            "lag_s": self.lag_quantiles(),
            "lag_last_batch_s": self.lag_last_batch_s,
            "shed": self.shed.as_dict(),
            "fast_receive": self.fast_receive,
            "store_rejected": self.store_rejected,
            "rejected": self.rejected.as_dict(),
        }


def classify(topic: str, payload: bytes, max_bytes: int, received_at: float) -> Incoming | str:
    """Decode one MQTT message: an :class:`Incoming`, ``"ignored"``, or a malformed-reason string."""
    try:
        t = parse_topic(topic)
    except WireTopicError:
        return "topic"
    if t.kind == "command":
        return "ignored"
    try:
        message = decode(payload, max_bytes=max_bytes)
    except WireTooLarge:
        return "too_large"
    except WireVersionError:
        return "version"
    except WireError:
        return "decode"
    from agent.wire import kind_of  # noqa: PLC0415 - hot path keeps the module namespace small

    kind = kind_of(message)
    if kind != t.kind or message.node != t.node or message.site != t.site:
        return "topic_mismatch"  # a node may only speak for itself, on its own topic
    return Incoming(message=message, kind=kind, received_at=received_at)


def topic_node(topic: str) -> str | None:
    """The node a report's topic names, None when the topic names none (the rejects table's key)."""
    try:
        return parse_topic(topic).node
    except WireTopicError:
        return None


def explain(topic: str, payload: bytes, max_bytes: int) -> str:
    """Why :func:`classify` rejected a message, in words: decoded again, only when it is logged."""
    try:
        t = parse_topic(topic)
        message = decode(payload, max_bytes=max_bytes)
    except WireError as exc:
        return str(exc)
    from agent.wire import kind_of  # noqa: PLC0415 - as in classify

    return (f"a {kind_of(message)} message of node {message.node!r}, site {message.site!r} on the "
            f"{t.kind} topic of node {t.node!r}, site {t.site!r}")


def _tls_context(cfg: MqttSection) -> ssl.SSLContext | None:
    if not cfg.tls:
        return None
    ctx = ssl.create_default_context(cafile=cfg.ca_file)
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    return ctx


class Bus:
    """The coordinator's MQTT connection: ingest loop, batcher and command outbox."""

    def __init__(
        self,
        cfg: MqttSection,
        *,
        host: str,
        port: int,
        client_id: str,
        apply: Callable[[list[Incoming]], Awaitable[BatchResult]],
        after_batch: Callable[[BatchResult], Awaitable[None]],
        batch_max: int,
        batch_interval_s: float,
        queue_max: int,
        writers: int = 1,
    ) -> None:
        self.cfg = cfg
        self.host = host
        self.port = port
        self.client_id = client_id
        self.apply = apply
        self.after_batch = after_batch
        self.batch_max = batch_max
        self.batch_interval_s = batch_interval_s
        self.writers = writers  # batches committed at once (the store's write transactions)
        self.outbox: asyncio.Queue[Command] = asyncio.Queue(10_000)
        self.stats = IngestStats()
        # reports received, not yet committed: bounded, metrics shed first (coordinator.intake)
        self.queue = intake.Intake(queue_max, batch_max, self.stats.shed)
        self.changed = asyncio.Event()  # set after each committed batch (the live stream waits on it)
        self.ready = asyncio.Event()  # set once subscribed
        self._client: aiomqtt.Client | None = None
        self._protocol = ProtocolChoice(cfg.protocol)  # MQTT 5, or 3.1.1 once a broker refused 5

    async def publish(self, command: Command) -> None:
        """Queue a signed command; it is sent as soon as the broker connection is up."""
        try:
            self.outbox.put_nowait(command)
        except asyncio.QueueFull:
            log.error("command outbox full, dropping", command=command.id, node=command.node)

    async def run(self) -> None:
        # What exists now (modules, config, the store) lives as long as the process: out of the
        # collector's generations, and a young generation sized for a batch's worth of reports.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._connection_loop(), name="mqtt-connection")
            tg.create_task(self._batch_loop(), name="ingest-batcher")

    def _client_for(self) -> aiomqtt.Client:
        password = (
            read_secret_file(self.cfg.password_file, "mqtt.password_file") if self.cfg.password_file else None
        )
        version = self._protocol.version
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            username=self.cfg.username,
            password=password,
            keepalive=self.cfg.keepalive_s,
            tls_context=_tls_context(self.cfg),
            protocol=version,
            max_queued_incoming_messages=0,
            timeout=10,
            **session_options(
                version, clean_start=self.cfg.clean_start, session_expiry_s=self.cfg.session_expiry_s,
                max_payload_bytes=self.cfg.max_payload_bytes,
            ),
        )

    async def _connection_loop(self) -> None:
        backoff = 0.2
        cancelled = False
        while True:
            retry_now = False
            try:
                client = self._client_for()
                self.stats.fast_receive = intake.install(client, self.accept)
                async with client:
                    try:
                        self._client = client
                        for topic in subscriptions(self.cfg.share_group):
                            await client.subscribe(topic, qos=subscription_qos(topic))
                        self.stats.connected = True
                        self.stats.connects += 1
                        self.ready.set()
                        log.info(
                            "mqtt connected",
                            host=self.host,
                            port=self.port,
                            client_id=self.client_id,
                            share_group=self.cfg.share_group or None,
                            protocol=self._protocol.name,
                        )
                        backoff = 0.2
                        async with asyncio.TaskGroup() as tg:
                            tg.create_task(self._sender(client), name="mqtt-sender")
                            await self._receive(client)
                    except asyncio.CancelledError:
                        cancelled = True  # what aiomqtt raises on the way out is no lost link
                        raise
            except* aiomqtt.MqttError as group:
                retry_now = not self.stats.connected and self._protocol.fall_back(group.exceptions[0])
                if retry_now:  # once per coordinator run
                    log.info(
                        "mqtt protocol fallback",
                        host=self.host,
                        port=self.port,
                        protocol="3.1.1",
                        reason="the broker refused MQTT 5; 3.1.1 until the coordinator restarts",
                    )
                else:
                    log.warning(
                        "mqtt connection lost, reconnecting",
                        error=str(group.exceptions[0]),
                        retry_in_s=round(backoff, 2),
                    )
            finally:
                self._client = None
                self.stats.connected = False
            # A disconnect error raised while we were being cancelled (aiomqtt's __aexit__ times out
            # on its DISCONNECT): stop, never reconnect. Not Task.cancelling(): on Python 3.11 a
            # TaskGroup whose child failed after its body ended leaves the parent's count at 1.
            if cancelled:
                raise asyncio.CancelledError
            if retry_now:
                continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.cfg.backoff_max_s)

    def accept(self, topic_bytes: bytes, payload: bytes) -> None:
        """One received report: shed when the intake is full, else decoded and added to the batch."""
        stats = self.stats
        stats.received += 1
        if not self.queue.admits(topic_bytes):
            return
        max_bytes = self.cfg.max_payload_bytes
        got: Incoming | str
        try:
            topic = topic_bytes.decode()
        except UnicodeDecodeError:
            topic, got = topic_bytes.decode(errors="replace"), "topic"
        else:
            got = classify(topic, payload, max_bytes, time.time())
        if isinstance(got, str):
            if got == "ignored":
                stats.ignored += 1
            else:
                stats.malformed[got] += 1
                stats.reject(topic_node(topic), got, partial(explain, topic, payload, max_bytes))
            return
        self.queue.put(got)

    async def _receive(self, client: aiomqtt.Client) -> None:
        """Wait for the connection to end; with fast receive off, hand each message to :meth:`accept`."""
        async for msg in client.messages:
            payload = msg.payload
            self.accept(msg.topic.value.encode(),
                        payload if isinstance(payload, bytes) else str(payload).encode())
        raise aiomqtt.MqttError("message stream ended")

    async def _sender(self, client: aiomqtt.Client) -> None:
        while True:
            command = await self.outbox.get()
            if command.expires_at < time.time():
                log.warning("dropping expired command", command=command.id, node=command.node)
                continue
            try:
                await client.publish(
                    topic_of(command),
                    encode(command),
                    qos=1,
                    properties=command_properties(self._protocol.version, command.expires_at),
                )
            except aiomqtt.MqttError:
                self.outbox.put_nowait(command)  # put it back: the reconnect resends it
                raise
            self.stats.commands_sent += 1

    async def _batch_loop(self) -> None:
        """Commit what waits: a full batch at once, else what came within ``batch_interval_s``;
        up to ``writers`` batches at once, each taken only when a writer is free (so it fills up
        meanwhile). Reports keep arriving (and are shed, metrics first, when the intake is full)
        during a commit."""
        pending = self.queue
        free = asyncio.Semaphore(self.writers)

        async def commit(batch: list[Incoming]) -> None:
            try:
                await self._commit(batch)
            finally:
                free.release()

        async with asyncio.TaskGroup() as tg:
            while True:
                await pending.nonempty.wait()
                if not pending.full.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.batch_interval_s):
                            await pending.full.wait()
                await free.acquire()
                tg.create_task(commit(pending.take()), name="ingest-commit")

    async def _commit(self, batch: list[Incoming]) -> None:
        for attempt in range(4):
            started = time.monotonic()
            try:
                result = await self.apply(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store may fail in many ways; we retry then drop
                self.stats.store_errors += 1
                log.error(
                    "store write failed",
                    error=str(exc),
                    error_type=type(exc).__name__,
                    batch=len(batch),
                    attempt=attempt + 1,
                )
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            self.stats.last_batch_s = time.monotonic() - started
            self.stats.batches += 1
            self.stats.processed += result.new
            self.stats.duplicates += result.duplicates
            self.stats.lags.extend(result.lags)
            if result.lags:
                self.stats.lag_last_batch_s = max(result.lags)
            for r in result.rejected:  # left out of the batch by the store: the rest was stored
                self.stats.store_rejected += 1
                self.stats.reject(r.node, r.reason, f"{r.kind} seq {r.seq}: {r.error}")
            if result.new:
                self.changed.set()
            try:
                await self.after_batch(result)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - lease handling must not stop ingest
                log.error("post-batch handling failed", error=str(exc), error_type=type(exc).__name__)
            return
        self.stats.dropped_batches += 1
        log.error("dropping batch after repeated store failures", batch=len(batch))

    async def wait_ready(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.ready.wait()
        return self.ready.is_set()
