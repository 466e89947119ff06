"""``heald check``: validate the config, the playbooks and the model artifacts; list every problem."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli.run import config_arg

if TYPE_CHECKING:
    from agent.errors import Problem
    from agent.runtime.config import LoadedConfig, Settings


def add(p: argparse.ArgumentParser) -> None:
    config_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_check)


def run_checks(settings: Settings) -> list[Problem]:
    """What the config alone cannot tell: do the playbooks load, do the model artifacts fit?"""
    from agent.decide.loader import check_playbooks  # noqa: PLC0415 - `heald --help` stays light
    from agent.score.stage import check_model  # noqa: PLC0415

    state = settings.paths.state_dir
    return [*check_playbooks(settings.playbooks),
            *check_model(settings.model, state if Path(state).is_dir() else None)]


def cmd_check(args: argparse.Namespace) -> int:
    from agent.errors import InputError  # noqa: PLC0415
    from agent.runtime.config import load_config  # noqa: PLC0415

    loaded: LoadedConfig | None
    try:
        loaded = load_config(args.config)
        problems = run_checks(loaded.settings)
    except InputError as exc:
        problems = exc.problems
        loaded = None
    if args.json:
        print(json.dumps({
            "ok": not problems,
            "files": [str(f) for f in loaded.files] if loaded else [],
            "problems": [{"file": p.file, "line": p.line, "key": p.key, "message": p.message}
                         for p in problems],
        }, indent=2))
    else:
        for p in problems:
            print(f"heald: {p}", file=sys.stderr)
        if not problems and loaded is not None:
            files = ", ".join(str(f) for f in loaded.files) or "built-in defaults"
            print(f"ok: {files}")
    return 2 if problems else 0
