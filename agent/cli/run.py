"""``heald run``: the daemon in the foreground (what heald.service runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def config_arg(p: argparse.ArgumentParser) -> None:
    """``--config PATH``, shared by every command that reads the agent's configuration."""
    p.add_argument("--config", "-c", type=Path, default=None, metavar="PATH",
                   help="main config file (default: $HEALD_CONFIG or /etc/heald/agent.toml); "
                        "conf.d/*.toml beside it is merged in name order")


def add(p: argparse.ArgumentParser) -> None:
    config_arg(p)
    p.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - handlers import what they need: `heald --help` stays light

    from agent.cli.base import configure_logging  # noqa: PLC0415
    from agent.runtime.config import load_config  # noqa: PLC0415
    from agent.runtime.daemon import build_daemon  # noqa: PLC0415

    loaded = load_config(args.config)
    configure_logging(loaded.settings.log.level, loaded.settings.log.format)
    daemon = build_daemon(loaded, args.config)
    return asyncio.run(daemon.run())
