"""Every playbook in tests/playbooks_broken/ is refused with a message naming file, field and line."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from agent.decide.loader import check_playbooks, load_playbooks, parse_playbook
from agent.decide.settings import PlaybookSettings
from agent.errors import PlaybookError

CORPUS = Path(__file__).parent / "playbooks_broken"
FILES = sorted(CORPUS.glob("*.yaml"))
_EXPECT = re.compile(r"^# expect: key=(?P<key>\S*) line=(?P<line>\d+)$")


def test_corpus_is_large_enough() -> None:
    assert len(FILES) >= 20


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_broken_playbook_is_refused_with_file_field_line(path: Path) -> None:
    text = path.read_text()
    m = _EXPECT.match(text.splitlines()[0])
    assert m, f"{path.name}: first line must be '# expect: key=FIELD line=N'"
    pb, problems = parse_playbook(text, str(path))
    assert pb is None
    assert problems
    messages = [str(p) for p in problems]
    want_key, want_line = m["key"], int(m["line"])
    match = [p for p in problems if p.key == want_key and p.line == want_line]
    assert match, f"expected a problem at [{want_key}] line {want_line}, got {messages}"
    msg = str(match[0])
    assert msg.startswith(f"{path}:{want_line}:")
    if want_key:
        assert f"[{want_key}]" in msg


def test_load_playbooks_raises_with_every_problem(tmp_path: Path) -> None:
    for p in FILES[:5]:
        shutil.copy(p, tmp_path / p.name)
    settings = PlaybookSettings(dirs=(str(tmp_path),), load_shipped=False)
    with pytest.raises(PlaybookError) as exc:
        load_playbooks(settings)
    files = {Path(p.file).name for p in exc.value.problems}
    assert files == {p.name for p in FILES[:5]}
    assert len(check_playbooks(settings)) == len(exc.value.problems)


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    body = (
        "name: same\ndescription: x\ntrigger: {metric: mem.used_pct, op: '>', value: 95}\n"
        "steps:\n  - action: drop_caches\n"
    )
    (tmp_path / "a.yaml").write_text(body)
    (tmp_path / "b.yaml").write_text(body)
    problems = check_playbooks(PlaybookSettings(dirs=(str(tmp_path),), load_shipped=False))
    assert len(problems) == 1
    assert problems[0].file.endswith("b.yaml")
    assert problems[0].key == "name"
    assert problems[0].line == 1
    assert "a.yaml" in problems[0].message
