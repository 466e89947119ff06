"""The Reporter against a real, private mosquitto: birth/status/will, commands in, TLS, outages,
kill -9, spool quota and corruption. Long ones are marked slow."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest
import structlog
from broker import Broker, BrokerFactory, Subscriber, TlsCerts, default_config, tls_listener_config

from agent import wire
from agent.collect.sample import Sample
from agent.control.receiver import CommandReceiver
from agent.report import build
from agent.report.settings import MqttSettings, SpoolSettings, TlsSettings
from agent.report.spool import MAGIC, Spool
from agent.report.transport import Reporter, full_jitter

REPO = Path(__file__).resolve().parents[1]
SITE = "lab"


def settings_for(broker: Broker, **over: Any) -> MqttSettings:
    base: dict[str, Any] = {"enabled": True, "host": broker.host, "port": broker.port,
                            "backoff_initial_s": 0.1, "backoff_max_s": 1.0, "ack_timeout_s": 5.0,
                            "connect_timeout_s": 3.0, "max_publish_per_s": 10000.0,
                            "spool": SpoolSettings(fsync_interval_s=0.2)}
    base.update(over)
    return MqttSettings(**base)


@contextlib.asynccontextmanager
async def running(reporter: Reporter) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(reporter.run(), name="test-reporter")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def sample(n: int, node: str = "n1", width: int = 4) -> Sample:
    return Sample(node=node, seq=n, wall=time.time(), mono=time.monotonic(),
                  metrics={f"m{i}": float(n + i) for i in range(width)})


def first_seen(seqs: list[int]) -> list[int]:
    return list(dict.fromkeys(seqs))


# ------------------------------------------------------------------------------ basics
@pytest.mark.asyncio
async def test_subscriber_sees_online_birth_and_metrics(mosquitto: Broker, tmp_path: Path) -> None:
    reporter = Reporter(settings_for(mosquitto), node="n1", site=SITE, state_dir=tmp_path,
                        labels={"rack": "r1"}, collectors=["cpu", "memory"], capabilities=["restart_service"])
    async with Subscriber(mosquitto) as sub, running(reporter):
        await asyncio.wait_for(reporter.wait_connected(), 10)
        reporter.submit(build.metrics([sample(1), sample(2)]))
        reporter.submit_event(build.SampleEvent(kind="gpu.xid", source="gpu", wall=time.time(),
                                                labels={"gpu": "0"}, value=79.0))
        await sub.wait_for(lambda: sub.of(wire.Metrics) and sub.of(wire.Event), what="metrics and event")
        birth = sub.of(wire.Birth)[0]
        status = sub.of(wire.Status)[0]
        assert (status.state, status.bdseq) == ("online", birth.bdseq)
        assert birth.labels == {"rack": "r1"}
        assert birth.collectors == ["cpu", "memory"]
        assert birth.bdseq == 1
        metrics = sub.of(wire.Metrics)[0]
        assert [s.seq for s in metrics.samples] == [1, 2]
        assert metrics.samples[0].metrics["m1"] == 2.0
        topics = {t for t, _, _ in sub.received}
        assert topics == {f"heald/v1/{SITE}/n1/{k}" for k in ("status", "birth", "metrics", "event")}
        assert reporter.counters.published >= 2
        # status and birth are retained: a late subscriber (the coordinator restarting) sees them
        async with Subscriber(mosquitto) as late:
            await late.wait_for(lambda: len(late.received) >= 2, what="retained messages")
            assert {wire.kind_of(m) for _, m, retained in late.received if retained} == {"status", "birth"}
    # stopping cleanly publishes "offline" itself (a clean DISCONNECT suppresses the will)
    async with Subscriber(mosquitto) as after:
        await after.wait_for(lambda: bool(after.of(wire.Status)), what="retained status")
        assert after.of(wire.Status)[0].state == "offline"
        assert after.of(wire.Status)[0].reason == "agent stopped"


@pytest.mark.asyncio
async def test_seq_and_bdseq_survive_restarts(mosquitto: Broker, tmp_path: Path) -> None:
    seen: list[int] = []
    bdseqs: list[int] = []
    async with Subscriber(mosquitto) as sub:
        for _ in range(2):
            reporter = Reporter(settings_for(mosquitto), node="n1", site=SITE, state_dir=tmp_path)
            async with running(reporter):
                await asyncio.wait_for(reporter.wait_connected(), 10)
                for _ in range(3):
                    reporter.submit(build.report_event("t"))
                await asyncio.wait_for(reporter.wait_drained(), 10)
        await sub.wait_for(lambda: len(sub.of(wire.Event)) == 6, what="6 events")
        seen = [m.seq for m in sub.of(wire.Event)]
        bdseqs = [m.bdseq for m in sub.of(wire.Birth)]
    assert seen == sorted(seen)
    assert len(set(seen)) == 6
    assert bdseqs == [1, 2]
    all_seqs = [m.seq for _, m, _ in sub.received]
    assert len(set(all_seqs)) == len(all_seqs)  # no sequence number is ever reused


@pytest.mark.asyncio
async def test_commands_in_and_malformed_payloads_counted(mosquitto: Broker, tmp_path: Path) -> None:
    got: list[wire.Command] = []
    receiver = CommandReceiver(node="n1", site=SITE, max_payload_bytes=4096, handler=got.append)
    reporter = Reporter(settings_for(mosquitto, max_payload_bytes=4096), node="n1", site=SITE,
                        state_dir=tmp_path, inbound=receiver)

    def command(cid: str, *, node: str = "n1", site: str = SITE) -> bytes:
        now = time.time()
        return wire.encode(wire.Command(v=1, node=node, site=site, seq=1, ts=now, id=cid, issued_at=now,
                                        expires_at=now + 60, nonce=os.urandom(16), name="restart_service",
                                        args={"unit": "nginx"}, signature=b"sig"))

    async with running(reporter), aiomqtt.Client(mosquitto.host, mosquitto.port) as coordinator:
        # (the coordinator's side of the protocol)
        await asyncio.wait_for(reporter.wait_connected(), 10)
        await asyncio.sleep(0.2)  # the subscription follows the birth
        base = f"heald/v1/{SITE}"
        await coordinator.publish(f"{base}/n1/cmd", command("direct"), qos=1)
        await coordinator.publish(f"{base}/_all/cmd", command("site-wide", node="*"), qos=1)
        await coordinator.publish("heald/v1/_all/_all/cmd", command("fleet", node="*", site="*"), qos=1)
        await coordinator.publish(f"{base}/n1/cmd", b"\xc1garbage", qos=1)
        await coordinator.publish(f"{base}/n1/cmd", b"\x00" * 5000, qos=1)  # over max_payload_bytes
        await coordinator.publish(f"{base}/n1/cmd", command("misrouted", node="n2"), qos=1)
        await coordinator.publish(f"{base}/_all/cmd", command("wrong-topic"), qos=1)  # n1 on site topic
        not_a_command = wire.encode(build.report_event("not-a-command"))
        await coordinator.publish(f"{base}/n1/cmd", not_a_command, qos=1)
        future_version = msgspec.msgpack.encode({"v": 9, "kind": "command"})
        await coordinator.publish(f"{base}/n1/cmd", future_version, qos=1)
        deadline = time.monotonic() + 10
        while receiver.counters.commands + receiver.counters.commands_rejected < 9:
            assert time.monotonic() < deadline, receiver.counters
            await asyncio.sleep(0.02)
        assert reporter.connected  # nothing above crashed the connection
    assert [c.id for c in got] == ["direct", "site-wide", "fleet"]
    assert got[0].args == {"unit": "nginx"}
    assert got[0].signature == b"sig"
    assert receiver.counters.commands == 3
    assert receiver.counters.commands_rejected == 6


@pytest.mark.asyncio
async def test_inflight_bounded_without_aiomqtt_warnings(mosquitto: Broker, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A 600-record replay never has more than max_inflight publishes pending (aiomqtt warns above 10)."""
    caplog.set_level(logging.WARNING, logger="mqtt")
    reporter = Reporter(settings_for(mosquitto, max_inflight=10), node="n1", site=SITE, state_dir=tmp_path)
    for i in range(600):
        reporter.submit(build.report_event("burst", value=float(i)))
    async with Subscriber(mosquitto) as sub, running(reporter):
        await asyncio.wait_for(reporter.wait_drained(), 30)
        await sub.wait_for(lambda: len(sub.of(wire.Event)) >= 600, what="600 events")
    assert [e.value for e in sub.of(wire.Event)] == [float(i) for i in range(600)]
    assert not [r for r in caplog.records if "pending" in r.getMessage()]
    assert reporter.counters.replayed == 600


@pytest.mark.asyncio
async def test_publish_rate_is_bounded(mosquitto: Broker, tmp_path: Path) -> None:
    reporter = Reporter(settings_for(mosquitto, max_publish_per_s=50.0), node="n1", site=SITE,
                        state_dir=tmp_path)
    async with running(reporter):
        await asyncio.wait_for(reporter.wait_connected(), 10)
        started = time.monotonic()
        for _ in range(100):
            reporter.submit(build.report_event("rate"))
        await asyncio.wait_for(reporter.wait_drained(), 30)
        elapsed = time.monotonic() - started
    assert elapsed >= 0.9  # 100 publishes, bucket of 50 at 50/s: at least one second


@pytest.mark.asyncio
async def test_oversize_metrics_are_split_and_oversize_events_dropped(tmp_path: Path) -> None:
    reporter = Reporter(MqttSettings(max_payload_bytes=4096), node="n1", site=SITE, state_dir=tmp_path)
    assert reporter.submit(build.metrics([sample(i, width=30) for i in range(40)]))
    assert reporter.backlog > 1  # split into several messages, each under the limit
    assert not reporter.submit(build.report_event("big", message="x" * 4000, labels={"k": "v" * 1000}))
    assert reporter.counters.dropped_oversize == 1
    with pytest.raises(ValueError, match="publishes birth"):
        reporter.submit(wire.Birth(v=1, node="n1", site=SITE, seq=0, ts=0.0, bdseq=0, agent_version=""))
    reporter.spool.close()


def test_full_jitter_bounds() -> None:
    import random  # noqa: PLC0415

    rng = random.Random(1)
    for attempt in range(40):
        for _ in range(20):
            d = full_jitter(attempt, 0.5, 60.0, rng)
            assert 0.0 <= d <= min(60.0, 0.5 * 2**attempt)


# ------------------------------------------------------------------------------ TLS
def client_tls(certs: TlsCerts) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return ctx


@pytest.mark.asyncio
async def test_mtls_with_client_certificate(mosquitto_factory: BrokerFactory, tls_certs: TlsCerts,
                                            tmp_path: Path) -> None:
    broker = mosquitto_factory(tls_listener_config(tls_certs, require_certificate=True))
    tls = TlsSettings(enabled=True, ca_file=str(tls_certs.ca), cert_file=str(tls_certs.client_cert),
                      key_file=str(tls_certs.client_key))
    reporter = Reporter(settings_for(broker, tls=tls), node="n1", site=SITE, state_dir=tmp_path)
    async with Subscriber(broker, tls_context=client_tls(tls_certs)) as sub, running(reporter):
        reporter.submit(build.report_event("over-tls"))
        await sub.wait_for(lambda: bool(sub.of(wire.Event)), what="event over mTLS")
        assert sub.of(wire.Birth)


@pytest.mark.asyncio
async def test_wrong_ca_is_refused_with_a_clear_log_and_keeps_running(
        mosquitto_factory: BrokerFactory, tls_certs: TlsCerts, tmp_path: Path) -> None:
    broker = mosquitto_factory(tls_listener_config(tls_certs, require_certificate=True))
    tls = TlsSettings(enabled=True, ca_file=str(tls_certs.other_ca), cert_file=str(tls_certs.client_cert),
                      key_file=str(tls_certs.client_key))
    reporter = Reporter(settings_for(broker, tls=tls, backoff_max_s=0.3), node="n1", site=SITE,
                        state_dir=tmp_path)
    with structlog.testing.capture_logs() as logs:
        async with running(reporter) as task:
            reporter.submit(build.report_event("kept"))
            deadline = time.monotonic() + 10
            while reporter.counters.connect_failures < 3:
                assert time.monotonic() < deadline
                assert not task.done()
                await asyncio.sleep(0.05)
            assert not task.done()
            assert not reporter.connected
    failures = [e for e in logs if e["event"] == "mqtt.connect_failed"]
    assert failures
    first = failures[0]
    assert first["log_level"] == "error"
    assert "certificate verify failed" in first["reason"]
    assert str(tls_certs.other_ca) in first["reason"]
    assert first["tls_ca_file"] == str(tls_certs.other_ca)
    assert reporter.backlog == 1  # the event waits in the spool


@pytest.mark.asyncio
async def test_client_without_certificate_is_refused_by_require_certificate(
        mosquitto_factory: BrokerFactory, tls_certs: TlsCerts, tmp_path: Path) -> None:
    broker = mosquitto_factory(tls_listener_config(tls_certs, require_certificate=True))
    tls = TlsSettings(enabled=True, ca_file=str(tls_certs.ca))
    reporter = Reporter(settings_for(broker, tls=tls, connect_timeout_s=1.0), node="n1", site=SITE,
                        state_dir=tmp_path)
    with structlog.testing.capture_logs() as logs:
        async with running(reporter):
            deadline = time.monotonic() + 10
            while reporter.counters.connect_failures < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
    assert reporter.counters.connects == 0
    assert any(e["event"] in ("mqtt.connect_failed", "mqtt.connection_lost") for e in logs)


@pytest.mark.asyncio
async def test_username_and_password_file(mosquitto_factory: BrokerFactory, tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    await asyncio.to_thread(subprocess.run, ["mosquitto_passwd", "-c", "-b", str(passwd), "node1", "s3cret"],
                            check=True, capture_output=True, timeout=30)
    acl = tmp_path / "acl"
    acl.write_text("user node1\ntopic readwrite heald/v1/lab/n1/#\ntopic read heald/v1/_all/_all/cmd\n"
                   "topic read heald/v1/lab/_all/cmd\n")
    broker = mosquitto_factory(default_config(f"password_file {passwd}\nacl_file {acl}\n")
                               .replace("allow_anonymous true", "allow_anonymous false"))
    secret = tmp_path / "mqtt.pass"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    reporter = Reporter(settings_for(broker, username="node1", password_file=str(secret)), node="n1",
                        site=SITE, state_dir=tmp_path / "state")
    async with running(reporter):
        await asyncio.wait_for(reporter.wait_connected(), 10)
        reporter.submit(build.report_event("authed"))
        await asyncio.wait_for(reporter.wait_drained(), 10)
    bad = tmp_path / "bad.pass"
    bad.write_text("wrong")
    denied = Reporter(settings_for(broker, username="node1", password_file=str(bad)), node="n1", site=SITE,
                      state_dir=tmp_path / "state2")
    async with running(denied):
        deadline = time.monotonic() + 10
        while denied.counters.connect_failures < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert denied.counters.connects == 0


# ------------------------------------------------------------------------------ processes
def emit(broker: Broker, state: Path, node: str, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "devtools.emit", "--host", broker.host, "--port", str(broker.port),
         "--state-dir", str(state), "--node", node, "--site", SITE, *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def read_rounds(proc: subprocess.Popen[str], at_least: int, within: float = 20.0) -> int:
    """Read the helper's JSON lines until it reports ``at_least`` rounds; the last round seen."""
    assert proc.stdout is not None
    last = 0
    deadline = time.monotonic() + within
    while last < at_least:
        assert time.monotonic() < deadline, "emit helper too slow"
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line, "emit helper exited early"
        last = json.loads(line)["round"]
    return last


@pytest.mark.slow
@pytest.mark.asyncio
async def test_sigkill_makes_broker_publish_retained_offline_will(mosquitto: Broker, tmp_path: Path) -> None:
    async with Subscriber(mosquitto) as sub:
        with reaped(emit(mosquitto, tmp_path, "victim", "--interval", "0.2")) as proc:
            await sub.wait_for(lambda: bool(sub.of(wire.Event, "victim")), within=20, what="first event")
            online = sub.of(wire.Status, "victim")[-1]
            assert online.state == "online"
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            await sub.wait_for(lambda: sub.of(wire.Status, "victim")[-1].state == "offline", what="will")
        will = sub.of(wire.Status, "victim")[-1]
        assert will.bdseq == online.bdseq
        assert will.reason == "connection lost"
    async with Subscriber(mosquitto) as late:  # and it is retained
        await late.wait_for(lambda: bool(late.of(wire.Status, "victim")), what="retained will")
        assert late.of(wire.Status, "victim")[0].state == "offline"


@pytest.mark.slow
@pytest.mark.asyncio
async def test_sigkill_while_offline_then_replay_on_restart(mosquitto: Broker, tmp_path: Path) -> None:
    mosquitto.stop()
    with reaped(emit(mosquitto, tmp_path, "crashy", "--interval", "0.05")) as proc:
        last = await read_rounds(proc, 40)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    mosquitto.start()
    async with Subscriber(mosquitto) as sub:
        with reaped(emit(mosquitto, tmp_path, "crashy", "--interval", "0.05", "--count", "1")) as proc2:
            await asyncio.to_thread(proc2.wait, 30)
            assert proc2.returncode == 0
        # every round the killed process submitted (but perhaps the very last) arrives after restart
        await sub.wait_for(lambda: {int(e.value or 0) for e in sub.of(wire.Event)} >= set(range(1, last)),
                           within=20, what=f"events of rounds 1..{last - 1}")
    for cls in (wire.Event, wire.Action, wire.Metrics):
        seqs = [m.seq for m in sub.of(cls)]
        assert first_seen(seqs) == sorted(set(seqs)), f"{cls.__name__} out of order"
    rounds = [int(e.value or 0) for e in sub.of(wire.Event)]
    assert first_seen(rounds)[: last - 1] == list(range(1, last))
    events = sub.of(wire.Event)
    # the restarted helper's own round 1 comes after the replay, with a higher seq than anything spooled
    assert events[-1].value == 1.0
    assert events[-1].seq == max(e.seq for e in events)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_broker_outage_60s_every_message_exactly_once_in_order(mosquitto_factory: BrokerFactory,
                                                                     tmp_path: Path) -> None:
    """Broker down for 60 s while the node produces an event, an action and a metrics batch every
    second. After the restart every event/action/metrics message arrives, exactly once per seq
    after (node, seq) dedupe, in order, spooled data before new data."""
    broker = mosquitto_factory(default_config(
        "persistence true\npersistence_location {dir}/\nautosave_interval 1\n"
        "queue_qos0_messages true\nmax_queued_messages 100000\n"))
    reporter = Reporter(settings_for(broker, backoff_max_s=2.0), node="n1", site=SITE,
                        state_dir=tmp_path / "state")
    submitted = 0
    outage = (3, 63)  # seconds since start

    async def produce(rounds: int) -> None:
        nonlocal submitted
        for n in range(1, rounds + 1):
            reporter.submit(build.report_event("tick", value=float(n)))
            reporter.submit(build.action(phase="finished", run_id=f"r{n}", playbook="p", step="s",
                                         action="noop", dry_run=True, outcome="ok"))
            reporter.submit(build.metrics([sample(n)]))
            submitted = n
            await asyncio.sleep(1.0)

    async with Subscriber(broker, client_id="outage-subscriber") as sub, running(reporter):
        await asyncio.wait_for(reporter.wait_connected(), 10)
        producer = asyncio.create_task(produce(outage[1] + 4))
        await asyncio.sleep(outage[0])
        broker.stop()
        await asyncio.sleep(outage[1] - outage[0])
        spooled_during_outage = reporter.counters.spooled
        broker.start()
        await producer
        await asyncio.wait_for(reporter.wait_drained(), 30)
        await sub.wait_for(lambda: len({m.seq for m in sub.of(wire.Metrics)}) >= submitted, within=30,
                           what="all metrics")
        await sub.wait_for(lambda: len({m.seq for m in sub.of(wire.Event)}) >= submitted, within=30,
                           what="all events")
        await sub.wait_for(lambda: len({m.seq for m in sub.of(wire.Action)}) >= submitted, within=30,
                           what="all actions")
    assert spooled_during_outage >= 3 * 55
    assert reporter.counters.replayed >= 3 * 55
    assert reporter.counters.dropped_metrics == 0
    for cls in (wire.Event, wire.Action, wire.Metrics):
        seqs = [m.seq for m in sub.of(cls)]
        assert first_seen(seqs) == sorted(set(seqs)), f"{cls.__name__} out of order"
        assert len(set(seqs)) == submitted, f"{cls.__name__}: {len(set(seqs))} of {submitted}"
    assert first_seen([int(e.value or 0) for e in sub.of(wire.Event)]) == list(range(1, submitted + 1))
    assert first_seen([m.samples[0].seq for m in sub.of(wire.Metrics)]) == list(range(1, submitted + 1))
    # original timestamps: each event's ts is when it was built, about one second apart
    events = {e.seq: e for e in sub.of(wire.Event)}
    ts = [events[s].ts for s in sorted(events)]
    assert all(0.5 < b - a < 2.0 for a, b in itertools.pairwise(ts))
    births = sub.of(wire.Birth)
    assert [b.bdseq for b in births][-1] >= 2  # reconnected with a new birth


# ------------------------------------------------------------------------------ spool via reporter
@pytest.mark.asyncio
async def test_quota_drops_oldest_metrics_keeps_events_and_reports_count(mosquitto: Broker,
                                                                         tmp_path: Path) -> None:
    mosquitto.stop()
    quota = SpoolSettings(quota_bytes=65536, segment_bytes=4096, fsync_interval_s=0.2)
    s = settings_for(mosquitto, spool=quota)
    reporter = Reporter(s, node="n1", site=SITE, state_dir=tmp_path)
    async with running(reporter):
        for n in range(1, 401):
            reporter.submit(build.metrics([sample(n, width=40)]))
            if n % 20 == 0:
                reporter.submit(build.report_event("kept", value=float(n)))
            if n % 50 == 0:
                await asyncio.sleep(0)  # let the writer move the queue to the spool
        await asyncio.sleep(0.2)
        assert reporter.spool.used_bytes <= 65536 + 8192
        dropped = reporter.counters.dropped_metrics
        assert dropped > 100
        mosquitto.start()
        async with Subscriber(mosquitto) as sub:
            await sub.wait_for(lambda: any(e.name == "report.spool_dropped" for e in sub.of(wire.Event)),
                               within=20, what="dropped report")
            await asyncio.wait_for(reporter.wait_drained(), 20)
            await asyncio.sleep(0.2)
    kept = [int(e.value or 0) for e in sub.of(wire.Event) if e.name == "kept"]
    assert kept == list(range(20, 401, 20))  # every event survived, in order
    metrics = [m.samples[0].seq for m in sub.of(wire.Metrics)]
    assert metrics == sorted(metrics)
    assert len(metrics) + dropped == 400
    assert metrics[-1] == 400  # the newest were kept, the oldest dropped
    report = next(e for e in sub.of(wire.Event) if e.name == "report.spool_dropped")
    assert report.value == dropped
    online = [st for st in sub.of(wire.Status) if st.state == "online"]
    assert online[-1].dropped_metrics == dropped


@pytest.mark.asyncio
async def test_corrupt_segment_quarantined_and_prefix_replayed(mosquitto: Broker, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    sp = Spool(spool_dir, quota_bytes=1 << 20, segment_bytes=1 << 16)
    for seq in range(1, 11):
        msg = msgspec.structs.replace(build.report_event("old", value=float(seq)), node="n1", site=SITE,
                                      seq=seq)
        sp.append(seq, "event", wire.encode(msg))
    sp.close()
    seg = min(spool_dir.glob("*.seg"))
    data = bytearray(seg.read_bytes())
    data[len(MAGIC) + len(data) // 2] ^= 0x55  # damage somewhere in the middle
    seg.write_bytes(bytes(data))
    with structlog.testing.capture_logs() as logs:
        reporter = Reporter(settings_for(mosquitto), node="n1", site=SITE, state_dir=tmp_path)
    assert any(e["event"] == "spool.segment_quarantined" for e in logs)
    assert len(list((spool_dir / "quarantine").iterdir())) == 1
    survivors = reporter.spool.pending
    assert 0 < survivors < 10
    async with Subscriber(mosquitto) as sub, running(reporter):
        await asyncio.wait_for(reporter.wait_drained(), 10)
        await sub.wait_for(lambda: len(sub.of(wire.Event)) == survivors, what="valid prefix")
    assert [int(e.value or 0) for e in sub.of(wire.Event)] == list(range(1, survivors + 1))
    assert reporter._seq.peek > survivors  # new numbers continue above what the spool holds


@pytest.mark.asyncio
async def test_unacknowledged_qos1_publish_is_kept_and_replayed(mosquitto: Broker, tmp_path: Path) -> None:
    """A frozen broker (SIGSTOP: TCP up, no PUBACK) makes the publish time out; the reporter drops the
    link, keeps the record in the spool and delivers it once the broker answers again."""
    reporter = Reporter(settings_for(mosquitto, ack_timeout_s=1.0, connect_timeout_s=1.0, backoff_max_s=0.3),
                        node="n1", site=SITE, state_dir=tmp_path)
    assert mosquitto.proc is not None
    async with Subscriber(mosquitto) as sub, running(reporter):
        await asyncio.wait_for(reporter.wait_connected(), 10)
        mosquitto.proc.send_signal(signal.SIGSTOP)
        try:
            reporter.submit(build.report_event("during-freeze", value=1.0))
            deadline = time.monotonic() + 10
            while reporter.connected:
                assert time.monotonic() < deadline, "ack timeout did not drop the link"
                await asyncio.sleep(0.05)
            assert reporter.backlog >= 1
        finally:
            mosquitto.proc.send_signal(signal.SIGCONT)
        reporter.submit(build.report_event("after-freeze", value=2.0))
        await sub.wait_for(lambda: {e.value for e in sub.of(wire.Event)} >= {1.0, 2.0}, within=20,
                           what="both events")
    values = first_seen([int(e.value or 0) for e in sub.of(wire.Event)])
    assert values == [1, 2]
