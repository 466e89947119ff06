"""The operator's view in headless Chromium (Playwright driving the system /usr/bin/chromium):
open escalations on the fleet page, an offline node shown as stale (no ALERT), an approval that
names its target, charts in human units, and no horizontal scroll at 1280 and 1920 px wide.

The nodes are simulated agents (real wire messages over a real mosquitto) and the coordinator is
a real process. Screenshots go to the test's temporary directory (HEALD_TEST_ARTIFACTS to keep
them).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from broker import Broker
from test_browser_dashboard import CHROMIUM, CHROMIUM_ARGS, _skip_reason
from test_fleet_cli import PlaybookAgent

from agent.wire import Metrics, MetricSample, RequestEvent
from agent.wire.signing import load_private_key
from devtools.coordinator_proc import PASSWORD, CoordinatorProcess, free_port, write_config
from devtools.fleet_sim import SimAgent, SimNode

pytestmark = pytest.mark.slow

#: What the engine's approval request says the run would act on (agent.act.preview.acts_on).
TARGET = "stop_process: stress-ng (pid 4242, 97% CPU, top cpu now)"
WIDTHS = (1280, 1920)


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
    path = Path(os.environ.get("HEALD_TEST_ARTIFACTS") or tmp_path / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _metrics(node: SimNode, n: int) -> Metrics:
    """Samples with byte, percent and rate metrics (the charts must show them in human units)."""
    now = time.time()
    samples = [
        MetricSample(seq=node.seq * 10 + i, wall=now - (n - 1 - i), mono=time.monotonic(),
                     metrics={"cpu.util_pct": 20.0 + i, "mem.used_bytes": 3.5 * 2**30 + i * 2**20,
                              "disk.used_pct[/]": 61.0})
        for i in range(n)
    ]
    return msgspec.structs.replace(node.metrics(1), samples=samples)


async def _no_horizontal_scroll(page: Any, name: str, artifacts: Path) -> dict[int, tuple[int, int]]:
    """At each width: the document is no wider than the window; a full-page screenshot each."""
    seen: dict[int, tuple[int, int]] = {}
    for width in WIDTHS:
        await page.set_viewport_size({"width": width, "height": 1000})
        await page.wait_for_timeout(150)
        scroll, inner = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        await page.screenshot(path=str(artifacts / f"operator-{name}-{width}.png"), full_page=True)
        seen[width] = (scroll, inner)
        assert scroll <= inner, f"{name} at {width} px: document {scroll} px wide, window {inner} px"
    return seen


@pytest.mark.asyncio
async def test_operator_view(coord: CoordinatorProcess, mosquitto: Broker, artifacts: Path) -> None:
    from playwright.async_api import async_playwright, expect  # noqa: PLC0415

    key = load_private_key(coord.config.parent / "state" / "command-key.pem").public_key()
    web = PlaybookAgent(SimNode("op-web", site="lab", labels={"role": "web"}), "127.0.0.1", mosquitto.port,
                        key)
    old = SimAgent(SimNode("op-old", site="lab", labels={"role": "db"}), "127.0.0.1", mosquitto.port, key)
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(a.run(), name=f"sim-{a.node.node}") for a in (web, old)]
        try:
            for a in (web, old):
                await asyncio.wait_for(a.subscribed.wait(), 10)
            await web.send(_metrics(web.node, 30))
            await web.send(web.node.risk(0.4))
            await web.send(web.node.event("playbook.escalated",
                                          {"playbook": "restart-nginx", "run_id": "r-1"},
                                          message="restart-nginx gave up after 3 tries"))
            await web.send(web.node.event(
                RequestEvent.APPROVAL_REQUEST,
                {"request_id": "ap-1", "run_id": "ap-1", "playbook": "runaway-cpu", "action": "playbook",
                 "target": "runaway-cpu", "acts_on": TARGET},
                message="runaway-cpu: approval needed to run on runaway-cpu"))
            # an unbroken 300-character message: the page must wrap it, not grow wider than the window
            await web.send(web.node.event("probe.detail", {}, message="x" * 300))
            await old.send(old.node.risk(1.6))  # its last risk is an ALERT...
            await old.send(old.node.status("offline", "connection lost"))  # ...and then it went away

            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    page = await browser.new_page(viewport={"width": 1280, "height": 1000})
                    await page.goto(coord.url + "/login")
                    await page.fill("#secret", PASSWORD)
                    await page.click("#login")
                    await expect(page.locator("#fleet")).to_be_visible()

                    # open escalations on the fleet page: the node's count and newest reason, fleet-wide
                    esc = page.locator("#node-op-web td.escalations")
                    await expect(esc).to_contain_text("restart-nginx gave up after 3 tries", timeout=15_000)
                    await expect(esc.locator("b")).to_have_text("1")
                    await expect(page.locator("#count-escalations")).to_have_text("1")
                    # the offline node: stale, greyed, no ALERT
                    old_risk = page.locator("#node-op-old .risk")
                    await expect(old_risk).to_contain_text("stale since", timeout=15_000)
                    await expect(old_risk).not_to_contain_text("ALERT")
                    await expect(old_risk.locator(".stale")).to_have_count(1)
                    await _no_horizontal_scroll(page, "fleet", artifacts)

                    # the approval names its target, on the escalations page and the node page
                    await page.click("#nav-escalations")
                    await expect(page.locator("#approvals .approval-target")).to_have_text(TARGET)
                    await page.goto(coord.url + "/#/node/op-web")
                    await expect(page.locator("#node-name")).to_have_text("op-web")
                    await expect(page.locator("#node-approvals .approval-target")).to_have_text(TARGET)
                    await expect(page.locator("#node-escalations")).to_contain_text("restart-nginx gave up")
                    # charts in human units: bytes as GiB, percentages with %
                    mem = page.locator("#charts .chart", has_text="mem.used_bytes")
                    await expect(mem.locator("h3 .latest")).to_contain_text("GiB")
                    await expect(mem.locator("svg text").first).to_contain_text("GiB")
                    cpu = page.locator("#charts .chart", has_text="cpu.util_pct")
                    await expect(cpu.locator("h3 .latest")).to_contain_text("%")
                    # a playbook the node does not have: the page shows the node's refusal
                    await page.fill("#run-form input[name=playbook]", "no-such-playbook")
                    await page.click("#run-form button")
                    await expect(page.locator("#run-answer")).to_contain_text(
                        "op-web did not run no-such-playbook: rejected: no playbook named", timeout=20_000)
                    await page.fill("#run-form input[name=playbook]", "restart-nginx")
                    await page.click("#run-form button")
                    await expect(page.locator("#run-answer")).to_have_text("op-web started restart-nginx.",
                                                                           timeout=20_000)
                    sizes = await _no_horizontal_scroll(page, "node", artifacts)
                    width = await page.evaluate("document.getElementById('view').offsetWidth")
                    assert width <= 1400, f"the node page's content is {width} px wide at {sizes}"

                    await page.goto(coord.url + "/#/node/op-old")
                    await expect(page.locator("#node-risk")).to_contain_text("stale since")
                    await expect(page.locator("#node-risk")).not_to_contain_text("ALERT")
                finally:
                    await browser.close()
        finally:
            for t in tasks:
                t.cancel()
    await asyncio.sleep(0.1)
