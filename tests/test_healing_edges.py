"""Healing at the edges (issue 17): guards per target, verdicts that stay true across a restart,
manual runs under a silence, deny, and disk playbooks that act only where they can.

Each test reproduces a failure the old engine had (its docstring says which) against real
tmpfs mounts and real processes; GPUs are synthetic XID events with a recording nvidia-smi.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from playbook_kit import Recorder, idle, make_engine, playbook, running, sample, xid

from agent import wire
from agent.collect.disk import DiskCollector
from agent.collect.sample import Sample
from agent.collect.settings import DiskSettings
from agent.control.dispatcher import CommandDispatcher
from agent.control.silence import Silence
from agent.decide.loader import parse_playbook, shipped_dir
from agent.decide.model import Playbook
from agent.decide.settings import PlaybookSettings
from agent.runtime.pipeline import Pipeline
from agent.wire import signing

PY = sys.executable
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root to mount a tmpfs")


def shipped(name: str, settings: PlaybookSettings, *, fast: str = "300ms", settle: str = "300ms") -> Playbook:
    data = yaml.safe_load((shipped_dir() / f"{name}.yaml").read_text())
    if "for" in data["trigger"]:
        data["trigger"]["for"] = fast
    data.setdefault("verify", {})["settle"] = settle
    pb, problems = parse_playbook(yaml.safe_dump(data), name, settings, shipped=True)
    assert pb is not None, [str(p) for p in problems]
    return pb


@contextlib.contextmanager
def tmpfs_mount(size: str = "20m") -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="heald-edge-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()


def used_pct(path: Path) -> float:
    st = os.statvfs(path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return 100.0 * used / (used + st.f_bavail * st.f_frsize)


def fill(path: Path, to_pct: float, *, age_s: float = 0.0, prefix: str = "f") -> None:
    """Write 1 MiB files under ``path`` until it is ``to_pct`` full; ``age_s`` back-dates them."""
    path.mkdir(parents=True, exist_ok=True)
    i = 0
    while used_pct(path.parent if path.name == "cache" else path) < to_pct:
        f = path / f"{prefix}-{i}.bin"
        try:
            f.write_bytes(b"x" * (1 << 20))
        except OSError:
            break
        if age_s:
            t = time.time() - age_s
            os.utime(f, (t, t))
        i += 1


def disk_sample(col: DiskCollector, *mounts: Path) -> Sample:
    """A sample of the disk collector, with only the test's own mounts in it: the host is shared,
    and a playbook here must never see (let alone act on) another mount."""
    reading = col.collect()
    ours = {str(m) for m in mounts}
    metrics = {k: v for k, v in reading.metrics.items() if "[" not in k or k.split("[", 1)[1][:-1] in ours}
    return Sample(node="n1", seq=0, wall=time.time(), mono=time.monotonic(), metrics=metrics)


def runs_of(rec: Recorder, bindings: dict[str, str], kind: str) -> list[dict[str, Any]]:
    """The records of one target (by the labels its trigger bound) of one kind."""
    if kind == "held":
        return [r for r in rec.of(kind) if r["bindings"] == bindings]
    run_ids = {r["run_id"] for r in rec.of("run.start") if r["bindings"] == bindings}
    return [r for r in rec.of(kind) if r.get("run_id") in run_ids]


# --------------------------------------------------------------------------- 1. per-target guards


@pytest.mark.root
@pytest.mark.slow
@needs_root
@pytest.mark.asyncio
async def test_a_mount_that_cannot_be_cleaned_does_not_hold_the_playbook_for_another(tmp_path: Path) -> None:
    """Old: guards were per playbook. The stubborn mount escalated, and its cooldown then held
    disk-nearly-full for every other mount: the one that really filled was never cleaned."""
    with tmpfs_mount() as stubborn, tmpfs_mount() as cleanable:
        roots = (str(stubborn), str(cleanable))
        settings = PlaybookSettings(dirs=(), clean_roots=roots, journalctl=("true",))
        eng, rec = make_engine(tmp_path, [shipped("disk-nearly-full", settings)], settings)
        col = DiskCollector(DiskSettings(include_mounts=(str(stubborn), str(cleanable))))
        col.start()
        stuck = {"mount": str(stubborn)}
        good = {"mount": str(cleanable)}
        fill(stubborn / "cache", 95)  # fresh files: nothing older than an hour to delete
        async with running(eng):
            t0 = time.monotonic()
            while not runs_of(rec, stuck, "run.end") and time.monotonic() - t0 < 30:
                await eng.evaluate(disk_sample(col, stubborn, cleanable), None)
                await asyncio.sleep(0.1)
            assert [r["outcome"] for r in runs_of(rec, stuck, "run.end")] == ["escalated"]
            fill(cleanable / "cache", 95, age_s=3 * 86400)  # now the other mount fills, with old files
            t0 = time.monotonic()
            while not runs_of(rec, good, "run.end") and time.monotonic() - t0 < 30:
                await eng.evaluate(disk_sample(col, stubborn, cleanable), None)
                await asyncio.sleep(0.1)
            await idle(eng)
        assert [r["outcome"] for r in runs_of(rec, good, "run.end")] == ["succeeded"]
        assert used_pct(cleanable) < 85
        assert runs_of(rec, good, "step")[0]["data"]["deleted"] > 0
        assert [r["reason"] for r in runs_of(rec, stuck, "held")] == ["cooldown"]
        assert not runs_of(rec, good, "held")
        assert [e["kind"] for e in rec.events] == ["disk.full.unresolved"], "the stuck mount escalates once"


def gpu_sample(events: list[Any]) -> Sample:
    s = sample({"gpu.util_pct[1]": 0.0, "gpu.util_pct[2]": 0.0}, events)
    detail = {"gpu": {"devices": {
        "1": {"uuid": "GPU-1", "name": "H100", "pci": "00000000:3B:00.0"},
        "2": {"uuid": "GPU-2", "name": "H100", "pci": "00000000:86:00.0"},
    }}}
    return Sample(node=s.node, seq=s.seq, wall=s.wall, mono=s.mono, metrics=s.metrics, events=s.events,
                  detail=detail)  # type: ignore[arg-type]


def recording_tool(tmp: Path, name: str) -> tuple[str, Path]:
    log = tmp / f"{name}.log"
    script = tmp / name
    script.write_text(f"#!{PY}\nimport sys\nopen({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n")
    script.chmod(0o755)
    return str(script), log


@pytest.mark.asyncio
async def test_a_tripped_breaker_of_one_gpu_does_not_hold_another_gpu(tmp_path: Path) -> None:
    """Old: after GPU 1 tripped gpu-xid-reset's breaker, an XID 48 on GPU 2 was held as breaker-open."""
    smi, log = recording_tool(tmp_path, "nvidia-smi")
    settings = PlaybookSettings(
        dirs=(),
        gpu_reset_argv=(smi, "--gpu-reset", "-i", "{gpu}"),
        gpu_drain_argv=(smi, "drain", "-p", "{pci}", "-m", "1"),
        gpu_undrain_argv=(smi, "drain", "-p", "{pci}", "-m", "0"),
    )
    eng, rec = make_engine(tmp_path, [shipped("gpu-xid-reset", settings, settle="500ms")], settings)
    gpu1, gpu2 = {"gpu": "1"}, {"gpu": "2"}
    async with running(eng):
        t0 = time.monotonic()
        while not rec.of("breaker.open") and time.monotonic() - t0 < 10:  # GPU 1 keeps failing
            await eng.evaluate(gpu_sample([xid(48, gpu="1")]), None)
            await asyncio.sleep(0.1)
        await idle(eng)
        assert len(rec.of("breaker.open")) == 1
        assert runs_of(rec, gpu1, "breaker.open") == rec.of("breaker.open")
        await eng.evaluate(gpu_sample([xid(48, gpu="2")]), None)  # one double-bit ECC error on GPU 2
        t0 = time.monotonic()
        while not runs_of(rec, gpu2, "run.end") and time.monotonic() - t0 < 10:
            await eng.evaluate(gpu_sample([]), None)
            await asyncio.sleep(0.05)
    assert [r["outcome"] for r in runs_of(rec, gpu2, "run.end")] == ["succeeded"]
    assert log.read_text().splitlines()[-3:] == [
        "drain -p 00000000:86:00.0 -m 1", "--gpu-reset -i 2", "drain -p 00000000:86:00.0 -m 0",
    ]
    assert "breaker-open" not in [r["reason"] for r in runs_of(rec, gpu2, "held")]
    # guards are keyed by PCI bus id, not index: indices shift after a drain
    assert {r["target"] for r in rec.of("run.start")} == {
        "gpu-xid-reset[gpu=pci:00000000:3B:00.0]", "gpu-xid-reset[gpu=pci:00000000:86:00.0]"}


# --------------------------------------------------------------------------- 2. verdicts across a restart

STUBBORN = """
name: stubborn-disk
description: steps that do not free anything; only the verdict matters
mode: enforce
trigger:
  metric: "disk.used_pct[{{mount}}]"
  op: ">="
  value: 90
  for: 2s
  clear_below: 85
steps:
  - name: slow
    action: run_command
    params: {{argv: ["{py}", "-c", "import time; time.sleep(30)"]}}
    timeout: 1m
  - name: second
    action: run_command
    params: {{argv: ["/bin/true"]}}
    timeout: 10s
verify: {{settle: 0s}}
guards: {{cooldown: 1h}}
"""


@pytest.mark.root
@pytest.mark.slow
@needs_root
@pytest.mark.asyncio
async def test_a_resumed_run_does_not_claim_success_while_the_disk_is_still_full(tmp_path: Path) -> None:
    """Old: the resumed run verified against a freshly restarted ``for:`` timer and ended
    "trigger no longer holds" (succeeded) with the disk still 94% full."""
    with tmpfs_mount() as mnt:
        fill(mnt / "data", 94)
        pb = playbook(STUBBORN.format(py=PY))
        col = DiskCollector(DiskSettings(include_mounts=(str(mnt),)))
        col.start()
        journal = tmp_path / "state" / "journal"
        eng, rec = make_engine(tmp_path, [pb])
        async with running(eng):  # the first life: stopped while the slow step runs (kill -9's journal)
            t0 = time.monotonic()
            while not any("intent" in p.read_text() for p in journal.glob("*.jsonl")):
                assert time.monotonic() - t0 < 15
                await eng.evaluate(disk_sample(col, mnt), None)
                await asyncio.sleep(0.1)
        assert not rec.of("run.end")
        eng2, rec2 = make_engine(tmp_path, [pb])
        async with running(eng2):  # the second life resumes the run from the journal
            t0 = time.monotonic()
            while not rec2.of("run.end") and time.monotonic() - t0 < 20:
                await eng2.evaluate(disk_sample(col, mnt), None)
                await asyncio.sleep(0.1)
            await idle(eng2)
        assert used_pct(mnt) > 90
        assert [r["outcome"] for r in rec2.of("run.end")] == ["escalated"]
        assert [r["ok"] for r in rec2.of("verify")] == [False, False]
        assert [r["status"] for r in rec2.of("step")] == ["interrupted", "done"], "no step ran twice"


# --------------------------------------------------------------------------- 3. silence


FIXABLE = """
name: fixable
description: a marker file is the problem; the step removes it
mode: enforce
trigger: {{metric: "app.bad", op: ">", value: 0}}
steps:
  - name: fix
    action: run_command
    params: {{argv: ["/bin/rm", "-f", "{marker}"]}}
    timeout: 10s
verify: {{settle: 0s}}
guards: {{cooldown: 1s}}
"""


@pytest.mark.asyncio
async def test_a_silence_holds_automatic_runs_but_a_manual_run_verifies(tmp_path: Path) -> None:
    """Old: while a node was silenced the pipeline stopped feeding the engine, so a manual run
    failed verification with "no fresh sample to verify with" and raised a critical escalation."""
    marker = tmp_path / "bad"
    marker.write_text("x")
    eng, rec = make_engine(tmp_path, [playbook(FIXABLE.format(marker=marker))])
    silence = Silence()
    silence.until = time.time() + 3600
    pipe = Pipeline(decider=eng, hold=silence)

    def bad() -> dict[str, float | None]:
        return {"app.bad": 1.0 if marker.exists() else 0.0}

    async with running(eng):
        for _ in range(3):
            await pipe.process(sample(bad()))
            await asyncio.sleep(0.02)
        await eng.trigger_manual("fixable", approved_by="ops")  # an operator runs it anyway
        t0 = time.monotonic()
        while not rec.of("run.end") and time.monotonic() - t0 < 15:
            await pipe.process(sample(bad()))
            await asyncio.sleep(0.05)
        marker.write_text("x")  # the problem is back: automatic runs stay held
        for _ in range(10):
            await pipe.process(sample(bad()))
            await asyncio.sleep(0.02)
    assert [r["outcome"] for r in rec.of("run.end")] == ["succeeded"]
    assert [r["reason"] for r in rec.of("verify")] == ["the trigger's condition is over"]
    assert not rec.events, "no escalation"
    assert [r["trigger"] for r in rec.of("run.start")] == ["manual"], "automatic runs are held"
    assert [r["reason"] for r in rec.of("held")] == ["silenced", "silenced"]


# --------------------------------------------------------------------------- 4. deny


class Outbox:
    """The dispatcher's way out: what it acknowledged (the report stage is not under test here)."""

    def __init__(self) -> None:
        self.sent: list[wire.Envelope] = []
        self.connected = True

    def submit(self, message: wire.Envelope) -> bool:
        self.sent.append(message)
        return True


@pytest.mark.asyncio
async def test_a_signed_deny_ends_the_pending_approval_as_denied(tmp_path: Path) -> None:
    """Old: the runtime looked up Engine.deny, which did not exist: a signed deny was acknowledged
    "done" and the approval stayed pending (for up to an hour)."""
    marker = tmp_path / "bad"
    marker.write_text("x")
    text = FIXABLE.format(marker=marker).replace("mode: enforce", "mode: approval")
    eng, rec = make_engine(tmp_path, [playbook(text)])
    key = Ed25519PrivateKey.generate()
    signer = signing.CommandSigner(key, issuer="coordinator")
    verifier = signing.CommandVerifier([key.public_key()], node="n1", site="lab",
                                       nonces=signing.NonceCache(tmp_path / "nonces"))
    outbox = Outbox()
    dispatcher = CommandDispatcher(verifier, eng, outbox)
    async with running(eng), asyncio.TaskGroup() as tg:
        commands = tg.create_task(dispatcher.run(), name="commands")
        for _ in range(3):
            await eng.evaluate(sample({"app.bad": 1.0}), None)
        (pending,) = eng.pending_approvals()
        request_id = str(pending.get("request_id", ""))  # the coordinator names the request it denies
        args: wire.messages.Args = {"playbook": "fixable", "request_id": request_id, "by": "alice"}
        dispatcher(signer.make(node="n1", site="lab", name=wire.CommandName.DENY, args=args))
        t0 = time.monotonic()
        while len([m for m in outbox.sent if isinstance(m, wire.CommandAck)]) < 2:
            assert time.monotonic() - t0 < 5
            await asyncio.sleep(0.02)
        commands.cancel()
    acks = [m for m in outbox.sent if isinstance(m, wire.CommandAck)]
    assert [a.status for a in acks] == ["accepted", "done"]
    assert acks[1].result["denied"] is True
    assert eng.pending_approvals() == []
    (denied,) = rec.of("approval.denied")
    assert (denied["request_id"], denied["target"]) == (request_id, "fixable")
    assert not rec.of("run.start")
    assert marker.exists()


# --------------------------------------------------------------------------- 6. only where it can act


FILLER = """
import os, sys, time
root, age, total = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
os.makedirs(root, exist_ok=True)
for i in range(total):
    p = os.path.join(root, f"blob-{i}.bin")
    try:
        with open(p, "wb") as fh:
            fh.write(b"c" * (1 << 20))
    except OSError:
        sys.exit(28)  # ENOSPC: the disk filled up
    if age:
        os.utime(p, (time.time() - age, time.time() - age))
    time.sleep(0.1)
"""


@pytest.mark.root
@pytest.mark.slow
@needs_root
@pytest.mark.asyncio
async def test_two_mounts_fill_at_once_one_cleanable_one_not(tmp_path: Path) -> None:
    """Old: disk-nearly-full fired on any mount, deleted nothing where it had no clean root and
    escalated claiming it had cleaned caches, temp files and the journal; and while it ran on one
    mount the other waited (one run per playbook)."""
    with tmpfs_mount("40m") as ours, tmpfs_mount("40m") as theirs:
        settings = PlaybookSettings(dirs=(), clean_roots=(str(ours),), journalctl=("true",))
        pbs = [shipped("disk-nearly-full", settings), shipped("disk-nearly-full-unmanaged", settings)]
        eng, rec = make_engine(tmp_path, pbs, settings)
        col = DiskCollector(DiskSettings(include_mounts=(str(ours), str(theirs))))
        col.start()
        (theirs / "keep").mkdir()
        fillers = [subprocess.Popen([PY, "-c", FILLER, str(root), age, "39"])  # noqa: ASYNC220 - started once
                   for root, age in ((ours / "cache", str(3 * 86400)), (theirs / "keep", "0"))]
        peak = 0.0
        try:
            async with running(eng):
                t0 = time.monotonic()
                while time.monotonic() - t0 < 30 and (fillers[0].poll() is None or not rec.of("escalate")):
                    peak = max(peak, used_pct(ours))
                    await eng.evaluate(disk_sample(col, ours, theirs), None)
                    await asyncio.sleep(0.1)
                await idle(eng)
        finally:
            for f in fillers:
                if f.poll() is None:
                    f.kill()
                f.wait()
        assert fillers[0].returncode == 0, "our mount filled up before heald cleaned it"
        assert peak < 100
        starts = {(r["playbook"], r["bindings"]["mount"]) for r in rec.of("run.start")}
        assert starts == {("disk-nearly-full", str(ours)), ("disk-nearly-full-unmanaged", str(theirs))}
        assert "succeeded" in [r["outcome"] for r in runs_of(rec, {"mount": str(ours)}, "run.end")]
        escalations = [e for e in rec.events if e["kind"] == "disk.full.unresolved"]
        assert len(escalations) == 1, "the unmanaged mount escalates once"
        assert str(theirs) in escalations[0]["message"]
        assert "holds nothing heald may delete" in escalations[0]["message"]
        assert "Tried: tell (notify)" in escalations[0]["message"]
        assert len(list((theirs / "keep").iterdir())) > 30, "nothing deleted where there is no clean root"


@pytest.mark.asyncio
async def test_a_flood_of_forged_commands_is_not_answered_one_for_one(tmp_path: Path) -> None:
    """Issue 18, item 9: 15,000 forged commands were answered with 15,000 acks, queued ahead of the
    node's real reports. Rejections are now answered at a bounded rate, and counted all the same."""
    key, forger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    verifier = signing.CommandVerifier([key.public_key()], node="n1", site="lab",
                                       nonces=signing.NonceCache(tmp_path / "nonces"))
    outbox = Outbox()
    eng, _rec = make_engine(tmp_path, [playbook(FIXABLE.format(marker=tmp_path / "none"))])
    dispatcher = CommandDispatcher(verifier, eng, outbox)
    forged = signing.CommandSigner(forger, issuer="mallory")
    t0 = time.monotonic()
    for _ in range(2000):
        dispatcher(forged.make(node="n1", site="lab", name=wire.CommandName.STATUS))
    elapsed = time.monotonic() - t0
    acks = [m for m in outbox.sent if isinstance(m, wire.CommandAck)]
    assert dispatcher.rejected == {"bad_signature": 2000}
    assert len(acks) <= 20 + 5 * elapsed + 1, (len(acks), elapsed)
    assert dispatcher.rejections_unanswered == 2000 - len(acks)
    # a real command right after the flood is still answered
    real = signing.CommandSigner(key, issuer="coordinator").make(node="n1", site="lab",
                                                                 name=wire.CommandName.STATUS)
    dispatcher(real)
    assert isinstance(outbox.sent[-1], wire.CommandAck)
    assert (outbox.sent[-1].command_id, outbox.sent[-1].status) == (real.id, "accepted")
