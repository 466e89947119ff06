"""Load and validate playbooks: YAML -> JSON Schema -> semantic checks -> typed :class:`Playbook`.

Each stage has its module: :mod:`agent.decide.source` (YAML with the line of every value),
:mod:`agent.decide.schema` (the JSON Schema's problems), :mod:`agent.decide.builder` (the typed
playbook and the checks a schema cannot express). This module finds the files and puts the
stages together. Every problem names the file, the line and the field
(``steps[1].params.unit``). Loading is all or nothing: ``load_playbooks`` returns the complete
list or raises :class:`~agent.errors.PlaybookError` with every problem.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from agent.decide.builder import PlaybookBuilder
from agent.decide.model import Playbook
from agent.decide.schema import schema_problems
from agent.decide.settings import PlaybookSettings
from agent.decide.source import dotted, parse_yaml
from agent.errors import PlaybookError, Problem


def shipped_dir() -> Path:
    """The shipped library: packaged as agent/_remediations, or remediations/ in a source tree."""
    here = Path(__file__).resolve().parent.parent
    packaged = here / "_remediations"
    return packaged if packaged.is_dir() else here.parent / "remediations"



def parse_playbook(
    text: str, file: str, settings: PlaybookSettings | None = None, *, shipped: bool = False
) -> tuple[Playbook | None, list[Problem]]:
    """Validate one playbook document; returns (playbook or None, problems)."""
    settings = settings or PlaybookSettings()
    try:
        data, smap = parse_yaml(text, file)
    except PlaybookError as exc:
        return None, exc.problems
    problems = [Problem(file, dotted(p), f"duplicate key '{p[-1]}'", line) for p, line in smap.duplicates]
    if not isinstance(data, Mapping):
        return None, [
            *problems,
            Problem(
                file, "", "a playbook file holds one mapping (name:, trigger:, steps:, ...)", smap.line(())
            ),
        ]
    problems += schema_problems(data, file, smap)
    if problems:
        return None, problems
    builder = PlaybookBuilder(file, smap, settings)
    pb = builder.playbook(data, shipped)
    if builder.problems:
        return None, sorted(dict.fromkeys(builder.problems), key=lambda p: (p.line or 0, p.key))
    return pb, []


def playbook_files(settings: PlaybookSettings) -> Iterator[tuple[Path, bool]]:
    """Every playbook file to load, shipped first, then each operator directory in name order."""
    dirs: list[tuple[Path, bool]] = []
    if settings.load_shipped:
        dirs.append((shipped_dir(), True))
    dirs.extend((Path(d), False) for d in settings.dirs)
    for d, shipped in dirs:
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.suffix in (".yaml", ".yml") and p.is_file():
                yield p, shipped


def _settings_of(settings: object) -> PlaybookSettings:
    if isinstance(settings, PlaybookSettings):
        return settings
    inner = getattr(settings, "playbooks", None)
    if isinstance(inner, PlaybookSettings):
        return inner
    raise TypeError(f"expected PlaybookSettings or Settings, got {type(settings).__name__}")


def _load(settings: PlaybookSettings) -> tuple[list[Playbook], list[Problem]]:
    playbooks: list[Playbook] = []
    problems: list[Problem] = []
    seen: dict[str, Playbook] = {}
    for path, shipped in playbook_files(settings):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(str(path), "", f"cannot read: {exc}"))
            continue
        pb, probs = parse_playbook(text, str(path), settings, shipped=shipped)
        problems.extend(probs)
        if pb is None:
            continue
        if pb.name in seen:
            first = seen[pb.name]
            problems.append(
                Problem(
                    str(path),
                    "name",
                    f"duplicate playbook name '{pb.name}' (first defined in {first.source}:"
                    f"{first.source_line or 1}); names must be unique across files",
                    _name_line(text),
                )
            )
            continue
        seen[pb.name] = pb
        playbooks.append(pb)
    return playbooks, problems


def _name_line(text: str) -> int | None:
    for n, line in enumerate(text.splitlines(), start=1):
        if line.startswith("name:"):
            return n
    return None


def check_playbooks(settings: object) -> list[Problem]:
    """Every problem in every playbook file (``heald check``); empty when all are valid."""
    return _load(_settings_of(settings))[1]


def load_playbooks(settings: object) -> list[Playbook]:
    """All playbooks, or PlaybookError listing every problem (nothing half-loaded)."""
    playbooks, problems = _load(_settings_of(settings))
    if problems:
        raise PlaybookError(problems)
    return playbooks
