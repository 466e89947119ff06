"""The dashboard in headless Chromium (Playwright driving the system /usr/bin/chromium).

Log in, see both nodes, open one, approve its pending action and watch the outcome arrive live
(over the Server-Sent Events stream, without reloading). Screenshots go to test-artifacts/.
The two nodes are simulated agents (real wire messages over mosquitto) that verify the signed
approval with the real CommandVerifier before "running" the action.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import Broker

from agent.wire.signing import load_private_key
from devtools.coordinator_proc import PASSWORD, CoordinatorProcess, free_port, write_config
from devtools.fleet_sim import SimAgent, SimNode

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("HEALD_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _skip_reason() -> str | None:
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"chromium not found at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.async_api  # noqa: F401, PLC0415
    except ImportError:
        return "playwright is not installed (pip install playwright; no `playwright install` needed)"
    return None


@pytest.fixture
def coord(mosquitto: Broker, tmp_path: Path) -> Iterator[CoordinatorProcess]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    port = free_port()
    proc = CoordinatorProcess(write_config(tmp_path, mqtt_port=mosquitto.port, web_port=port), port)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where the screenshots go: HEALD_TEST_ARTIFACTS when set (to keep them), else the test's own
    temporary directory; never into the checkout."""
    path = Path(os.environ.get("HEALD_TEST_ARTIFACTS") or tmp_path / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.asyncio
async def test_dashboard_login_nodes_approve_live(coord: CoordinatorProcess, mosquitto: Broker,
                                                  artifacts: Path) -> None:
    from playwright.async_api import async_playwright, expect  # noqa: PLC0415

    key = load_private_key(coord.config.parent / "state" / "command-key.pem").public_key()
    agents = [
        SimAgent(SimNode("web-1", site="lab", labels={"role": "web"}), "127.0.0.1", mosquitto.port, key),
        SimAgent(SimNode("db-1", site="lab", labels={"role": "db"}), "127.0.0.1", mosquitto.port, key),
    ]
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(a.run(), name=f"sim-{a.node.node}") for a in agents]
        try:
            for a in agents:
                await asyncio.wait_for(a.subscribed.wait(), 10)
            web = agents[0]
            await web.send(web.node.metrics(20))
            await web.send(web.node.risk(0.4))
            await web.send(web.node.risk(1.6))
            await web.request_approval("approve-me", "restart-nginx")

            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
                    await page.goto(coord.url + "/")
                    await expect(page).to_have_url(coord.url + "/login")
                    await page.fill("#secret", PASSWORD)
                    await page.click("#login")
                    await expect(page.locator("#fleet")).to_be_visible()
                    await expect(page.locator("#node-web-1")).to_be_visible()
                    await expect(page.locator("#node-db-1")).to_be_visible()
                    await expect(page.locator("#node-web-1 .risk")).to_contain_text("ALERT")
                    await page.screenshot(path=str(artifacts / "dashboard-fleet.png"), full_page=True)

                    # sorting and filtering go through the server
                    await page.fill("#filter-label", "role=db")
                    await page.press("#filter-label", "Enter")
                    await expect(page.locator("#node-web-1")).to_have_count(0)
                    await expect(page.locator("#node-db-1")).to_be_visible()
                    await page.fill("#filter-label", "")
                    await page.press("#filter-label", "Enter")

                    await page.click("#node-web-1 a.node-link")
                    await expect(page.locator("#node-name")).to_have_text("web-1")
                    await expect(page.locator("#charts svg").first).to_be_visible()
                    await expect(page.locator("#node-approvals button.approve")).to_be_visible()
                    await page.screenshot(path=str(artifacts / "dashboard-node-pending.png"), full_page=True)

                    await page.click("#node-approvals button.approve")
                    # the agent verifies the signed approval, runs the action and reports: the page
                    # updates from the live stream, no reload
                    outcome = page.locator("#actions td.outcome.ok")
                    await expect(outcome).to_have_count(1, timeout=15_000)
                    await expect(page.locator("#node-last-action")).to_contain_text("restart-nginx")
                    await expect(page.locator("#live")).to_have_class("live on")
                    await page.screenshot(path=str(artifacts / "dashboard-node-approved.png"), full_page=True)

                    await page.click("#nav-escalations")
                    await expect(page.locator("#no-approvals")).to_be_visible()
                    await page.screenshot(path=str(artifacts / "dashboard-escalations.png"), full_page=True)
                finally:
                    await browser.close()
            assert [c.name for c in web.accepted] == ["approve"]
            assert web.rejected == []
        finally:
            for t in tasks:
                t.cancel()
    await asyncio.sleep(0.1)
