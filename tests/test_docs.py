"""The docs: generated files (docs/configuration.md, packaging/agent.toml) stay up to date; links resolve."""

from __future__ import annotations

import functools
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import msgspec

from agent.runtime.config import Settings, load_config

TOP = Path(__file__).resolve().parents[1]
EXAMPLE = TOP / "packaging" / "agent.toml"


@functools.cache
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_docs", TOP / "packaging" / "gen_config_docs.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_generated_files_are_up_to_date() -> None:
    gen = generator()
    for path, text in gen.generate().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(TOP)} is out of date with the config model: "
            "run `python packaging/gen_config_docs.py` and commit the result")


def test_every_key_is_documented() -> None:
    gen = generator()
    doc = (TOP / "docs" / "configuration.md").read_text()
    for section in gen.walk():
        for field in section.fields:
            name = field.key.rsplit(".", 1)[-1]
            assert f"| `{name}` |" in doc, field.key


def test_example_loads_and_means_the_defaults() -> None:
    gen = generator()
    loaded = load_config(EXAMPLE, env={}, hostname="example-host")
    expected = msgspec.to_builtins(Settings())
    for dotted, value in gen.EXAMPLE_SET.items():
        node = expected
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    expected["node"]["id"] = "example-host"
    assert msgspec.to_builtins(loaded.settings) == expected


def test_example_uncommented_is_still_valid(tmp_path: Path) -> None:
    """Uncommenting any `# key = default` line must give a valid file (the values are real TOML)."""
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        stripped = line.removeprefix("# ")
        if line.startswith("# ") and " = " in stripped and "(not set)" not in stripped \
                and not stripped.endswith("= ...") and stripped.split(" = ")[0].isidentifier():
            lines.append(stripped)
        else:
            lines.append(line)
    uncommented = tmp_path / "agent.toml"
    uncommented.write_text("\n".join(lines) + "\n")
    loaded = load_config(uncommented, env={}, hostname="h")
    assert loaded.settings.mqtt.enabled is False


def test_heald_check_accepts_the_example() -> None:
    result = subprocess.run([sys.executable, "-m", "agent", "check", "--config", str(EXAMPLE)],
                            capture_output=True, text=True, timeout=120, cwd=TOP, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


FENCED = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)  # code blocks: no links, no headings
HEADING = re.compile(r"^#+\s+(.+)$", re.MULTILINE)


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in HEADING.finditer(FENCED.sub("", markdown))}


def test_relative_links_resolve() -> None:
    """Every relative link in the repository's Markdown names a file that exists (and a heading
    that exists, when it has an #anchor into a Markdown file)."""
    pages = [*TOP.glob("*.md"), *TOP.glob("docs/**/*.md"), *TOP.glob("bench/**/*.md"),
             *TOP.glob("remediations/**/*.md")]
    broken = []
    for page in pages:
        text = FENCED.sub("", page.read_text(encoding="utf-8"))
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path) if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(TOP)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text(encoding="utf-8")):
                broken.append(f"{page.relative_to(TOP)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
