"""Login hardening (issue 18, item 7): guessing is throttled, weak secrets are refused, and every
response carries the security headers — each shown against the attack it refuses.

The process tests run a real coordinator (``python -m coordinator``) against a private
mosquitto and talk to it from distinct loopback source addresses (127.0.0.2, .3, ...: Linux
routes all of 127/8 to lo), so each test is its own client and no test's lockout touches
another's, nor the token the helpers use from 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from broker import Broker

from coordinator.config import MIN_SECRET_LENGTH, loads
from coordinator.errors import CoordinatorConfigError
from coordinator.web.app import SECURITY_HEADERS, security_headers
from coordinator.web.throttle import LoginThrottle, client_address, client_key, parse_networks
from devtools.coordinator_proc import PASSWORD, REPO_ROOT, TOKEN, CoordinatorProcess, free_port, write_config

STRONG = "kV3f-q9Lz-wP2m-Xa7e"  # fixed: it shows in test ids
LOCKOUT_S = 2.0
TRACKED_MAX = 50
PROXY = "127.0.0.9"  # the one trusted proxy of the module's coordinator


# ------------------------------------------------------------------------------ the tracker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tracker(clock: Clock, **kw: float) -> LoginThrottle:
    settings: dict[str, float] = {
        "max_failures": 5, "window_s": 900, "lockout_s": 30, "lockout_max_s": 900, "max_clients": 100,
    } | kw
    return LoginThrottle(
        max_failures=int(settings["max_failures"]),
        window_s=settings["window_s"],
        lockout_s=settings["lockout_s"],
        lockout_max_s=settings["lockout_max_s"],
        max_clients=int(settings["max_clients"]),
        clock=clock,
    )


def test_failures_lock_out_exponentially_up_to_the_cap() -> None:
    clock = Clock()
    t = tracker(clock)
    assert [t.failure("a").lockout_s for _ in range(4)] == [0, 0, 0, 0]
    assert t.retry_after("a") == 0
    assert t.failure("a").lockout_s == 30  # the 5th failure starts the first lockout
    assert t.retry_after("a") == 30  # ... so the 6th attempt is refused, whatever it sends
    clock.now += 10
    assert t.retry_after("a") == 20  # refusals do not lengthen it
    lockouts = []
    for _ in range(8):
        clock.now += t.retry_after("a")
        assert t.retry_after("a") == 0
        lockouts.append(t.failure("a").lockout_s)
    assert lockouts == [60, 120, 240, 480, 900, 900, 900, 900]
    assert t.retry_after("b") == 0  # per client
    assert t.info()["lockouts"] == 9
    assert t.info()["refused"] == 2 + 8  # each retry_after() while locked is one


def test_success_and_a_quiet_window_forget_the_client() -> None:
    clock = Clock()
    t = tracker(clock, window_s=100)
    for _ in range(4):
        t.failure("a")
    t.success("a")
    assert t.failure("a").lockout_s == 0  # counting starts again
    for _ in range(4):
        t.failure("a")
    assert t.retry_after("a") == 30
    clock.now += 30 + 99  # the window runs from the lockout's end, not from its start
    assert t.failure("a").lockout_s == 60
    clock.now += 60 + 100
    assert t.retry_after("a") == 0
    assert t.failure("a").failures == 1
    assert len(t) == 1


def test_a_flood_of_distinct_clients_takes_bounded_memory() -> None:
    clock = Clock()
    t = tracker(clock, max_clients=1000)
    for _ in range(5):
        t.failure("attacker")
    for i in range(100_000):
        t.failure(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
        if i % 500 == 0:  # the locked-out client keeps trying (and is refused)
            assert t.retry_after("attacker") > 0
        assert len(t) <= 1000
    assert t.info()["evicted"] == 100_000 + 1 - 1000
    assert t.retry_after("attacker") > 0  # the client hammering its lockout is not the one forgotten


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid"):
        tracker(Clock(), lockout_s=60, lockout_max_s=30)


def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy() -> None:
    assert client_address("127.0.0.1", ["203.0.113.7"], ()) == "127.0.0.1"  # the default: no proxies
    proxies = parse_networks(["10.0.0.0/8", "192.0.2.1"])
    assert client_address("198.51.100.4", ["203.0.113.7"], proxies) == "198.51.100.4"  # untrusted peer
    assert client_address("10.1.1.1", ["203.0.113.7"], proxies) == "203.0.113.7"
    # the client forges entries on the left; the proxies append on the right
    assert client_address("10.1.1.1", ["1.2.3.4, 203.0.113.7, 192.0.2.1"], proxies) == "203.0.113.7"
    assert client_address("10.1.1.1", ["1.2.3.4", "203.0.113.7"], proxies) == "203.0.113.7"
    assert client_address("10.1.1.1", ["203.0.113.7, garbage"], proxies) == "10.1.1.1"
    assert client_address("10.1.1.1", [], proxies) == "10.1.1.1"
    assert client_address("::ffff:10.1.1.1", ["203.0.113.7"], proxies) == "203.0.113.7"
    assert client_address(None, [], proxies) == "?"


def test_ipv6_clients_are_keyed_by_their_64() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.5") == "192.0.2.5"
    assert client_key("192.0.2.5") == "192.0.2.5"


# ------------------------------------------------------------------------------ weak secrets


@pytest.mark.parametrize(
    ("text", "key", "secret"),
    [
        ("[web]\npassword = 'x'\n", "web.password", "'x'"),
        ("[web]\npassword = 'elevenchars'\n", "web.password", "elevenchars"),
        ("[web]\npassword = 'aaaaaaaaaaaaaaaaaaaa'\n", "web.password", "aaaaaaaaaaaa"),
        (f"[web]\npassword = '{STRONG}'\ntokens = ['{STRONG}', 'short']\n", "web.tokens", "short"),
        (f"[web]\npassword = '{STRONG}'\ntrusted_proxies = ['proxy.example']\n", "web.trusted_proxies", ""),
        (
            f"[web]\npassword = '{STRONG}'\nlogin_lockout_s = 60\nlogin_lockout_max_s = 30\n",
            "web.login_lockout_max_s",
            "",
        ),
    ],
)
def test_weak_secrets_and_bad_login_settings_are_refused(text: str, key: str, secret: str) -> None:
    with pytest.raises(CoordinatorConfigError) as exc:
        loads(text, "c.toml")
    assert [p.key for p in exc.value.problems] == [key]
    if secret:
        assert secret not in str(exc.value.problems[0])  # never echoes a secret
        assert "heald-coordinator password" in str(exc.value.problems[0])


def test_login_defaults() -> None:
    web = loads(f"[web]\npassword = '{STRONG}'\n").web
    assert web.trusted_proxies == []  # X-Forwarded-For is not trusted unless asked for
    assert (web.login_max_failures, web.login_lockout_s, web.login_lockout_max_s) == (5, 30, 900)
    assert web.login_tracked_max == 10_000
    assert len(STRONG) >= MIN_SECRET_LENGTH
    assert len(PASSWORD) >= MIN_SECRET_LENGTH  # the per-run secrets of the process tests
    assert len(TOKEN) >= MIN_SECRET_LENGTH


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator", *args],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=False,
    )


def test_check_and_run_refuse_a_weak_password(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[coordinator]\nstate_dir = '{tmp_path}'\n[web]\npassword = 'hunter2'\n")
    for command in ("check", "run"):
        res = cli("--config", str(cfg), command)
        assert res.returncode == 2, res.stderr
        assert f"{cfg}:4: [web.password] the dashboard password is 7 characters long" in res.stderr
        assert "heald-coordinator password" in res.stderr
        assert "hunter2" not in res.stderr
        assert "Traceback" not in res.stderr
    weak_file = tmp_path / "password"
    weak_file.write_text("hunter2\n")
    cfg.write_text(f"[coordinator]\nstate_dir = '{tmp_path}'\n[web]\npassword_file = '{weak_file}'\n")
    res = cli("--config", str(cfg), "check")
    assert res.returncode == 2
    assert f"{weak_file}: [web.password_file] the dashboard password is 7 characters long" in res.stderr
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# scripts\n{STRONG}\nabc\n")
    cfg.write_text(f"[coordinator]\nstate_dir = '{tmp_path}'\n[web]\ntoken_file = '{tokens}'\n")
    res = cli("--config", str(cfg), "check")
    assert res.returncode == 2
    assert f"{tokens}:3: [web.token_file] the token is 3 characters long" in res.stderr


def test_password_command_makes_an_acceptable_password(tmp_path: Path) -> None:
    res = cli("password")
    assert res.returncode == 0, res.stderr
    password = res.stdout.strip()
    assert len(password) >= 32
    assert f'password = "{password}"' in res.stderr
    assert cli("password").stdout.strip() != password
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[coordinator]\nstate_dir = '{tmp_path}'\n[web]\npassword = \"{password}\"\n")
    assert cli("--config", str(cfg), "check").returncode == 0
    res = cli("--config", str(tmp_path / "none.toml"), "password")  # needs no (readable) config
    assert res.returncode == 0


# ------------------------------------------------------------------------------ 5xx headers


@pytest.mark.asyncio
async def test_security_headers_on_an_unhandled_error() -> None:
    """A handler bug (500) never reaches a real coordinator on purpose: the same hook, on an app."""

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("bug")

    app = web.Application()
    app.on_response_prepare.append(security_headers)
    app.router.add_get("/boom", boom)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/boom")
        assert resp.status == 500
        assert {k: resp.headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS


# ------------------------------------------------------------------------------ the real process


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    from broker import default_config  # noqa: PLC0415

    broker = Broker(default_config(), tmp_path_factory.mktemp("mosq"), free_port())
    broker.start()
    port = free_port()
    web_settings = {
        "login_lockout_s": LOCKOUT_S,
        "login_lockout_max_s": 4 * LOCKOUT_S,
        "login_tracked_max": TRACKED_MAX,
        "trusted_proxies": [PROXY],
    }
    d = tmp_path_factory.mktemp("coord")
    proc = CoordinatorProcess(write_config(d, mqtt_port=broker.port, web_port=port, web=web_settings), port)
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()
        broker.kill()


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> dict[str, object]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


def request(
    c: CoordinatorProcess,
    method: str,
    path: str,
    *,
    src: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request from the loopback source address ``src`` (a client of its own)."""
    conn = http.client.HTTPConnection("127.0.0.1", c.web_port, timeout=10, source_address=(src, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def login(c: CoordinatorProcess, secret: str, src: str, xff: str | None = None) -> Reply:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if xff:
        headers["X-Forwarded-For"] = xff
    body = urllib.parse.urlencode({"secret": secret}).encode()
    return request(c, "POST", "/login", src=src, body=body, headers=headers)


def bearer(c: CoordinatorProcess, token: str, src: str, path: str = "/api/session", xff: str = "") -> Reply:
    headers = {"Authorization": f"Bearer {token}"} | ({"X-Forwarded-For": xff} if xff else {})
    return request(c, "GET", path, src=src, headers=headers)


def retry_after(reply: Reply) -> int:
    assert reply.status == 429, (reply.status, reply.body[:200])
    value = reply.headers["Retry-After"]
    assert value is not None
    return int(value)


def same(body: bytes) -> bytes:
    """A refusal's body without the seconds it counts down."""
    return re.sub(rb"\d+", b"N", body)


def audit(c: CoordinatorProcess, action: str) -> list[dict[str, object]]:
    status, body = c.api("GET", "/api/audit?limit=1000")
    assert status == 200, body
    return [a for a in body["items"] if a["action"] == action]


@pytest.mark.slow
def test_password_guessing_is_throttled(coord: CoordinatorProcess) -> None:
    src = "127.0.0.2"
    for i in range(5):
        assert login(coord, f"guess-{i}-not-the-password", src).status == 401
    right = login(coord, PASSWORD, src)  # the 6th attempt: the right password is refused too ...
    wait = retry_after(right)
    assert 1 <= wait <= LOCKOUT_S
    wrong = login(coord, "guess-6-not-the-password", src)  # ... exactly as a wrong one
    assert (wrong.status, same(wrong.body)) == (right.status, same(right.body))
    assert b"Too many failed attempts" in right.body
    assert "Set-Cookie" not in right.headers
    time.sleep(wait + 0.2)
    # the lockout is over; the next failure starts the next one, twice as long
    assert login(coord, "guess-7-not-the-password", src).status == 401
    wait = retry_after(login(coord, PASSWORD, src))
    assert LOCKOUT_S < wait <= 2 * LOCKOUT_S
    time.sleep(wait + 0.2)
    ok = login(coord, PASSWORD, src)
    assert ok.status == 302
    assert "heald_session=" in (ok.headers["Set-Cookie"] or "")
    for i in range(4):  # the success forgot the failures: four more are 401, not 429
        assert login(coord, f"again-{i}-not-the-password", src).status == 401
    lockouts = [a for a in audit(coord, "login.lockout") if a["actor"] == f"client@{src}"]
    assert len(lockouts) == 2
    assert "login lockout" in coord.log_text()
    assert any(a["actor"] == f"operator@{src}" for a in audit(coord, "login"))


@pytest.mark.slow
def test_token_guessing_is_throttled_per_address(coord: CoordinatorProcess) -> None:
    src = "127.0.0.3"
    ok = login(coord, PASSWORD, src)  # a session from before the attack
    cookie = (ok.headers["Set-Cookie"] or "").split(";")[0]
    for i in range(5):
        reply = bearer(coord, f"guess-{i}-not-the-token-at-all", src)
        assert reply.status == 401
        assert reply.json()["error"] == "invalid bearer token"
    refused = bearer(coord, TOKEN, src)
    wait = retry_after(refused)
    assert "too many wrong secrets" in str(refused.json()["error"])
    assert same(bearer(coord, "guess-5-not-the-token-at-all", src).body) == same(refused.body)
    assert retry_after(login(coord, PASSWORD, src)) <= wait  # one budget for both ways in
    # a session is a 256-bit secret, not a guess: it keeps working
    assert request(coord, "GET", "/api/session", src=src, headers={"Cookie": cookie}).status == 200
    assert bearer(coord, TOKEN, "127.0.0.1").status == 200  # other addresses are not locked out
    assert any(
        a["actor"] == f"client@{src}" and "bearer" in str(a["detail"]) for a in audit(coord, "login.lockout")
    )


@pytest.mark.slow
def test_forwarded_for_counts_only_from_a_trusted_proxy(coord: CoordinatorProcess) -> None:
    untrusted = "127.0.0.4"
    for i in range(5):  # each attempt claims another address: the header is not believed
        assert login(coord, f"guess-{i}-not-the-password", untrusted, xff=f"198.51.100.{i}").status == 401
    assert retry_after(login(coord, PASSWORD, untrusted, xff="198.51.100.99")) >= 1
    # through the trusted proxy, the client is the address it forwards for
    for i in range(5):
        assert login(coord, f"guess-{i}-not-the-password", PROXY, xff="203.0.113.5").status == 401
    assert retry_after(login(coord, PASSWORD, PROXY, xff="203.0.113.5")) >= 1
    assert login(coord, PASSWORD, PROXY, xff="203.0.113.6").status == 302  # another client behind it
    # a client behind the proxy cannot forge its way out: the proxy appends the real address
    assert retry_after(login(coord, PASSWORD, PROXY, xff="10.9.9.9, 203.0.113.5")) >= 1
    actors = {a["actor"] for a in audit(coord, "login.lockout")}
    assert {f"client@{untrusted}", "client@203.0.113.5"} <= actors
    assert not any(str(a).startswith("client@198.51.100.") for a in actors)


@pytest.mark.slow
def test_a_flood_of_forged_addresses_is_bounded(coord: CoordinatorProcess) -> None:
    def one(i: int) -> int:
        xff = f"10.66.{i >> 8}.{i & 255}"
        return bearer(coord, "flood-not-the-token-at-all", PROXY, path="/api/info", xff=xff).status

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(6 * TRACKED_MAX)))
    assert set(statuses) == {401}
    status, info = coord.api("GET", "/api/info")
    assert status == 200
    login_info = info["login"]
    assert login_info["max_tracked"] == TRACKED_MAX
    assert login_info["tracked"] <= TRACKED_MAX
    assert login_info["evicted"] >= 5 * TRACKED_MAX
    assert login_info["failures"] >= 6 * TRACKED_MAX


def assert_security_headers(reply: Reply, what: str) -> None:
    got = {k: reply.headers.get(k) for k in SECURITY_HEADERS}
    assert got == SECURITY_HEADERS, what


@pytest.mark.slow
def test_every_kind_of_response_carries_the_security_headers(coord: CoordinatorProcess) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    src = "127.0.0.1"
    cases = {
        "login page": (request(coord, "GET", "/login", src=src), 200),
        "static file": (request(coord, "GET", "/static/app.css", src=src), 200),
        "public JSON": (request(coord, "GET", "/api/health", src=src), 200),
        "JSON API": (request(coord, "GET", "/api/nodes", src=src, headers=auth), 200),
        "dashboard": (request(coord, "GET", "/", src=src, headers=auth), 200),
        "redirect to login": (request(coord, "GET", "/", src=src), 302),
        "400": (request(coord, "GET", "/api/nodes?limit=abc", src=src, headers=auth), 400),
        "401": (request(coord, "GET", "/api/nodes", src=src), 401),
        "404 from the API": (request(coord, "GET", "/api/nodes/nope", src=src, headers=auth), 404),
        "404 from the router": (request(coord, "GET", "/no/such/page", src=src, headers=auth), 404),
        "404 static": (request(coord, "GET", "/static/nope.js", src=src), 404),
        "405": (request(coord, "DELETE", "/api/nodes", src=src, headers=auth), 405),
        "413": (
            request(coord, "POST", "/api/nodes/x/run", src=src, body=b"{" + b" " * 100_000 + b"}",
                    headers=auth | {"Content-Type": "application/json"}),
            413,
        ),
    }
    for i in range(5):
        login(coord, f"guess-{i}-not-the-password", "127.0.0.5")
    cases["429"] = (login(coord, PASSWORD, "127.0.0.5"), 429)
    for what, (reply, status) in cases.items():
        assert reply.status == status, (what, reply.status, reply.body[:200])
        assert_security_headers(reply, what)

    # the event stream: its handler prepares the response itself
    conn = http.client.HTTPConnection("127.0.0.1", coord.web_port, timeout=10)
    try:
        conn.request("GET", "/api/stream", headers=auth)
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert_security_headers(Reply(resp.status, resp.headers, b""), "event stream")
        assert resp.readline().startswith(b"event: hello")
    finally:
        conn.close()

