"""Replay recorded samples through features -> score -> decide, in dry-run: what would have fired.

``heald replay`` (:mod:`agent.cli.replay`) feeds each recorded sample to a fresh
:class:`agent.score.stage.RiskStage` and a fresh :class:`agent.decide.decider.Decider` (temporary
state dir, every playbook forced to dry-run) exactly as the daemon's per-sample pipeline does,
and collects the decisions. No action code runs: the engine's runner is never involved. A
would-be run ends at the sample that started it (a live dry-run takes milliseconds), so the
cooldowns and runs-per-window guards count from the recording's own clock, as they did live.

Recordings:

* ``.npz``: a fault-harness recording (``bench/faults/run.py``): ``keys`` (metric keys), ``X``
  (one row a sample, NaN for a missing value), ``wall``, ``mono``, ``seq``; a live agent's
  recording also has ``absent`` (bit-packed rows: the key was not in that sample at all, as when
  a process or a mount is gone; NaN alone is a None value). Without it every NaN is a None value
  of a key that was there;
* ``.jsonl``: one sample a line, ``{"seq", "wall", "mono", "metrics": {key: value|null}}``: the
  samples of a coordinator's ``metrics`` messages (:class:`agent.wire.MetricSample`), as written
  by a node's capture or an export.

The model: a detector artifact (``model``), else a detector fitted on the recording's first
``cold_start_s`` seconds exactly as the daemon does it (child processes, synchronously in the
replay, refit on the daemon's schedule), or none (``model_enabled=False``: rules only).
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.collect.sample import Sample
from agent.decide.decider import Decider, Hold, RequestApproval, StartRun
from agent.decide.guards import StateStore, record_end
from agent.decide.latest import Latest
from agent.decide.model import Playbook
from agent.decide.settings import PlaybookSettings
from agent.errors import InputError, Problem
from agent.score.settings import ModelSettings
from agent.score.stage import DETECTOR_FILE, RiskStage

NPZ_KEYS = ("keys", "X", "wall", "mono", "seq")


@dataclass(frozen=True, slots=True)
class WouldRun:
    """One decision the replay made: a dry-run start (``run``), an approval ask or a hold."""

    wall: float
    seq: int
    playbook: str
    target: str
    labels: dict[str, str]
    kind: str  # "run" | "approval" | "hold"
    reason: str  # the hold's reason; empty for runs
    inputs: dict[str, Any]  # the values that made the trigger hold
    model_version: str
    anomaly: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"wall": self.wall, "seq": self.seq, "playbook": self.playbook, "target": self.target,
                "labels": self.labels, "kind": self.kind, "reason": self.reason,
                "inputs": self.inputs, "model_version": self.model_version, "anomaly": self.anomaly}


@dataclass
class ReplayResult:
    samples: int = 0
    first_wall: float | None = None
    last_wall: float | None = None
    fits: list[tuple[int, bool, str]] = field(default_factory=list)  # (after sample, ok, version)
    decisions: list[WouldRun] = field(default_factory=list)

    @property
    def runs(self) -> list[WouldRun]:
        return [d for d in self.decisions if d.kind != "hold"]


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _npz_samples(path: Path) -> Iterator[Sample]:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError([Problem(str(path), "", f"not a readable .npz recording: {exc}")]) from None
    with z:
        missing = [k for k in NPZ_KEYS if k not in z.files]
        if missing:
            raise InputError([Problem(str(path), ",".join(missing), "missing from the recording "
                                      f"(a recording holds {', '.join(NPZ_KEYS)})")])
        keys = [str(k) for k in z["keys"]]
        x = np.asarray(z["X"], dtype=np.float64)
        wall, mono, seq = (np.asarray(z[k]) for k in ("wall", "mono", "seq"))
        packed = np.asarray(z["absent"]) if "absent" in z.files else None
    if x.ndim != 2 or x.shape[1] != len(keys) or not x.shape[0] == wall.size == mono.size == seq.size:
        raise InputError([Problem(str(path), "X", f"shape {x.shape} does not match {len(keys)} keys and "
                                  f"{wall.size} samples")])
    absent = None
    if packed is not None:  # a live recording tells a key absent from a sample from a None value
        if packed.ndim != 2 or packed.shape[0] != x.shape[0] or packed.shape[1] * 8 < x.shape[1]:
            raise InputError([Problem(str(path), "absent",
                                      f"shape {packed.shape} does not match X {x.shape}")])
        absent = np.unpackbits(packed.astype(np.uint8), axis=1, count=x.shape[1]).astype(bool)
    for i, row in enumerate(x.tolist()):
        if absent is not None:
            gone = absent[i]
            metrics = {k: (v if math.isfinite(v) else None)
                       for j, (k, v) in enumerate(zip(keys, row, strict=True)) if not gone[j]}
            yield Sample(node="replay", seq=int(seq[i]), wall=float(wall[i]), mono=float(mono[i]),
                         metrics=metrics)
            continue
        metrics = {k: (v if math.isfinite(v) else None) for k, v in zip(keys, row, strict=True)}
        yield Sample(node="replay", seq=int(seq[i]), wall=float(wall[i]), mono=float(mono[i]),
                     metrics=metrics)


LIVE_KEYS = ("live_kind", "live_playbook", "live_target", "live_wall")
#: A live decision is matched by the replayed one of the same sample: the daemon writes its audit
#: record after the sample's wall time, within the sample interval (1 s) plus the audit's fsync.
LIVE_SLACK_S = 1.9


@dataclass(frozen=True, slots=True)
class LiveDecision:
    """What the recording's live agent decided (``bench/faults/run.py --live-agent``)."""

    kind: str  # "run" | "approval"
    playbook: str
    target: str
    wall: float  # the audit record's time


def live_decisions(path: Path) -> list[LiveDecision] | None:
    """The live run's would-be actions kept in an ``.npz`` recording, or None where it has none."""
    if path.suffix != ".npz" or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if not all(k in z.files for k in LIVE_KEYS):
                return None
            cols = [np.asarray(z[k]).tolist() for k in LIVE_KEYS]
    except (OSError, ValueError) as exc:
        raise InputError([Problem(str(path), "", f"not a readable .npz recording: {exc}")]) from None
    if len({len(c) for c in cols}) != 1:
        raise InputError([Problem(str(path), ",".join(LIVE_KEYS), "the live run's columns differ in length")])
    return [LiveDecision(str(k), str(p), str(t), float(w)) for k, p, t, w in zip(*cols, strict=True)]


def compare_live(replayed: list[WouldRun], live: list[LiveDecision]) -> list[str]:
    """Where the replay's runs and approval asks differ from the live run's; empty when the same
    (same kind, playbook and target in the same order, each live record within LIVE_SLACK_S after
    the replayed sample)."""
    mine = [d for d in replayed if d.kind in ("run", "approval")]
    diffs: list[str] = []
    for i in range(max(len(mine), len(live))):
        r = mine[i] if i < len(mine) else None
        lv = live[i] if i < len(live) else None
        if r is None and lv is not None:
            diffs.append(f"#{i + 1}: live {lv.kind} {lv.target} at {lv.wall:.1f}, not in the replay")
        elif lv is None and r is not None:
            diffs.append(f"#{i + 1}: replay {r.kind} {r.target} at {r.wall:.1f}, not in the live run")
        elif r is not None and lv is not None:
            if (r.kind, r.playbook, r.target) != (lv.kind, lv.playbook, lv.target):
                diffs.append(f"#{i + 1}: replay {r.kind} {r.target}, live {lv.kind} {lv.target}")
            elif not r.wall <= lv.wall < r.wall + LIVE_SLACK_S:
                diffs.append(f"#{i + 1}: {r.target}: replay at {r.wall:.1f}, live at {lv.wall:.1f}")
    return diffs


def _jsonl_samples(path: Path) -> Iterator[Sample]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError([Problem(str(path), "", f"cannot read: {exc}")]) from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            wall, mono = _finite(rec["wall"]), _finite(rec.get("mono", rec["wall"]))
            metrics = {str(k): _finite(v) for k, v in dict(rec["metrics"]).items()}
            seq = int(rec.get("seq", n))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError([Problem(str(path), "", f"not a sample line: {exc}", n)]) from None
        if wall is None or mono is None:
            raise InputError([Problem(str(path), "wall", "wall and mono must be finite numbers", n)])
        yield Sample(node="replay", seq=seq, wall=wall, mono=mono, metrics=metrics)


def samples(path: Path) -> Iterator[Sample]:
    """The recording's samples, oldest first (``.npz`` or ``.jsonl``)."""
    if not path.is_file():
        raise InputError([Problem(str(path), "", "no such recording")])
    if path.suffix == ".npz":
        return _npz_samples(path)
    if path.suffix in (".jsonl", ".json"):
        return _jsonl_samples(path)
    raise InputError([Problem(str(path), "", "unknown recording format: use a .npz or .jsonl recording")])


class Replay:
    """A dry-run node over recorded samples: the score stage and the decider, no engine."""

    def __init__(self, playbooks: list[Playbook], *, model: Path | None = None, model_enabled: bool = True,
                 cold_start_s: float = 600.0, settings: PlaybookSettings | None = None,
                 holds: bool = False) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="heald-replay-")
        state = Path(self._tmp.name)
        if model is not None:
            (state / "models").mkdir()
            shutil.copyfile(model, state / "models" / DETECTOR_FILE)
        base = settings or PlaybookSettings()
        self.settings = PlaybookSettings(**{**{f: getattr(base, f) for f in base.__struct_fields__},
                                            "force_mode": "dry-run"})
        self.stage = RiskStage(ModelSettings(enabled=model_enabled, cold_start_s=cold_start_s), state)
        self.refit = model is None and model_enabled
        self.store = StateStore(state)
        self.latest = Latest()
        self.decider = Decider(self.settings, self.store, self.latest, "replay")
        self.decider.reload(playbooks)
        self.holds = holds
        self.result = ReplayResult()

    def close(self) -> None:
        self.stage.close()
        self._tmp.cleanup()

    def feed(self, sample: Sample) -> list[WouldRun]:
        """One sample through score and decide, as :meth:`agent.runtime.pipeline.Pipeline.process`."""
        res = self.result
        risk = self.stage.on_sample(sample)
        self.latest.take(sample, risk)
        self.decider.evaluate(sample.wall, sample.mono, {})
        out: list[WouldRun] = []
        for d in self.decider.decide(sample.wall, {}):
            if isinstance(d, StartRun):
                # the decider started this dry-run at the sample's wall time; it ends there too, as
                # a live dry-run does (Runner._finish): guards on the recording's clock
                record_end(d.playbook, self.decider.state(d.target), sample.wall, "dry-run", counts=False)
                kind, reason = "run", ""
            elif isinstance(d, RequestApproval):
                kind, reason = "approval", ""
            elif isinstance(d, Hold):
                if not self.holds:
                    continue
                kind, reason = "hold", d.reason
            out.append(WouldRun(wall=sample.wall, seq=sample.seq, playbook=d.playbook.name,
                                target=d.target.key, labels=d.target.labels, kind=kind, reason=reason,
                                inputs=_jsonable(d.match.inputs), model_version=risk.model_version,
                                anomaly=risk.anomaly))
        self.latest.evaluated()
        res.samples += 1
        res.first_wall = sample.wall if res.first_wall is None else res.first_wall
        res.last_wall = sample.wall
        res.decisions.extend(out)
        if self.refit and self.stage.refit_due():
            ok = asyncio.run(self.stage.refit())
            res.fits.append((res.samples, ok, self.stage.model_version))
        return out


def _jsonable(inputs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in dict(inputs).items():
        out[str(k)] = v if isinstance(v, (str, int, bool)) or v is None else (
            _finite(v) if isinstance(v, float) else str(v))
    return out


def replay(path: Path, playbooks: list[Playbook], **options: Any) -> ReplayResult:
    """Every would-be decision over the recording at ``path`` (see :class:`Replay` for options)."""
    node = Replay(playbooks, **options)
    try:
        for sample in samples(path):
            node.feed(sample)
        return node.result
    finally:
        node.close()
