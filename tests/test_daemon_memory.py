"""The daemon's resident memory (issue 25): what ``heald run`` keeps out of its process, checked
where it is decided.

- ``heald run`` imports the code of its own command only (agent/cli/main.py), not the other
  commands' modules (``heald fleet``, ``heald model``, ``heald install-units``, ...).
- Loading valid playbooks never imports jsonschema (~3.4 MiB with attrs, referencing, rpds and
  idna): :func:`agent.decide.conform.conforms` says they conform, and only a playbook that does
  not goes to jsonschema, whose problems are reported as before. The two must agree, so
  :func:`conforms` is checked against jsonschema on the shipped playbooks, every playbook under
  tests/ and a few thousand mutations of them.
- A real ``heald run`` (dry-run, its own temporary state) has no jsonschema extension mapped.
"""

from __future__ import annotations

import copy
import os
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.decide import schema as schema_mod
from agent.decide.conform import conforms
from agent.decide.loader import parse_playbook, shipped_dir
from agent.decide.source import parse_yaml
from agent.errors import PlaybookError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import healdbench as hb  # noqa: E402 - the bench's confined agent (dry-run, private state)

SHIPPED = sorted(shipped_dir().glob("*.yaml"))
TEST_YAML = sorted(p for p in (ROOT / "tests").rglob("*.yaml"))


def _docs() -> Iterator[tuple[str, Any]]:
    for path in [*SHIPPED, *TEST_YAML]:
        try:
            data, _ = parse_yaml(path.read_text(), str(path))
        except PlaybookError:  # a fixture that is not even YAML: nothing to compare
            continue
        yield path.name, data


_VALUES: list[Any] = [0, 1, -1, 1.0, 2.5, -0.5, True, False, None, "", "x", "10s", "250ms", "5m", "1h",
                      "cpu.util", "restart_unit", "dry-run", "enforce", "notify", "gt", ">", [], [1], {},
                      {"a": 1}, 10**9, "a b", "node.load1"]


def _paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))


def _mutate(doc: Any, rng: random.Random) -> Any:
    """One or two random edits: a value replaced, a key dropped or added, a list item dropped or doubled."""
    out = copy.deepcopy(doc)
    for _ in range(rng.choice((1, 1, 2))):
        paths = [p for p in _paths(out) if p]
        if not paths:
            return out
        path = rng.choice(paths)
        parent = out
        for k in path[:-1]:
            parent = parent[k]
        last = path[-1]
        op = rng.randrange(5)
        if op == 0:
            parent[last] = rng.choice(_VALUES)
        elif op == 1:
            del parent[last]
        elif op == 2 and isinstance(parent, dict):
            key = rng.choice(["extra", "params", "mode", "for", "op", "value", "cooldown", 3])
            parent[key] = rng.choice(_VALUES)
        elif op == 3 and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
        else:  # a sibling's value (right type, maybe wrong place)
            donor = rng.choice(paths)
            value: Any = out
            for k in donor:
                value = value[k]
            if donor[: len(path)] != path:
                parent[last] = copy.deepcopy(value)
    return out


def test_conforms_agrees_with_jsonschema_on_every_playbook_and_mutations_of_them() -> None:
    validator = jsonschema.Draft202012Validator(schema_mod.schema())
    docs = list(_docs())
    assert len([n for n, _ in docs]) >= len(SHIPPED) + 20
    rng = random.Random(25)
    checked = valid = 0
    for name, doc in docs:
        for variant in [doc, *(_mutate(doc, rng) for _ in range(80))]:
            want = validator.is_valid(variant)
            assert conforms(variant, schema_mod.schema()) is want, (name, variant)
            checked += 1
            valid += want
    # both answers were exercised, many times
    assert valid > 500
    assert checked - valid > 1000


def test_conforms_with_a_keyword_it_does_not_know_says_no() -> None:
    # a schema edited to use, say, uniqueItems: the document goes to jsonschema
    assert conforms([1, 2], {"type": "array", "minItems": 1}) is True
    assert conforms([1, 2], {"type": "array", "uniqueItems": True}) is False
    assert conforms({"a": 1}, {"$ref": "https://example.com/other.json"}) is False


def test_json_semantics_match_jsonschemas() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1},
                                               "c": {"const": 1}, "e": {"enum": [[1, True]]}}}
    for doc in ({"n": 1.0}, {"n": True}, {"n": 0}, {"c": True}, {"c": 1.0}, {"e": [1, True]},
                {"e": [True, 1]}, {"e": [1.0, True]}, {"n": "1"}):
        assert conforms(doc, schema) is jsonschema.Draft202012Validator(schema).is_valid(doc), doc


@pytest.mark.parametrize("path", sorted((ROOT / "tests" / "playbooks_broken").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_problems_are_the_same_as_without_the_shortcut(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = path.read_text()
    _, got = parse_playbook(text, str(path))
    monkeypatch.setattr(schema_mod, "conforms", lambda *_a: False)  # always ask jsonschema
    _, want = parse_playbook(text, str(path))
    assert got == want


_PROBE = """
import sys
from agent.cli.main import main
try:
    main(["run", "--help"])  # heald run's command line, up to the handler
except SystemExit:
    pass
import agent.runtime.daemon, agent.act.engine, agent.score.stage, agent.report.transport
from agent.decide.loader import load_playbooks
from agent.decide.settings import PlaybookSettings
assert len(load_playbooks(PlaybookSettings())) >= 10  # the shipped library, validated
print("MODULES", *(m for m, v in sys.modules.items() if v is not None))
"""


def test_heald_run_imports_neither_the_other_commands_nor_jsonschema() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    loaded = set(next(line for line in out.stdout.splitlines() if line.startswith("MODULES")).split())
    assert "agent.cli.run" in loaded
    assert "agent.decide.schema" in loaded  # the playbooks were checked against the schema
    others = {"agent.cli.fleet", "agent.cli.model", "agent.cli.units", "agent.cli.replay", "agent.cli.local",
              "agent.cli.check", "agent.cli.once", "agent.cli.audit", "agent.runtime.units"}
    assert not loaded & others
    assert not {m for m in loaded if m.split(".")[0] in ("jsonschema", "referencing", "rpds")}


@pytest.mark.slow
def test_a_running_daemon_maps_no_jsonschema_extension(tmp_path: Path) -> None:
    config = hb.write_config(tmp_path)
    log = tmp_path / "heald.log"
    proc = hb.start_heald(tmp_path, config, log, cwd=ROOT)
    try:
        deadline = time.monotonic() + 15
        while hb.start_summary(log) is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
    finally:
        hb.stop(proc)
    hb.check_agent(tmp_path, log)
    assert "libpython" in maps or "python" in maps
    assert "_multiarray_umath" in maps  # numpy: the score stage's buffers (still needed)
    assert "rpds" not in maps  # jsonschema's referencing → rpds extension


def _unit_environment() -> dict[str, str]:
    """The ``Environment=`` assignments of systemd/heald.service."""
    env: dict[str, str] = {}
    for line in (ROOT / "systemd" / "heald.service").read_text().splitlines():
        if line.startswith("Environment="):
            for item in shlex.split(line.removeprefix("Environment=")):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _pids_cgroup(name: str) -> Path | None:
    """A new pids cgroup (v1 hierarchy or v2 with the pids controller), or None if we may not."""
    for base in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        try:
            d = base / name
            d.mkdir()
        except OSError:
            continue
        if (d / "pids.max").exists():
            return d
        d.rmdir()
    return None


def _import_numpy_in(cgroup: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``import numpy`` in a process that joined ``cgroup`` first (then exec'd: one task)."""
    join = ("import os, sys\n"
            f"open({str(cgroup / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
            "os.execv(sys.executable, [sys.executable, '-c', 'import numpy; print(\"ok\")'])\n")
    return subprocess.run([sys.executable, "-c", join], capture_output=True, text=True, timeout=60, env=env,
                          check=False)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS starts no thread on one CPU")
def test_the_units_environment_keeps_openblas_within_the_task_limit() -> None:
    """A cgroup that allows one task stands for TasksMax=64 on a host with 64+ CPUs: OpenBLAS's
    thread per CPU does not fit. With heald.service's environment numpy imports; without, the
    import dies (OpenBLAS raises SIGINT: exit 130)."""
    unit = _unit_environment()
    assert unit.get("OPENBLAS_NUM_THREADS") == "1"
    cgroup = _pids_cgroup(f"heald-test-blas-{os.getpid()}-{time.monotonic_ns()}")
    if cgroup is None:
        pytest.skip("no pids cgroup can be made here (not root, or no pids controller)")
    try:
        (cgroup / "pids.max").write_text("1\n")
        base = {k: v for k, v in os.environ.items()
                if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        bare = _import_numpy_in(cgroup, base)
        if bare.returncode == 0:
            pytest.skip("this numpy's BLAS starts no threads at import: nothing to keep in")
        assert "pthread_create failed" in bare.stderr or bare.returncode == 130, bare.stderr[-2000:]
        with_unit = _import_numpy_in(cgroup, {**base, **unit})
        assert with_unit.returncode == 0, with_unit.stderr[-2000:]
        assert with_unit.stdout.strip() == "ok"
    finally:
        cgroup.rmdir()
