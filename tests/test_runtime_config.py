"""Config loading: merge order, env overrides, and a corpus of broken configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from agent.errors import ConfigError
from agent.runtime.config import Settings, load_config

BROKEN = Path(__file__).parent / "configs_broken"

# file -> (key named in the message, expected line or None, words in the message)
EXPECTED: dict[str, tuple[str, int | None, str]] = {
    "01-bad-toml.toml": ("", 1, "invalid TOML"),
    "02-unknown-section.toml": ("colect", 1, "did you mean 'collect'"),
    "03-unknown-key.toml": ("collect.cpu.intervall_s", 2, "did you mean 'interval_s'"),
    "04-wrong-type-str.toml": ("collect.memory.interval_s", 2, "Expected `float`"),
    "05-wrong-type-bool.toml": ("mqtt.enabled", 2, "Expected `bool`"),
    "06-port-range.toml": ("mqtt.port", 2, "<= 65535"),
    "07-negative-interval.toml": ("collect.disk.interval_s", 2, "> 0"),
    "08-bad-log-level.toml": ("log.level", 2, "Invalid enum value 'verbose'"),
    "09-bad-node-id.toml": ("node.id", 2, "matching regex"),
    "10-labels-not-strings.toml": ("node.labels.rack", 2, "Expected `str`"),
    "11-probe-missing-port.toml": ("collect.network.probes[0]", 1, "missing required field `port`"),
    "12-probe-bad-port.toml": ("collect.network.probes[0].port", 1, ">= 1"),
    "13-timeout-too-long.toml": ("collect.cpu.timeout_s", 3, "exceeds twice interval_s"),
    "14-tls-cert-without-key.toml": ("mqtt.tls.cert_file", 3, "given together"),
    "15-section-not-table.toml": ("collect", 1, "must be a table"),
    "16-sample-interval-too-small.toml": ("sample.interval_s", 2, ">= 0.1"),
    "17-bad-prometheus-listen.toml": ("prometheus.listen", 2, "HOST:PORT"),
    "18-backoff-inverted.toml": ("mqtt.backoff_initial_s", 2, "backoff_max_s"),
    "19-unknown-top-level-key.toml": ("verbose", 1, "unknown key 'verbose'"),
    "20-duplicate-key.toml": ("", 3, "invalid TOML"),
    "21-force-mode-invalid.toml": ("playbooks.force_mode", 2, "Invalid enum value"),
    "22-not-utf8.toml": ("", None, "cannot read"),
}


def test_corpus_is_complete() -> None:
    assert sorted(p.name for p in BROKEN.glob("*.toml")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 15


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_config_is_refused_with_file_key_and_line(name: str) -> None:
    path = BROKEN / name
    key, line, words = EXPECTED[name]
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    problems = info.value.problems
    assert len(problems) == 1, problems
    p = problems[0]
    assert p.file == str(path)
    assert p.key == key
    assert p.line == line
    assert words in p.message
    text = str(p)
    assert str(path) in text
    assert key in text


@pytest.mark.parametrize("name", ["03-unknown-key.toml", "20-duplicate-key.toml", "22-not-utf8.toml"])
def test_cli_check_exits_2_without_traceback(name: str) -> None:
    path = BROKEN / name
    proc = subprocess.run([sys.executable, "-m", "agent", "check", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr + proc.stdout
    assert str(path) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[collect.cpu]\nintervall_s = 2\n[mqtt]\nport = "x"\n[log]\nlevel = "loud"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cfg, env={})
    keys = [p.key for p in info.value.problems]
    assert keys == ["collect.cpu.intervall_s", "mqtt.port", "log.level"]
    assert [p.line for p in info.value.problems] == [2, 4, 6]


def test_unreadable_config_is_a_clean_error(tmp_path: Path) -> None:
    directory = tmp_path / "agent.toml"
    directory.mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(directory, env={})
    assert info.value.problems[0].file == str(directory)
    assert "cannot read" in info.value.problems[0].message
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such file"):
        load_config(missing, env={})


def test_empty_file_gives_defaults_and_hostname(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("")
    s = load_config(cfg, env={}, hostname="web-01.example").settings
    assert s.node.id == "web-01.example"
    assert s.node.site == "default"
    assert s.collect.cpu.interval_s == 1.0
    assert s.mqtt.enabled is False
    with pytest.raises(AttributeError):
        s.node.site = "x"  # type: ignore[misc]


def test_conf_d_merges_in_name_order_and_env_wins(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[node]\nsite = "main"\nlabels = { rack = "r1" }\n[collect.cpu]\ninterval_s = 5\n')
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "20-b.toml").write_text('[node]\nsite = "b"\n')
    (tmp_path / "conf.d" / "10-a.toml").write_text('[node]\nsite = "a"\nlabels = { row = "7" }\n')
    (tmp_path / "conf.d" / "ignored.txt").write_text("garbage")
    env = {"HEALD_COLLECT__CPU__INTERVAL_S": "2", "HEALD_NODE__ID": "n1", "OTHER": "x",
           "HEALD_COLLECT__NETWORK__EXCLUDE_INTERFACES": '["lo"]'}
    loaded = load_config(cfg, env=env)
    s = loaded.settings
    assert s.node.site == "b"
    assert s.node.labels == {"rack": "r1", "row": "7"}
    assert s.node.id == "n1"
    assert s.collect.cpu.interval_s == 2.0
    assert s.collect.network.exclude_interfaces == ("lo",)
    assert [f.name for f in loaded.files] == ["agent.toml", "10-a.toml", "20-b.toml"]


def test_problem_in_drop_in_names_the_drop_in(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[mqtt]\nport = 1883\n")
    (tmp_path / "conf.d").mkdir()
    bad = tmp_path / "conf.d" / "50-bad.toml"
    bad.write_text("# comment\n[mqtt]\nport = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, env={})
    (p,) = info.value.problems
    assert (p.file, p.line, p.key) == (str(bad), 3, "mqtt.port")


def test_env_problem_names_the_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, env={"HEALD_MQTT__PORT": "many"})
    (p,) = info.value.problems
    assert p.file == "env HEALD_MQTT__PORT"
    assert p.key == "mqtt.port"


def test_settings_round_trip_through_msgspec() -> None:
    s = Settings()
    assert msgspec.convert(msgspec.to_builtins(s), Settings) == s


def test_shipped_example_config_is_valid() -> None:
    example = Path(__file__).parents[1] / "packaging" / "agent.toml"
    if not example.exists():
        pytest.skip("packaging/agent.toml not written yet")
    s = load_config(example, env={}).settings
    assert s.mqtt.enabled is False  # `heald run` works standalone with no broker
    assert os.fspath(example)
