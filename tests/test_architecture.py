"""The architecture as a test: who may import whom, no import cycles, no oversized files, and a
wheel that ships the product and nothing else.

The rules (docs/architecture.md explains them):

- The agent's stages import only earlier stages: collect < features < score < decide < act <
  report < control < bundle < runtime < cli, plus the foundation (``agent``, ``agent.errors``,
  ``agent.fsutil``, ``agent.native``, ``agent.wire``), which imports only itself.
- The coordinator imports from the agent only ``agent.wire``, ``agent.errors`` and the CLI base
  both front ends share (``agent.cli.base``).
- Nothing in the product (``agent/``, ``coordinator/``) imports ``tests``, ``devtools`` or
  ``bench``; nothing in ``agent/`` imports ``coordinator``.
- No import cycle between modules, counting every import: at module level, inside functions
  (lazy) and under ``TYPE_CHECKING``.

Imports are read from the source with :mod:`ast`, so a lazy import inside a handler counts as
much as one at the top of a file.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("agent", "coordinator")
MAX_LINES = 600

FOUNDATION = ("agent.errors", "agent.fsutil", "agent.native", "agent.wire")
STAGES = ("collect", "features", "score", "decide", "act", "report", "control", "bundle", "runtime", "cli")
COORDINATOR_MAY_IMPORT = ("agent", "agent.wire", "agent.errors", "agent.cli.base")
NEVER_IMPORTED_BY_PRODUCT = ("tests", "devtools", "bench")


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the product (and devtools) under root."""
    found: dict[str, Path] = {}
    for top in (*PRODUCT, "devtools"):
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(module: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, wherever it stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                # `from agent.report import build` imports the module agent.report.build
                sub = f"{source}.{alias.name}"
                yield (sub if sub in known else source), node.lineno


def layer(module: str) -> tuple[str, int] | None:
    """("foundation", -1), (stage, index), or None for a module outside the agent."""
    if module == "agent" or any(_under(module, f) for f in FOUNDATION):
        return ("foundation", -1)
    for i, stage in enumerate(STAGES):
        if _under(module, f"agent.{stage}"):
            return (stage, i)
    return None


def violations(root: Path) -> list[str]:
    known = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in known}
    problems: list[str] = []
    for module, path in known.items():
        where = path.relative_to(root)
        for target, line in imports_of(module, path, known):
            if target in known and target != module:
                graph[module].add(target)
            if _under(module, "devtools"):
                continue  # devtools may use anything; only the product is ruled
            if any(_under(target, bad) for bad in NEVER_IMPORTED_BY_PRODUCT):
                problems.append(f"{where}:{line}: the product imports {target}")
            if _under(module, "coordinator"):
                if _under(target, "agent") and target not in COORDINATOR_MAY_IMPORT \
                        and not _under(target, "agent.wire"):
                    problems.append(f"{where}:{line}: the coordinator imports {target} "
                                    f"(only {', '.join(COORDINATOR_MAY_IMPORT[1:])})")
                continue
            if _under(target, "coordinator"):
                problems.append(f"{where}:{line}: the agent imports {target}")
                continue
            mine, theirs = layer(module), layer(target)
            if mine is None or theirs is None:
                continue
            if mine[0] == "foundation" and theirs[0] != "foundation":
                problems.append(f"{where}:{line}: foundation module {module} imports stage module {target}")
            elif theirs[1] > mine[1]:
                problems.append(f"{where}:{line}: {mine[0]}/ imports a later stage: {target}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_tree_follows_the_import_rules() -> None:
    assert violations(REPO) == []


PLANTS = {
    "a stage imports a later stage": ("agent/collect/sample.py", "from agent.act.engine import Engine\n",
                                      "collect/ imports a later stage: agent.act.engine"),
    "a lazy import counts too": ("agent/score/types.py",
                                 "def _late() -> None:\n    from agent.runtime import daemon\n",
                                 "score/ imports a later stage: agent.runtime.daemon"),
    "the wire imports a stage": ("agent/wire/topics.py", "from agent.collect.sample import Sample\n",
                                 "foundation module agent.wire.topics imports stage module"),
    "the coordinator imports the agent's internals": ("coordinator/model.py",
                                                      "from agent.runtime.config import Settings\n",
                                                      "the coordinator imports agent.runtime.config"),
    "the agent imports the coordinator": ("agent/cli/fleet.py", "import coordinator.store\n",
                                          "the agent imports coordinator.store"),
    "the product imports a dev tool": ("agent/runtime/daemon.py", "from devtools.fake_nvml import FakeNVML\n",
                                       "the product imports devtools.fake_nvml"),
    "an import cycle inside a stage": ("agent/report/spool.py", "from agent.report import transport\n",
                                       "import cycle: agent.report.spool -> agent.report.transport"),
}


@pytest.mark.parametrize("what", sorted(PLANTS))
def test_a_planted_violation_is_caught(tmp_path: Path, what: str) -> None:
    for top in (*PRODUCT, "devtools"):
        shutil.copytree(REPO / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    file, line, expected = PLANTS[what]
    target = tmp_path / file
    target.write_text(target.read_text(encoding="utf-8") + "\n" + line, encoding="utf-8")
    found = violations(tmp_path)
    assert any(expected in v for v in found), found


def test_no_file_in_the_product_is_over_600_lines() -> None:
    long = {}
    for top in PRODUCT:
        for path in (REPO / top).rglob("*"):
            binary = path.suffix in (".so", ".npz", ".pyc")
            if path.is_file() and "__pycache__" not in path.parts and not binary:
                count = len(path.read_bytes().splitlines())
                if count > MAX_LINES:
                    long[str(path.relative_to(REPO))] = count
    assert long == {}


@pytest.mark.slow
def test_the_wheel_ships_the_product_and_no_dev_or_test_tools(tmp_path: Path) -> None:
    pytest.importorskip("build", reason="the wheel is built with `python -m build` (pip install build)")
    pytest.importorskip("hatchling", reason="needs hatchling for --no-isolation")
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.so", "dist", "build",
                                                             ".mypy_cache", ".ruff_cache", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("heald-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"agent", "coordinator"}
    # the product, its data and its units are there
    for expected in ("agent/cli/main.py", "agent/cli/base.py", "agent/control/dispatcher.py",
                     "coordinator/cli.py", "agent/py.typed", "agent/_remediations/disk-nearly-full.yaml",
                     "agent/_systemd/heald.service", "agent/score/data/default-classifier.npz",
                     "agent/decide/playbook.schema.json"):
        assert expected in names, expected
    # no dev or test tool, no credentials
    for forbidden in ("fake_nvml", "emit.py", "sim.py", "testing.py", "coordinator_proc", "conftest",
                      "tests/", "devtools/", "bench/"):
        offenders = [n for n in names if forbidden in n]
        assert offenders == [], offenders
    # the development fixtures' secrets once sat in coordinator/testing.py
    for name in names:
        if name.endswith(".py"):
            text = zipfile.ZipFile(wheel).read(name).decode("utf-8")
            assert "test-token" not in text, name
            assert "test-password" not in text, name
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "heald = agent.cli.main:main" in scripts
    assert "heald-coordinator = coordinator.cli:main" in scripts
