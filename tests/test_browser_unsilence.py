"""The node page in headless Chromium: silence a node, lift the silence with the Unsilence button,
and deny an approval and see the node's denial among its actions.

The node is a simulated agent (real wire messages over mosquitto) that verifies each signed
command with the real CommandVerifier; its denial is the message the agent's report stage builds
from the engine's ``approval.denied`` audit record (:func:`agent.report.build.playbook_record`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import pytest
from broker import Broker
from test_browser_dashboard import CHROMIUM, CHROMIUM_ARGS, _skip_reason

from agent.report.build import playbook_record
from agent.wire import CommandName
from agent.wire.signing import load_private_key
from devtools.coordinator_proc import PASSWORD, CoordinatorProcess, free_port, write_config
from devtools.fleet_sim import SimAgent, SimNode

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = pytest.mark.slow

NONE = "\N{EN DASH}"  # what the node page shows for "not silenced"


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
    """Screenshots: HEALD_TEST_ARTIFACTS when set, else the test's own temporary directory."""
    path = Path(os.environ.get("HEALD_TEST_ARTIFACTS") or tmp_path / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


async def received(agent: SimAgent, names: list[str]) -> None:
    """Wait (10 s at most) until the node has verified and accepted exactly these commands."""
    deadline = time.monotonic() + 10
    while [c.name for c in agent.accepted] != names:
        if time.monotonic() > deadline:
            raise AssertionError(f"the node got {[c.name for c in agent.accepted]}, not {names}")
        await asyncio.sleep(0.05)


async def live_rerender(page: Page, agent: SimAgent) -> None:
    """The node reports; wait until the page has re-rendered from the live stream since."""
    from playwright.async_api import expect  # noqa: PLC0415

    before = await page.evaluate("document.body.dataset.rendered")
    await agent.send(agent.node.metrics(20))
    await expect(page.locator("body")).not_to_have_attribute("data-rendered", before)


@pytest.mark.asyncio
async def test_unsilence_button_and_a_denied_approval(coord: CoordinatorProcess, mosquitto: Broker,
                                                      artifacts: Path) -> None:
    from playwright.async_api import async_playwright, expect  # noqa: PLC0415

    key = load_private_key(coord.config.parent / "state" / "command-key.pem").public_key()
    web = SimAgent(SimNode("web-1", site="lab", labels={"role": "web"}), "127.0.0.1", mosquitto.port, key)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(web.run(), name="sim-web-1")
        try:
            await asyncio.wait_for(web.subscribed.wait(), 10)
            await web.send(web.node.metrics(20))
            await web.send(web.node.risk(0.4))
            await web.request_approval("deny-me", "runaway-cpu", "signal_process")

            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
                    await page.goto(coord.url + "/login")
                    await page.fill("#secret", PASSWORD)
                    await page.click("#login")
                    await expect(page.locator("#node-web-1")).to_be_visible()
                    await expect(page.locator("#node-web-1")).not_to_contain_text("silenced")
                    await page.click("#node-web-1 a.node-link")
                    await expect(page.locator("#node-name")).to_have_text("web-1")
                    # not silenced: no Unsilence button
                    await expect(page.locator("#node-silenced")).to_have_text(NONE)
                    await expect(page.locator("#unsilence")).to_have_count(0)

                    await page.fill("#silence-form input[name=minutes]", "30")
                    await page.click("#silence-form button[type=submit]")
                    await expect(page.locator("#unsilence")).to_be_visible()
                    await expect(page.locator("#node-silenced")).not_to_have_text(NONE)
                    await received(web, [CommandName.SILENCE])
                    await page.screenshot(path=str(artifacts / "dashboard-node-silenced.png"), full_page=True)
                    await page.click("#nav-fleet")
                    await expect(page.locator("#node-web-1")).to_contain_text("silenced")
                    await page.click("#node-web-1 a.node-link")

                    await page.click("#unsilence")
                    await expect(page.locator("#unsilence")).to_have_count(0)
                    await expect(page.locator("#node-silenced")).to_have_text(NONE)
                    lifted = page.locator(".flash", has_text="Lifted the silence on web-1; signed command")
                    await expect(lifted).to_be_visible()
                    await received(web, [CommandName.SILENCE, CommandName.UNSILENCE])
                    await expect(page.locator("#audit")).to_contain_text("unsilence")
                    # the node's ack and its next report re-render the page live: the operator's
                    # confirmation stays (it was lost to the first live re-render after it: a CI flake)
                    await expect(page.locator("#commands tr", has_text="unsilence")).to_contain_text("done")
                    await live_rerender(page, web)
                    await expect(lifted).to_be_visible()

                    # deny the pending approval; the node's engine records the denial and reports it
                    await page.click("#node-approvals button.deny")
                    denied = page.locator(".flash", has_text="Denied web-1-deny-me; signed command sent.")
                    await expect(denied).to_be_visible()
                    await received(web, [CommandName.SILENCE, CommandName.UNSILENCE, CommandName.DENY])
                    deny = web.accepted[-1]
                    assert deny.args["request_id"] == "deny-me"
                    record = {"type": "approval.denied", "node": "web-1", "playbook": "runaway-cpu",
                              "by": deny.args["by"], "bindings": {"pid": 4242}, "audit_seq": 3}
                    env = web.node._env()  # the simulator's envelope: this node's next seq
                    await web.send(msgspec.structs.replace(playbook_record(record), node="web-1", site="lab",
                                                           seq=env["seq"]))
                    refused = page.locator("#actions tr", has=page.locator("td.outcome.refused"))
                    await expect(refused).to_have_count(1, timeout=15_000)  # live, no reload
                    await expect(refused).to_contain_text("approval.denied")
                    await expect(refused).to_contain_text(f"by {deny.args['by']}")
                    await expect(refused).to_contain_text("finished")
                    await expect(page.locator("#node-last-action")).to_have_text(
                        "runaway-cpu/approval.denied: refused")
                    await expect(denied).to_be_visible()  # across the live re-renders the denial caused
                    await expect(lifted).to_be_visible()
                    await page.screenshot(path=str(artifacts / "dashboard-node-unsilenced-denied.png"),
                                          full_page=True)
                    await lifted.locator("button.flash-dismiss").click()  # the operator dismisses one
                    await expect(lifted).to_have_count(0)
                    await expect(denied).to_be_visible()

                    await page.click("#nav-fleet")
                    await expect(page.locator("#node-web-1")).to_be_visible()
                    await expect(page.locator("#node-web-1")).not_to_contain_text("silenced")
                    await expect(page.locator(".flash")).to_have_count(0)  # they belonged to the node page
                finally:
                    await browser.close()
            assert web.rejected == []
        finally:
            task.cancel()
    await asyncio.sleep(0.1)
