"""The /metrics endpoint: served on loopback, scraped with curl, parsed with prometheus_client."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.collect.sample import CollectorState, Event, Sample
from agent.errors import HealdError
from agent.runtime.pipeline import StageCost
from agent.runtime.prometheus import (
    FIXED_METRICS,
    Exposition,
    MetricsServer,
    metric_name,
    parse_listen,
    serve,
    start,
)
from agent.score.types import Forecast, Risk

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")


def sample(seq: int = 7, events: tuple[Event, ...] = ()) -> Sample:
    return Sample(
        node="node-a", seq=seq, wall=time.time(), mono=time.monotonic(),
        metrics={
            "cpu.util_pct": 12.5,
            "cpu.util_pct[0]": 10.0,
            "cpu.util_pct[1]": 15.0,
            "disk.used_pct[/]": 50.0,
            "disk.used_pct[/var/lib/my data]": 60.0,
            "disk.used_pct[/mnt/gone]": None,
            "net.rx_bytes_per_s[eth0]": 1.5e6,
            "unit.active[nginx.service]": 1.0,
            "events": 3.0,  # would clash with heald_events_total: not exported
        },
        events=events,
        collectors={
            "cpu": CollectorState(status="ok", age_s=0.2, duration_ms=1.5),
            "gpu": CollectorState(status="absent", reason="no NVML"),
        },
    )


def full_exposition() -> Exposition:
    e = Exposition("node-a")
    e.update_sample(sample(events=(Event(kind="gpu.xid", source="gpu", wall=1.0, value=79.0),)))
    e.update_sample(sample(seq=8, events=(Event(kind="gpu.xid", source="gpu", wall=2.0),
                                          Event(kind="mem.oom_kill", source="memory", wall=2.0))))
    e.update_risk(Risk(seq=8, wall=time.time(), anomaly=0.42, alert=False, cold=False, model_version="m-3",
                       failure={"oom": 0.1, "disk_full": 0.02},
                       forecasts=(Forecast(resource="disk.used_bytes[/]", eta_s=7200.0, confidence=0.8,
                                           rate_per_s=10.0),
                                  Forecast(resource="mem.used_pct", eta_s=None, confidence=0.1,
                                           rate_per_s=0.0)), drift=0.25))
    e.record_run("clean-tmp", "ok")
    e.record_run("clean-tmp", "ok")
    e.record_run("restart-unit", "failed")
    e.set_report_state(connected=True, spool_bytes=4096, spool_records=12)
    cost = StageCost()
    for score_us, decide_us in ((40, 10), (60, 20), (50, 30)):
        cost.add(score_us * 1000, decide_us * 1000)
    e.update_stage_cost(cost)
    return e


def curl(url: str) -> str:
    assert CURL is not None
    result = subprocess.run([CURL, "--silent", "--show-error", "--fail", "--max-time", "10", url],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def scrape(url: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Sample name -> [(family type, labels, value)]."""
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(curl(url)):
        for s in family.samples:
            out.setdefault(s.name, []).append((family.type, dict(s.labels), s.value))
    return out


def documented_names() -> set[str]:
    return set(re.findall(r"^\| `(heald_[a-z_]+)` \|", DOC.read_text(), flags=re.MULTILINE))


def test_every_fixed_metric_is_documented() -> None:
    assert documented_names() == set(FIXED_METRICS)


@needs_curl
def test_scrape_with_curl_has_every_documented_name() -> None:
    server = start(full_exposition(), "127.0.0.1:0")
    try:
        assert server.host == "127.0.0.1"
        assert server.port > 0
        got = scrape(server.url)
    finally:
        server.close()

    missing = documented_names() - set(got)
    assert not missing, f"documented but not exposed: {sorted(missing)}"

    def value(name: str, **labels: str) -> float:
        for _, lab, v in got[name]:
            if all(lab.get(k) == w for k, w in labels.items()) and set(lab) == set(labels):
                return v
        raise AssertionError(f"{name}{labels} not in {got.get(name)}")

    assert value("heald_cpu_util_pct") == 12.5
    assert value("heald_cpu_util_pct", label="1") == 15.0
    assert value("heald_disk_used_pct", label="/var/lib/my data") == 60.0
    assert not any(lab.get("label") == "/mnt/gone" for _, lab, _ in got["heald_disk_used_pct"])
    assert value("heald_net_rx_bytes_per_s", label="eth0") == 1.5e6
    assert value("heald_unit_active", label="nginx.service") == 1.0
    assert "heald_events" not in got  # the sample key "events" must not shadow heald_events_total
    assert value("heald_events_total", kind="gpu.xid") == 2
    assert value("heald_events_total", kind="mem.oom_kill") == 1
    assert value("heald_sample_seq") == 8
    assert 0 <= value("heald_sample_age_seconds") < 60
    assert value("heald_collector_status", collector="cpu", status="ok") == 1
    assert value("heald_collector_status", collector="cpu", status="stale") == 0
    assert value("heald_collector_status", collector="gpu", status="absent") == 1
    assert value("heald_collector_duration_seconds", collector="cpu") == pytest.approx(0.0015)
    assert value("heald_risk_anomaly") == pytest.approx(0.42)
    assert value("heald_model_drift") == pytest.approx(0.25)
    assert value("heald_risk_alert") == 0
    assert value("heald_failure_probability", **{"class": "oom"}) == pytest.approx(0.1)
    assert value("heald_forecast_eta_seconds", resource="disk.used_bytes[/]") == 7200
    assert len(got["heald_forecast_eta_seconds"]) == 1  # the non-trending forecast has no ETA
    assert value("heald_model_info", version="m-3") == 1
    assert value("heald_playbook_runs_total", playbook="clean-tmp", outcome="ok") == 2
    assert value("heald_playbook_runs_total", playbook="restart-unit", outcome="failed") == 1
    assert value("heald_mqtt_connected") == 1
    assert value("heald_spool_bytes") == 4096
    assert value("heald_spool_records") == 12
    assert value("heald_info", version=got["heald_info"][0][1]["version"], node="node-a") == 1
    assert value("heald_pipeline_cpu_seconds_count", stage="score") == 3
    assert value("heald_pipeline_cpu_seconds_sum", stage="sample") == pytest.approx(210e-6)
    assert value("heald_pipeline_cpu_seconds", stage="score", quantile="0.5") == pytest.approx(50e-6)
    assert value("heald_pipeline_cpu_seconds", stage="decide", quantile="0.99") == pytest.approx(30e-6)
    assert value("heald_pipeline_cpu_seconds", stage="sample", quantile="0.9") == pytest.approx(80e-6)
    assert "process_resident_memory_bytes" in got
    types = {t for entries in got.values() for t, _, _ in entries}
    assert types <= {"gauge", "counter", "info", "summary"}


@needs_curl
def test_cold_daemon_exposes_what_it_knows() -> None:
    """Before the first sample only the meta families are there; a cold model has no anomaly."""
    e = Exposition("node-b")
    server = start(e, "127.0.0.1:0")
    try:
        got = scrape(server.url)
        assert "heald_info" in got
        assert "heald_sample_seq" not in got
        e.update_risk(Risk(seq=1, wall=0.0, anomaly=None, alert=False, cold=True, model_version=""))
        got = scrape(server.url)
        assert "heald_risk_anomaly" not in got
        assert "heald_model_drift" not in got  # not measured yet
        assert got["heald_risk_cold"][0][2] == 1
    finally:
        server.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@needs_curl
@pytest.mark.asyncio
async def test_serve_runs_until_cancelled_and_stops_cleanly() -> None:
    e = full_exposition()
    started: list[MetricsServer] = []
    task = asyncio.create_task(serve(e, "127.0.0.1:0", started=started.append), name="metrics")
    for _ in range(100):
        if started:
            break
        await asyncio.sleep(0.02)
    assert started, "server did not start"
    server = started[0]
    body = await asyncio.to_thread(curl, server.url)
    assert "heald_mqtt_connected 1.0" in body
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not _port_open(server.port)
    assert not server.running


def test_bind_failure_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(HealdError, match=r"prometheus.listen: cannot listen on 127.0.0.1:\d+"):
            start(Exposition("n"), f"127.0.0.1:{port}")


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9108") == ("127.0.0.1", 9108)
    assert parse_listen("[::1]:9108") == ("::1", 9108)
    for bad in ("9108", ":9108", "host:", "host:http", "host:70000"):
        with pytest.raises(HealdError):
            parse_listen(bad)


def test_metric_name() -> None:
    assert metric_name("cpu.util_pct") == "heald_cpu_util_pct"
    assert metric_name("gpu.xid-count") == "heald_gpu_xid_count"


def test_updates_from_another_thread_while_scraping() -> None:
    """The daemon updates on the event loop while the HTTP thread collects: no torn state."""
    e = full_exposition()
    stop = threading.Event()

    def writer() -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            e.update_sample(sample(seq=seq))
            e.record_run("p", "ok")

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(50):
            names = {m.name for m in e.collect()}
            assert "heald_cpu_util_pct" in names
    finally:
        stop.set()
        t.join()
