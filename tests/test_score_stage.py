"""RiskStage: cold start, child-process refit, persistence, refused models, no scikit-learn in the daemon."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent.collect.sample import Sample
from agent.score import compiled as art
from agent.score.settings import ModelSettings
from agent.score.stage import DETECTOR_FILE, RiskStage, check_model


def samples(n: int, start: int = 0, fill_rate: float = 0.0) -> list[Sample]:
    rng = np.random.default_rng(start)
    out = []
    for i in range(start, start + n):
        m: dict[str, float | None] = {
            "cpu.util_pct": 20.0 + float(rng.normal(0, 2)),
            "mem.used_pct": 30.0 + float(rng.normal(0, 0.5)),
            "mem.available_bytes": 8e9 + float(rng.normal(0, 1e7)),
            "disk.used_pct[/]": 40.0 + float(rng.normal(0, 0.01)),
            "disk.free_bytes[/]": 5e10 - fill_rate * i,
            "net.tcp_retrans_per_s": float(rng.poisson(0.2)),
            "proc.running": float(rng.integers(1, 4)),
        }
        out.append(Sample(node="t", seq=i, wall=1.7e9 + i, mono=100.0 + i, metrics=m))
    return out


def settings(**kw: object) -> ModelSettings:
    return ModelSettings(cold_start_s=120, **kw)  # type: ignore[arg-type]


def test_daemon_side_never_imports_sklearn() -> None:
    code = ("import sys, agent.score.stage, agent.features.window, agent.score.classifier, "
            "agent.score.forecast; assert 'sklearn' not in sys.modules, sorted(m for m in sys.modules "
            "if m.startswith('sklearn'))[:3]; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_cold_start_rules_only(tmp_path: Path) -> None:
    st = RiskStage(settings(classifier_path=str(tmp_path / "none.npz")), tmp_path)
    assert st.scorer is None  # refused with a log line, not a crash
    risk = None
    for s in samples(50):
        risk = st.on_sample(s)
    assert risk is not None
    assert risk.cold
    assert risk.anomaly is None
    assert not risk.alert
    assert risk.failure == {}
    assert not st.refit_due()  # 50 s < cold_start_s
    assert any(f.resource == "disk.free_bytes[/]" for f in risk.forecasts)


@pytest.mark.slow
def test_refit_persist_reload_and_refusals(tmp_path: Path) -> None:
    st = RiskStage(settings(classifier_path=str(tmp_path / "none.npz")), tmp_path)
    for s in samples(130):
        st.on_sample(s)
    assert st.refit_due()
    assert asyncio.run(st.refit())
    risk = st.on_sample(samples(1, start=130)[0])
    assert not risk.cold
    assert risk.anomaly is not None
    assert risk.model_version.startswith("anomaly:")
    artifact = tmp_path / "models" / DETECTOR_FILE
    assert artifact.exists()
    st.close()

    # reloaded at start: warm immediately
    st2 = RiskStage(settings(classifier_path=str(tmp_path / "none.npz")), tmp_path)
    assert not st2.cold
    assert st2.on_sample(samples(1, start=131)[0]).anomaly is not None

    # an anomalous sample gets an explanation
    s = samples(1, start=132)[0]
    bad = dict(s.metrics)
    bad["cpu.util_pct"] = 100.0
    bad["net.tcp_retrans_per_s"] = 500.0
    r = None
    for k in range(5):
        r = st2.on_sample(Sample(node="t", seq=200 + k, wall=s.wall + k, mono=s.mono + k, metrics=bad))
    assert r is not None
    assert r.anomaly is not None
    assert r.anomaly >= 1.0
    assert r.alert
    assert r.explanation
    assert 0 < r.explanation[0].share <= 1
    assert r.anomaly_channel in ("slow", "fast", "both")  # which channel alerted

    # corrupt artifact: refused, rules only, no crash; check_model reports it
    artifact.write_bytes(artifact.read_bytes()[:100])
    st3 = RiskStage(settings(classifier_path=str(tmp_path / "none.npz")), tmp_path)
    assert st3.cold
    assert st3.on_sample(samples(1)[0]).anomaly is None
    probs = check_model(settings(classifier_path=str(tmp_path / "none.npz")), tmp_path)
    assert any(p.key == "model.classifier_path" for p in probs)
    assert any(DETECTOR_FILE in p.file and "refitted" in p.message for p in probs)

    # schema mismatch: a detector over features this node does not produce
    good = art.load(tmp_path / "models" / "work" / "detector.npz") if (
        tmp_path / "models" / "work" / "detector.npz").exists() else None
    del good
    from agent.score.fit import fit_detector  # noqa: PLC0415 - test side may use sklearn

    foreign = fit_detector(np.random.default_rng(0).normal(size=(50, 2)), ["x:value", "y:value"])
    art.save(foreign, artifact)
    st4 = RiskStage(settings(classifier_path=str(tmp_path / "none.npz")), tmp_path)
    assert st4.cold


@pytest.mark.slow
def test_refit_loop_runs_and_cancels(tmp_path: Path) -> None:
    st = RiskStage(settings(classifier_path=str(tmp_path / "none.npz")), tmp_path)
    for s in samples(130):
        st.on_sample(s)

    async def main() -> None:
        task = asyncio.create_task(st.refit_loop(check_every_s=0.05), name="refit")
        for _ in range(600):
            await asyncio.sleep(0.05)
            if not st.cold:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert not st.cold


def test_disabled_stage(tmp_path: Path) -> None:
    st = RiskStage(ModelSettings(enabled=False), tmp_path)
    r = st.on_sample(samples(1)[0])
    assert r.cold
    assert r.anomaly is None
    assert r.model_version == "disabled"
    assert check_model(ModelSettings(enabled=False)) == []


def test_risk_alert_sources(tmp_path: Path) -> None:
    st = RiskStage(settings(classifier_path=str(tmp_path / "none.npz")), tmp_path, forecast_alert_s=600)
    r = None
    for s in samples(60, fill_rate=1e8):  # 5e10 bytes at 1e8/s: ~500 s left
        r = st.on_sample(s)
    assert r is not None
    assert st.risk_alert(r) == ["forecast[disk.free_bytes[/]]"]


@pytest.mark.slow
def test_early_refits_each_time_the_history_doubles(tmp_path: Path) -> None:
    """Cold start at 120 rows, then at 2x the rows of the last fit, until the interval is shorter."""
    st = RiskStage(settings(classifier_path=str(tmp_path / "none.npz"), refit_interval_s=300), tmp_path)
    stream = samples(300)
    fits = []
    for i, s in enumerate(stream):
        st.on_sample(s)
        if st.refit_due():
            assert asyncio.run(st.refit())
            fits.append(i + 1)
    # 120 rows (cold start), 240 (doubled); the next would be at 480 rows, past this stream.
    assert fits == [120, 240]
    st.close()
    # Once the last fit's history spans the interval, only the (wall-clock) interval refits.
    for interval, due in ((300, True), (120, False)):
        again = RiskStage(settings(classifier_path=str(tmp_path / "none.npz"), refit_interval_s=interval),
                          tmp_path)  # reloads the artifact and sees the 300 rows of history
        assert again.detector is not None
        assert again.history_rows() == 300
        again._fit_rows, again._last_fit_mono = 150, time.monotonic()
        assert again.refit_due() is due, interval
    # The detector is left without the workload levels (DEFAULT_FIT_OPTIONS["exclude"]).
    assert st.detector is not None
    assert not any(n.startswith(("cpu.util_pct:", "proc.running:")) for n in st.detector.feature_names)


def test_a_model_trained_without_despiking_is_refused() -> None:
    """Schema v1 models (no despike) and models of another despike width do not match."""
    import msgspec  # noqa: PLC0415

    from agent.errors import ModelError  # noqa: PLC0415
    from agent.features.schema import FeatureSchema  # noqa: PLC0415
    from agent.score.stage import check_schema_compatible  # noqa: PLC0415

    node = FeatureSchema()
    check_schema_compatible(node, node)
    with pytest.raises(ModelError, match=r"despike=1, schema v2; this node uses .*despike=3"):
        check_schema_compatible(msgspec.structs.replace(node, despike=1), node)
    v1 = msgspec.json.decode(node.to_json().replace(b'"version":2', b'"version":1'), type=FeatureSchema)
    with pytest.raises(ModelError, match=r"schema v1; this node uses"):
        check_schema_compatible(v1, node)
