"""A safe first run (issue 19): the README's Quickstart line acts on nothing and says what it would do.

``test_quickstart_as_written_acts_on_nothing`` takes the Quickstart's command line from the
README text (not retyped) and runs it in a private PID and mount namespace
(``tests/first_run_namespace.py``) where a 95%-full tmpfs on ``/var/tmp`` holds one old file: the
shipped ``disk-nearly-full`` playbook (mode enforce) decides to clean it, and under the
Quickstart's ``--dry-run`` the audit log says so with ``dry_run: true`` and the file is untouched.
Without ``--dry-run`` the same setup deletes the file, which is what the test would see if the
README's line acted.

``test_start_summary_names_every_playbook_and_its_mode`` starts ``heald run`` on playbooks of
every mode (with triggers that cannot match) and reads the one start summary record.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.coordinator_proc import REPO_ROOT

README = REPO_ROOT / "README.md"
INSTALL = "python3 -m pip install ."


def quickstart_argv() -> list[str]:
    """The Quickstart's command line, from the README: ``INSTALL && heald run ...``."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"^```sh\n(.*?)^```", section, re.DOTALL | re.MULTILINE)[0]
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 1, "the Quickstart is one line"
    install, run = lines[0].split(" && ")
    assert install == INSTALL, "the install comes first (not run: the package is installed already)"
    return shlex.split(run)


def test_quickstart_is_dry_run_and_says_how_to_enforce() -> None:
    argv = quickstart_argv()
    assert argv[:2] == ["heald", "run"]
    assert "--dry-run" in argv
    section = README.read_text(encoding="utf-8").split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert "enforce" in section
    assert "drop\n`--dry-run`" in section
    assert "tests/test_first_run.py" in section


def records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.root
def test_quickstart_as_written_acts_on_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: a private PID and mount namespace with a tmpfs on /var/tmp")
    missing = [tool for tool in ("unshare", "heald") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not on PATH: {', '.join(missing)} (util-linux, the installed package)")
    argv = quickstart_argv()
    work = tmp_path / "work"
    work.mkdir()
    spec = {"repo": str(REPO_ROOT), "work": str(work), "argv": argv, "timeout_s": 100}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    subprocess.run(["unshare", "--pid", "--kill-child", "--mount", "--mount-proc", sys.executable,
                    str(REPO_ROOT / "tests" / "first_run_namespace.py"), str(tmp_path / "spec.json")],
                   check=True, timeout=180)
    result = json.loads((work / "result.json").read_text())
    log = (work / "agent.log").read_text(errors="replace")
    assert result["used_pct"] >= 90, result
    audit = result["audit"]
    starts = [r for r in audit if r.get("type") == "run.start" and r.get("playbook") == "disk-nearly-full"]
    assert starts, f"the shipped playbook never decided to clean /var/tmp: {result}\n{log[-4000:]}"
    assert all(r["dry_run"] is True for r in starts)
    assert all(r["mode_forced"] == "dry-run" for r in starts), "the override is in the audit record"
    steps = [r for r in audit if r.get("type") == "step"]
    assert steps
    assert all(r["dry_run"] is True and r["status"] == "dry-run" for r in steps), steps
    assert not [r for r in audit if r.get("dry_run") is False], "a record of a run that acted"
    assert result["target_exists"], "the old file was deleted"
    assert result["target_size"] > 900_000, "the old file was cut"
    assert result["rc"] == 130, "Ctrl-C exits 130"
    summary = [r for r in records(log) if r.get("event") == "heald start summary"]
    assert len(summary) == 1
    assert summary[0]["mode_override"] == "--dry-run"
    assert summary[0]["acting"] == []
    assert {p["mode"] for p in summary[0]["playbooks"]} == {"dry-run"}
    assert "To enforce" in summary[0]["to_enforce"]


PLAYBOOK = """\
name: {name}
description: never matches (a test of the start summary)
mode: {mode}
trigger: {{metric: cpu.util_pct, op: ">", value: 1000, for: 1h}}
steps:
  - {{name: step, action: {action}, params: {params}}}
"""


def test_start_summary_names_every_playbook_and_its_mode(tmp_path: Path) -> None:
    books = tmp_path / "playbooks"
    books.mkdir()
    modes = {"a-enforce": ("enforce", "stop_process", "{target: {name: nothing-here}}"),
             "b-dry": ("dry-run", "clean_paths", "{on_mount: /, older_than: 2d, target_used_pct: 80}"),
             "c-approval": ("approval", "restart_unit", "{unit: nothing.service}"),
             "d-off": ("off", "notify", "{message: hi}")}
    for name, (mode, action, params) in modes.items():
        text = PLAYBOOK.format(name=name, mode=mode, action=action, params=params)
        (books / f"{name}.yaml").write_text(text)
    config = tmp_path / "agent.toml"
    config.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n[model]\nenabled = false\n'
                      f'[playbooks]\nload_shipped = false\ndirs = ["{books}"]\n'
                      '[collect.gpu]\nenabled = false\n')
    check = subprocess.run(["heald", "check", "--config", str(config)],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(["heald", "run", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    summary = [r for r in records(out) if r.get("event") == "heald start summary"]
    assert len(summary) == 1, out
    s = summary[0]
    assert [(p["playbook"], p["mode"]) for p in s["playbooks"]] == [
        ("a-enforce", "enforce"), ("b-dry", "dry-run"), ("c-approval", "approval"), ("d-off", "off")]
    effects = {p["playbook"]: p["effects"] for p in s["playbooks"]}
    assert effects["a-enforce"] == ["stop processes"]
    assert effects["b-dry"] == ["delete files"]
    assert s["acting"] == ["a-enforce"]
    assert s["mode_override"] is None
    assert "to_enforce" not in s
    assert s["state_dir"] == str(tmp_path / "state")
    assert s["mqtt"].startswith("off")
    assert s["prometheus"] == "off"
    assert s["cold_start"] == "model disabled: rules only"
    assert "sshd" in s["protected_processes"]
    assert "/var/tmp" in s["clean_roots"]
    assert all(isinstance(r.get("priority"), int) for r in records(out)), "every record has a syslog priority"
