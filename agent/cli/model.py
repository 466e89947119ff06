"""``heald model``: train, inspect and evaluate the anomaly model.

This module imports nothing heavy at import time: numpy, scikit-learn and the model code are
imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from agent.cli.base import out, quiet_logging, table
from agent.errors import HealdError, InputError, Problem


def add(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("evaluate", help="fit and score heald's detector and baselines on labelled datasets",
                       description="For each *.npz (train, test, test_label) in DIR: fit on train, score "
                                   "test one row at a time, report AUC-PR, point-F1 at the label-free "
                                   "threshold, event recall, detection delay and µs per sample for "
                                   "heald and the PCA, IsolationForest and random baselines.")
    p.add_argument("directory", metavar="DIR", help="directory of *.npz datasets")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--max-rows", type=int, default=None, metavar="N",
                   help="score only the first N test rows of each file")
    p.add_argument("--seed", type=int, default=0, help="seed of the random and IsolationForest baselines")
    p.add_argument("--interval", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between two rows (default 60: SMD's 1-minute samples; NAB's are 5 "
                        "minutes, a node's recording 1 s): the detector's fast channel needs its "
                        "deviation to last a time, not a number of rows")
    p.set_defaults(handler=evaluate_cmd)

    p = sub.add_parser("info", help="print a model artifact's metadata",
                       description="Load and verify a model artifact (content hash, format version) "
                                   "and print its metadata.")
    p.add_argument("path", metavar="PATH", help="model artifact")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=info_cmd)

    p = sub.add_parser("train", help="fit the anomaly model on training rows and write an artifact",
                       description="Fit heald's anomaly detector on FILE (.npz with a 'train' array and "
                                   "optional 'feature_names'/'units', .npy, or .csv with a header row) and "
                                   "write the compiled artifact atomically.")
    p.add_argument("--input", required=True, metavar="FILE", help="training rows (.npz, .npy or .csv)")
    p.add_argument("--output", required=True, metavar="PATH", help="artifact to write")
    p.add_argument("--options", default="{}", metavar="JSON",
                   help='fit options as a JSON object, e.g. \'{"n_clusters": 16}\'')
    p.add_argument("--json", action="store_true", help="print the new artifact's metadata as JSON")
    p.set_defaults(handler=train_cmd)

    p = sub.add_parser("train-classifier", help="fit the failure classifier on a labelled dataset",
                       description="Fit heald's failure classifier on DATA (.npz with X, y, groups, "
                                   "feature_names, units and schema_json, as bench/faults/dataset.py "
                                   "writes it), check the compiled form against scikit-learn and write "
                                   "the artifact atomically.")
    p.add_argument("--data", required=True, metavar="FILE", help="labelled dataset (.npz)")
    p.add_argument("--out", required=True, metavar="PATH", help="artifact to write")
    p.add_argument("--c", type=float, default=0.1, metavar="C", help="inverse L2 regularisation strength")
    p.add_argument("--splits", type=int, default=3, metavar="N",
                   help="calibration folds (grouped by episode)")
    p.add_argument("--json", action="store_true", help="print the new artifact's metadata as JSON")
    p.set_defaults(handler=train_classifier_cmd)

    p = sub.add_parser("train-demand", help="fit the demand forecast model on a node's demand history",
                       description="Fit heald's demand model (agent/score/demand.py) on a demand history "
                                   "(<state_dir>/demand/history.json) and write the artifact atomically. "
                                   "The daemon's demand fit runs this in a child process.")
    p.add_argument("--history", required=True, metavar="FILE", help="the demand history (.json)")
    p.add_argument("--output", required=True, metavar="PATH", help="artifact to write (.npz)")
    p.add_argument("--horizon-s", type=float, default=7200.0, metavar="S", help="how far ahead to forecast")
    p.set_defaults(handler=train_demand_cmd)

    p = sub.add_parser("export-history", help="write a training file from a node's feature history",
                       description="Write the rows of the feature history in DIR (<state_dir>/model/history) "
                                   "that the anomaly model would be fitted on, as an .npz with 'train', "
                                   "'feature_names', 'units' and 'wall' (the input of `heald model train`). "
                                   "The daemon's refit runs this in a child process. Prints the row count; "
                                   "exit 1 when there is nothing usable.")
    p.add_argument("--dir", required=True, metavar="DIR", help="the history directory")
    p.add_argument("--out", required=True, metavar="FILE", help="training file to write (.npz)")
    p.add_argument("--schema", default=None, metavar="JSON",
                   help="the feature schema as JSON (default: heald's default schema)")
    p.add_argument("--since", type=float, default=None, metavar="WALL",
                   help="only rows from this wall-clock time (seconds since the epoch) on")
    p.set_defaults(handler=export_history_cmd)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def evaluate_cmd(args: argparse.Namespace) -> int:
    from agent.score.evaluate import DETECTORS, evaluate_dir  # noqa: PLC0415

    quiet_logging()

    if args.max_rows is not None and args.max_rows < 1:
        raise InputError([Problem("--max-rows", "", "must be >= 1")])
    if not (math.isfinite(args.interval) and 0 < args.interval <= 86400):
        raise InputError([Problem("--interval", "", "must be a number of seconds in (0, 86400]")])
    t0 = time.perf_counter()
    with _FileProgress(args.directory) as bar:
        result = evaluate_dir(args.directory, max_rows=args.max_rows, seed=args.seed,
                              progress=bar.step if bar.shown else None, sample_interval_s=args.interval)
    wall = time.perf_counter() - t0
    if args.json:
        out(json.dumps(result))
        return 0
    headers = ["file", "detector", "AUC-PR", "F1", "event recall", "delay", "µs/sample"]
    rows = []
    for name, per in [*result["files"].items(), ("MEAN", result["mean"])]:
        for det in DETECTORS:
            m = per[det]
            rows.append([name, det, _fmt(m["auc_pr"]), _fmt(m["f1"]), _fmt(m["event_recall"]),
                         _fmt(m["delay_mean"], 1), _fmt(m["us_per_sample"], 1)])
    out(table(headers, rows, rule=True))
    fast = [per["heald"].get("fast_only") for per in result["files"].values()]
    share = [f for f in fast if f is not None]
    out(f"{len(result['files'])} files in {wall:.1f} s. heald is scored one row at a time; "
           "baseline µs/sample is sklearn single-row latency."
        + (f" Alerts made by heald's fast channel alone: {sum(share) / len(share):.0%} (mean over files)."
           if share else ""))
    return 0


class _FileProgress:
    """A progress bar over the datasets on stderr, when stderr is a terminal (tqdm's own test):
    the files done, the current file and what is being done to it, elapsed and remaining time."""

    _STEP = re.compile(r"\[(\d+)/(\d+)\] (.*)")

    def __init__(self, directory: str) -> None:
        from tqdm import tqdm  # noqa: PLC0415 - only for this command

        total = len(list(Path(directory).glob("*.npz"))) if Path(directory).is_dir() else 0
        self._bar = tqdm(total=total, unit="file", file=sys.stderr, disable=None, dynamic_ncols=True,
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} files [{elapsed}<{remaining}]")
        self.shown = not self._bar.disable

    def step(self, msg: str) -> None:
        m = self._STEP.match(msg)
        if m is None:
            return
        self._bar.n = int(m[1]) - 1
        self._bar.set_description_str(m[3][:48], refresh=False)
        self._bar.refresh()

    def __enter__(self) -> _FileProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._bar.n = self._bar.total or 0
            self._bar.set_description_str("done", refresh=False)
        self._bar.close()


def _meta_dict(model: Any) -> dict[str, Any]:
    import msgspec  # noqa: PLC0415

    meta: dict[str, Any] = msgspec.to_builtins(model.meta)
    return {"sha256": model.sha256, "version": model.version, **meta,
            "arrays": {k: list(v.shape) for k, v in model.arrays.items()}}


def _print_meta(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        out(json.dumps(info))
        return
    tr = info["training"]
    rows = [
        ["version", info["version"]],
        ["sha256", info["sha256"]],
        ["format", f"{info['kind']} v{info['format_version']}"],
        ["features", f"{len(info['features'])}: " + ", ".join(f["name"] for f in info["features"][:8])
         + (" ..." if len(info["features"]) > 8 else "")],
        ["training", f"{tr['rows']} rows" + (f" from {tr['source']}" if tr["source"] else "")
         + (f", {tr['start']} .. {tr['end']}" if tr["start"] is not None else "")],
        ["threshold", (f"{info['threshold']:.6g} (arithmetic EWMA), {info['threshold_geo']:.6g} "
                       "(geometric EWMA); reported score 1.0 = both reached")],
        ["fast channel", "none (fitted before it)" if info.get("threshold_fast") is None else
         (f"{info['threshold_fast']:.6g} (EWMA alpha {info['fast_alpha']}); alerts when over it for "
          f"{info['fast_min_s']:g} s")],
        ["ewma_alpha", str(info["ewma_alpha"])],
        ["top_k", str(info["top_k"])],
        ["options", json.dumps(info["options"], sort_keys=True)],
        ["sklearn", info["sklearn_version"]],
        ["numpy", info["numpy_version"]],
        ["created", info["created"]],
    ]
    out(table(["field", "value"], rows, rule=True))


def info_cmd(args: argparse.Namespace) -> int:
    """Metadata of an anomaly-detector artifact or of a failure-classifier artifact."""
    from agent.errors import ModelError  # noqa: PLC0415
    from agent.score import classifier  # noqa: PLC0415
    from agent.score.compiled import load  # noqa: PLC0415

    quiet_logging()

    try:
        detector = load(args.path)
    except ModelError as first:
        try:
            model = classifier.load(args.path)
        except ModelError:
            raise first from None
        _print_classifier(model, args.json)
        return 0
    _print_meta(_meta_dict(detector), args.json)
    return 0


def _print_classifier(model: Any, as_json: bool) -> None:
    info = _meta_dict(model)
    if as_json:
        out(json.dumps(info))
        return
    tr = info["training"]
    rows = [
        ["version", info["version"]],
        ["sha256", info["sha256"]],
        ["format", f"{info['kind']} v{info['format_version']}"],
        ["classes", ", ".join(info["classes"])],
        ["horizon", f"{info['horizon_s']:g} s"],
        ["features", f"{len(info['features'])}: " + ", ".join(f["name"] for f in info["features"][:6])
         + (" ..." if len(info["features"]) > 6 else "")],
        ["training", f"{tr['rows']} rows" + (f" from {tr['source']}" if tr.get("source") else "")],
        ["sklearn", info["sklearn_version"]],
        ["created", info["created"]],
    ]
    out(table(["field", "value"], rows, rule=True))


def train_cmd(args: argparse.Namespace) -> int:
    """Also the daemon's fitting child (:func:`agent.score.fit.fit_in_child`)."""
    from agent.score.fit import fit_file, leave_oom_protection  # noqa: PLC0415

    # First: under memory pressure the kernel must kill the fit, not the healer that started it.
    leave_oom_protection()
    import msgspec  # noqa: PLC0415

    quiet_logging()

    try:
        opts = msgspec.json.decode(args.options, type=dict[str, Any])
    except msgspec.DecodeError as exc:
        raise InputError([Problem("--options", "", f"not a JSON object: {exc}")]) from None
    model = fit_file(args.input, args.output, **opts)
    info = _meta_dict(model)
    if args.json:
        _print_meta(info, True)
    else:
        out(f"wrote {args.output}: model {info['version']}, {len(info['features'])} features, "
               f"{info['training']['rows']} training rows, thresholds {info['threshold']:.6g} / "
               f"{info['threshold_geo']:.6g}")
    return 0


def train_classifier_cmd(args: argparse.Namespace) -> int:
    """Also the daemon's classifier child (:func:`agent.score.classifier_train.train_in_child`)."""
    from agent.score.fit import leave_oom_protection  # noqa: PLC0415

    leave_oom_protection()
    from agent.score.classifier_train import train  # noqa: PLC0415

    quiet_logging()
    try:
        model = train(args.data, args.out, c_reg=args.c, n_splits=args.splits)
    except (OSError, KeyError, ValueError) as exc:
        raise InputError([Problem(args.data, "--data", f"bad dataset: {exc}")]) from None
    info = _meta_dict(model)
    if args.json:
        out(json.dumps(info))
    else:
        out(f"wrote {args.out}: classifier {info['version']}, classes {', '.join(info['classes'])}, "
            f"{len(info['features'])} features, {info['training']['rows']} training rows")
    return 0


def train_demand_cmd(args: argparse.Namespace) -> int:
    """Also the daemon's demand fit child (:func:`agent.score.demand.fit_in_child`)."""
    from agent.score.fit import leave_oom_protection  # noqa: PLC0415

    leave_oom_protection()
    from agent.score.demand import fit_history  # noqa: PLC0415

    quiet_logging()
    if not 0 < args.horizon_s <= 7 * 86400:
        raise InputError([Problem("--horizon-s", "", "must be in (0, 604800]")])
    model = fit_history(args.history, args.output, horizon_s=args.horizon_s)
    m = model.meta
    out(f"wrote {args.output}: demand model {model.version}, {len(m.resources)} resources, "
        f"{m.training.rows} rows of {m.step_s:g} s, horizon {m.horizon_steps} steps")
    if m.choice:  # which forecast each resource got, chosen out of sample (agent/score/demand.py)
        pairs = zip(m.resources, m.choice, strict=True)
        out("forecast per resource: " + ", ".join(f"{r} {c}" for r, c in pairs))
    return 0


def export_history_cmd(args: argparse.Namespace) -> int:
    """Also the daemon's history-export child (:class:`agent.score.stage.RiskStage`)."""
    from agent.features.history import export  # noqa: PLC0415
    from agent.features.schema import decode_schema, default_schema  # noqa: PLC0415

    quiet_logging()
    try:
        schema = default_schema() if args.schema is None else decode_schema(args.schema)
    except ValueError as exc:
        raise InputError([Problem("--schema", "", f"not a feature schema: {exc}")]) from None
    try:
        rows = export(args.dir, schema, args.out, args.since)
    except OSError as exc:  # a full state dir: one line on stderr, which the daemon logs as the reason
        raise HealdError(f"cannot write the training file {args.out}: {exc}") from None
    out(str(rows))
    return 0 if rows else 1
