"""The coordinator imports only agent.wire, agent.errors and agent.cli.base from the agent (checked
in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

from devtools.coordinator_proc import REPO_ROOT

# agent.cli.base: the command-line conventions (exit codes, error lines, logging) heald-coordinator
# shares with heald; agent.cli is its (light) package.
ALLOWED = ("agent", "agent.errors", "agent.wire", "agent.cli", "agent.cli.base")

PROBE = """
import json, sys
import coordinator.cli, coordinator.service, coordinator.web.app, coordinator.store, coordinator.ingest
import coordinator.broker, coordinator.config
print(json.dumps(sorted(m for m in sys.modules if m == "agent" or m.startswith("agent."))))
"""


def test_coordinator_imports_only_the_wire_from_the_agent() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    modules = json.loads(out.stdout)
    assert "agent.wire" in modules
    offenders = [m for m in modules if not (m in ALLOWED or m.startswith("agent.wire."))]
    assert offenders == [], f"the coordinator imports more of the agent than {ALLOWED}: {offenders}"


def test_coordinator_does_not_import_heavy_agent_dependencies() -> None:
    probe = (
        "import sys, coordinator.service, coordinator.web.app; "
        "print([m for m in ('sklearn', 'numpy', 'psutil', 'pynvml') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"

