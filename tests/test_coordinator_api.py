"""JSON API, login, CSRF and the `heald fleet` CLI against a real coordinator process."""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from broker import Broker

from agent.wire.signing import CommandVerifier, load_private_key
from devtools.coordinator_proc import PASSWORD, REPO_ROOT, TOKEN, CoordinatorProcess, free_port, write_config
from devtools.fleet_sim import SimNode, publish

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    from broker import default_config  # noqa: PLC0415

    b = Broker(default_config(), tmp_path_factory.mktemp("mosq"), free_port())
    b.start()
    yield b
    b.kill()


@pytest.fixture(scope="module")
def coord(module_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    port = free_port()
    d = tmp_path_factory.mktemp("coord")
    proc = CoordinatorProcess(write_config(d, mqtt_port=module_broker.port, web_port=port), port)
    proc.start()
    asyncio.run(seed(module_broker.port))
    proc.wait_for(lambda c: c.api("GET", "/api/approvals")[1]["items"], timeout=20)
    yield proc
    proc.stop()


async def seed(port: int) -> None:
    a, b = SimNode("api-a", site="lab", labels={"rack": "r1"}), SimNode("api-b", site="edge")
    async with aiomqtt.Client("127.0.0.1", port) as client:
        for m in (a.birth(), a.status(), b.birth(), b.status(), a.risk(1.3), a.metrics(5)):
            await publish(client, m)
        for i in range(3):
            await publish(
                client,
                a.event(
                    "approval_request",
                    {"request_id": f"api-a-ap-{i}", "run_id": f"run-{i}", "playbook": "restart-nginx"},
                ),
            )
    await asyncio.sleep(0.1)  # let paho close its socket before asyncio.run() closes the loop


def login(c: CoordinatorProcess, secret: str = PASSWORD) -> tuple[urllib.request.OpenerDirector, str]:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(c.url + "/login", data=urllib.parse.urlencode({"secret": secret}).encode())
    csrf = json.loads(opener.open(c.url + "/api/session").read())["csrf"]
    return opener, csrf


def post(opener: urllib.request.OpenerDirector, url: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(  # noqa: S310 - local test URL
        url, data=b"{}", method="POST", headers={"Content-Type": "application/json"} | headers
    )
    try:
        with opener.open(req) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


def test_everything_needs_credentials(coord: CoordinatorProcess) -> None:
    for path in (
        "/api/nodes",
        "/api/nodes/api-a",
        "/api/approvals",
        "/api/escalations",
        "/api/info",
        "/api/stream",
        "/api/audit",
        "/api/nodes/api-a/metrics",
    ):
        status, body = coord.api("GET", path, token=None)
        assert status == 401, path
        assert "authentication required" in body["error"]
    for path in ("/api/approvals/api-a-ap-0/approve", "/api/nodes/api-a/run", "/api/nodes/api-a/silence"):
        assert coord.api("POST", path, {}, token=None)[0] == 401
    assert coord.api("GET", "/api/nodes", token="wrong")  # noqa: S106 - a wrong token on purpose[0] == 401
    assert coord.api("GET", "/api/health", token=None)[0] == 200  # liveness only, no data
    # the dashboard page redirects to the login form
    no_redirect = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as exc:
        no_redirect.open(coord.url + "/")
    exc.value.close()
    assert exc.value.code == 302
    assert exc.value.headers["Location"] == "/login"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_login_session_cookie_and_csrf(coord: CoordinatorProcess) -> None:
    req = urllib.request.Request(  # noqa: S310 - local test URL
        coord.url + "/login", data=urllib.parse.urlencode({"secret": "nope"}).encode()
    )
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.build_opener(NoRedirect).open(req)
    bad.value.close()
    assert bad.value.code == 401
    req = urllib.request.Request(  # noqa: S310 - local test URL
        coord.url + "/login", data=urllib.parse.urlencode({"secret": PASSWORD}).encode()
    )
    with pytest.raises(urllib.error.HTTPError) as ok:
        urllib.request.build_opener(NoRedirect).open(req)
    ok.value.close()
    assert ok.value.code == 302
    cookie = ok.value.headers["Set-Cookie"]
    assert "heald_session=" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert ok.value.headers["Content-Security-Policy"].startswith("default-src 'self'")

    opener, csrf = login(coord)
    url = coord.url + "/api/approvals/api-a-ap-0/approve"
    assert post(opener, url, {}) == 403  # no CSRF token
    assert post(opener, url, {"X-CSRF-Token": "forged"}) == 403
    assert post(opener, url, {"X-CSRF-Token": csrf, "Origin": "http://evil.example"}) == 403
    assert post(opener, url, {"X-CSRF-Token": csrf, "Origin": coord.url}) == 200
    assert post(opener, url, {"X-CSRF-Token": csrf}) == 409  # already approved
    audit = coord.api("GET", "/api/audit")[1]["items"]
    assert any(a["action"] == "approved" and a["actor"].startswith("operator@") for a in audit)


def test_api_queries_and_errors(coord: CoordinatorProcess) -> None:
    status, body = coord.api("GET", "/api/nodes?site=edge")
    assert status == 200
    assert [n["node"] for n in body["items"]] == ["api-b"]
    assert coord.api("GET", "/api/nodes?label=rack=r1")[1]["total"] == 1
    assert coord.api("GET", "/api/nodes?label=oops")[0] == 400
    assert coord.api("GET", "/api/nodes?order=sideways")[0] == 400
    assert coord.api("GET", "/api/nodes?limit=abc")[0] == 400
    assert coord.api("GET", "/api/nodes/nope")[0] == 404
    assert coord.api("POST", "/api/nodes/api-a/run", {"playbook": "bad name!"})[0] == 400
    assert coord.api("POST", "/api/nodes/api-a/silence", {"duration_s": "x"})[0] == 400
    assert coord.api("POST", "/api/approvals/missing/approve", {})[0] == 404
    node = coord.api("GET", "/api/nodes/api-a")[1]
    assert node["alert"]
    metrics = coord.api("GET", "/api/nodes/api-a/metrics?since=0")[1]
    assert len(metrics["samples"]) == 5
    risk = coord.api("GET", "/api/nodes/api-a/risk?since=0")[1]
    assert risk[0]["anomaly"] == 1.3


def test_approval_sends_a_signed_command(
    coord: CoordinatorProcess, module_broker: Broker, tmp_path: Path
) -> None:
    key = load_private_key(coord.config.parent / "state" / "command-key.pem").public_key()

    async def approve_and_receive() -> object:
        payload = None
        async with aiomqtt.Client("127.0.0.1", module_broker.port) as client:
            await client.subscribe("heald/v1/lab/api-a/cmd", qos=1)
            status, body = await asyncio.to_thread(coord.api, "POST", "/api/approvals/api-a-ap-1/approve", {})
            assert status == 200, body
            async with asyncio.timeout(10):
                async for msg in client.messages:
                    payload = msg.payload
                    break
        await asyncio.sleep(0.1)  # let paho close its socket before asyncio.run() closes the loop
        return payload

    payload = asyncio.run(approve_and_receive())
    from agent.wire import decode_command  # noqa: PLC0415

    cmd = decode_command(payload)  # type: ignore[arg-type]
    CommandVerifier([key], node="api-a", site="lab").verify(cmd)
    assert cmd.name == "approve"
    assert cmd.args["request_id"] == "api-a-ap-1"
    assert cmd.args["run_id"] == "run-1"


def fleet(coord: CoordinatorProcess, *args: str, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, PYTHONPATH=str(REPO_ROOT), HEALD_COORDINATOR_URL=coord.url, HEALD_COORDINATOR_TOKEN=token
    )
    return subprocess.run(
        [sys.executable, "-m", "agent", "fleet", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )


def test_fleet_cli(coord: CoordinatorProcess) -> None:
    ls = fleet(coord, "ls")
    assert ls.returncode == 0, ls.stderr
    assert ls.stdout.splitlines()[0].split()[:4] == ["NODE", "SITE", "STATE", "RISK"]
    assert ls.stdout.splitlines()[1].startswith("api-a")  # riskiest first
    as_json = fleet(coord, "--json", "ls", "--site", "edge")
    assert [n["node"] for n in json.loads(as_json.stdout)["items"]] == ["api-b"]
    assert json.loads(fleet(coord, "ls", "--json").stdout)["total"] == 2
    show = fleet(coord, "show", "api-a")
    assert show.returncode == 0
    assert "1.30 ALERT" in show.stdout
    assert "pending approvals" in show.stdout
    assert fleet(coord, "approve", "api-a-ap-2").returncode == 0
    again = fleet(coord, "approve", "api-a-ap-2")
    assert again.returncode == 2
    assert "already approved" in again.stderr
    assert fleet(coord, "deny", "nope").returncode == 2
    run = fleet(coord, "--json", "run", "api-b", "restart-nginx", "--wait", "0")  # no agent answers
    assert run.returncode == 0
    assert json.loads(run.stdout)["node"] == "api-b"
    assert fleet(coord, "silence", "api-b", "15m").returncode == 0
    assert fleet(coord, "silence", "api-b", "soon").returncode == 2
    assert fleet(coord, "show", "nope").returncode == 2
    denied = fleet(coord, "ls", token="wrong")  # noqa: S106 - a wrong token on purpose
    assert denied.returncode == 1
    assert "refused the credentials" in denied.stderr
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        HEALD_COORDINATOR_URL="http://127.0.0.1:1",
        HEALD_COORDINATOR_TOKEN=TOKEN,
    )
    down = subprocess.run(
        [sys.executable, "-m", "agent", "fleet", "ls"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )
    assert down.returncode == 1
    assert "cannot reach the coordinator" in down.stderr
    silenced = coord.api("GET", "/api/nodes?state=silenced")[1]
    assert [n["node"] for n in silenced["items"]] == ["api-b"]
