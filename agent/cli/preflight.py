"""``heald check``'s checks beyond "does it load": trigger metrics against the collectors' schema,
directories that are not there, and steps the service user cannot run.

Problems fail the check (exit 2); warnings are printed and do not (a missing default playbook
directory, a root-only step when the agent may well run as root).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import Problem

if TYPE_CHECKING:
    from agent.decide.model import Playbook
    from agent.decide.settings import PlaybookSettings
    from agent.runtime.config import Settings

DEFAULT_PLAYBOOK_DIR = "/etc/heald/playbooks.d"
#: Steps that need root (CAP_SYS_ADMIN): heald.service runs as the user heald without it.
ROOT_ONLY = frozenset({"drop_caches", "gpu_reset", "gpu_drain"})


def _line_of(path: str, needle: str) -> int | None:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    return next((n for n, line in enumerate(lines, start=1) if needle in line), None)


def parsed_playbooks(settings: PlaybookSettings) -> list[Playbook]:
    """Every playbook file that parses on its own (for checks that need the typed playbook)."""
    from agent.decide.loader import parse_playbook, playbook_files  # noqa: PLC0415

    out = []
    for path, shipped in playbook_files(settings):
        try:
            pb, _ = parse_playbook(path.read_text(encoding="utf-8"), str(path), settings, shipped=shipped)
        except (OSError, UnicodeDecodeError):
            continue  # check_playbooks reports it
        if pb is not None:
            out.append(pb)
    return out


def unknown_metrics(playbooks: list[Playbook]) -> list[Problem]:
    """Trigger and verify keys whose family no collector produces, with a did-you-mean."""
    from agent.collect.families import METRIC_FAMILIES  # noqa: PLC0415
    from agent.decide.model import ForecastCond, MetricCond, walk  # noqa: PLC0415

    problems = []
    for pb in playbooks:
        conds = [(c, "trigger") for c in walk(pb.trigger)]
        if pb.verify.expect is not None:
            conds += [(c, "verify.expect") for c in walk(pb.verify.expect)]
        for cond, where in conds:
            if not isinstance(cond, MetricCond | ForecastCond) or cond.key.family in METRIC_FAMILIES:
                continue
            family = cond.key.family
            close = difflib.get_close_matches(family, sorted(METRIC_FAMILIES), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else " (see docs/metrics.md)"
            problems.append(Problem(pb.source, f"{where}.metric",
                                    f"unknown metric '{family}': no collector produces it{hint}",
                                    _line_of(pb.source, family)))
    return problems


def directory_findings(settings: PlaybookSettings, config: str) -> tuple[list[Problem], list[str]]:
    """Playbook directories that are missing (a problem, but for the default one), clean roots
    that are missing (a warning)."""
    problems: list[Problem] = []
    warnings: list[str] = []
    for d in settings.dirs:
        p = Path(d)
        if p.is_dir():
            continue
        what = "is not a directory" if p.exists() else "does not exist"
        if d == DEFAULT_PLAYBOOK_DIR and not p.exists():
            warnings.append(f"playbook directory {d} does not exist: only the shipped playbooks load")
        else:
            problems.append(Problem(config, "playbooks.dirs", f"playbook directory {d} {what}",
                                    _line_of(config, d)))
    warnings += [f"clean root {r} does not exist: nothing is cleaned there"
                 for r in settings.clean_roots if not Path(r).is_dir()]
    return problems, warnings


def service_user_warnings(settings: Settings, playbooks: list[Playbook]) -> list[str]:
    """Steps of active playbooks that fail under heald.service (User=heald, no CAP_SYS_ADMIN)."""
    from agent.runtime.summary import effective_mode  # noqa: PLC0415

    s = settings.playbooks
    out = []
    for pb in sorted(playbooks, key=lambda p: p.name):
        if effective_mode(pb, s.force_mode) == "off":
            continue
        actions = sorted({step.action for step in pb.steps})
        root = [a for a in actions if a in ROOT_ONLY]
        if root and not s.use_helper_units:
            out.append(f"playbook {pb.name}: {', '.join(root)} need root; under heald.service (user heald) "
                       "set [playbooks] use_helper_units = true")
        if "cgroup_limit" in actions and s.cgroup_direct_write:
            out.append(f"playbook {pb.name}: cgroup_limit with [playbooks] cgroup_direct_write = true fails "
                       "under heald.service (ProtectControlGroups=yes)")
    return out


def mode_line(settings: Settings, playbooks: list[Playbook]) -> str:
    """How the playbooks will run: forced, or each its own mode (counts)."""
    from agent.runtime.summary import effective_mode  # noqa: PLC0415

    force = settings.playbooks.force_mode
    counts: dict[str, int] = {}
    for pb in playbooks:
        mode = effective_mode(pb, force)
        counts[mode] = counts.get(mode, 0) + 1
    modes = ", ".join(f"{n} {m}" for m, n in sorted(counts.items()))
    how = f"forced {force} ([playbooks] force_mode or HEALD_PLAYBOOKS__FORCE_MODE)" if force else "own modes"
    return f"playbooks: {modes or 'none'} ({how}; `heald run --dry-run` forces dry-run)"
