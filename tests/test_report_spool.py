"""The store-and-forward spool on a real tmp filesystem: order, ack cursor, crash recovery, quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.report.spool import MAGIC, Spool, encode_record


def open_spool(path: Path, quota: int = 1 << 20, segment: int = 4096) -> Spool:
    return Spool(path, quota_bytes=quota, segment_bytes=segment)


def drain(spool: Spool, ack: bool = True) -> list[int]:
    seqs: list[int] = []
    while batch := spool.read(7):
        for rec in batch:
            seqs.append(rec.seq)
            if ack:
                spool.ack(rec.seq)
    return seqs


def test_append_read_ack_in_order_across_segments(tmp_path: Path) -> None:
    sp = open_spool(tmp_path)
    for seq in range(1, 201):
        assert sp.append(seq, "event" if seq % 3 else "metrics", b"x" * 100)
    assert sp.segment_count > 3
    assert sp.pending == 200
    assert drain(sp) == list(range(1, 201))
    assert sp.pending == 0
    assert sp.read(10) == []
    sp.append(201, "action", b"late")
    assert [r.payload for r in sp.read(10)] == [b"late"]
    sp.close()


def test_rewind_replays_unacked_only(tmp_path: Path) -> None:
    sp = open_spool(tmp_path)
    for seq in range(10, 20):
        sp.append(seq, "event", b"e")
    first = sp.read(4)
    sp.ack(first[1].seq)  # 10, 11 delivered; 12, 13 in flight when the connection dies
    sp.rewind()
    assert drain(sp) == list(range(12, 20))
    sp.close()


def test_sequence_must_increase(tmp_path: Path) -> None:
    sp = open_spool(tmp_path)
    sp.append(5, "event", b"")
    with pytest.raises(ValueError, match="must increase"):
        sp.append(5, "event", b"")
    sp.close()


def test_restart_does_not_replay_acked_records(tmp_path: Path) -> None:
    sp = open_spool(tmp_path)
    for seq in range(1, 51):
        sp.append(seq, "event", b"p" * 50)
    for rec in sp.read(30):
        sp.ack(rec.seq)
    sp.sync()
    # no close(): as after kill -9 once the cursor was synced
    sp2 = open_spool(tmp_path)
    assert sp2.pending == 20
    assert drain(sp2) == list(range(31, 51))
    assert sp2.last_seq == 50
    sp2.close()
    sp.close()


def test_torn_last_record_is_truncated(tmp_path: Path) -> None:
    sp = open_spool(tmp_path, segment=1 << 16)
    for seq in range(1, 6):
        sp.append(seq, "event", b"payload")
    sp.sync()
    seg = max(tmp_path.glob("*.seg"))
    size = seg.stat().st_size
    with seg.open("ab") as f:  # a crash halfway through the next append
        f.write(encode_record(6, "event", b"payload-of-six")[:11])
    with structlog.testing.capture_logs() as logs:
        sp2 = open_spool(tmp_path, segment=1 << 16)
    assert seg.stat().st_size == size
    assert any(e["event"] == "spool.torn_tail_truncated" for e in logs)
    assert drain(sp2) == [1, 2, 3, 4, 5]
    sp2.append(6, "event", b"after")
    assert [r.seq for r in sp2.read(5)] == [6]
    assert not (tmp_path / "quarantine").exists()
    sp.close()
    sp2.close()


def test_bad_crc_in_the_middle_quarantines_segment_keeps_prefix(tmp_path: Path) -> None:
    sp = open_spool(tmp_path, segment=1 << 16)
    for seq in range(1, 11):
        sp.append(seq, "event", bytes([seq]) * 40)
    sp.close()
    seg = min(tmp_path.glob("*.seg"))
    data = bytearray(seg.read_bytes())
    rec_size = len(encode_record(1, "event", b"x" * 40))
    data[len(MAGIC) + 4 * rec_size + 30] ^= 0xFF  # flip a byte inside record 5's payload
    seg.write_bytes(bytes(data))
    with structlog.testing.capture_logs() as logs:
        sp2 = open_spool(tmp_path, segment=1 << 16)
    quarantined = list((tmp_path / "quarantine").iterdir())
    assert len(quarantined) == 1
    assert quarantined[0].read_bytes() == bytes(data)  # the evidence is kept as it was
    assert any(e["event"] == "spool.segment_quarantined" and e["log_level"] == "error" for e in logs)
    assert drain(sp2) == [1, 2, 3, 4]
    sp2.close()


def test_garbage_segment_is_quarantined_not_fatal(tmp_path: Path) -> None:
    sp = open_spool(tmp_path)
    sp.append(1, "event", b"ok")
    sp.close()
    (tmp_path / "0000000000000000.seg").write_bytes(os.urandom(500))
    (tmp_path / "0000000000000009.seg").write_bytes(b"\x00" * 100 + os.urandom(100))
    sp2 = open_spool(tmp_path)
    assert len(list((tmp_path / "quarantine").iterdir())) >= 1
    assert drain(sp2) == [1]
    sp2.append(2, "event", b"more")
    assert drain(sp2) == [2]
    sp2.close()


def test_quota_drops_oldest_metrics_first_and_keeps_events(tmp_path: Path) -> None:
    quota = 65536
    sp = open_spool(tmp_path, quota=quota, segment=4096)
    events: list[int] = []
    appended_metrics: list[int] = []
    for seq in range(1, 1201):
        if seq % 10 == 0:
            assert sp.append(seq, "event", b"E" * 200)
            events.append(seq)
        elif sp.append(seq, "metrics", b"M" * 200):
            appended_metrics.append(seq)
    assert sp.used_bytes <= quota + 4096
    assert sp.dropped_metrics > 0
    seqs = drain(sp)
    kept_metrics = [s for s in seqs if s % 10]
    assert [s for s in seqs if s % 10 == 0] == events  # every event survived, in order
    assert seqs == sorted(seqs)
    assert len(kept_metrics) + sp.dropped_metrics == 1200 - len(events)
    # the newest metrics are the ones kept
    assert kept_metrics == sorted(kept_metrics)
    assert kept_metrics[-1] == 1199
    assert min(kept_metrics) > 500
    assert sp.take_dropped_unreported() == sp.dropped_metrics
    assert sp.take_dropped_unreported() == 0
    sp.close()


def test_dropped_count_survives_restart(tmp_path: Path) -> None:
    sp = open_spool(tmp_path, quota=65536)
    for seq in range(1, 2000):
        sp.append(seq, "metrics", b"M" * 300)
    dropped = sp.dropped_metrics
    assert dropped > 0
    sp.close()
    sp2 = open_spool(tmp_path, quota=65536)
    assert sp2.dropped_unreported == dropped
    sp2.close()


def test_acked_segments_are_deleted_on_sync(tmp_path: Path) -> None:
    sp = open_spool(tmp_path)
    for seq in range(1, 301):
        sp.append(seq, "event", b"z" * 100)
    n = sp.segment_count
    drain(sp)
    sp.sync()
    assert sp.segment_count == 1 < n
    sp.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["append", "append", "append", "read", "rewind", "crash",
                                               "sync"]),
                              st.sampled_from(["event", "metrics", "action"]),
                              st.integers(0, 300)), max_size=80))
def test_random_ops_lose_nothing_and_keep_order(tmp_path_factory: pytest.TempPathFactory,
                                                ops: list[tuple[str, str, int]]) -> None:
    """Whatever the interleaving of appends, partial reads, lost connections and kill -9 (no close,
    only synced or page-cache state), every appended record is delivered at least once, and the
    first deliveries are in sequence order: exactly once per seq after (node, seq) dedupe."""
    path = tmp_path_factory.mktemp("spool")
    sp = open_spool(path, segment=2048)
    seq = 0
    appended: list[int] = []
    delivered: list[int] = []
    opened = [sp]
    for op, kind, size in ops:
        if op == "append":
            seq += 1
            assert sp.append(seq, kind, os.urandom(size))
            appended.append(seq)
        elif op == "read":
            for rec in sp.read(size % 9 + 1):
                delivered.append(rec.seq)
                if size % 4:  # some reads are delivered but never acknowledged
                    sp.ack(rec.seq)
        elif op == "rewind":
            sp.rewind()
        elif op == "sync":
            sp.sync()
        else:
            sp = open_spool(path, segment=2048)
            opened.append(sp)
            seq = max(seq, sp.last_seq)
    delivered += drain(sp)
    first_seen = list(dict.fromkeys(delivered))
    assert first_seen == appended
    for s in opened:
        s.close()
