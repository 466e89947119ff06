"""MQTT transport: publish reports, replay the spool; carry the session's inbound subscriptions.

Data path (one direction, one order)::

    submit(msg) -> stamp node/site/seq -> encode -> memory queue -> spool (disk) -> publisher -> broker

``submit`` never blocks on the network: it stamps, encodes and writes the record into the spool
(an append-only file: page cache, fsynced once a second) when nothing waits before it, else
appends it to a bounded in-memory queue that a writer task moves into the spool; either wakes
the publisher, which reads the spool in order and publishes with at most ``max_inflight``
unacknowledged publishes and at most ``max_publish_per_s``. A record is acknowledged in the spool
(its cursor advanced) only when it and every record before it are published (QoS 1: PUBACK;
QoS 0: written to the socket). When the link breaks (error, disconnect, or a QoS 1 publish not
acknowledged within ``ack_timeout_s``) the publisher rewinds to the first unacknowledged record,
and replays from there after the next connect. So everything spooled while disconnected goes
out in its original order, with its original timestamps, before anything newer; and a
``kill -9`` at any moment loses nothing that reached ``submit`` (while the disk takes writes;
when it does not, see :mod:`agent.report.spool`). Delivery is at least once: receivers dedupe by
``(node, inc, seq)``.

Connection: MQTT 5, or 3.1.1 from a broker's first refusal of 5 on (``[mqtt] protocol``,
:mod:`agent.report.protocol`), a persistent session (``clean_start``, ``session_expiry_s``),
TLS/mTLS from ``[mqtt.tls]``, password from ``password_file`` (re-read on
every connect), last will = retained ``offline`` status; on connect the retained ``online``
status and the birth (``bdseq`` +1, persisted) are published before the replay. Reconnects use
capped full-jitter exponential backoff. :meth:`Reporter.run` never raises because of the broker.

Nor because of the state dir (issue 17): on a full or read-only disk the spool sheds its oldest
records and keeps what the disk cannot take in a bounded memory tail, published from there when
the broker is up (:mod:`agent.report.spool`); the sequence and ``bdseq`` counters go on from
memory (:mod:`agent.report.state`). What was dropped is counted and reported once connected: the
``report.spool_dropped`` event (``value``: records dropped; labels ``metrics`` and ``other``:
how many of each) and the ``status`` message's ``dropped_metrics`` / ``dropped_other``. While
the disk is in trouble, drops are also reported while connected, at most every
:data:`DROP_REPORT_INTERVAL_S` (with a healthy disk, only quota drops exist, reported on connect).

The same session carries what the coordinator sends back (signed commands, lease answers): an
:class:`Inbound` (the control stage's :class:`agent.control.receiver.CommandReceiver`) names
the topics to subscribe on every connect and takes every message that arrives on them. The
transport knows nothing of what those messages mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final, Literal, Protocol

import aiomqtt
import msgspec
import structlog

from agent import __version__, wire
from agent.collect.sample import Event as SampleEvent
from agent.collect.sample import Sample
from agent.fsutil import FailureStreak
from agent.report import build
from agent.report.check import OutboundCheck
from agent.report.pacing import TokenBucket, full_jitter
from agent.report.protocol import ProtocolChoice, session_options
from agent.report.settings import MqttSettings
from agent.report.spool import Spool, SpoolRecord
from agent.report.state import PersistentCounter, SeqStore, load_incarnation
from agent.report.tls import client_context
from agent.score.types import Risk as ScoreRisk

log = structlog.get_logger()

#: Kinds the reporter publishes itself (on connect); submit() refuses them.
_OWN_KINDS: Final = frozenset({"birth", "status", "command"})
#: While connected and the disk is in trouble, drops since the last report go out at most this often.
DROP_REPORT_INTERVAL_S: Final = 60.0
#: ``[mqtt]`` keys the running session takes as they change; any other change reconnects.
_SESSION_KEEPS: Final = frozenset({"max_publish_per_s", "max_payload_bytes", "metrics_interval_s",
                                   "queue_max", "backoff_initial_s", "backoff_max_s", "ack_timeout_s",
                                   "spool"})


class _Reconnect(Exception):
    """Ends a session so that the next one uses the reconfigured settings."""



class Inbound(Protocol):
    """Takes the messages of the subscriptions it names (the coordinator -> node direction)."""

    def topics(self) -> list[str]:
        """Topic filters to subscribe to (QoS 1) on every connect."""
        ...

    def on_message(self, topic: str, payload: object) -> None:
        """One message from the broker. Must not raise: hostile input is the receiver's to count."""
        ...


@dataclass
class ReporterCounters:
    published: int = 0  # records acknowledged by the broker (QoS 1) or written to the socket (QoS 0)
    spooled: int = 0  # records that were submitted while disconnected (they waited on disk)
    replayed: int = 0  # records published after a (re)connect that were submitted before it
    dropped_metrics: int = 0  # metrics records dropped: spool quota, full memory queue, oversize
    dropped_oversize: int = 0  # messages over max_payload_bytes even alone (non-metrics included)
    dropped_invalid: int = 0  # messages the coordinator would reject (agent.report.check), never sent
    dropped_other: int = 0  # non-metrics records the spool shed: state dir full or unwritable
    connects: int = 0
    connect_failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Slot:
    seq: int
    replay: bool
    done: bool = False


@dataclass
class _Pending:
    seq: int
    kind: str
    payload: bytes
    while_offline: bool = field(default=False)


class Reporter:
    """The report stage. Create it, run :meth:`run` as a task, call :meth:`submit` from the pipeline.

    The constructor opens the spool and the persisted counters (blocking file I/O: create it
    before the event loop is busy, or in ``asyncio.to_thread``).
    """

    def __init__(self, settings: MqttSettings, *, node: str, site: str, state_dir: Path | str,
                 labels: dict[str, str] | None = None, model_version: str = "",
                 collectors: Iterable[str] = (), capabilities: Iterable[str] = (),
                 inbound: Inbound | None = None) -> None:
        self.settings = settings
        self.node = node
        self.site = site
        self.labels = build.bounded_labels(labels)  # the birth's, inside the wire's bounds
        self.model_version = model_version[:wire.MAX_TEXT]
        self.collectors = build.bounded_names(collectors)
        self.capabilities = build.bounded_names(capabilities)
        self.inbound = inbound
        self.counters = ReporterCounters()
        self.state_dir = Path(state_dir)
        self._log = log.bind(node=node, site=site)
        self._check = OutboundCheck(self._log)
        sp = settings.spool
        self.spool = Spool(self.state_dir / "spool", quota_bytes=sp.quota_bytes,
                           segment_bytes=sp.segment_bytes)
        self._seq = SeqStore(self.state_dir / "report" / "seq", at_least=self.spool.last_seq + 1)
        self._bdseq = PersistentCounter(self.state_dir / "report" / "bdseq")
        self.incarnation = load_incarnation(self.state_dir / "report" / "incarnation")
        self._topics = {kind: wire.topic_for(site, node, kind) for kind in wire.KINDS if kind != "command"}
        self._queue: deque[_Pending] = deque()
        self._queue_event = asyncio.Event()
        self._spool_event = asyncio.Event()
        self._connected = False
        self._cancelled = False  # set when a cancellation reached the session (see _connection_loop)
        self._connected_event = asyncio.Event()
        self._drained = asyncio.Event()
        if self.spool.pending == 0:
            self._drained.set()
        self._replay_until = -1
        self._rng = random.Random()  # noqa: S311  (backoff jitter, not cryptography)
        self._protocol = ProtocolChoice(settings.protocol)
        self._reconfigured = asyncio.Event()
        self._bucket = TokenBucket(settings.max_publish_per_s)
        self._batch: list[Sample] = []
        self._batch_started = 0.0
        self._last_risk: wire.Risk | None = None
        self._last_risk_mono = 0.0
        self._boot_ts = time.time()
        self._drops_reported_mono = time.monotonic()
        self._disk_trouble = False  # the spool was degraded or shed since drops were last reported
        self._sheds_seen = 0
        self._writer_failures = FailureStreak("report.spool_write_failed", self._log, dir=str(self.spool.dir))
        self._sync_failures = FailureStreak("report.spool_sync_failed", self._log, dir=str(self.spool.dir))

    # ------------------------------------------------------------------ public state
    @property
    def connected(self) -> bool:
        return self._connected

    async def wait_connected(self) -> None:
        await self._connected_event.wait()

    async def wait_drained(self) -> None:
        """Until everything submitted so far is acknowledged by the broker."""
        await self._drained.wait()

    @property
    def queued(self) -> int:
        """Records submitted but not yet written to the spool."""
        return len(self._queue)

    @property
    def backlog(self) -> int:
        """Everything not yet acknowledged by the broker (memory queue + spool)."""
        return len(self._queue) + self.spool.pending

    def reconfigure(self, settings: MqttSettings) -> None:
        """New ``[mqtt]`` settings (SIGHUP): a new broker, credentials or session options reconnect
        at once; the spool, the sequence numbers and what waits to be sent are kept."""
        old, self.settings = self.settings, settings
        self._bucket = TokenBucket(settings.max_publish_per_s)
        if settings.protocol != old.protocol:
            self._protocol = ProtocolChoice(settings.protocol)
        if any(getattr(old, f.name) != getattr(settings, f.name)
               for f in msgspec.structs.fields(settings) if f.name not in _SESSION_KEEPS):
            self._log.info("mqtt.reconnect_for_reload", host=settings.host, port=settings.port)
            self._reconfigured.set()

    # ------------------------------------------------------------------ submit (pipeline side)
    def submit(self, message: wire.Envelope) -> bool:
        """Queue one message for delivery; never blocks. False when it was dropped (see counters).

        ``node``, ``site`` and ``seq`` are stamped here; ``ts``/``mono`` are kept as built.
        """
        kind = wire.kind_of(message)
        if kind in _OWN_KINDS:
            raise ValueError(f"the reporter publishes {kind} messages itself")
        stamped = msgspec.structs.replace(message, v=wire.PROTOCOL_VERSION, node=self.node, site=self.site,
                                          seq=self._seq.next(), inc=self.incarnation)
        payload = self._check.encode(stamped)
        if payload is None:  # the coordinator would reject it: not sent (logged once per streak)
            self.counters.dropped_invalid += 1
            self.counters.dropped_metrics += kind == "metrics"
            return False
        if len(payload) > self.settings.max_payload_bytes:
            return self._oversize(stamped, len(payload))
        if kind == "metrics" and len(self._queue) >= self.settings.queue_max:
            self.counters.dropped_metrics += 1
            return False
        self._queue.append(_Pending(stamped.seq, kind, payload, not self._connected))
        self._drained.clear()
        if len(self._queue) == 1 and not self._writer_failures.failing:
            # Straight into the spool (a write to the page cache: it survives kill -9) when
            # nothing is waiting before it, so that no report that reached submit is lost with
            # the process. The writer task takes over when the disk is in trouble.
            with contextlib.suppress(OSError):
                self._write_queue()
        if self._queue:
            self._queue_event.set()
        return True

    def _oversize(self, message: wire.Envelope, size: int) -> bool:
        if isinstance(message, wire.Metrics) and len(message.samples) > 1:
            half = len(message.samples) // 2
            first = self.submit(msgspec.structs.replace(message, samples=message.samples[:half]))
            second = self.submit(msgspec.structs.replace(message, samples=message.samples[half:]))
            return first and second
        self.counters.dropped_oversize += 1
        if isinstance(message, wire.Metrics):
            self.counters.dropped_metrics += 1
        self._log.error("report.message_too_large", kind=wire.kind_of(message), seq=message.seq, bytes=size,
                        max_payload_bytes=self.settings.max_payload_bytes)
        return False

    def submit_sample(self, sample: Sample) -> None:
        """Batch samples into one metrics message per ``metrics_interval_s`` of sample time
        (a batch covers ``[first.mono, first.mono + interval)`` and goes out when the next sample
        falls outside it, or at 3600 samples)."""
        if self._batch and (sample.mono - self._batch_started >= self.settings.metrics_interval_s
                            or len(self._batch) >= 3600):
            self.flush_samples()
        if not self._batch:
            self._batch_started = sample.mono
        self._batch.append(sample)

    def flush_samples(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            self.submit(build.metrics(batch))

    def submit_event(self, event: SampleEvent) -> None:
        self.submit(build.event(event))

    def submit_risk(self, risk: ScoreRisk, *, min_change: float = 0.1) -> bool:
        """Send a risk message when it changed (alert/cold flipped, anomaly or a failure probability
        moved by ``min_change``), or at least every ``metrics_interval_s``. True when sent."""
        msg = build.risk(risk)
        last = self._last_risk
        now = time.monotonic()
        if last is not None and now - self._last_risk_mono < self.settings.metrics_interval_s:
            moved = (last.alert != msg.alert or last.cold != msg.cold
                     or (last.anomaly is None) != (msg.anomaly is None)
                     or (msg.anomaly is not None and last.anomaly is not None
                         and abs(msg.anomaly - last.anomaly) >= min_change)
                     or any(abs(p - last.failure.get(k, 0.0)) >= min_change for k, p in msg.failure.items()))
            if not moved:
                return False
        self._last_risk, self._last_risk_mono = msg, now
        return self.submit(msg)

    # ------------------------------------------------------------------ run
    async def run(self) -> None:
        """Deliver until cancelled. Broker trouble is logged and retried, never raised."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._writer(), name="report-spool-writer")
                tg.create_task(self._syncer(), name="report-spool-sync")
                tg.create_task(self._connection_loop(), name="report-mqtt-connection")
        finally:
            self._connected = False
            self._connected_event.clear()
            self.flush_samples()
            with contextlib.suppress(OSError):
                self._write_queue()
            self.spool.close()

    async def _writer(self) -> None:
        while True:
            await self._queue_event.wait()
            self._queue_event.clear()
            try:
                self._write_queue()
            except OSError as exc:  # the spool keeps what the disk cannot take; this is a last resort
                self._writer_failures.failed(exc, queued=len(self._queue))
                await asyncio.sleep(1.0)
                self._queue_event.set()
            else:
                self._writer_failures.succeeded()

    def _write_queue(self) -> None:
        wrote = False
        dropped_before = self.spool.dropped_metrics
        other_before = self.spool.dropped_other
        try:
            while self._queue:
                item = self._queue[0]
                stored = self.spool.append(item.seq, item.kind, item.payload)
                self._queue.popleft()
                wrote = True
                self.counters.spooled += stored and item.while_offline
        finally:
            # The spool counts every drop: new records refused for the quota, old ones compacted
            # away, and (full or unwritable disk) records shed or pushed out of its memory tail.
            self.counters.dropped_metrics += self.spool.dropped_metrics - dropped_before
            self.counters.dropped_other += self.spool.dropped_other - other_before
            if wrote:
                self._spool_event.set()

    async def _syncer(self) -> None:
        while True:
            await asyncio.sleep(self.settings.spool.fsync_interval_s)
            try:
                job = self.spool.prepare_sync()
                if job is not None:
                    await asyncio.to_thread(job.run)  # never raises OSError: the spool logs how it went
                    self.spool.finish_sync(job)
            except OSError as exc:
                self._sync_failures.failed(exc)
            else:
                self._sync_failures.succeeded()
            self._disk_trouble |= self.spool.degraded or self.spool.sheds != self._sheds_seen
            self._sheds_seen = self.spool.sheds
            if self._connected and self._disk_trouble \
                    and time.monotonic() - self._drops_reported_mono >= DROP_REPORT_INTERVAL_S:
                self._report_drops()

    async def _connection_loop(self) -> None:
        attempt = 0
        while True:
            s = self.settings
            was_connected = fell_back = again = False
            try:
                was_connected = await self._session()
            except* _Reconnect:
                again = True
            except* aiomqtt.MqttError as group:
                was_connected = self._connected
                fell_back = not was_connected and self._protocol.fall_back(group.exceptions[0])
                if fell_back:  # once per agent run: retried at once, with 3.1.1
                    self._log.info("mqtt.protocol_fallback", host=s.host, port=s.port, protocol="3.1.1",
                                   reason="the broker refused MQTT 5; 3.1.1 until the agent restarts")
                else:
                    self._log_failure(group.exceptions[0], connected=self._connected)
            except* OSError as group:  # TLS context (missing CA file, bad key), password file
                was_connected = self._connected
                self._log_failure(group.exceptions[0], connected=self._connected)
            finally:
                self._connected = False
                self._connected_event.clear()
                self.spool.rewind()
            if self._cancelled:
                # Stopping, but the cancellation became an MqttError on the way out (aiomqtt's
                # __aexit__ times out waiting for its DISCONNECT and raises): never reconnect then,
                # or the daemon's stop would wait for this loop forever. (Not Task.cancelling():
                # on Python 3.11 a TaskGroup whose child failed leaves its parent's count at 1.)
                raise asyncio.CancelledError
            if fell_back or again:
                continue
            if was_connected:
                attempt = 0
            delay = full_jitter(attempt, s.backoff_initial_s, s.backoff_max_s, self._rng)
            attempt += 1
            self._log.debug("mqtt.reconnect_in", delay_s=round(delay, 3), attempt=attempt)
            with contextlib.suppress(TimeoutError):  # new settings cut the wait short
                async with asyncio.timeout(delay):
                    await self._reconfigured.wait()

    def _log_failure(self, exc: BaseException, *, connected: bool) -> None:
        s = self.settings
        error = str(exc) or type(exc).__name__
        fields: dict[str, object] = {"host": s.host, "port": s.port, "error": error,
                                     "error_type": type(exc).__name__}
        if s.tls.enabled:
            fields["tls_ca_file"] = s.tls.ca_file or "(system trust store)"
            fields["tls_cert_file"] = s.tls.cert_file
        if connected:
            self._log.warning("mqtt.connection_lost", **fields, backlog=self.backlog)
            return
        self.counters.connect_failures += 1
        if "certificate verify failed" in error.lower():
            self._log.error("mqtt.connect_failed",
                            reason=f"certificate verify failed: the broker's certificate is not trusted by "
                                   f"CA file {fields.get('tls_ca_file')}", **fields)
        else:
            self._log.warning("mqtt.connect_failed", **fields)

    # ------------------------------------------------------------------ one connection
    def _password(self) -> str | None:
        path = self.settings.password_file
        if path is None:
            return None
        return Path(path).read_text().rstrip("\r\n")

    def _status(self, state: Literal["online", "offline"], bdseq: int, reason: str = "") -> bytes:
        msg = wire.Status(v=wire.PROTOCOL_VERSION, node=self.node, site=self.site, seq=self._seq.next(),
                          inc=self.incarnation,
                          ts=time.time(), mono=time.monotonic(), state=state,
                          bdseq=bdseq, reason=reason, spool_pending=self.backlog,
                          dropped_metrics=self.counters.dropped_metrics,
                          dropped_other=self.counters.dropped_other)
        return wire.encode(msg)

    def _birth(self, bdseq: int) -> bytes:
        msg = wire.Birth(v=wire.PROTOCOL_VERSION, node=self.node, site=self.site, seq=self._seq.next(),
                         inc=self.incarnation,
                         ts=time.time(), mono=time.monotonic(), bdseq=bdseq, agent_version=__version__,
                         model_version=self.model_version, labels=self.labels, collectors=self.collectors,
                         capabilities=self.capabilities, hostname=socket.gethostname(), boot_ts=self._boot_ts)
        return wire.encode(msg)

    async def _session(self) -> bool:
        self._reconfigured.clear()
        s = self.settings
        tls = client_context(self.settings.tls)
        password = self._password()
        bdseq = self._bdseq.next()
        status_topic = self._topics["status"]
        will = aiomqtt.Will(status_topic, self._status("offline", bdseq, "connection lost"), qos=1,
                            retain=True)
        version = self._protocol.version
        client = aiomqtt.Client(
            s.host, s.port, username=s.username, password=password,
            identifier=s.client_id or f"heald-{self.site}-{self.node}",
            protocol=version, will=will, keepalive=s.keepalive_s,
            timeout=s.connect_timeout_s, tls_context=tls, max_inflight_messages=s.max_inflight,
            **session_options(version, clean_start=s.clean_start, session_expiry_s=s.session_expiry_s),
        )
        try:
            return await self._connected_session(client, status_topic, bdseq)
        finally:
            if tls is not None:
                tls.close_wrapped()

    async def _connected_session(self, client: aiomqtt.Client, status_topic: str, bdseq: int) -> bool:
        s = self.settings
        async with client:
            self._connected = True
            self._connected_event.set()
            self.counters.connects += 1
            try:
                await client.publish(status_topic, self._status("online", bdseq), qos=1, retain=True,
                                     timeout=s.ack_timeout_s)
                await client.publish(self._topics["birth"], self._birth(bdseq), qos=1, retain=True,
                                     timeout=s.ack_timeout_s)
                if self.inbound is not None:
                    await client.subscribe([(t, 1) for t in self.inbound.topics()], timeout=s.ack_timeout_s)
                self._write_queue()
                self._report_drops()
                self._replay_until = self.spool.last_seq
                self._log.info("mqtt.connected", host=s.host, port=s.port, bdseq=bdseq, tls=s.tls.enabled,
                               replay=self.spool.pending, protocol=self._protocol.name)
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._publisher(client, tg), name="report-mqtt-publisher")
                    if self.inbound is not None:
                        tg.create_task(self._receiver(client, self.inbound), name="report-mqtt-inbound")
                    tg.create_task(self._until_reconfigured(client, status_topic, bdseq),
                                   name="report-mqtt-reload")
            except asyncio.CancelledError:
                self._cancelled = True  # the connection loop must not take what follows for a lost link
                # Shutting down: a clean DISCONNECT suppresses the will, so say offline ourselves.
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.publish(status_topic, self._status("offline", bdseq, "agent stopped"), qos=1,
                                         retain=True, timeout=1.0)
                raise
        return True

    async def _until_reconfigured(self, client: aiomqtt.Client, status_topic: str, bdseq: int) -> None:
        await self._reconfigured.wait()
        with contextlib.suppress(aiomqtt.MqttError):  # leaving this broker: say offline (no will now)
            await client.publish(status_topic, self._status("offline", bdseq, "reconfigured"), qos=1,
                                 retain=True, timeout=1.0)
        raise _Reconnect

    def _report_drops(self) -> None:
        """Tell the coordinator what was dropped since the last report (see the module docstring)."""
        self._drops_reported_mono = time.monotonic()
        disk_trouble, self._disk_trouble = self._disk_trouble | self.spool.degraded, self.spool.degraded
        metrics, other = self.spool.take_unreported()
        if not (metrics or other):
            return
        self._log.warning("report.metrics_dropped_reported", dropped=metrics + other, metrics=metrics,
                          other=other)
        if other or disk_trouble:
            message = (f"{metrics + other} records were dropped ({metrics} metrics, {other} other): spool "
                       f"quota {self.settings.spool.quota_bytes} bytes reached or the state dir full or "
                       f"unwritable")
        else:
            message = (f"{metrics} metrics records were dropped while offline: spool quota "
                       f"{self.settings.spool.quota_bytes} bytes reached")
        self.submit(build.report_event("report.spool_dropped", value=float(metrics + other), message=message,
                                       labels={"metrics": str(metrics), "other": str(other)}))
        self._write_queue()

    async def _publisher(self, client: aiomqtt.Client, tg: asyncio.TaskGroup) -> None:
        window: deque[_Slot] = deque()
        room = asyncio.Semaphore(self.settings.max_inflight)
        while True:
            self._spool_event.clear()
            records = self.spool.read(self.settings.max_inflight)
            if not records:
                await self._spool_event.wait()
                continue
            for rec in records:
                await room.acquire()
                await self._bucket.take()
                slot = _Slot(rec.seq, rec.seq <= self._replay_until)
                window.append(slot)
                tg.create_task(self._publish(client, rec, slot, window, room),
                               name=f"report-publish-{rec.seq}")

    async def _publish(self, client: aiomqtt.Client, rec: SpoolRecord, slot: _Slot, window: deque[_Slot],
                       room: asyncio.Semaphore) -> None:
        delivery = wire.DELIVERY[rec.kind]
        try:
            await client.publish(self._topics[rec.kind], rec.payload, qos=delivery.qos,
                                 retain=delivery.retain, timeout=self.settings.ack_timeout_s)
        except aiomqtt.MqttError as exc:
            raise aiomqtt.MqttError(f"publish of seq {rec.seq} ({rec.kind}, qos {delivery.qos}) failed: "
                                    f"{exc}") from exc
        finally:
            room.release()
        slot.done = True
        while window and window[0].done:
            done = window.popleft()
            self.spool.ack(done.seq)
            self.counters.published += 1
            self.counters.replayed += done.replay
        if not window and not self._queue and self.spool.pending == 0:
            self._drained.set()

    async def _receiver(self, client: aiomqtt.Client, inbound: Inbound) -> None:
        async for message in client.messages:
            inbound.on_message(message.topic.value, message.payload)
