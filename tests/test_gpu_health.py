"""GPU health against FakeNVML (issue 24): NVIDIA's XID catalog and the shipped ladder built from
it, per-GPU guards driven by the real collector, a lost GPU, a GPU needing a reset, unsupported
fields asked once, MIG; and bench/gpu_device_check.sh where there is no GPU.

FakeNVML is the one fake allowed (devtools/fake_nvml.py); its API is checked against the real
nvidia-ml-py module installed here."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pynvml
import pytest
import yaml
from playbook_kit import idle, make_engine, running, sample
from test_healing_edges import recording_tool, runs_of
from test_playbooks_shipped import shipped

from agent.collect import gpu_xid
from agent.collect.gpu import GpuCollector
from agent.collect.sample import Sample
from agent.collect.settings import GpuSettings
from agent.decide.loader import shipped_dir
from agent.decide.settings import PlaybookSettings
from devtools.fake_nvml import FakeNVML

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30


def started(fake: FakeNVML) -> GpuCollector:
    c = GpuCollector(GpuSettings(kernel_log_fallback=False), nvml=fake)
    c.start()
    return c


# --------------------------------------------------------------------------- FakeNVML is pynvml


def test_fake_functions_have_the_real_signatures() -> None:
    fake = FakeNVML()
    names = [n for n in dir(fake) if n.startswith("nvml") and callable(getattr(fake, n))]
    assert "nvmlDeviceGetMigDeviceHandleByIndex" in names
    for name in names:
        fake_params = list(inspect.signature(getattr(fake, name)).parameters)
        assert fake_params == list(inspect.signature(getattr(pynvml, name)).parameters), name
    fake.nvmlInit()
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotSupported):  # a GPU without MIG, as NVML answers
        fake.nvmlDeviceGetMigMode(handle)
    fake.enable_mig(0, [(1, 0, GIB)])
    with pytest.raises(pynvml.NVMLError_NotFound):  # an empty slot
        fake.nvmlDeviceGetMigDeviceHandleByIndex(handle, 3)
    fake.require_reset(0)
    with pytest.raises(pynvml.NVMLError_ResetRequired):
        fake.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)


# --------------------------------------------------------------------------- the catalog


def test_catalog_buckets() -> None:
    assert {e.bucket for e in gpu_xid.CATALOG.values()} == set(gpu_xid.BUCKETS)
    assert gpu_xid.bucket(48) == "reset_gpu"  # double-bit ECC
    assert gpu_xid.bucket(79) == "reboot_node"  # fallen off the bus
    assert gpu_xid.bucket(45) == "ignore"  # preemptive cleanup
    assert gpu_xid.bucket(13) == "restart_app"
    assert gpu_xid.bucket(54) == "service"  # auxiliary power
    assert gpu_xid.bucket(999) == "unknown"


def test_shipped_gpu_ladder_is_the_catalog() -> None:
    """Every rung's trigger lists are exactly the catalog's buckets (no XID hand-copied)."""
    def trigger(name: str) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load((shipped_dir() / f"{name}.yaml").read_text())
        return data

    reset, reboot, service = (trigger(n) for n in ("gpu-xid-reset", "gpu-xid-reboot", "gpu-xid-service"))
    ladder = gpu_xid.xids("reset_gpu", "reboot_node")
    assert sorted(reset["trigger"]["values"]) == ladder
    assert sorted(reset["trigger"]["ignore_values"]) == gpu_xid.xids("ignore")
    assert [s["action"] for s in reset["steps"]] == ["gpu_drain", "gpu_reset", "gpu_drain"]
    assert sorted(reboot["trigger"]["values"]) == ladder
    assert reboot["mode"] == "approval"
    assert reboot["trigger"]["count"] > 1
    assert sorted(service["trigger"]["values"]) == gpu_xid.xids("service")
    assert reset["escalate"]["event"] == reboot["escalate"]["event"] == "gpu.needs_service"
    assert not set(ladder) & set(gpu_xid.xids("restart_app", "ignore", "service"))


# --------------------------------------------------------------------------- collector


def test_xid_events_name_the_gpu_by_bus_id_uuid_and_resolution() -> None:
    fake = FakeNVML(3)
    c = started(fake)
    fake.inject_xid(1, 48)
    fake.inject_xid(2, 13)
    fake.inject_xid(2, 999)
    xids = [e for e in c.collect().events if e.kind == "gpu.xid"]
    assert [(e.labels["gpu"], e.value, e.labels["resolution"]) for e in xids] == [
        ("1", 48, "reset_gpu"), ("2", 13, "restart_app"), ("2", 999, "unknown")]
    assert xids[0].labels["pci"] == "00000000:28:00.0"
    assert xids[0].labels["uuid"] == fake.device(1).uuid
    detail = c.collect().detail
    assert detail["devices"]["2"]["pci"] == "00000000:38:00.0"  # type: ignore[index]
    c.close()


def test_event_set_is_polled_without_waiting() -> None:
    fake = FakeNVML(2)
    c = started(fake)
    t0 = time.perf_counter()
    for _ in range(50):
        c.collect()
    assert time.perf_counter() - t0 < 5  # 50 passes; a blocking wait would be seconds each
    assert fake.calls["nvmlEventSetWait"] == 50  # one 0 ms wait per pass when nothing is queued
    c.close()


def test_unsupported_fields_are_asked_once_then_never() -> None:
    fake = FakeNVML(2)
    fake.set_unsupported(0, "nvmlDeviceGetRetiredPages", "nvmlDeviceGetPcieReplayCounter",
                         "nvmlDeviceGetTotalEccErrors")
    c = started(fake)
    m = c.collect().metrics
    first = fake.calls.copy()
    for _ in range(3):
        m = c.collect().metrics
    calls = fake.calls
    assert calls["nvmlDeviceGetPcieReplayCounter"] == first["nvmlDeviceGetPcieReplayCounter"] + 3  # GPU 1
    assert fake.calls["nvmlDeviceGetRetiredPages"] == first["nvmlDeviceGetRetiredPages"] + 3 * 2
    assert fake.calls["nvmlDeviceGetTotalEccErrors"] == first["nvmlDeviceGetTotalEccErrors"] + 3 * 4
    assert fake.calls["nvmlDeviceGetMigMode"] == 2  # no MIG on either: asked once each, at start
    assert "gpu.pcie_replays[0]" not in m
    assert "gpu.ecc_dbe_volatile[0]" not in m
    assert m["gpu.pcie_replays[1]"] == 0
    assert m["gpu.ecc_dbe_volatile[1]"] == 0
    assert "gpu.mig_mode[0]" not in m
    c.close()


def test_a_lost_gpu_is_an_event_and_the_others_are_still_read() -> None:
    fake = FakeNVML(2)
    c = started(fake)
    c.collect()
    fake.fall_off_bus(0)
    r = c.collect()
    assert [(e.kind, e.value, e.labels["resolution"]) for e in r.events if e.kind == "gpu.xid"] == [
        ("gpu.xid", 79, "reboot_node")]
    lost = [e for e in r.events if e.kind == "gpu.lost"]
    assert [(e.labels["gpu"], e.labels["pci"]) for e in lost] == [("0", "00000000:18:00.0")]
    assert r.metrics["gpu.lost[0]"] == 1
    assert r.metrics["gpu.temp_c[0]"] is None
    assert r.metrics["gpu.lost[1]"] == 0
    assert r.metrics["gpu.temp_c[1]"] == 35
    assert not [e for e in c.collect().events if e.kind == "gpu.lost"]  # once
    c.close()


def test_reset_required_is_an_event_not_an_exception() -> None:
    fake = FakeNVML(2)
    c = started(fake)
    fake.require_reset(1)
    r = c.collect()
    assert [(e.kind, e.labels["gpu"]) for e in r.events] == [("gpu.reset_required", "1")]
    assert r.metrics["gpu.reset_required[1]"] == 1
    assert r.metrics["gpu.temp_c[1]"] is None
    assert r.metrics["gpu.reset_required[0]"] == 0
    assert r.metrics["gpu.temp_c[0]"] == 35
    assert not c.collect().events
    c.close()


def test_mig_instances_labelled_and_xids_name_the_instance() -> None:
    fake = FakeNVML(2)
    fake.enable_mig(0, [(1, 0, 10 * GIB), (2, 0, 20 * GIB)])
    fake.device(0).migs.insert(1, None)  # an empty slot between them
    fake.devices[0].migs[2].mem_used = 3 * GIB  # type: ignore[union-attr]
    fake.device(1).mig_capable = True  # MIG supported, disabled
    c = started(fake)
    r = c.collect()
    m = r.metrics
    assert m["gpu.mig_mode[0]"] == 1
    assert m["gpu.mig_mode[1]"] == 0
    assert m["gpu.mig_mem_total_bytes[0/gi1/ci0]"] == 10 * GIB
    assert m["gpu.mig_mem_used_bytes[0/gi2/ci0]"] == 3 * GIB
    assert "gpu.util_pct[0]" not in m  # not supported on a MIG-enabled GPU: absent, not None
    assert m["gpu.util_pct[1]"] == 0
    mig = r.detail["devices"]["0"]["mig"]  # type: ignore[index]
    assert sorted(mig) == ["0/gi1/ci0", "0/gi2/ci0"]
    assert mig["0/gi2/ci0"]["uuid"].startswith("MIG-")
    assert r.detail["devices"]["1"]["mig"] == {}  # type: ignore[index]
    fake.inject_xid(0, 31, gpu_instance=2, compute_instance=0)
    (ev,) = c.collect().events
    assert ev.labels["gpu"] == "0"
    assert ev.labels["mig"] == "0/gi2/ci0"
    assert ev.labels["mig_uuid"] == mig["0/gi2/ci0"]["uuid"]
    c.close()


# --------------------------------------------------------------------------- the ladder, per GPU


def collected(c: GpuCollector, fake: FakeNVML) -> Sample:
    r = c.collect()
    s = sample(dict(r.metrics), r.events)
    return Sample(node=s.node, seq=s.seq, wall=s.wall, mono=s.mono, metrics=s.metrics, events=s.events,
                  detail={"gpu": r.detail})


@pytest.mark.slow
@pytest.mark.asyncio
async def test_collector_driven_ladder_gpu1_breaker_open_gpu2_still_reset(tmp_path: Path) -> None:
    """FakeNVML -> GpuCollector -> the shipped ladder: GPU 1 keeps reporting double-bit ECC XIDs
    after its reset (breaker open, escalated, the reboot rung asks for approval for GPU 1 only);
    an XID on GPU 2 is still drained, reset and undrained, on GPU 2's bus id."""
    smi, log = recording_tool(tmp_path, "nvidia-smi")
    settings = PlaybookSettings(
        dirs=(),
        gpu_reset_argv=(smi, "--gpu-reset", "-i", "{gpu}"),
        gpu_drain_argv=(smi, "drain", "-p", "{pci}", "-m", "1"),
        gpu_undrain_argv=(smi, "drain", "-p", "{pci}", "-m", "0"),
    )
    ladder = ("gpu-xid-reset", "gpu-xid-reboot", "gpu-xid-service")
    books = [shipped(n, settings, fast="500ms") for n in ladder]
    eng, rec = make_engine(tmp_path, books, settings)
    fake = FakeNVML(3)
    c = started(fake)
    gpu1, gpu2 = {"gpu": "1"}, {"gpu": "2"}
    try:
        async with running(eng):
            t0 = time.monotonic()
            while not rec.of("breaker.open") and time.monotonic() - t0 < 15:
                fake.inject_xid(1, 48)
                await eng.evaluate(collected(c, fake), None)
                await asyncio.sleep(0.1)
            await idle(eng)
            assert len(rec.of("breaker.open")) == 1
            fake.inject_xid(2, 48)
            t0 = time.monotonic()
            while not runs_of(rec, gpu2, "run.end") and time.monotonic() - t0 < 15:
                await eng.evaluate(collected(c, fake), None)
                await asyncio.sleep(0.05)
            fake.inject_xid(2, 54)  # auxiliary power: a human's job
            await eng.evaluate(collected(c, fake), None)
            await idle(eng)
            pending = [(a["playbook"], a["target"]) for a in eng.pending_approvals()]
    finally:
        c.close()
    assert runs_of(rec, gpu1, "breaker.open") == rec.of("breaker.open")
    assert [r["outcome"] for r in runs_of(rec, gpu2, "run.end") if r["playbook"] == "gpu-xid-reset"] == [
        "succeeded"]
    assert log.read_text().splitlines()[-3:] == [
        "drain -p 00000000:38:00.0 -m 1", "--gpu-reset -i 2", "drain -p 00000000:38:00.0 -m 0"]
    assert "--gpu-reset -i 1" in log.read_text().splitlines()
    # the reboot rung asks, for GPU 1 only, and never runs by itself
    assert pending == [("gpu-xid-reboot", "gpu-xid-reboot[gpu=pci:00000000:28:00.0]")]
    assert not [r for r in rec.of("run.start") if r["playbook"] == "gpu-xid-reboot"]
    kinds = [(e["kind"], e.get("labels", {}).get("gpu")) for e in rec.events]
    assert ("gpu.needs_service", "1") in kinds, kinds  # rung 1 escalated GPU 1
    service = [r for r in rec.of("run.start") if r["playbook"] == "gpu-xid-service"]
    assert [r["bindings"] for r in service] == [gpu2]


# --------------------------------------------------------------------------- bench script


def test_gpu_device_check_script_syntax_and_no_gpu_fails_fast(tmp_path: Path) -> None:
    script = REPO / "bench" / "gpu_device_check.sh"
    bash = shutil.which("bash")
    assert bash is not None
    subprocess.run([bash, "-n", str(script)], check=True)
    smi_dir = tmp_path / "bin"
    smi_dir.mkdir()
    (smi_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no devices' >&2\nexit 9\n")
    (smi_dir / "nvidia-smi").chmod(0o755)
    assert shutil.which("nvidia-smi", path="/usr/bin:/bin") is None
    for path in (f"{smi_dir}:/usr/bin:/bin", "/usr/bin:/bin"):  # nvidia-smi fails / is missing
        env = {"PATH": path, "HOME": str(tmp_path)}
        t0 = time.monotonic()
        done = subprocess.run([bash, str(script)], env=env, capture_output=True, text=True, timeout=60,
                              cwd=tmp_path, check=False)
        assert done.returncode == 2, done.stderr
        assert time.monotonic() - t0 < 10
        assert "no NVIDIA GPU" in done.stderr
        assert done.stderr.count("\n") == 1, done.stderr  # one clear line, nothing else
        assert not list(tmp_path.glob("gpu-check*"))  # nothing installed or written
    assert os.access(script, os.X_OK)
