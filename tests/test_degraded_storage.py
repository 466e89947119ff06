"""The agent's own disk full or read-only (issue 17, item 5): every writer under the state dir
keeps the daemon going, on a real 2 MiB tmpfs filled to 100% (and remounted read-only), and
recovers once there is room again. The daemon itself: tests/test_degraded_daemon.py."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.act.audit import AuditLog, verify
from agent.act.journal import Journal
from agent.features.history import MAX_PENDING, HistoryWriter, read
from agent.features.schema import FeatureSchema
from agent.report.spool import Spool
from agent.report.state import PersistentCounter, SeqStore
from agent.wire.signing import (
    CommandOutsideWindow,
    CommandReplayed,
    CommandSigner,
    CommandVerifier,
    NonceCache,
)

pytestmark = pytest.mark.root


class Tmpfs:
    """A private tmpfs and the filler file that fills it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        """Grow the filler until the filesystem refuses one more byte."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (1 << 16, 4096, 1):
                data = b"\0" * chunk
                while True:
                    try:
                        os.write(fd, data)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        assert self.avail() == 0

    def free(self, nbytes: int | None = None) -> None:
        """Give back ``nbytes`` of the filler (all of it by default)."""
        if nbytes is None:
            self.filler.unlink(missing_ok=True)
        else:
            os.truncate(self.filler, max(0, self.filler.stat().st_size - nbytes))

    def avail(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True)


def mount_tmpfs(path: Path, size: str = "2m") -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")


def unmount(path: Path) -> None:
    """Unmount the tmpfs this test mounted at ``path`` (lazily if something still holds it)."""
    if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    mnt = tmp_path / "tmpfs"
    mount_tmpfs(mnt)
    try:
        yield Tmpfs(mnt)
    finally:
        unmount(mnt)


def errors(logs: list[dict[str, Any]], event: str) -> int:
    return sum(1 for e in logs if e["event"] == event and e["log_level"] == "error")


# --------------------------------------------------------------------------- sequence numbers


def test_seq_numbers_never_repeat_on_a_full_disk_and_survive_a_crash(tmpfs: Tmpfs) -> None:
    path = tmpfs.path / "report" / "seq"
    store = SeqStore(path, block=100)
    handed = [store.next() for _ in range(10)]
    tmpfs.fill()
    with structlog.testing.capture_logs() as logs:
        handed += [store.next() for _ in range(1000)]  # ten block reservations on a full disk
    assert handed == sorted(set(handed))
    # The file is rewritten in place (no new block needed): the crash guarantee holds.
    assert store.durable
    assert int(path.read_text().strip()) > handed[-1]
    assert errors(logs, "report.seq_persist_failed") == 0
    crashed = SeqStore(path, block=100)  # no close: as after kill -9
    assert crashed.next() > handed[-1]


def test_seq_numbers_from_memory_when_nothing_can_be_written(tmpfs: Tmpfs) -> None:
    tmpfs.fill()  # a first start on a full disk: no file to rewrite in place
    path = tmpfs.path / "report" / "seq"
    store = SeqStore(path, block=10)
    with structlog.testing.capture_logs() as logs:
        handed = [store.next() for _ in range(500)]
        time.sleep(1.1)  # past the retry interval: tried again, fails again, logged once
        handed += [store.next() for _ in range(500)]
    assert handed == list(range(1000))
    assert not store.durable
    assert errors(logs, "report.seq_persist_failed") == 1
    tmpfs.free()
    time.sleep(1.1)
    with structlog.testing.capture_logs() as logs:
        handed += [store.next() for _ in range(5)]
    assert handed == list(range(1005))
    assert store.durable
    assert any(e["event"] == "state write recovered" for e in logs)
    assert SeqStore(path, block=10).next() >= 1005


def test_seq_numbers_go_on_on_a_read_only_disk(tmpfs: Tmpfs) -> None:
    path = tmpfs.path / "report" / "seq"
    store = SeqStore(path, block=5)
    first = [store.next() for _ in range(3)]
    tmpfs.remount("ro")
    try:
        rest = [store.next() for _ in range(50)]
    finally:
        tmpfs.remount("rw")
    assert first + rest == list(range(53))


def test_bdseq_counter_never_blocks_a_connect(tmpfs: Tmpfs) -> None:
    path = tmpfs.path / "report" / "bdseq"
    fresh = tmpfs.path / "report" / "bdseq-new"
    counter = PersistentCounter(path)
    assert counter.next() == 1
    tmpfs.fill()
    assert [counter.next() for _ in range(3)] == [2, 3, 4]
    assert PersistentCounter(path).value == 4  # rewritten in place
    new = PersistentCounter(fresh)  # no file yet: cannot be created on a full disk
    with structlog.testing.capture_logs() as logs:
        assert [new.next() for _ in range(3)] == [1, 2, 3]
    assert errors(logs, "report.counter_persist_failed") == 1
    tmpfs.free()
    assert new.next() == 4
    assert PersistentCounter(fresh).value == 4


# --------------------------------------------------------------------------- spool


def drain(spool: Spool, ack: bool = True) -> list[int]:
    seqs: list[int] = []
    while batch := spool.read(7):
        for rec in batch:
            seqs.append(rec.seq)
            if ack:
                spool.ack(rec.seq)
    return seqs


def kind_of(seq: int) -> str:
    return "event" if seq % 5 == 0 else "metrics"


def test_spool_sheds_oldest_first_and_counts_on_a_full_disk(tmpfs: Tmpfs) -> None:
    spool_dir = tmpfs.path / "spool"
    sp = Spool(spool_dir, quota_bytes=1 << 30, segment_bytes=4096, retry_s=0.0)
    seq = 0
    for _ in range(200):  # the broker is down: nothing is acknowledged
        seq += 1
        assert sp.append(seq, kind_of(seq), os.urandom(150))
    tmpfs.fill()
    before = sp.used_bytes
    with structlog.testing.capture_logs() as logs:
        for _ in range(300):
            seq += 1
            sp.append(seq, kind_of(seq), os.urandom(150))
            if seq % 50 == 0:
                tmpfs.fill()  # whatever the spool freed and did not use, something else takes
    assert sp.used_bytes <= before + 4096
    shed = sp.dropped_metrics + sp.dropped_other
    assert shed > 100
    assert sp.dropped_other > 0  # non-metrics too: oldest first, whatever they are
    assert sum(1 for e in logs if e["event"] == "spool.disk_full_shed") == 1  # not one a shed
    kept = drain(sp)
    assert kept == list(range(shed + 1, seq + 1))  # exactly the oldest went, every one counted
    assert sp.take_unreported() == (sp.dropped_metrics, sp.dropped_other)
    assert sp.take_unreported() == (0, 0)
    sp.sync()  # the cursor is rewritten in place on the full disk
    sp.close()
    reopened = Spool(spool_dir, quota_bytes=1 << 30, segment_bytes=4096)
    assert reopened.acked_seq == seq
    assert reopened.pending == 0
    tmpfs.free()
    reopened.append(seq + 1, "event", b"after")
    assert drain(reopened) == [seq + 1]
    reopened.close()


def test_spool_holds_what_the_disk_cannot_take_bounded_then_writes_it_out(tmpfs: Tmpfs) -> None:
    spool_dir = tmpfs.path / "spool"
    sp = Spool(spool_dir, quota_bytes=1 << 30, segment_bytes=4096, memory_bytes=20_000, retry_s=0.0)
    tmpfs.fill()  # and the spool holds nothing it could shed
    with structlog.testing.capture_logs() as logs:
        for seq in range(2, 302):
            sp.append(seq, kind_of(seq), b"x" * 200)
    assert errors(logs, "spool.disk_write_failed") == 1
    assert sp.degraded
    assert sp.held_bytes <= 20_000
    assert sp.dropped_metrics > 0
    # Published from memory while the disk is full: in order, the oldest metrics dropped first.
    first = sp.read(5)
    sp.ack(first[-1].seq)
    seqs = [r.seq for r in first] + drain(sp, ack=False)
    assert seqs == sorted(seqs)
    events = [s for s in range(2, 302) if kind_of(s) == "event"]
    assert [s for s in seqs if kind_of(s) == "event"] == events  # metrics went first
    assert len(seqs) + sp.dropped_metrics + sp.dropped_other == 300
    sp.rewind()  # the connection broke: everything not acknowledged is read again
    unacked = [s for s in seqs if s > first[-1].seq]
    assert drain(sp, ack=False) == unacked
    sp.rewind()
    tmpfs.free()
    with structlog.testing.capture_logs() as logs:
        sp.append(302, "event", b"disk is back")  # writes the memory tail out first, in order
    assert any(e["event"] == "state write recovered" for e in logs)
    assert not sp.degraded
    sp.sync()
    sp.close()
    reopened = Spool(spool_dir, quota_bytes=1 << 30, segment_bytes=4096)
    assert drain(reopened) == [*unacked, 302]
    reopened.close()


def test_spool_on_a_read_only_disk_keeps_reading_and_holds_new_records(tmpfs: Tmpfs) -> None:
    spool_dir = tmpfs.path / "spool"
    sp = Spool(spool_dir, quota_bytes=1 << 30, segment_bytes=4096, retry_s=0.0)
    for seq in range(1, 31):
        sp.append(seq, kind_of(seq), b"y" * 100)
    sp.close()  # a read-only remount refuses while files are open for writing
    tmpfs.remount("ro")
    try:
        restarted = Spool(spool_dir, quota_bytes=1 << 30, segment_bytes=4096, retry_s=0.0)
        for seq in range(31, 41):
            assert restarted.append(seq, kind_of(seq), b"z" * 100)
        got = restarted.read(100)
        assert [r.seq for r in got] == list(range(1, 41))
        restarted.ack(35)
        restarted.sync()  # neither fsync nor cursor can be written: logged, not raised
    finally:
        tmpfs.remount("rw")
    restarted.append(41, "event", b"rw again")
    restarted.rewind()  # a reconnect: everything not acknowledged is read again
    assert drain(restarted) == [36, 37, 38, 39, 40, 41]
    restarted.close()


def test_a_failed_append_leaves_no_torn_record(tmpfs: Tmpfs) -> None:
    spool_dir = tmpfs.path / "spool"
    sp = Spool(spool_dir, quota_bytes=1 << 30, segment_bytes=1 << 20, retry_s=0.0)
    for seq in (1, 2, 3):
        sp.append(seq, "event", b"a" * 100)
    assert drain(sp) == [1, 2, 3]  # acknowledged: shedding them costs nothing
    tmpfs.fill()
    big = os.urandom(20_000)
    sp.append(4, "action", big)  # written in part into a fresh segment, cut off, then held
    assert sp.held_bytes > 20_000
    assert sp.dropped_metrics + sp.dropped_other == 0
    tmpfs.free()
    sp.append(5, "event", b"after")  # the held record goes to disk first, after the cut
    sp.close()
    with structlog.testing.capture_logs() as logs:
        reopened = Spool(spool_dir, quota_bytes=1 << 30, segment_bytes=1 << 20)
    assert not [e for e in logs if e["event"] in ("spool.torn_tail_truncated", "spool.segment_quarantined")]
    got = reopened.read(10)
    assert [(r.seq, r.payload) for r in got] == [(4, big), (5, b"after")]
    reopened.close()


# --------------------------------------------------------------------------- journal and audit


def test_audit_log_stays_one_valid_chain_through_a_full_disk(tmpfs: Tmpfs,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmpfs.path / "audit.jsonl"
    audit = AuditLog(path)
    for i in range(3):
        audit.append({"type": "step", "i": i})
    tmpfs.fill()
    tmpfs.free(4096)  # one page: a big entry is written partially, then refused
    size = path.stat().st_size
    with structlog.testing.capture_logs() as logs:
        for i in range(5):
            with pytest.raises(OSError, match="No space"):
                audit.append({"type": "step", "i": 100 + i, "detail": "x" * 20_000})
    assert path.stat().st_size == size  # the partial line was cut off
    assert errors(logs, "audit append failed; records go on unchained") == 1
    assert verify(path).ok
    tmpfs.free()
    for i in range(3, 6):
        audit.append({"type": "step", "i": i})
    audit.close()
    report = verify(path)
    assert report.ok, report
    assert [json.loads(x)["seq"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmpfs.path / "audit.jsonl.head").read_text())["seq"] == 6
    r = subprocess.run([sys.executable, "-m", "agent", "audit", "verify", str(path)], capture_output=True,
                       text=True, check=False, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_audit_log_opens_on_a_read_only_disk_and_chains_on_after(tmpfs: Tmpfs) -> None:
    path = tmpfs.path / "audit.jsonl"
    audit = AuditLog(path)
    audit.append({"type": "step", "i": 0})
    audit.close()
    tmpfs.remount("ro")
    try:
        ro = AuditLog(path)  # a restart on a read-only disk: opens, refuses appends
        with pytest.raises(OSError, match="Read-only"):
            ro.append({"type": "step", "i": 1})
    finally:
        tmpfs.remount("rw")
    ro.append({"type": "step", "i": 2})
    ro.close()
    assert verify(path).ok
    assert [json.loads(x)["record"]["i"] for x in path.read_text().splitlines()] == [0, 2]


def test_journal_degrades_and_catches_up_in_order(tmpfs: Tmpfs) -> None:
    journal = Journal(tmpfs.path / "journal")
    tmpfs.fill()
    with structlog.testing.capture_logs() as logs:
        run = journal.open_run("r1", {"playbook": "p", "bindings": {}, "inputs": {}, "dry_run": False})
        run.intent(0, "run_command")
        run.result(0, "done", {"ok": True})
    assert not run.complete
    assert errors(logs, "journal write failed; the run goes on unjournaled") == 1
    assert journal.unfinished() == []  # nothing on disk yet: a crash now would forget the run
    tmpfs.free()
    run.verify(0, True)  # the records held in memory go first, in order
    assert run.complete
    (unfinished,) = journal.unfinished()
    assert unfinished.run_id == "r1"
    assert unfinished.done == {0: "done"}
    assert unfinished.verified == {0: True}
    run.end("succeeded")
    assert journal.unfinished() == []
    assert not list((tmpfs.path / "journal").iterdir())


def test_journal_never_leaves_a_torn_line(tmpfs: Tmpfs) -> None:
    journal = Journal(tmpfs.path / "journal")
    run = journal.open_run("r2", {"playbook": "p"})
    tmpfs.fill()
    tmpfs.free(4096)
    run.result(0, "done", {"detail": "x" * 20_000})  # partially written, cut off, held
    run.intent(1, "run_command")
    tmpfs.free()
    run.verify(1, False)
    (unfinished,) = journal.unfinished()
    assert unfinished.done == {0: "done"}
    assert unfinished.last_step == 1
    lines = (tmpfs.path / "journal" / "r2.jsonl").read_bytes().splitlines()
    assert [json.loads(x)["t"] for x in lines] == ["run", "result", "intent", "verify"]
    run.close()


def test_journal_on_a_read_only_disk_never_raises(tmpfs: Tmpfs) -> None:
    journal = Journal(tmpfs.path / "journal")
    done = journal.open_run("r3", {"playbook": "p"})
    done.end("succeeded")
    left = journal.open_run("r4", {"playbook": "p"})
    left.close()
    tmpfs.remount("ro")
    try:
        ro = Journal(tmpfs.path / "journal")
        run = ro.open_run("r5", {"playbook": "p"})
        run.intent(0, "run_command")
        run.end("succeeded")
        (unfinished,) = ro.unfinished()
        again = ro.reopen(unfinished)
        again.result(0, "interrupted", {})
        again.end("abandoned")  # the file cannot be removed: logged
    finally:
        tmpfs.remount("rw")


# --------------------------------------------------------------------------- nonce cache


def test_nonce_cache_on_a_full_disk_accepts_refuses_replays_and_fails_closed(tmpfs: Tmpfs) -> None:
    path = tmpfs.path / "report" / "nonces.msgpack"
    key = Ed25519PrivateKey.generate()
    signer = CommandSigner(key, issuer="coordinator")
    seen: list[OSError | None] = []

    def verifier() -> CommandVerifier:
        return CommandVerifier([key.public_key()], node="n1", site="lab",
                               nonces=NonceCache(path, on_persist=seen.append))

    v = verifier()
    v.verify(signer.make(node="n1", site="lab", name="status"))
    assert path.stat().st_size > 0
    tmpfs.fill()
    accepted = signer.make(node="n1", site="lab", name="status")
    v.verify(accepted)  # not refused, not raised
    assert isinstance(seen[-1], OSError)
    assert v.nonces.file_emptied
    assert path.stat().st_size == 0
    with pytest.raises(CommandReplayed):
        v.verify(accepted)  # within the process, replay protection is whole
    restarted = verifier()  # a crash now: the history is unknown, so everything older is refused
    with pytest.raises(CommandOutsideWindow):
        restarted.verify(accepted)
    time.sleep(0.01)
    tmpfs.free()
    later = signer.make(node="n1", site="lab", name="status")
    restarted.verify(later)
    assert seen[-1] is None
    with pytest.raises(CommandReplayed):
        verifier().verify(later)  # saved again: a restart remembers it


# --------------------------------------------------------------------------- feature history


def test_history_keeps_scoring_bounded_and_writes_again_later(tmpfs: Tmpfs) -> None:
    schema = FeatureSchema()
    hist = HistoryWriter(tmpfs.path / "history", schema, window_s=86400, chunk_rows=10)
    vec = np.zeros(schema.dim)
    for i in range(10):
        hist.append(1.7e9 + i, vec)
    hist.write_pending()
    tmpfs.fill()
    with structlog.testing.capture_logs() as logs:
        for i in range(10, 200):
            hist.append(1.7e9 + i, vec + i)
            if i % 30 == 0:
                hist.write_pending()  # the daemon's worker, every 30 s
    assert errors(logs, "feature history not written; rows stay queued and are retried") == 1
    assert hist.pending <= MAX_PENDING + 1
    assert hist.rows_dropped > 0
    tmpfs.free()
    hist.flush()
    assert hist.pending == 0
    wall, _ = read(tmpfs.path / "history", schema.digest)
    assert len(wall) == 200 - hist.rows_dropped
    assert list(wall) == sorted(wall)
    assert wall[-1] == 1.7e9 + 199  # the newest survive


@pytest.mark.slow
def test_refit_on_a_full_disk_logs_once_leaves_nothing_and_scoring_goes_on(tmpfs: Tmpfs) -> None:
    from test_score_stage import samples  # noqa: PLC0415

    from agent.score.settings import ModelSettings  # noqa: PLC0415
    from agent.score.stage import RiskStage  # noqa: PLC0415

    st = RiskStage(ModelSettings(cold_start_s=120, classifier_path=str(tmpfs.path / "none")), tmpfs.path)
    for s in samples(130):
        st.on_sample(s)
    assert st.history is not None
    st.history.flush()
    tmpfs.fill()
    with structlog.testing.capture_logs() as logs:
        assert not asyncio.run(st.refit())  # the export cannot write its training file
        assert not asyncio.run(st.refit())
        risk = st.on_sample(samples(1, start=130)[0])
    assert risk.cold  # rules only, as before the first fit
    assert errors(logs, "anomaly refit failed; keeping the previous model") == 1
    assert not list((tmpfs.path / "models" / "work").iterdir())
    tmpfs.free()
    with structlog.testing.capture_logs() as logs:
        assert asyncio.run(st.refit())
    assert any(e["event"] == "state write recovered" for e in logs)
    assert st.on_sample(samples(1, start=131)[0]).anomaly is not None
