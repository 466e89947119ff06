"""End to end: a real agent (``heald run``, playbooks forced to dry-run) reports cost summaries
every 2 s over a real mosquitto to a real coordinator process; the coordinator's cost page shows
them in headless Chromium (screenshot) and ``heald fleet cost --json`` returns the same numbers
as the page and the API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Broker
from test_browser_dashboard import CHROMIUM, CHROMIUM_ARGS, _skip_reason

from devtools.coordinator_proc import PASSWORD, TOKEN, CoordinatorProcess, free_port, write_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
NODE = "cost-e2e"


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
def agent(mosquitto: Broker, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    d = tmp_path / "agent"
    d.mkdir()
    cfg = d / "agent.toml"
    cfg.write_text(
        f'[node]\nid = "{NODE}"\nsite = "lab"\n'
        f'[paths]\nstate_dir = "{d / "state"}"\nruntime_dir = "{d / "run"}"\n'
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {mosquitto.port}\nmetrics_interval_s = 1.0\n'
        '[log]\nformat = "json"\n[model]\nenabled = false\n'
        '[playbooks]\nforce_mode = "dry-run"\n'
        '[cost]\nsummary_interval_s = 2\nnode_class = "e2e"\ncurrency = "EUR"\nper_core_hour = 0.5\n'
        'per_gib_hour = 0.01\n'
    )
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                            stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()


def _cost(c: CoordinatorProcess) -> dict[str, Any]:
    status, body = c.api("GET", "/api/cost?days=14&top=10")
    assert status == 200, body
    data: dict[str, Any] = body if isinstance(body, dict) else json.loads(body)
    return data


def _fleet_cost(coord: CoordinatorProcess, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "agent", "fleet", "--url", coord.url, f"--token={TOKEN}", "cost", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.exclusive  # a quiet host: see tests/exclusive.py
def test_a_real_agents_cost_summaries_on_the_page_and_in_the_cli(
        coord: CoordinatorProcess, agent: subprocess.Popen[bytes], tmp_path: Path) -> None:
    # at least three summaries (6 s of sample time) stored
    def enough(c: CoordinatorProcess) -> object:
        d = _cost(c)
        return d if d["top"] and d["top"][0]["seconds"] >= 5.0 else None

    coord.wait_for(enough, timeout=45)
    agent.send_signal(signal.SIGTERM)  # stop reporting: the numbers hold still for the comparison
    assert agent.wait(20) == 0
    data = _cost(coord)
    node = data["top"][0]
    assert node["node"] == NODE
    assert node["node_class"] == "e2e"
    assert data["currency"] == "EUR"
    assert node["core_h"] > 0
    assert 0 < node["idle_core_h"] <= node["core_h"]
    assert node["mem_stranded_gib_h"] > 0
    expected = node["idle_core_h"] * 0.5 + node["mem_stranded_gib_h"] * 0.01
    assert node["money"] == pytest.approx(expected, rel=1e-3, abs=1e-5)

    cli = _fleet_cost(coord, "--json")
    assert cli.returncode == 0, cli.stderr
    from_cli = json.loads(cli.stdout)
    assert {k: v for k, v in from_cli.items() if k != "now"} == {k: v for k, v in data.items() if k != "now"}
    table = _fleet_cost(coord)
    assert table.returncode == 0, table.stderr
    assert NODE in table.stdout
    assert f"{data['week']['idle_core_h']:.6f}" in table.stdout

    shots = Path(os.environ.get("HEALD_TEST_ARTIFACTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    asyncio.run(_page(coord, data, shots / "cost-page.png"))
    assert (shots / "cost-page.png").stat().st_size > 0


async def _page(coord: CoordinatorProcess, data: dict[str, Any], shot: Path) -> None:
    """The cost page shows the API's numbers (6 decimals, money 4)."""
    from playwright.async_api import async_playwright, expect  # noqa: PLC0415

    node = data["top"][0]
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1000})
            await page.goto(coord.url + "/login")
            await page.fill("#secret", PASSWORD)
            await page.click("#login")
            await page.goto(coord.url + "/#/cost")
            row = page.locator(f'#cost-top tr[data-node="{NODE}"]')
            await expect(row).to_be_visible(timeout=15_000)
            for key, digits in (("idle_core_h", 6), ("mem_stranded_gib_h", 6), ("money", 4)):
                await expect(row.locator(f'td[data-col="{key}"]')).to_have_text(f"{node[key]:.{digits}f}")
            week = page.locator('#cost-summary tr[data-period="week"] td[data-col="idle_core_h"]')
            await expect(week).to_have_text(f"{data['week']['idle_core_h']:.6f}")
            await expect(page.locator("#cost-nodes")).to_contain_text("EUR")
            await page.screenshot(path=str(shot), full_page=True)
        finally:
            await browser.close()
