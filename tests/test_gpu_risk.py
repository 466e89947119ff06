"""Per-GPU failure risk (issue 24): FakeNVML -> the real GpuCollector -> the score stage ->
the risk report and a playbook trigger; the GPU health features of the schema; a host without
GPUs. FakeNVML (devtools/fake_nvml.py) is the one fake allowed."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
from playbook_kit import playbook

from agent import wire
from agent.collect.gpu import GpuCollector
from agent.collect.sample import Sample
from agent.collect.settings import GpuSettings
from agent.decide.targets import target
from agent.decide.triggers import EvalContext, EventLog, SampleIndex, TriggerEvaluator
from agent.features.schema import DEFAULT_INPUTS, GPU_COUNTER_LEVELS, FeatureSchema
from agent.report import build
from agent.score import compiled as art
from agent.score.gpu_risk import GpuRiskScorer
from agent.score.settings import ModelSettings
from agent.score.stage import DEFAULT_FIT_OPTIONS, DETECTOR_FILE, RiskStage
from agent.score.types import Risk
from devtools.fake_nvml import FakeNVML

_seq = itertools.count(1)


def stage(tmp_path: Path) -> RiskStage:
    return RiskStage(ModelSettings(), tmp_path, history=False)


def gpu_sample(c: GpuCollector, t0: float, i: int) -> Sample:
    r = c.collect()
    return Sample(node="n1", seq=next(_seq), wall=t0 + i, mono=1000.0 + i, metrics=dict(r.metrics),
                  events=tuple(r.events), detail={"gpu": r.detail})


def run(st: RiskStage, c: GpuCollector, n: int, t0: float, start: int = 0) -> Risk:
    """``n`` samples of the real collector through the score stage; the last one's risk."""
    risk = None
    for i in range(start, start + n):
        risk = st.on_sample(gpu_sample(c, t0, i))
    assert risk is not None
    return risk


def test_dbe_and_remap_pending_give_a_high_score_naming_them_a_healthy_gpu_stays_low(tmp_path: Path) -> None:
    fake = FakeNVML(2)
    c = GpuCollector(GpuSettings(kernel_log_fallback=False), nvml=fake)
    c.start()
    st = stage(tmp_path)
    t0 = time.time()
    try:
        healthy = run(st, c, 5, t0)
        assert [g.gpu for g in healthy.gpu] == ["0", "1"]
        assert all(g.score < 0.01 and g.reasons == () for g in healthy.gpu)
        pci0, pci1 = healthy.gpu[0].pci, healthy.gpu[1].pci
        assert pci0
        assert pci1
        assert pci0 != pci1
        fake.add_ecc(0, uncorrected=2)
        fake.set_row_remap(0, uncorrectable=1, pending=True)
        risk = run(st, c, 3, t0, start=5)
    finally:
        c.close()
    bad, good = risk.gpu
    assert bad.pci == pci0
    assert bad.score > 0.95, bad
    assert bad.reasons[:2] == ("ecc_dbe=2", "remap_pending"), bad.reasons
    assert good.score < 0.01
    assert good.reasons == ()
    # the failure map carries the score by PCI bus id: a risk alert, and on the wire
    assert risk.failure[f"gpu.failure[{pci0}]"] == bad.score
    assert risk.failure[f"gpu.failure[{pci1}]"] < 0.01
    assert st.risk_alert(risk) == [f"failure[gpu.failure[{pci0}]]"]
    msg = build.risk(risk)
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(msg), type=wire.Message)
    assert isinstance(back, wire.Risk)
    assert back.gpu[0].pci == pci0
    assert back.gpu[0].reasons[:2] == ["ecc_dbe=2", "remap_pending"]
    assert back.failure[f"gpu.failure[{pci0}]"] == bad.score


def test_xids_pcie_nvlink_and_thermal_are_reasons(tmp_path: Path) -> None:
    fake = FakeNVML(2, nvlink_links=2)
    c = GpuCollector(GpuSettings(kernel_log_fallback=False), nvml=fake)
    c.start()
    st = stage(tmp_path)
    t0 = time.time()
    try:
        run(st, c, 3, t0)
        fake.inject_xid(1, 79)  # fallen off the bus: reboot_node
        fake.add_pcie_replays(1, 30)
        fake.add_nvlink_errors(1, 0, fake.NVML_NVLINK_ERROR_DL_CRC_FLIT, 20)
        fake.set_throttle(1, fake.nvmlClocksThrottleReasonHwThermalSlowdown)
        risk = run(st, c, 2, t0, start=3)
    finally:
        c.close()
    g0, g1 = risk.gpu
    assert g0.score < 0.01
    assert g1.score > 0.95
    assert set(g1.reasons) == {"xid_reboot_node", "pcie_replays", "nvlink_errors", "thermal"}, g1.reasons


def test_a_dbe_burst_leaves_the_score_once_out_of_the_window() -> None:
    """Counters are read as increases over the window: the score falls back once the burst is
    older than the window (re-scored at least every 10 s while nothing changes)."""
    sc = GpuRiskScorer(window_s=30.0)

    def at(t: float, dbe: float) -> float:
        s = Sample(node="n", seq=int(t), wall=t, mono=t,
                   metrics={"gpu.lost[0]": 0.0, "gpu.ecc_dbe_volatile[0]": dbe, "cpu.util_pct": 1.0})
        (r,) = sc.push(s)
        return r.score

    assert at(0, 5) < 0.01  # a count from before the scorer started is history
    assert at(1, 5) < 0.01
    assert at(2, 7) > 0.4
    assert at(20, 7) > 0.4
    assert at(45, 7) < 0.01


def test_a_host_without_gpus_has_no_score_and_nan_gpu_features(tmp_path: Path) -> None:
    st = stage(tmp_path)
    risk = None
    for i in range(5):
        risk = st.on_sample(Sample(node="n1", seq=i, wall=time.time(), mono=float(i),
                                   metrics={"cpu.util_pct": 10.0, "mem.used_pct": 40.0}))
    assert risk is not None
    assert risk.gpu == ()
    assert not any(k.startswith("gpu.") for k in risk.failure)
    assert "gpu" not in msgspec.to_builtins(build.risk(risk))  # omitted on the wire
    vec = st.window.output
    gpu_cols = [i for i, n in enumerate(st.window.names) if "(gpu." in n]
    assert len(gpu_cols) >= 6 * 18
    assert all(math.isnan(vec[i]) for i in gpu_cols)


def test_gpu_health_inputs_are_in_the_schema_and_counter_levels_left_to_the_rates() -> None:
    names = set(FeatureSchema().names)
    for f in ("sum(gpu.ecc_dbe_volatile[*]):rate", "sum(gpu.ecc_sbe_volatile[*]):rate",
              "sum(gpu.pcie_replays[*]):rate", "sum(gpu.nvlink_crc_errors[*]):rate",
              "max(gpu.remap_pending[*]):value", "max(gpu.remap_failure[*]):value",
              "max(gpu.retired_pages_pending[*]):value", "max(gpu.throttle_hw_thermal[*]):value"):
        assert f in names, f
    exclude = DEFAULT_FIT_OPTIONS["exclude"]
    assert isinstance(exclude, list)
    assert set(GPU_COUNTER_LEVELS) <= set(exclude)
    assert set(GPU_COUNTER_LEVELS) <= names
    assert "sum(gpu.pcie_replays[*]):rate" not in exclude


@pytest.mark.slow
def test_detector_refits_and_scores_on_a_host_without_gpus(tmp_path: Path) -> None:
    """All-NaN GPU inputs: the stage's own refit (history export + fit, child processes) leaves
    them out, and the fitted detector scores finite values."""
    st = RiskStage(ModelSettings(cold_start_s=60), tmp_path)
    rng = np.random.default_rng(1)
    t0 = time.time() - 400
    for i in range(300):
        st.on_sample(Sample(node="n1", seq=i, wall=t0 + i, mono=float(i),
                            metrics={"cpu.iowait_pct": float(rng.normal(5, 1)),
                                     "mem.used_pct": float(rng.normal(40, 1))}))
    assert asyncio.run(st.refit())
    assert st.detector is not None
    names = st.detector.model.meta.feature_names
    assert names
    assert not any("(gpu." in n for n in names)
    r = st.on_sample(Sample(node="n1", seq=300, wall=t0 + 300, mono=300.0,
                            metrics={"cpu.iowait_pct": 5.0, "mem.used_pct": 40.0}))
    assert r.anomaly is not None
    assert math.isfinite(r.anomaly)
    assert r.gpu == ()
    st.close()


def test_a_detector_fitted_before_the_gpu_inputs_still_loads(tmp_path: Path) -> None:
    """The schema version did not change: a node's detector fitted on the 41 inputs of before
    binds its features by name and keeps scoring after the upgrade."""
    from agent.score.fit import fit_detector  # noqa: PLC0415 - scikit-learn, tests only

    old = FeatureSchema(inputs=DEFAULT_INPUTS[:41])
    assert old.inputs[-1].key == "gpu.lost[*]"
    x = np.random.default_rng(0).normal(0, 1, (200, old.dim))
    art.save(fit_detector(x, list(old.names)), tmp_path / "models" / DETECTOR_FILE)
    st = stage(tmp_path)
    assert st.detector is not None
    r = st.on_sample(Sample(node="n1", seq=1, wall=time.time(), mono=1.0, metrics={"cpu.util_pct": 1.0}))
    assert r.anomaly is not None


def test_playbook_failure_trigger_binds_each_gpu_at_risk(tmp_path: Path) -> None:
    """FakeNVML -> collector -> score stage -> a GPU playbook's ``failure: gpu.failure[{pci}]``
    trigger: one match, for the GPU at risk, binding its bus id and index (the GPU actions' {gpu}),
    guarded per GPU by bus id; the classifier's plain failure classes still match as before."""
    pb = playbook(
        "name: gpu-risk-drain\ndescription: d\ntrigger:\n  failure: \"gpu.failure[{pci}]\"\n  above: 0.9\n"
        "steps:\n  - action: gpu_drain\n    params: {}\n"
    )
    fake = FakeNVML(3)
    c = GpuCollector(GpuSettings(kernel_log_fallback=False), nvml=fake)
    c.start()
    st = stage(tmp_path)
    try:
        run(st, c, 3, time.time())
        fake.set_row_remap(2, uncorrectable=1, failure=True)
        s = gpu_sample(c, time.time(), 3)
        r = st.on_sample(s)
    finally:
        c.close()
    pci2 = r.gpu[2].pci
    t = TriggerEvaluator(pb.trigger)
    ms = t.evaluate(EvalContext(SampleIndex(s), r, EventLog(), time.time(), 0.0))
    assert [m.bindings for m in ms] == [{"pci": pci2, "gpu": "2"}]
    assert ms[0].inputs == {f"failure[gpu.failure[{pci2}]]": r.failure[f"gpu.failure[{pci2}]"]}
    assert target(pb.name, ms[0].bindings, s.detail).key == f"gpu-risk-drain[gpu=pci:{pci2},pci={pci2}]"
    plain = TriggerEvaluator(playbook(
        "name: d\ndescription: d\ntrigger:\n  failure: disk_full\n  above: 0.5\n"
        "steps:\n  - action: drop_caches\n"
    ).trigger)
    r2 = msgspec.structs.replace(r, failure={**r.failure, "disk_full": 0.7})
    got = plain.evaluate(EvalContext(SampleIndex(s), r2, EventLog(), time.time(), 0.0))
    assert [m.bindings for m in got] == [{}]
