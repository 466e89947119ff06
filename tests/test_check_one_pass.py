"""``heald check`` in one pass (issue 19): every problem at once, typo'd trigger metrics with a
did-you-mean against the collectors' schema, missing directories, steps the service user cannot
run, and the mode the playbooks will run in.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from agent.collect.families import METRIC_FAMILIES
from agent.collect.gpu import GpuCollector
from agent.collect.sample import split_key
from agent.collect.settings import GpuSettings
from agent.decide.loader import shipped_dir
from devtools.fake_nvml import FakeNVML

TYPO = """\
name: typo
description: a trigger whose metric is misspelt
mode: dry-run
trigger:
  all:
    - {metric: "cpu.utl_pct", op: ">", value: 99, for: 1m}
    - {metric: "mem.used_pct", op: ">", value: 1}
steps:
  - {name: s, action: notify, params: {message: hi}}
"""
BROKEN = """\
name: broken
description: an action that does not exist
mode: enforce
trigger: {metric: "mem.used_pct", op: ">", value: 99}
steps:
  - {name: s, action: reboot_everything}
"""


def check(config: Path) -> tuple[int, dict[str, Any], str]:
    js = subprocess.run(["heald", "check", "--json", "--config", str(config)],
                        capture_output=True, text=True, check=False, timeout=120)
    text = subprocess.run(["heald", "check", "--config", str(config)],
                          capture_output=True, text=True, check=False, timeout=120)
    assert js.returncode == text.returncode
    return js.returncode, json.loads(js.stdout), text.stderr + text.stdout


def test_every_problem_in_one_pass(tmp_path: Path) -> None:
    books = tmp_path / "books"
    books.mkdir()
    (books / "typo.yaml").write_text(TYPO)
    (books / "broken.yaml").write_text(BROKEN)
    missing = tmp_path / "no-such-dir"
    config = tmp_path / "agent.toml"
    # a config problem too: the playbooks are still checked in the same pass
    config.write_text(f'[sample]\ninterval_s = 0\n[playbooks]\nload_shipped = false\n'
                      f'dirs = ["{books}", "{missing}"]\n')
    rc, result, text = check(config)
    assert rc == 2
    assert not result["ok"]
    messages = [(Path(p["file"]).name, p["key"], p["message"]) for p in result["problems"]]
    keys = {(f, k) for f, k, _ in messages}
    assert ("agent.toml", "sample.interval_s") in keys, messages
    assert ("agent.toml", "playbooks.dirs") in keys, messages
    assert any(f == "broken.yaml" for f, _, _ in messages), messages
    typo = [m for f, k, m in messages if f == "typo.yaml"]
    assert typo == ["unknown metric 'cpu.utl_pct': no collector produces it; did you mean 'cpu.util_pct'?"]
    assert f"playbook directory {missing} does not exist" in text
    assert "typo.yaml:6: [trigger.metric]" in text
    # fix the config: the same playbook problems, nothing else
    config.write_text(f'[playbooks]\nload_shipped = false\ndirs = ["{books}", "{missing}"]\n')
    rc, result, _ = check(config)
    assert rc == 2
    assert {(Path(p["file"]).name, p["key"]) for p in result["problems"]} >= {
        ("agent.toml", "playbooks.dirs"), ("typo.yaml", "trigger.metric")}


def test_warnings_and_modes_do_not_fail(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[playbooks]\nforce_mode = "dry-run"\nclean_roots = ["/var/tmp", "/no/such/root"]\n')
    rc, result, text = check(config)
    assert rc == 0, text
    assert result["ok"]
    assert "clean root /no/such/root does not exist: nothing is cleaned there" in result["warnings"]
    gpu = [w for w in result["warnings"] if w.startswith("playbook gpu-xid-reset:")]
    assert gpu, result["warnings"]
    assert "use_helper_units = true" in gpu[0]
    assert "forced dry-run" in result["playbooks"]
    assert "heald: warning: clean root /no/such/root" in text
    config.write_text('[playbooks]\nuse_helper_units = true\n')
    rc, result, text = check(config)
    assert rc == 0, text
    assert not [w for w in result["warnings"] if "gpu-xid-reset" in w]
    assert "(own modes;" in result["playbooks"]


def test_shipped_playbooks_name_only_known_metrics() -> None:
    from agent.cli.preflight import parsed_playbooks, unknown_metrics  # noqa: PLC0415
    from agent.decide.settings import PlaybookSettings  # noqa: PLC0415

    books = parsed_playbooks(PlaybookSettings(dirs=()))
    assert len(books) == len(list(shipped_dir().glob("*.yaml")))
    assert unknown_metrics(books) == []


def test_the_schema_holds_every_family_a_real_sample_has() -> None:
    """`heald once` on this host and every GPU signal of FakeNVML: no family outside the schema."""
    once = subprocess.run(["heald", "once", "--json"], capture_output=True, text=True, check=True,
                          timeout=120)
    data = json.loads(once.stdout)
    metrics = data.get("metrics", data)
    fake = FakeNVML(2)
    gpu = GpuCollector(GpuSettings(), nvml=fake, root="/nonexistent-root")
    gpu.start()
    try:
        keys = [*metrics, *gpu.collect().metrics]
    finally:
        gpu.close()
    families = {split_key(k)[0] for k in keys}
    assert any(f.startswith("gpu.") for f in families)
    assert families - METRIC_FAMILIES == set()
