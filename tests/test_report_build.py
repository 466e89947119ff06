"""Report-stage helpers without a broker: sequence numbers, sample batching, risk gating, builders."""

from __future__ import annotations

import time
from pathlib import Path

from agent import wire
from agent.collect.sample import Event, Sample
from agent.report import build
from agent.report.settings import MqttSettings
from agent.report.state import PersistentCounter, SeqStore
from agent.report.transport import Reporter
from agent.score.types import Contribution, Forecast, Risk


def test_seq_never_goes_backwards_across_crashes(tmp_path: Path) -> None:
    path = tmp_path / "seq"
    first = SeqStore(path, block=10)
    used = [first.next() for _ in range(25)]
    # "kill -9": no close, the next process starts from the persisted reservation
    second = SeqStore(path, block=10)
    later = [second.next() for _ in range(5)]
    assert min(later) > max(used)
    assert used == list(range(25))
    third = SeqStore(path, block=10, at_least=1000)  # e.g. the spool holds higher numbers
    assert third.next() == 1000


def test_persistent_counter(tmp_path: Path) -> None:
    c = PersistentCounter(tmp_path / "bdseq")
    assert [c.next(), c.next()] == [1, 2]
    assert PersistentCounter(tmp_path / "bdseq").next() == 3
    (tmp_path / "bdseq").write_text("garbage")
    assert PersistentCounter(tmp_path / "bdseq").next() == 1


def submitted(r: Reporter) -> list[bytes]:
    """Everything submitted and not yet sent, oldest first: the spool (submit writes straight
    into it), then what still waits in memory. Reads the spool's cursor forward."""
    return [rec.payload for rec in r.spool.read(100_000)] + [item.payload for item in r._queue]


def sample(seq: int, mono: float) -> Sample:
    return Sample(node="n1", seq=seq, wall=time.time(), mono=mono, metrics={"cpu.util_pct": 1.0})


def test_samples_are_batched_per_metrics_interval(tmp_path: Path) -> None:
    r = Reporter(MqttSettings(metrics_interval_s=10.0), node="n1", site="s1", state_dir=tmp_path)
    for i in range(25):
        r.submit_sample(sample(i, 100.0 + i))
    assert r.backlog == 2  # samples 0..9 and 10..19; 20..24 still batching
    first = wire.decode(submitted(r)[0])
    assert isinstance(first, wire.Metrics)
    assert [s.seq for s in first.samples] == list(range(10))
    r.flush_samples()
    assert r.backlog == 3
    r.spool.close()


def test_risk_sent_on_change_only(tmp_path: Path) -> None:
    r = Reporter(MqttSettings(metrics_interval_s=60.0), node="n1", site="s1", state_dir=tmp_path)

    def risk(anomaly: float, alert: bool = False) -> Risk:
        return Risk(seq=1, wall=time.time(), anomaly=anomaly, alert=alert, cold=False, model_version="m1",
                    explanation=(Contribution("cpu", 0.5),), failure={"disk.full": 0.2},
                    forecasts=(Forecast(resource="disk", eta_s=None, confidence=0.5, rate_per_s=0.0),))

    assert r.submit_risk(risk(0.5))
    assert not r.submit_risk(risk(0.55))
    assert r.submit_risk(risk(0.7))
    assert r.submit_risk(risk(0.7, alert=True))
    assert r.backlog == 3
    r.spool.close()


def test_builders_produce_valid_messages_once_stamped(tmp_path: Path) -> None:
    r = Reporter(MqttSettings(), node="n1", site="s1", state_dir=tmp_path)
    msgs = [
        build.metrics([sample(1, 1.0)]),
        build.event(Event(kind="gpu.xid", source="gpu", wall=1.0, labels={"gpu": "0"}, value=79.0)),
        build.action(phase="started", run_id="r1", playbook="p", step="s", action="a", dry_run=True),
        build.command_ack("c1", "accepted"),
        build.report_event("x"),
    ]
    for m in msgs:
        assert r.submit(m)
    seqs = []
    for payload in submitted(r):  # what goes out, in order
        decoded = wire.decode(payload)
        assert (decoded.node, decoded.site) == ("n1", "s1")
        seqs.append(decoded.seq)
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(msgs)
    r.spool.close()
