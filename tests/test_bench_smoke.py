"""Every bench script runs in its ``--smoke`` mode and can act on nothing (issue 25).

Each script that can run here is run for real (``python3 bench/X.py --smoke``): it must exit 0
and print its table. The scripts that start ``heald run`` copy every audit log they checked into
``$HEALD_BENCH_AUDIT_DIR`` (bench/healdbench.py); this test reads them again on its own: no
``run.start`` with ``dry_run`` false. time_to_heal.py enforces its own two playbooks on purpose,
inside a private PID+mount namespace: only those, and only there. Scripts needing what is absent
here (monit, the SMD/NAB data, root, mosquitto) skip with the reason.

The checks themselves are tested against real audit logs (agent.act.audit.AuditLog) holding an
enforced run: they must fail the bench.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.act import records
from agent.act.audit import AuditLog
from agent.collect.sample import Sample
from agent.runtime.pipeline import Pipeline, StageCost
from agent.score.types import Risk

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import healdbench as hb  # noqa: E402

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, mounts)")
HAS_MOSQUITTO = Path(hb.MOSQUITTO).exists()
NEEDS_MOSQUITTO = pytest.mark.skipif(not HAS_MOSQUITTO, reason=f"{hb.MOSQUITTO} is missing")
DATA = ROOT.parent / "shared" / "data"


def run_start(playbook: str, *, dry_run: bool) -> dict[str, Any]:
    rec = records.RunStart(playbook=playbook, run_id="r1", target=f"{playbook}[]", trigger="auto",
                           approved_by="", dry_run=dry_run, bindings={}, inputs={})
    out: dict[str, Any] = msgspec.to_builtins(rec)
    return out


def agent_dir(tmp_path: Path, *runs: dict[str, Any], mode: str = "dry-run",
              acting: tuple[str, ...] = ()) -> Path:
    """A bench agent's directory as check_agent finds it: a start summary in the log, an audit log."""
    (tmp_path / "state").mkdir()
    audit = AuditLog(tmp_path / "state" / "audit.jsonl")
    for r in runs:
        audit.append(r)
    (tmp_path / "out.log").write_text(
        json.dumps({"event": "heald start summary", "playbooks_mode": mode, "acting": list(acting),
                    "playbooks": [{"playbook": "x"}]}) + "\n")
    return tmp_path


# ------------------------------------------------------------------ the checks can fail


def test_check_agent_passes_dry_runs_and_counts_them(tmp_path: Path) -> None:
    d = agent_dir(tmp_path, run_start("disk-nearly-full", dry_run=True), run_start("oom", dry_run=True))
    assert hb.check_agent(d, d / "out.log")["dry_runs"] == 2


def test_check_agent_fails_on_an_enforced_run(tmp_path: Path) -> None:
    d = agent_dir(tmp_path, run_start("disk-nearly-full", dry_run=True),
                  run_start("kill-runaway", dry_run=False))
    with pytest.raises(hb.Unsafe) as err:
        hb.check_agent(d, d / "out.log")
    assert err.value.code == 3


@pytest.mark.parametrize(("mode", "acting"), [("per playbook", ()), ("dry-run", ("kill-runaway",))])
def test_check_agent_fails_when_the_agent_could_have_acted(tmp_path: Path, mode: str,
                                                           acting: tuple[str, ...]) -> None:
    d = agent_dir(tmp_path, mode=mode, acting=acting)
    with pytest.raises(hb.Unsafe):
        hb.check_agent(d, d / "out.log")


def test_check_agent_fails_without_a_start_summary(tmp_path: Path) -> None:
    d = agent_dir(tmp_path)
    (d / "out.log").write_text("Traceback: it never started\n")
    with pytest.raises(hb.Unsafe):
        hb.check_agent(d, d / "out.log")


def test_enforced_runs_outside_a_namespace_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = agent_dir(tmp_path, run_start("bench-worker", dry_run=False))
    monkeypatch.delenv(hb.NS_ENV, raising=False)
    assert not hb.confined()
    with pytest.raises(hb.Unsafe):
        hb.check_confined_audit(d / "state", {"bench-worker"})
    # the host's own namespaces named as "the host": still not confined
    monkeypatch.setenv(hb.NS_ENV, f"{os.readlink('/proc/self/ns/pid')} {os.readlink('/proc/self/ns/mnt')}")
    assert not hb.confined()
    with pytest.raises(hb.Unsafe):
        hb.check_confined_audit(d / "state", {"bench-worker"})


def test_the_bench_config_forces_dry_run_and_keeps_the_host_firewall(tmp_path: Path) -> None:
    from agent.runtime.config import load_config  # noqa: PLC0415

    cfg = hb.write_config(tmp_path, mqtt_port=1883, prometheus_port=9999)
    s = load_config(cfg).settings
    assert s.playbooks.force_mode == "dry-run"
    assert s.playbooks.dirs == ()
    assert s.security.keep_blocks_on_stop
    assert s.security.nft == ("false",)
    assert "--dry-run" in hb.heald_argv(cfg)
    assert hb.heald_env(tmp_path)[hb.FORCE_ENV] == "dry-run"


def test_the_bench_runs_heald_with_the_units_environment(tmp_path: Path) -> None:
    """The figures are of heald as systemd starts it: heald.service's Environment= lines apply."""
    unit = (ROOT / "systemd" / "heald.service").read_text()
    env = hb.heald_env(tmp_path)
    assert "MALLOC_ARENA_MAX=2" in unit
    assert env["MALLOC_ARENA_MAX"] == "2"
    assert env["OPENBLAS_NUM_THREADS"] == "1"
    fake = tmp_path / "x.service"
    fake.write_text('[Service]\nEnvironment=A=1 "B=two words"\nEnvironment=C=\n')
    assert hb.unit_environment(fake) == {"A": "1", "B": "two words", "C": ""}


# ------------------------------------------------------------------ the per-sample counter


class _BusyScorer:
    model_version = "m"

    def on_sample(self, sample: Sample) -> Risk:
        t0 = time.thread_time_ns()
        while time.thread_time_ns() - t0 < 2_000_000:  # 2 ms of this thread's CPU
            pass
        return Risk(seq=sample.seq, wall=sample.wall, anomaly=0.1, alert=False, cold=False, model_version="m")


@pytest.mark.asyncio
async def test_pipeline_counts_score_cpu_per_sample() -> None:
    pipe = Pipeline(scorer=_BusyScorer())
    for seq in range(3):
        await pipe.process(Sample(node="n", seq=seq, wall=time.time(), mono=time.monotonic(), metrics={}))
    cost = pipe.stage_cost
    assert cost.samples == 3
    assert cost.score_ns >= 3 * 2_000_000
    score, decide = cost.recent()
    assert len(score) == len(decide) == 3
    assert min(score) >= 2_000_000


def test_stage_cost_window_keeps_the_last_samples() -> None:
    cost = StageCost()
    for i in range(StageCost.WINDOW + 10):
        cost.add(i, 1)
    score, _ = cost.recent()
    assert len(score) == StageCost.WINDOW
    assert min(score) == 10  # the first ten were overwritten
    assert cost.samples == StageCost.WINDOW + 10
    assert cost.decide_ns == StageCost.WINDOW + 10


# ------------------------------------------------------------------ every script, for real


SCRIPTS: list[Any] = [
    # (script, extra args, text its table prints, starts heald run)
    pytest.param("agent_overhead.py", [], "heald as fleet nodes run it", True,
                 marks=[NEEDS_MOSQUITTO, pytest.mark.slow]),
    pytest.param("soak_memory.py", [], "rss_peak_mib", True, marks=[NEEDS_MOSQUITTO, pytest.mark.slow]),
    pytest.param("pipeline_cost.py", ["--in-daemon"], "score + decide, per sample", True,
                 marks=[NEEDS_MOSQUITTO, pytest.mark.slow]),
    pytest.param("pipeline_cost.py", [], "RiskStage.on_sample", False),
    pytest.param("time_to_heal.py", [], "SIGKILL -> new heald-bw", False),
    pytest.param("monit_restart.py", [], "monit", False,
                 marks=pytest.mark.skipif(shutil.which("monit") is None,
                                          reason="monit (a peer) is not installed: --smoke installs none")),
    pytest.param("cgroup_leak_lead.py", [], "| 60 | 64 |", False, marks=ROOT_ONLY),
    pytest.param("limits_lead.py", [], "fd leak (EMFILE)", False, marks=ROOT_ONLY),
    pytest.param("scoring.py", [], "heald StreamingDetector.score", False, marks=pytest.mark.slow),
    pytest.param("wire_codec.py", [], "mp bytes", False),
    pytest.param("same_behaviour.py", [], "SAME BEHAVIOUR: every Risk of the score stage on 300", False),
    pytest.param("spool_replay.py", [], "replay s", False, marks=NEEDS_MOSQUITTO),
    pytest.param("coordinator_ingest.py", [], "processed/s", False, marks=NEEDS_MOSQUITTO),
    pytest.param("notify_scan.py", [], "after every node reported again", False, marks=pytest.mark.slow),
    pytest.param("security_faultfree.py", [], "| ssh-brute-force | 0 | 0 | security |", True,
                 marks=[ROOT_ONLY, pytest.mark.slow,
                        pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(),
                                           reason="needs sshd (openssh-server)")]),
    pytest.param("auth_window_cost.py", [], "| 32 sources failing every pass, state dir", False),
    pytest.param("collector_cost.py", [], "% of a core", False),
    pytest.param("demand_forecast.py", [], "MASE", False,
                 marks=pytest.mark.skipif(not (DATA / "nab").is_dir(), reason=f"no NAB/SMD data in {DATA}")),
]


SCRIPT_IDS = [p.values[0].removesuffix(".py") + "".join(p.values[1]).replace("--", "-") for p in SCRIPTS]


@pytest.mark.parametrize(("script", "extra", "table", "starts_heald"), SCRIPTS, ids=SCRIPT_IDS)
def test_smoke(script: str, extra: list[str], table: str, starts_heald: bool, tmp_path: Path) -> None:
    results = BENCH / "results"
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()} if results.exists() else {}
    audits = tmp_path / "audits"
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{hb.AUDIT_COPY_ENV: str(audits)})
    env.pop(hb.NS_ENV, None)
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert table in proc.stdout, out[-4000:]
    after = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()} if results.exists() else {}
    assert after == before, "a --smoke run must not overwrite bench/results/"
    logs = sorted(audits.glob("*-audit.jsonl")) if audits.exists() else []
    entries = [json.loads(line)["record"] for log in logs for line in log.read_text().splitlines()]
    starts = [r for r in entries if r.get("type") == "run.start"]
    enforced = [r for r in starts if r.get("dry_run") is not True]
    if starts_heald:
        assert logs, "the script checked no agent audit log"
        assert "0 enforced" in proc.stdout
        assert not enforced, enforced
    if script == "time_to_heal.py":  # acts for real, on its own worker and tmpfs, confined
        assert logs
        assert "private PID+mount namespace" in proc.stdout
        assert enforced
        assert {r["playbook"] for r in enforced} <= {"bench-worker", "disk-nearly-full"}
