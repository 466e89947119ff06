"""coordinator.toml validation, `heald-coordinator check/pubkey`, and the embedded broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from agent.wire.signing import load_private_key, parse_public_key
from coordinator.broker import amqtt_available, check_loopback
from coordinator.config import loads
from coordinator.errors import BrokerUnavailable, CoordinatorConfigError
from devtools.coordinator_proc import REPO_ROOT, CoordinatorProcess, free_port, write_config
from devtools.fleet_sim import SimAgent, SimNode

#: A dashboard password long and varied enough for the config check (a fixed one: it shows in test ids).
STRONG = "kV3f-q9Lz-wP2m-Xa7e"
GOOD = f'[web]\npassword = "{STRONG}"\n'


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )


def test_defaults_are_safe() -> None:
    s = loads(GOOD)
    assert s.web.listen.startswith("127.0.0.1:")
    assert s.embedded_broker
    assert s.mqtt.embedded_listen.startswith("127.0.0.1:")
    assert s.store_url.startswith("sqlite:///")


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        (f"[web]\npassword = '{STRONG}'\nlisten = 'nope'\n", "web.listen", 3),
        (f"[web]\npassword = '{STRONG}'\n[budget]\nmax_percent = 300\n", "budget.max_percent", 4),
        (f"[web]\npassword = '{STRONG}'\n[store]\nurl = 'mysql://x'\n", "store.url", 4),
        (f"[web]\npassword = '{STRONG}'\n[mqtt]\nshare_group = 'g'\n", "mqtt.share_group", 4),
        (f"[web]\npassword = '{STRONG}'\ncolour = 1\n", "web.colour", 3),
        ("[web]\nlisten = '127.0.0.1:1'\n", "web", 1),
        (f"[budget]\ngroup_by = 'rack'\n[web]\npassword='{STRONG}'\n", "budget.group_by", 2),
    ],
)
def test_config_errors_name_key_and_line(text: str, key: str, line: int) -> None:
    with pytest.raises(CoordinatorConfigError) as exc:
        loads(text, "c.toml")
    problem = exc.value.problems[0]
    assert problem.key == key
    assert problem.line == line
    assert str(problem).startswith(f"c.toml:{line}:")


def test_cli_check_and_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(GOOD + f'[coordinator]\nstate_dir = "{tmp_path}"\n')
    ok = run("--config", str(good), "check")
    assert ok.returncode == 0
    assert "ok: store sqlite" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[web]\nlisten = 'x'\n")
    res = run("--config", str(bad), "check")
    assert res.returncode == 2
    assert "bad.toml:2: [web.listen]" in res.stderr
    assert "Traceback" not in res.stderr
    assert run("--config", str(tmp_path / "missing.toml"), "check").returncode == 2


def test_pubkey_matches_signing_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD + f'[coordinator]\nstate_dir = "{tmp_path / "state"}"\n')
    res = run("--config", str(cfg), "pubkey")
    assert res.returncode == 0
    public = parse_public_key(res.stdout.strip())
    private = load_private_key(tmp_path / "state" / "command-key.pem")
    assert public.public_bytes_raw() == private.public_key().public_bytes_raw()
    assert (tmp_path / "state" / "command-key.pem").stat().st_mode & 0o777 == 0o600


def test_embedded_broker_is_loopback_only() -> None:
    check_loopback("127.0.0.1")
    check_loopback("::1")
    for host in ("0.0.0.0", "192.168.1.10", "example.com"):
        with pytest.raises(BrokerUnavailable):
            check_loopback(host)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_embedded_broker_whole_system(tmp_path: Path) -> None:
    if not amqtt_available():
        pytest.skip("amqtt is not installed: the embedded broker is an optional extra (heald[embedded])")
    web, mqtt = free_port(), free_port()
    proc = CoordinatorProcess(write_config(tmp_path, mqtt_port=None, web_port=web, embedded_port=mqtt), web)
    await asyncio.to_thread(proc.start)
    try:
        key = load_private_key(tmp_path / "state" / "command-key.pem").public_key()
        agent = SimAgent(SimNode("solo", site="home"), "127.0.0.1", mqtt, key)
        task = asyncio.create_task(agent.run(), name="sim-solo")
        try:
            await asyncio.wait_for(agent.subscribed.wait(), 10)
            await agent.send(agent.node.risk(1.2))
            await agent.request_approval("ap", "restart-x")
            await asyncio.to_thread(proc.wait_for, lambda c: c.api("GET", "/api/approvals")[1]["items"])
            status, _ = await asyncio.to_thread(proc.api, "POST", "/api/approvals/ap/approve", {})
            assert status == 200
            node = await asyncio.to_thread(
                proc.wait_for, lambda c: (n := c.api("GET", "/api/nodes/solo")[1])["actions"] and n
            )
            assert node["alert"]
            assert agent.accepted[0].name == "approve"
            assert agent.rejected == []  # verified with the real CommandVerifier
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await asyncio.to_thread(proc.stop)
    assert "embedded mqtt broker started" in proc.log_text()
