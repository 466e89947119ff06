"""The README's "whole system on one machine", run as written (issue 18, item 8).

Its command lines, verbatim: ``heald-coordinator --config coordinator.toml`` with the
``coordinator.toml`` the README shows (a fresh password in place of its ``...``), then
``HEALD_MQTT__ENABLED=true heald run --config packaging/agent.toml``: the embedded broker (amqtt)
and a real agent. Logged in as the dashboard does, ``GET /api/nodes`` must show the node within
10 s of the agent's start. The first line, ``pip install``, is checked to be the install line and
not run (the package is installed already: that is how ``heald`` is on PATH).

The ``coordinator.toml`` is the README's, with a fresh password for its ``...`` and, for its
state directory ("any directory you can write"), one in this test's directory.

Safety: ``packaging/agent.toml`` loads the shipped playbooks in their shipped modes, which act on
the whole host (clean files under /tmp, stop processes). So the lines run with
``HEALD_PLAYBOOKS__FORCE_MODE=dry-run`` added to their environment and the agent's state in this
test's directory (``HEALD_PATHS__STATE_DIR``), and inside private network, mount and PID
namespaces (``tests/readme_namespace.py``): the README's fixed ports are free there whatever this
host runs, ``/run`` is private, and the agent sees no process but its own.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.broker import amqtt_available
from devtools.coordinator_proc import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.root]

README = REPO_ROOT / "README.md"
INSTALL = "python3 -m pip install '.[embedded,coordinator]'"
#: The done-line of issue 18: the node on the dashboard within this many seconds of the agent's start.
WITHIN_S = 10.0
STATE_DIR = 'state_dir = "/tmp/heald-coordinator"'


def one_machine_blocks() -> tuple[list[str], str]:
    """The command lines and the coordinator.toml of the README's one-machine section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## The whole system on one machine", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", section, re.DOTALL | re.MULTILINE)
    commands = next(body for lang, body in blocks if lang == "sh")
    toml = next(body for lang, body in blocks if lang == "toml")
    return [line for line in commands.splitlines() if line.strip()], toml


def test_readme_names_its_test() -> None:
    lines, toml = one_machine_blocks()
    assert lines[0] == INSTALL, "the install line comes first (the test skips exactly that one)"
    assert len(lines) == 3
    assert 'password = "..."' in toml, "a placeholder the coordinator refuses, not a usable password"
    assert [line.split("#")[0].strip() for line in toml.splitlines()] == [
        "[coordinator]", STATE_DIR, "[web]", 'password = "..."'], "the test fills in exactly these"
    assert "tests/test_readme_system.py" in README.read_text(encoding="utf-8")


def test_readme_one_machine_commands_show_the_node_within_10s(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the README's lines run in private network, mount and PID namespaces")
    missing = [tool for tool in ("unshare", "ip", "heald", "heald-coordinator") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not on PATH: {', '.join(missing)} (util-linux, iproute2, the installed package)")
    if not amqtt_available():
        pytest.skip("amqtt is not installed: the embedded broker is an optional extra (heald[embedded])")
    lines, toml = one_machine_blocks()
    assert lines[0] == INSTALL  # not run: the package is installed already
    password = secrets.token_urlsafe(18)
    work = tmp_path / "work"
    spec = {
        "repo": str(REPO_ROOT),
        "work": str(work),
        "commands": lines[1:],
        "coordinator_toml": toml.replace('password = "..."', f'password = "{password}"').replace(
            STATE_DIR, f'state_dir = "{tmp_path / "coordinator-state"}"'),
        "password": password,
        "env": {"HEALD_PLAYBOOKS__FORCE_MODE": "dry-run",
                "HEALD_PATHS__STATE_DIR": str(tmp_path / "agent-state")},
        "coordinator_timeout_s": 60,
        "node_timeout_s": 30,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    driver = subprocess.run(
        ["unshare", "--net", "--mount", "--pid", "--kill-child", "--mount-proc", "--",
         sys.executable, str(Path(__file__).with_name("readme_namespace.py")), str(tmp_path / "spec.json")],
        capture_output=True, text=True, timeout=180, check=False, cwd=tmp_path,
    )
    result_file = work / "result.json"
    assert result_file.exists(), f"the driver failed ({driver.returncode}):\n{driver.stderr[-4000:]}"
    result = json.loads(result_file.read_text())
    logs = "\n\n".join(f"--- {line}\n{log}" for line, log in zip(lines[1:], result["logs"], strict=True))
    assert "error" not in result, f"{result['error']}\n{logs}"
    assert result["login_status"] in (200, 302), logs
    assert result["node_seen_after_s"] is not None, f"no node on the dashboard\n{logs}"
    assert result["node_seen_after_s"] <= WITHIN_S, f"{result['node_seen_after_s']} s\n{logs}"
    (node,) = result["nodes"]
    assert node["online"]
    assert (tmp_path / "agent-state" / "spool").is_dir()  # the states went where they were told
    assert (tmp_path / "coordinator-state" / "coordinator.db").is_file()
    coordinator_log, agent_log = result["logs"]
    assert "mqtt protocol fallback" in coordinator_log  # both negotiated 3.1.1 with the embedded broker
    assert "mqtt.protocol_fallback" in agent_log
    assert "Operation timed out" not in agent_log
