"""Demand forecasts -> a `demand` trigger -> a `webhook` POST to a real loopback receiver, before
a scripted daily peak; the `idle` trigger; the webhook's bounded retries and refused redirects.

Time is compressed through the forecaster's inputs only: the demand model is fitted on 14 days
of a scripted daily CPU pattern (5-minute rows), and each engine sample advances the scorer's
clock by 5 minutes. The engine, its decider, guards, runner, audit and the HTTP POST are real.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playbook_kit import drive, make_engine, playbook, running, sample

from agent.act.audit import verify
from agent.decide.model import MetricCond
from agent.score import artifact, demand
from agent.score.types import Risk

STEP = 300.0
DAY = 86_400.0
PEAK_H = 14.0  # the daily peak: CPU ~85% at 14:00, ~20% at night


def cpu_at(wall: float) -> float:
    h = (wall % DAY) / 3600.0
    return 20.0 + 65.0 * float(np.exp(-0.5 * ((h - PEAK_H) / 1.5) ** 2))


class Receiver:
    """A loopback HTTP server recording the JSON bodies POSTed to it; answers ``codes`` in turn."""

    def __init__(self, codes: list[int] | None = None, location: str = "") -> None:
        self.bodies: list[dict[str, Any]] = []
        self.arrived: list[float] = []
        self.codes = list(codes or [])
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                outer.bodies.append(json.loads(self.rfile.read(n)))
                outer.arrived.append(time.monotonic())
                code = outer.codes.pop(0) if outer.codes else 200
                self.send_response(code)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def prescale(url: str, mode: str = "enforce") -> str:
    return (
        f"name: prescale\ndescription: call the autoscaler before the daily peak\nmode: {mode}\n"
        "trigger:\n  demand: cpu.util_pct\n  above: 60\n  within: 2h\n"
        f"steps:\n  - action: webhook\n    params: {{url: '{url}', timeout: 2s, retries: 1}}\n"
        "    verify: false\n"
        "guards:\n  cooldown: 1h\n"
    )


def fitted_model() -> demand.CompiledDemand:
    rng = np.random.default_rng(7)
    wall = np.arange(14 * int(DAY / STEP)) * STEP
    cpu = np.array([cpu_at(w) for w in wall]) + rng.normal(0, 3, wall.size)
    return demand.fit_demand(cpu[:, None], wall, ["cpu.util_pct"], step_s=STEP, horizon_s=7200)


@pytest.mark.asyncio
async def test_demand_trigger_calls_loopback_webhook_before_the_peak(tmp_path: Path,
                                                                     receiver: Receiver) -> None:
    model = demand.from_bytes(artifact.to_bytes(fitted_model()))  # as the daemon loads it
    scorer = demand.DemandScorer(model)
    eng, rec = make_engine(tmp_path, [playbook(prescale(receiver.url))])
    vclock = {"wall": 15 * DAY + 8 * 3600.0}  # day 15, 08:00: quiet, peak six hours away
    seen: list[tuple[float, float]] = []  # (virtual wall, actual cpu) of every sample fed

    def metrics() -> dict[str, float | None]:
        vclock["wall"] += STEP
        value = cpu_at(vclock["wall"])
        seen.append((vclock["wall"], value))
        scorer.push({"cpu.util_pct": value}, vclock["wall"])
        return {"cpu.util_pct": value}

    def risk() -> Risk:
        return Risk(seq=0, wall=time.time(), anomaly=0.1, alert=False, cold=False, model_version="t",
                    demand=scorer.forecast(vclock["wall"]))

    async with running(eng):
        await drive(eng, metrics, lambda: bool(receiver.bodies), risk_fn=risk, limit_s=30)
        fired_at, cpu_then = seen[-1]
        # the samples up to the peak keep coming: the webhook is called once (cooldown)
        while vclock["wall"] < 15 * DAY + PEAK_H * 3600:
            await eng.evaluate(sample(metrics()), risk())
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
    crossing = next(w for w, v in seen if v >= 60)
    assert cpu_then < 60, f"called only once CPU was already {cpu_then:.0f}%"
    lead_h = (crossing - fired_at) / 3600
    assert 0.5 <= lead_h <= 2.5, f"webhook {lead_h:.2f} h before CPU crossed 60%"
    assert len(receiver.bodies) == 1
    body = receiver.bodies[0]
    assert body["playbook"] == "prescale"
    assert body["node"] == "n1"
    assert body["run_id"]
    assert body["inputs"]["demand[cpu.util_pct].point"] >= 60
    assert 0 < body["inputs"]["demand[cpu.util_pct].in_s"] <= 7200
    steps = rec.of("step")
    assert [s["action"] for s in steps] == ["webhook"], steps
    assert steps[0]["ok"], steps
    assert steps[0]["data"]["status"] == 200
    assert rec.of("run.start")[0]["inputs"]["demand[cpu.util_pct].point"] >= 60
    assert verify(tmp_path / "state" / "audit.jsonl").ok


@pytest.mark.asyncio
async def test_dry_run_webhook_posts_nothing(tmp_path: Path, receiver: Receiver) -> None:
    scorer = demand.DemandScorer(fitted_model())
    eng, rec = make_engine(tmp_path, [playbook(prescale(receiver.url, mode="dry-run"))])
    vclock = {"wall": 15 * DAY + 10 * 3600.0}

    def metrics() -> dict[str, float | None]:
        vclock["wall"] += STEP
        scorer.push({"cpu.util_pct": cpu_at(vclock["wall"])}, vclock["wall"])
        return {"cpu.util_pct": cpu_at(vclock["wall"])}

    def risk() -> Risk:
        return Risk(seq=0, wall=time.time(), anomaly=0.1, alert=False, cold=False, model_version="t",
                    demand=scorer.forecast(vclock["wall"]))

    async with running(eng):
        await drive(eng, metrics, lambda: bool(rec.of("run.end")), risk_fn=risk, limit_s=30)
    assert receiver.bodies == []


def _ctx(tmp_path: Path) -> Any:
    from agent.act.base import ActionContext  # noqa: PLC0415 - test helper
    from agent.act.supervisor import Supervisor  # noqa: PLC0415
    from agent.decide.settings import PlaybookSettings  # noqa: PLC0415
    return ActionContext(settings=PlaybookSettings(load_shipped=False, dirs=()), node="n1", playbook="p",
                         run_id="r1", dry_run=False, emit=lambda e: None,
                         supervisor=Supervisor(lambda c, n: c, lambda n, p, r: None),
                         bindings={"gpu": "0"}, inputs={"x": 1.0})


@pytest.mark.asyncio
async def test_webhook_retries_are_bounded_and_4xx_is_final(tmp_path: Path) -> None:
    from agent.act.actions.webhook import webhook  # noqa: PLC0415
    r = Receiver(codes=[503, 503, 503, 503])
    try:
        res = await webhook({"url": r.url, "retries": 2, "timeout": 2}, _ctx(tmp_path))
        assert not res.ok
        assert res.data["attempts"] == 3
        assert len(r.bodies) == 3
        r.codes = [404, 200]
        res = await webhook({"url": r.url, "retries": 3}, _ctx(tmp_path))
        assert not res.ok
        assert res.data["attempts"] == 1
        r.codes = [500, 200]
        res = await webhook({"url": r.url, "retries": 1}, _ctx(tmp_path))
        assert res.ok
        assert res.data["attempts"] == 2
        assert r.bodies[-1]["target"] == {"gpu": "0"}
        assert r.bodies[-1]["inputs"] == {"x": 1.0}
    finally:
        r.close()
    res = await webhook({"url": r.url, "retries": 0, "timeout": 1}, _ctx(tmp_path))  # closed port
    assert not res.ok
    assert "attempt" in res.detail


@pytest.mark.asyncio
async def test_webhook_refuses_redirects(tmp_path: Path) -> None:
    from agent.act.actions.webhook import webhook  # noqa: PLC0415
    target = Receiver()
    r = Receiver(codes=[307], location=target.url)
    try:
        res = await webhook({"url": r.url, "retries": 0}, _ctx(tmp_path))
        assert not res.ok
        assert target.bodies == []
    finally:
        r.close()
        target.close()


def test_idle_trigger_builds_a_below_for_condition() -> None:
    pb = playbook(
        "name: reclaim\ndescription: idle gpu\nmode: dry-run\n"
        "trigger:\n  idle: 'gpu.util_pct[{gpu}]'\n  below: 5\n  for: 1h\n"
        "steps:\n  - action: webhook\n    params: {url: 'http://127.0.0.1:9/reclaim/{gpu}'}\n"
    )
    assert isinstance(pb.trigger, MetricCond)
    t = pb.trigger
    assert (t.op, t.value, t.for_s, t.key.label.var) == ("<", 5.0, 3600.0, "gpu")


def test_demand_model_round_trips_and_refuses_damage(tmp_path: Path) -> None:
    from agent.errors import ModelError  # noqa: PLC0415
    model = fitted_model()
    data = artifact.to_bytes(model)
    assert demand.from_bytes(data).sha256 == model.sha256
    with pytest.raises(ModelError):
        demand.from_bytes(data[:-40])


def test_labels_in_a_webhook_url_stay_one_segment() -> None:
    """A bound label is percent-encoded in a url parameter (and only there): a mount like
    /a/../b or a unit with # or & cannot change the webhook's path or query."""
    from agent.act.runner import substitute  # noqa: PLC0415 - only here

    got = substitute({"url": "http://127.0.0.1:9/hook/{mount}?unit={unit}", "message": "{mount} {unit}"},
                     {"mount": "/a/../b", "unit": "x#y&z=1"})
    assert got["url"] == "http://127.0.0.1:9/hook/%2Fa%2F..%2Fb?unit=x%23y%26z%3D1"
    assert got["message"] == "/a/../b x#y&z=1"
