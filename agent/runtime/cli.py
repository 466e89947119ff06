"""``heald run``, ``heald check`` and ``heald once``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import InputError, Problem
from agent.runtime.config import load_config

if TYPE_CHECKING:
    from agent.collect.sample import Sample
    from agent.runtime.config import Settings

# Extra validations run by `heald check`, as "module:function(settings) -> list[Problem]".
# Stages register theirs here (playbooks, model artifacts).
CHECKS: tuple[str, ...] = (
    "agent.runtime.cli:check_playbooks",
    "agent.runtime.cli:check_models",
)


def check_playbooks(settings: Settings) -> list[Problem]:
    from agent.decide.loader import check_playbooks as check  # noqa: PLC0415

    return check(settings.playbooks)


def check_models(settings: Settings) -> list[Problem]:
    from agent.score.stage import check_model  # noqa: PLC0415

    state = settings.paths.state_dir
    return check_model(settings.model, state if Path(state).is_dir() else None)


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, default=None, metavar="PATH",
                   help="main config file (default: $HEALD_CONFIG or /etc/heald/agent.toml); "
                        "conf.d/*.toml beside it is merged in name order")


def add_run(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.set_defaults(handler="agent.runtime.cli:cmd_run")


def add_check(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler="agent.runtime.cli:cmd_check")


def add_once(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="print the sample as JSON")
    p.add_argument("--window", type=float, default=1.0, metavar="SECONDS",
                   help="time between the two passes that rates are computed from (default 1)")
    p.set_defaults(handler="agent.runtime.cli:cmd_once")


def cmd_run(args: argparse.Namespace) -> int:
    from agent.runtime.daemon import build_daemon  # noqa: PLC0415 - keep `heald check` light
    from agent.runtime.logging import configure  # noqa: PLC0415

    loaded = load_config(args.config)
    configure(loaded.settings.log.level, loaded.settings.log.format)
    daemon = build_daemon(loaded, args.config)
    return asyncio.run(daemon.run())


def run_checks(settings: Settings) -> list[Problem]:
    from agent.cli import resolve  # noqa: PLC0415 - avoids an import cycle

    problems: list[Problem] = []
    for spec in CHECKS:
        problems.extend(resolve(spec)(settings))
    return problems


def cmd_check(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

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


def take_sample(settings: Settings, window: float = 1.0, nvml: object | None = None) -> Sample:
    """Start every collector, run two passes ``window`` seconds apart, return one Sample."""
    from agent.collect import registry  # noqa: PLC0415
    from agent.runtime.daemon import COLLECTOR_NAMES  # noqa: PLC0415
    from agent.runtime.sampler import Sampler  # noqa: PLC0415

    collectors = registry.build(settings.collect, nvml=nvml)
    enabled = {c.name for c in collectors}
    absent = {n: "disabled in config" for n in COLLECTOR_NAMES if n not in enabled}
    sampler = Sampler(settings.node.id, collectors, stale_after=1e9, absent=absent)

    async def go() -> Sample:
        started = [n for n in sampler.names if await sampler.start_collector(n)]
        for n in started:
            await sampler.collect_once(n)
        await asyncio.sleep(window)
        await asyncio.gather(*(sampler.collect_once(n) for n in started))
        return sampler.assemble()

    try:
        return asyncio.run(go())
    finally:
        sampler.close()


def cmd_once(args: argparse.Namespace) -> int:
    from agent.runtime.logging import configure  # noqa: PLC0415
    from agent.runtime.render import render_sample, sample_json  # noqa: PLC0415

    loaded = load_config(args.config)
    configure("warning", "console", stream=sys.stderr)
    sample = take_sample(loaded.settings, window=args.window)
    if args.json:
        sys.stdout.write(sample_json(sample) + "\n")
    else:
        sys.stdout.write(render_sample(sample))
    return 0
