"""End to end, demand: a real agent process (``heald run``) with a pre-fitted demand model calls a
loopback webhook before a scripted CPU peak, and reports cost and demand summaries over a real
mosquitto to a real coordinator process, whose cost and demand pages render in headless Chromium
(screenshots) with the numbers that ``heald fleet cost --json`` / ``heald fleet demand --json`` return.

How time is compressed, and why the path is still the daemon's own: the test fits a demand model
(:func:`agent.score.demand.fit_demand`, as the fit child does) on two days of a scripted 10-second
history in which the CPU sits at 2 % except for one minute a day, at the time of day that is
``LEAD_S`` seconds after the test starts, when it is at 100 %. The agent is pointed at it with
``[demand] model_path`` (the documented key for a pre-fitted artifact), so its profile says "the
daily peak is in about LEAD_S seconds". Everything after that is the running daemon: the real
cpu collector's samples go through RiskStage -> DemandStage -> ``Risk.demand``, the shipped
``demand`` trigger (``cpu.util_pct above 80 within 30s``) of the test's only playbook (enforce
mode, ``load_shipped = false``: it only POSTs to the test's loopback receiver) fires, the engine
runs the ``webhook`` action, and at the peak's time the test starts the scripted load (a CPU burner
for a few seconds). The webhook must arrive before the peak and not earlier than the forecast
horizon of the trigger allows (about 30 s before it).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker import Broker
from test_browser_dashboard import CHROMIUM, CHROMIUM_ARGS, _skip_reason
from test_demand_webhook import Receiver

from agent.score import demand as dm
from devtools.coordinator_proc import PASSWORD, TOKEN, CoordinatorProcess, free_port, write_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
NODE = "demand-e2e"
SITE = "lab-d"
STEP = 10.0
# The trigger's horizon and the peak's lead, both 30 s shorter than they were (60 s, 75 s): the
# peak still enters the horizon LEAD_S - WITHIN_S = 15 s into the test (after the agent's start)
# and three forecast steps ahead; the test no longer idles 30 s of it away.
LEAD_S = 45.0  # the scripted peak starts this long after the test does
WITHIN_S = 30.0  # the trigger's horizon


def fit_peak_model(peak_start: float, path: Path) -> None:
    """Two days of 10 s steps: CPU 2 % (+ noise), 100 % for the minute from ``peak_start``'s time of day."""
    rng = np.random.default_rng(7)
    day_bins = round(dm.DAY_S / STEP)
    n = 2 * day_bins + 60
    end = math.floor(time.time() / STEP) * STEP
    wall = end - STEP * np.arange(n, 0, -1)
    phase = np.floor(wall / STEP).astype(np.int64) % day_bins
    p0 = int(peak_start // STEP) % day_bins
    in_peak = ((phase - p0) % day_bins) < 6
    cpu = np.where(in_peak, 100.0, 2.0) + rng.normal(0.0, 0.5, n)
    model = dm.fit_demand(cpu[:, None], wall, ["cpu.util_pct"], step_s=STEP, horizon_s=300.0, source="e2e")
    dm.save(model, path)


@pytest.fixture
def coord(mosquitto: Broker, tmp_path: Path) -> Iterator[CoordinatorProcess]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    port = free_port()
    proc = CoordinatorProcess(write_config(tmp_path / "coord", mqtt_port=mosquitto.port, web_port=port), port)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def start_agent(tmp: Path, port: int, model: Path, hook: str) -> subprocess.Popen[bytes]:
    d = tmp / "agent"
    (d / "playbooks").mkdir(parents=True)
    (d / "playbooks" / "prescale.yaml").write_text(
        "name: prescale\ndescription: call the autoscaler before the daily peak\nmode: enforce\n"
        f"trigger:\n  demand: cpu.util_pct\n  above: 80\n  within: {WITHIN_S:g}s\n"
        f"steps:\n  - action: webhook\n    params: {{url: '{hook}', timeout: 2s, retries: 1}}\n"
        "guards:\n  cooldown: 1h\n")
    cfg = d / "agent.toml"
    cfg.write_text(
        f'[node]\nid = "{NODE}"\nsite = "{SITE}"\n'
        f'[paths]\nstate_dir = "{d / "state"}"\nruntime_dir = "{d / "run"}"\n'
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\nmetrics_interval_s = 1.0\n'
        '[log]\nformat = "json"\n'
        f'[playbooks]\nload_shipped = false\ndirs = ["{d / "playbooks"}"]\n'
        '[cost]\nsummary_interval_s = 2\nnode_class = "e2e"\ncurrency = "EUR"\nper_core_hour = 0.5\n'
        f'[demand]\nmodel_path = "{model}"\nstep_s = {STEP:g}\n'
    )
    log = (tmp / "agent.log").open("wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    finally:
        log.close()


def stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _api(c: CoordinatorProcess, path: str) -> dict[str, Any]:
    status, body = c.api("GET", path)
    assert status == 200, body
    data: dict[str, Any] = body if isinstance(body, dict) else json.loads(body)
    return data


def _fleet(coord: CoordinatorProcess, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "agent", "fleet", "--url", coord.url, f"--token={TOKEN}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def _site(data: dict[str, Any]) -> dict[str, Any] | None:
    return next((s for s in data["sites"] if s["site"] == SITE), None)


def test_a_real_agent_calls_the_webhook_before_the_peak_and_reports_demand(
        coord: CoordinatorProcess, mosquitto: Broker, receiver: Receiver, tmp_path: Path) -> None:
    t0 = time.time()
    peak = math.ceil((t0 + LEAD_S) / STEP) * STEP  # the scripted peak's start (wall clock)
    model = tmp_path / "demand.npz"
    fit_peak_model(peak, model)
    agent = start_agent(tmp_path, mosquitto.port, model, receiver.url)
    burner: subprocess.Popen[bytes] | None = None
    try:
        # 1. the webhook, before the peak
        while not receiver.bodies and time.time() < peak + 5 and agent.poll() is None:
            time.sleep(0.2)
        arrived = time.time()
        assert receiver.bodies, f"no webhook by the peak (agent exit {agent.poll()}): " + \
            (tmp_path / "agent.log").read_text()[-3000:]
        assert arrived < peak, f"webhook {arrived - peak:.1f} s after the peak"
        assert arrived >= peak - WITHIN_S - 2 * STEP, f"webhook {peak - arrived:.1f} s before the peak"
        body = receiver.bodies[0]
        assert body["node"] == NODE
        assert body["playbook"] == "prescale"
        assert body["inputs"]["demand[cpu.util_pct].point"] >= 80.0
        assert 0 < body["inputs"]["demand[cpu.util_pct].in_s"] <= WITHIN_S
        # the scripted peak itself: real load at the forecast time
        time.sleep(max(0.0, peak - time.time()))
        burn = "import time\nt = time.time() + 8\nwhile time.time() < t: pass"
        burner = subprocess.Popen([sys.executable, "-c", burn])

        # 2. cost and demand summaries at the coordinator (one summary every 2 s)
        def demand_there(c: CoordinatorProcess) -> object:
            site = _site(_api(c, "/api/demand?hours=48&bucket_s=60"))
            if site is None:
                return None
            res = {r["resource"]: r for r in site["resources"]}
            cpu = res.get("cpu.util_pct")
            return cpu if cpu and cpu["actual"] and cpu["predicted"] and cpu["forecast"] else None

        cpu = coord.wait_for(demand_there, timeout=60)
        assert isinstance(cpu, dict)
        assert burner.wait(30) == 0
        assert len(receiver.bodies) == 1  # the cooldown holds: one call for the peak
    finally:
        if burner is not None and burner.poll() is None:
            burner.kill()
            burner.wait()
        code = stop(agent)
    assert code == 0, (tmp_path / "agent.log").read_text()[-3000:]
    cost = _api(coord, "/api/cost?days=14&top=10")
    demand = _api(coord, "/api/demand?hours=48&bucket_s=60")
    hourly = _api(coord, "/api/demand?hours=48")  # what the page and the CLI show by default
    node = next(n for n in cost["top"] if n["node"] == NODE)
    assert node["core_h"] > 0
    assert 0 < node["idle_core_h"] <= node["core_h"]
    site = _site(demand)
    assert site is not None
    assert site["nodes"] == 1
    cpu = next(r for r in site["resources"] if r["resource"] == "cpu.util_pct")
    assert all(0.0 <= v <= 100.0 for _, v in cpu["actual"])
    fc = cpu["forecast"]
    assert fc["step_s"] == STEP
    assert len(fc["point"]) == 30
    assert all(lo <= p <= hi for lo, p, hi in zip(fc["lo"], fc["point"], fc["hi"], strict=True))

    # 3. the CLI returns the API's numbers
    runs = ((("cost", "--json"), cost), (("demand", "--hours", "48", "--bucket", "60", "--json"), demand),
            (("demand", "--json"), hourly))
    for args, api in runs:
        cli = _fleet(coord, *args)
        assert cli.returncode == 0, cli.stderr
        assert {k: v for k, v in json.loads(cli.stdout).items() if k != "now"} == \
            {k: v for k, v in api.items() if k != "now"}
    table = _fleet(coord, "demand", "--hours", "48", "--bucket", "60")
    assert table.returncode == 0
    assert f"site {SITE}" in table.stdout
    assert "cpu.util_pct" in table.stdout

    # 4. the pages
    shots = Path(os.environ.get("HEALD_TEST_ARTIFACTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    asyncio.run(_pages(coord, node, cpu, shots))  # the demand page at 60 s buckets, as `demand`
    for name in ("cost-page.png", "demand-page.png"):
        assert (shots / name).stat().st_size > 10_000


async def _pages(coord: CoordinatorProcess, node: dict[str, Any], cpu: dict[str, Any], shots: Path) -> None:
    from playwright.async_api import async_playwright, expect  # noqa: PLC0415

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1100})
            await page.goto(coord.url + "/login")
            await page.fill("#secret", PASSWORD)
            await page.click("#login")
            await page.goto(coord.url + "/#/cost")
            row = page.locator(f'#cost-top tr[data-node="{NODE}"]')
            await expect(row).to_be_visible(timeout=15_000)
            for key, digits in (("idle_core_h", 6), ("money", 4)):
                await expect(row.locator(f'td[data-col="{key}"]')).to_have_text(f"{node[key]:.{digits}f}")
            await page.screenshot(path=str(shots / "cost-page.png"), full_page=True)

            await page.goto(coord.url + "/#/demand?hours=48&bucket=60")
            row = page.locator(f'#demand-site-{SITE}-table tr[data-resource="cpu.util_pct"]')
            await expect(row).to_be_visible(timeout=15_000)
            await expect(row.locator('td[data-col="actual"]')).to_have_text(f"{cpu['actual'][-1][1]:.1f}")
            predicted = f"{cpu['predicted'][-1][1]:.1f}"
            await expect(row.locator('td[data-col="predicted"]')).to_have_text(predicted)
            chart = page.locator(f'#demand-site-{SITE} .demand-chart[data-resource="cpu.util_pct"] svg')
            await expect(chart.locator("polyline.demand-actual")).to_have_count(1)
            await expect(chart.locator("circle.demand-actual-dot")).to_have_count(len(cpu["actual"]))
            await expect(chart.locator("polyline.demand-forecast")).to_have_count(1)
            await expect(chart.locator("polygon.demand-band")).to_have_count(1)
            await page.screenshot(path=str(shots / "demand-page.png"), full_page=True)
        finally:
            await browser.close()
