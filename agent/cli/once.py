"""``heald once``: one full sample of this host, as a table (``--json`` for scripts)."""

from __future__ import annotations

import argparse
import sys

from agent.cli.run import config_arg


def add(p: argparse.ArgumentParser) -> None:
    config_arg(p)
    p.add_argument("--json", action="store_true", help="print the sample as JSON")
    p.add_argument("--window", type=window_seconds, default=1.0, metavar="SECONDS",
                   help=f"time between the two passes that rates are computed from (default 1; "
                        f"{MIN_WINDOW_S:g} to {MAX_WINDOW_S:g})")
    p.set_defaults(handler=cmd_once)


MIN_WINDOW_S, MAX_WINDOW_S = 0.1, 60.0


def window_seconds(text: str) -> float:
    """``--window``: a finite number of seconds in [MIN_WINDOW_S, MAX_WINDOW_S] (a negative or zero
    window made every rate, and CPU%, nonsense: 100%)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not MIN_WINDOW_S <= value <= MAX_WINDOW_S:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text} is outside {MIN_WINDOW_S:g}..{MAX_WINDOW_S:g} seconds")
    return value


def cmd_once(args: argparse.Namespace) -> int:
    from agent.cli.base import quiet_logging  # noqa: PLC0415 - `heald --help` stays light
    from agent.cli.render import render_sample, sample_json  # noqa: PLC0415
    from agent.runtime.config import load_config  # noqa: PLC0415
    from agent.runtime.sampler import take_sample  # noqa: PLC0415

    loaded = load_config(args.config)
    quiet_logging()
    sample = take_sample(loaded.settings.node.id, loaded.settings.collect, window=args.window)
    if args.json:
        sys.stdout.write(sample_json(sample) + "\n")
    else:
        sys.stdout.write(render_sample(sample))
    return 0
