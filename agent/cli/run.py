"""``heald run``: the daemon in the foreground (what heald.service runs)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.runtime.daemon import Daemon


def config_arg(p: argparse.ArgumentParser) -> None:
    """``--config PATH``, shared by every command that reads the agent's configuration."""
    p.add_argument("--config", "-c", type=Path, default=None, metavar="PATH",
                   help="main config file (default: $HEALD_CONFIG or /etc/heald/agent.toml); "
                        "conf.d/*.toml beside it is merged in name order")


#: How ``--dry-run`` forces the mode: the environment override, so a SIGHUP reload keeps it.
FORCE_MODE_ENV = "HEALD_PLAYBOOKS__FORCE_MODE"


def add(p: argparse.ArgumentParser) -> None:
    config_arg(p)
    p.add_argument("--dry-run", action="store_true",
                   help="run every playbook in dry-run: decide and log, act on nothing "
                        "(as [playbooks] force_mode = \"dry-run\"; kept across reloads)")
    p.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - handlers import what they need: `heald --help` stays light

    from agent.cli.base import configure_logging  # noqa: PLC0415
    from agent.runtime.config import load_config  # noqa: PLC0415
    from agent.runtime.daemon import build_daemon  # noqa: PLC0415

    loaded = load_config(args.config)
    override = ""
    if args.dry_run and loaded.settings.playbooks.force_mode != "off":  # off stays off: stricter
        os.environ[FORCE_MODE_ENV] = "dry-run"
        loaded = load_config(args.config)
        override = "--dry-run"
    elif loaded.settings.playbooks.force_mode:
        override = (f"${FORCE_MODE_ENV}" if os.environ.get(FORCE_MODE_ENV)
                    else "[playbooks] force_mode")
    configure_logging(loaded.settings.log.level, loaded.settings.log.format)
    daemon = build_daemon(loaded, args.config)
    log_start_summary(daemon, override)
    daemon.deadline_past_run = True  # a stop bounded until exit, executor threads' join included
    return asyncio.run(daemon.run())


def log_start_summary(daemon: Daemon, override: str) -> None:
    """The one start record: each playbook's mode and effects, clean roots, protected processes,
    the cold start's end, MQTT, /metrics and the state directory (:mod:`agent.runtime.summary`)."""
    import structlog  # noqa: PLC0415

    from agent.runtime.summary import start_summary  # noqa: PLC0415

    s = daemon.settings
    engine: Any = daemon.pipeline.decider
    playbooks = engine.playbooks.values() if engine is not None else ()
    scorer: Any = daemon.pipeline.scorer
    history_s = scorer.history_rows() * s.sample.interval_s if hasattr(scorer, "history_rows") else 0.0
    summary = start_summary(s, playbooks, state_dir=daemon.state_dir, history_s=history_s, override=override)
    structlog.get_logger("heald.daemon").info("heald start summary", node=s.node.id, **summary)
