"""``heald replay``: what would have fired on recorded samples, in dry-run (nothing is executed).

    heald replay RECORDING [--playbooks DIR]... [--model PATH | --no-model] [--cold-start S]
                 [--holds] [--json]

RECORDING is a ``.npz`` fault-harness recording or a ``.jsonl`` file of samples (see
:mod:`agent.decide.replay`). Without ``--playbooks`` the shipped library is used; with it, only
the given directories. The model is ``--model``'s detector artifact, else a detector fitted on
the recording's first ``--cold-start`` seconds the way the daemon fits one; ``--no-model`` runs
the rules alone. A recording made by a live agent (``bench/faults/run.py --live-agent``) carries
that agent's would-be actions: the replay's are compared with them (the last line says whether
they are the same; ``--json``: ``live``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from agent.errors import InputError, Problem


def add(p: argparse.ArgumentParser) -> None:
    p.add_argument("recording", type=Path, help="recorded samples: a .npz recording or a .jsonl of samples")
    p.add_argument("--playbooks", type=Path, action="append", default=[], metavar="DIR",
                   help="playbook directory (repeatable; default: the shipped library)")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, metavar="PATH", help="detector artifact to score with")
    model.add_argument("--no-model", action="store_true", help="no anomaly model, forecasts or classifier")
    p.add_argument("--cold-start", type=float, default=600.0, metavar="SECONDS",
                   help="without --model: fit the detector after this many seconds of samples (default 600)")
    p.add_argument("--holds", action="store_true", help="also list holds (cooldown, cold-start, ...)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_replay)


def _when(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(wall))


def _why(inputs: dict[str, Any]) -> str:
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in inputs.items()]
    text = ", ".join(parts)
    return text if len(text) <= 80 else text[:77] + "..."


def cmd_replay(args: argparse.Namespace) -> int:
    from agent.cli.base import out, quiet_logging, table  # noqa: PLC0415 - `heald --help` stays light
    from agent.decide.loader import load_playbooks  # noqa: PLC0415
    from agent.decide.replay import compare_live, live_decisions, replay  # noqa: PLC0415
    from agent.decide.settings import PlaybookSettings  # noqa: PLC0415

    quiet_logging()
    for d in args.playbooks:
        if not d.is_dir():
            raise InputError([Problem(str(d), "--playbooks", "not a directory")])
    if args.model is not None and not args.model.is_file():
        raise InputError([Problem(str(args.model), "--model", "no such model artifact")])
    if not 0 <= args.cold_start <= 86400:
        raise InputError([Problem("", "--cold-start", "must be within 0..86400 seconds")])
    settings = PlaybookSettings(dirs=tuple(str(d) for d in args.playbooks), load_shipped=not args.playbooks)
    playbooks = load_playbooks(settings)
    result = replay(args.recording, playbooks, model=args.model, model_enabled=not args.no_model,
                    cold_start_s=args.cold_start, settings=settings, holds=args.holds)
    live = live_decisions(args.recording)
    diffs = compare_live(result.decisions, live) if live is not None else []
    if args.json:
        out(json.dumps({"recording": str(args.recording), "samples": result.samples,
                        "first_wall": result.first_wall, "last_wall": result.last_wall,
                        "playbooks": sorted(p.name for p in playbooks),
                        "fits": [{"after_samples": n, "ok": ok, "model_version": v}
                                 for n, ok, v in result.fits],
                        "decisions": [d.as_dict() for d in result.decisions],
                        "live": None if live is None else {
                            "decisions": [{"kind": d.kind, "playbook": d.playbook, "target": d.target,
                                           "wall": d.wall} for d in live],
                            "same": not diffs, "differences": diffs}}, indent=1))
        return 0
    rows = [[_when(d.wall), d.playbook, d.target, d.kind + (f" ({d.reason})" if d.reason else ""),
             _why(d.inputs)] for d in result.decisions]
    span = (result.last_wall or 0.0) - (result.first_wall or 0.0)
    out(f"{args.recording}: {result.samples} samples ({span / 60:.1f} min), {len(playbooks)} playbooks, "
        f"dry-run; {len(result.runs)} would-be runs")
    for n, ok, version in result.fits:
        out(f"  detector fitted after {n} samples: {'ok' if ok else 'failed'} ({version})")
    if rows:
        out(table(["time (UTC)", "playbook", "target", "decision", "why"], rows, rule=True))
    if live is not None:
        verdict = "the same" if not diffs else f"{len(diffs)} difference(s)"
        out(f"recorded live run: {len(live)} would-be actions; this replay: {verdict}")
        for d in diffs:
            out(f"  {d}")
    return 0
