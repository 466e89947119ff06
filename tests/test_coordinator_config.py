"""coordinator.toml validation, `heald-coordinator check/pubkey`, and the embedded broker."""

from __future__ import annotations

import asyncio
import socket
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


@pytest.mark.parametrize("listen", ["0.0.0.0:1883", "[::]:1883", "192.168.1.10:1883", "example.com:1883"])
def test_check_refuses_what_start_up_refuses(tmp_path: Path, listen: str) -> None:
    """`check` and start-up share one loopback rule (coordinator.config.loopback_problem): an
    address start-up would refuse is refused by `check` too, exit 2, naming the key."""
    host = listen.rpartition(":")[0].strip("[]")
    with pytest.raises(BrokerUnavailable):
        check_loopback(host)
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD + f'[coordinator]\nstate_dir = "{tmp_path}"\n[mqtt]\nembedded_listen = "{listen}"\n')
    res = run("--config", str(cfg), "check")
    assert res.returncode == 2
    assert "c.toml:6: [mqtt.embedded_listen] " in res.stderr
    assert "loopback" in res.stderr
    assert "Traceback" not in res.stderr
    # with an external broker the embedded one's address does not matter
    cfg.write_text(cfg.read_text() + 'host = "mqtt.example"\n')
    assert run("--config", str(cfg), "check").returncode == 0


def test_mqtt_sessions_default_to_persistent_with_a_stable_client_id() -> None:
    s = loads(GOOD)
    assert (s.mqtt.protocol, s.mqtt.clean_start, s.mqtt.session_expiry_s) == ("auto", False, 86400)
    assert s.mqtt_client_id == f"heald-coordinator-{socket.gethostname()}"[:64]  # not the pid: stable
    assert loads(GOOD + "[coordinator]\nreplica_id = 'r2'\n").mqtt_client_id == "heald-coordinator-r2"
    assert loads(GOOD + "[mqtt]\nclient_id = 'c'\n").mqtt_client_id == "c"
    assert loads(GOOD + "[mqtt]\nprotocol = 5\n").mqtt.protocol == 5
    with pytest.raises(CoordinatorConfigError) as exc:
        loads(GOOD + "[mqtt]\nprotocol = '4'\n", "c.toml")
    assert exc.value.problems[0].key == "mqtt.protocol"


def test_replicas_sharing_subscriptions_need_their_own_client_ids() -> None:
    shared = GOOD + "[mqtt]\nhost = 'mqtt.example'\nshare_group = 'g'\n"
    with pytest.raises(CoordinatorConfigError) as exc:
        loads(shared, "c.toml")
    assert exc.value.problems[0].key == "mqtt.share_group"
    assert "replica_id" in exc.value.problems[0].message
    assert loads(shared + "[coordinator]\nreplica_id = 'r1'\n").mqtt_client_id == "heald-coordinator-r1"


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
            # stored under the node's name (tests/test_fleet_ownership.py): "solo-ap"
            status, _ = await asyncio.to_thread(proc.api, "POST", "/api/approvals/solo-ap/approve", {})
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
    assert "mqtt protocol fallback" in proc.log_text()  # MQTT 5 refused at once, then 3.1.1
