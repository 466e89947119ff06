"""``heald check``: validate the config, the playbooks and the model artifacts; list every problem."""

from __future__ import annotations

import argparse
import json
import os
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


def run_checks(settings: Settings, config: str = "agent.toml") -> list[Problem]:
    """What the config alone cannot tell: do the playbooks load, do their triggers name metrics
    the collectors produce, do the directories exist, do the model artifacts fit? All at once."""
    from agent.cli import preflight  # noqa: PLC0415 - `heald --help` stays light
    from agent.decide.loader import check_playbooks  # noqa: PLC0415
    from agent.score.demand_stage import check_demand  # noqa: PLC0415
    from agent.score.stage import check_model  # noqa: PLC0415

    state = settings.paths.state_dir
    return [*preflight.directory_findings(settings.playbooks, config)[0],
            *check_playbooks(settings.playbooks),
            *preflight.unknown_metrics(preflight.parsed_playbooks(settings.playbooks)),
            *check_model(settings.model, state if Path(state).is_dir() else None),
            *check_demand(settings.demand, settings.model.enabled)]


def run_warnings(settings: Settings) -> tuple[list[str], str]:
    """What may be fine but should be said (missing default directories, steps that need root),
    and the line saying in which mode the playbooks will run."""
    from agent.cli import preflight  # noqa: PLC0415

    playbooks = preflight.parsed_playbooks(settings.playbooks)
    warnings = [*preflight.directory_findings(settings.playbooks, "")[1],
                *preflight.service_user_warnings(settings, playbooks)]
    return warnings, preflight.mode_line(settings, playbooks)


def config_failed(config: Path | None) -> list[Problem]:
    """With a config that does not load, the playbooks are still checked (its [playbooks] table
    if that part is valid, else the defaults), so one pass shows every problem."""
    import tomllib  # noqa: PLC0415

    import msgspec  # noqa: PLC0415

    from agent.cli import preflight  # noqa: PLC0415
    from agent.decide.loader import check_playbooks  # noqa: PLC0415
    from agent.decide.settings import PlaybookSettings  # noqa: PLC0415
    from agent.runtime.config import DEFAULT_CONFIG  # noqa: PLC0415

    main = config or Path(os.environ.get("HEALD_CONFIG", str(DEFAULT_CONFIG)))
    try:
        table = tomllib.loads(main.read_text(encoding="utf-8")).get("playbooks", {})
        pbs = msgspec.convert(table, PlaybookSettings)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, msgspec.ValidationError):
        pbs = PlaybookSettings()
    return [*preflight.directory_findings(pbs, str(main))[0], *check_playbooks(pbs),
            *preflight.unknown_metrics(preflight.parsed_playbooks(pbs))]


def cmd_check(args: argparse.Namespace) -> int:
    from agent.cli.base import quiet_logging  # noqa: PLC0415
    from agent.errors import InputError  # noqa: PLC0415
    from agent.runtime.config import load_config  # noqa: PLC0415
    from agent.runtime.reload import restart_keys  # noqa: PLC0415

    quiet_logging()  # stdout is the result (--json): log lines (warnings and up) go to stderr
    loaded: LoadedConfig | None
    warnings: list[str] = []
    modes = ""
    try:
        loaded = load_config(args.config)
        config = str(loaded.files[0]) if loaded.files else "agent.toml"
        problems = run_checks(loaded.settings, config)
        warnings, modes = run_warnings(loaded.settings)
    except InputError as exc:
        problems = [*exc.problems, *config_failed(args.config)]
        loaded = None
    if args.json:
        print(json.dumps({
            "ok": not problems,
            "files": [str(f) for f in loaded.files] if loaded else [],
            "problems": [{"file": p.file, "line": p.line, "key": p.key, "message": p.message}
                         for p in problems],
            "warnings": warnings,
            "playbooks": modes,
            "restart_required": restart_keys(),  # keys a SIGHUP keeps at their running values
        }, indent=2))
    else:
        for p in problems:
            print(f"heald: {p}", file=sys.stderr)
        for w in warnings:
            print(f"heald: warning: {w}", file=sys.stderr)
        if not problems and loaded is not None:
            files = ", ".join(str(f) for f in loaded.files) or "built-in defaults"
            print(f"ok: {files}")
            print(modes)
            print(f"needs a restart to change (SIGHUP applies the rest): {', '.join(restart_keys())}")
    return 2 if problems else 0
