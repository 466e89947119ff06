"""The decider's per-sample shortcuts give the same matches as evaluating every trigger in full.

``Decider.evaluate`` skips a trigger whose metric families, forecasts and event kinds are all
absent (and which holds no timer), gathers a family's values only when a trigger reads it (a
``KeyPlan`` kept while the sample's keys stay the same) and shares one context per sample. Here
the shipped playbooks plus a few with ``for`` timers run over a live recording (host3: a disk
fills, processes and mounts come and go, forecasts move) with families and events injected on and
off, next to a fresh evaluator per playbook evaluated in full on a plain index: every sample, every
playbook, the matches must be equal.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import msgspec
import pytest
from playbook_kit import playbook, xid

from agent.collect.sample import Event, Sample
from agent.decide.decider import Decider
from agent.decide.guards import StateStore
from agent.decide.latest import Latest
from agent.decide.loader import load_playbooks
from agent.decide.replay import samples
from agent.decide.settings import PlaybookSettings
from agent.decide.triggers import EvalContext, EventLog, KeyPlan, SampleIndex, TriggerEvaluator, reads
from agent.score.settings import ModelSettings
from agent.score.stage import RiskStage

ROOT = Path(__file__).resolve().parents[1]
HOST3 = ROOT / "bench" / "faults" / "data" / "host3.npz"
STEPS = "steps:\n  - action: drop_caches\n"

EXTRA = [
    # a for timer on a family that comes and goes
    ("name: auth-for\ndescription: d\ntrigger:\n  metric: \"sec.auth_failures[{src}]\"\n  op: \">=\"\n"
    "  value: 3\n  for: 3s\n"),
    # hysteresis on a wildcard whose labels change
    ("name: zombies-hyst\ndescription: d\ntrigger:\n  metric: \"proc.zombies\"\n  op: \">=\"\n  value: 0\n"
    "  clear_below: -1\n"),
    # all: one item on an absent family, one on a present one with a timer
    ("name: all-mixed\ndescription: d\ntrigger:\n  all:\n    - metric: \"gpu.temp_c[{gpu}]\"\n"
    "      op: \">\"\n      value: 1\n    - metric: \"cpu.util_pct\"\n      op: \">=\"\n      value: 0\n"
    "      for: 5s\n"),
    # events, counted in a window
    "name: xid-any\ndescription: d\ntrigger:\n  event: gpu.xid\n  within: 20s\n",
]


def _stream() -> list[tuple[Sample, list[Event]]]:
    out = []
    for i, s in enumerate(itertools.islice(samples(HOST3), 500)):
        metrics = dict(s.metrics)
        if 100 <= i < 160 or 300 <= i < 305:  # a source failing, then gone; a blip shorter than for
            metrics[f"sec.auth_failures[10.0.0.{i % 3}]"] = float(i % 7)
        if 200 <= i < 260:  # all-mixed's absent item appears: its other item's timer ran all along
            metrics["gpu.temp_c[0]"] = 70.0
        events = [xid(79, wall=s.wall)] if i in (120, 121, 400) else []
        out.append((msgspec.structs.replace(s, metrics=metrics, events=tuple(events)), events))
    return out


@pytest.mark.skipif(not HOST3.exists(), reason="bench/faults/data/host3.npz is not in this checkout")
def test_skips_and_lazy_index_give_the_full_evaluation_matches(tmp_path: Path) -> None:
    pbs = load_playbooks(PlaybookSettings(dirs=(), load_shipped=True)) + [playbook(t + STEPS) for t in EXTRA]
    settings = PlaybookSettings(dirs=(), force_mode="dry-run")
    latest = Latest()
    decider = Decider(settings, StateStore(tmp_path), latest, "n1")
    decider.reload(pbs)
    full = {p.name: TriggerEvaluator(p.trigger) for p in pbs}
    full_log = EventLog()
    stage = RiskStage(ModelSettings(enabled=True), tmp_path / "model", history=False)
    skipped = fired = 0
    for s, events in _stream():
        r = stage.on_sample(s)
        latest.take(s, r)
        decider.evaluate(s.wall, s.mono, {})
        latest.evaluated()
        full_log.add(events, s.wall)
        for p in pbs:
            ctx = EvalContext(SampleIndex(s), r, full_log, s.wall, s.mono,
                              cleanable_mounts=decider.context(s.wall, s.mono).cleanable_mounts)
            want = full[p.name].evaluate(ctx)
            assert latest.matches[p.name] == want, (p.name, s.seq)
            fired += bool(want)
        forecasts = {f.resource.split("[")[0] for f in r.forecasts}
        skipped += sum(ev.idle(latest.index, forecasts, latest.events) for ev in decider._evaluators.values())
    assert fired > 100  # the comparison saw triggers hold (disk, zombies, auth, xid, all-mixed)
    assert skipped > 1000  # ... and triggers skipped


def test_reads_names_what_a_trigger_reads_or_none() -> None:
    t = playbook("name: a\ndescription: d\ntrigger:\n  any:\n    - metric: \"disk.used_pct[{mount}]\"\n"
                 "      op: \">\"\n      value: 1\n    - event: gpu.xid\n" + STEPS).trigger
    r = reads(t)
    assert r is not None
    assert (r.metrics, r.events) == ({"disk.used_pct"}, {"gpu.xid"})
    risky = playbook("name: b\ndescription: d\ntrigger:\n  all:\n    - risk: anomaly\n      above: 1\n"
                     "    - metric: \"cpu.util_pct\"\n      op: \">\"\n      value: 1\n" + STEPS).trigger
    assert reads(risky) is None  # the risk has a timer of its own: never skipped


def test_key_plan_follows_the_keys() -> None:
    plan = KeyPlan()
    a = Sample(node="n", seq=1, wall=0.0, mono=0.0, metrics={"disk.used_pct[/]": 1.0, "cpu.util_pct": 2.0})
    assert SampleIndex(a, plan).family("disk.used_pct") == [("/", 1.0)]
    b = msgspec.structs.replace(a, metrics={"disk.used_pct[/]": 3.0, "cpu.util_pct": 2.0})
    assert SampleIndex(b, plan).family("disk.used_pct") == [("/", 3.0)]  # same keys: new values
    c = msgspec.structs.replace(a, metrics={"disk.used_pct[/]": 3.0, "disk.used_pct[/var]": 4.0})
    idx = SampleIndex(c, plan)
    assert idx.family("disk.used_pct") == [("/", 3.0), ("/var", 4.0)]
    assert not idx.has("cpu.util_pct")
    assert idx.family("cpu.util_pct") == []
    assert idx.families == {"disk.used_pct": [("/", 3.0), ("/var", 4.0)]}
