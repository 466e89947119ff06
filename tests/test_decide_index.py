"""The decider's per-sample shortcuts give the same matches as evaluating every trigger in full.

``Decider.evaluate`` skips a trigger none of whose metrics and forecasts holds its condition,
whose event kinds are absent, and which holds no timer (``TriggerEvaluator.quiet``), gathers a
family's values only when a trigger reads it (a ``KeyPlan`` patched for the families whose keys
came or went) and shares one context per sample. Here
the shipped playbooks plus a few with ``for`` timers run over a live recording (host3: a disk
fills, processes and mounts come and go, forecasts move) with families and events injected on and
off, next to a fresh evaluator per playbook evaluated in full on a plain index: every sample, every
playbook, the matches must be equal. Then the same for any tree of metric and forecast leaves
over any values (Hypothesis), and the patched key plan against one made afresh.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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
from agent.score.types import Forecast, Risk

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
        forecasts: dict[str, list[Forecast]] = {}
        for f in r.forecasts:
            forecasts.setdefault(f.resource.split("[")[0], []).append(f)
        skipped += sum(ev.quiet(latest.index, forecasts, latest.events)
                       for ev in decider._evaluators.values())
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


# --------------------------------------------------------------------------- quiet: any trees, any values

_VALUES = st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.0, 5.0, -1.0]),
                    st.floats(allow_nan=True, allow_infinity=True, width=32))


@st.composite
def _leaf(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 3)) == 0:  # a forecast leaf
        key = draw(st.sampled_from(['"f.x[{m}]"', '"f.x[/]"', '"f.y"']))
        return (f"forecast: {key}\n  eta_below: {draw(st.sampled_from([10, 60]))}s\n"
                f"  min_confidence: {draw(st.sampled_from([0.3, 0.6]))}")
    key = draw(st.sampled_from(['"m.a[{x}]"', '"m.a[one]"', '"m.b"', '"m.c[{y}]"']))
    op = draw(st.sampled_from([">", ">=", "<", "<=", "==", "!="]))
    value = draw(st.sampled_from([0, 1, 2]))
    extra = ""
    if draw(st.booleans()):
        extra += f"\n  for: {draw(st.sampled_from([1, 2, 4]))}s"
    hyst = draw(st.sampled_from(["", "clear_below", "clear_above"]))
    if hyst and op in (">", ">=") and hyst == "clear_below":
        extra += f"\n  clear_below: {value - 1}"
    elif hyst and op in ("<", "<=") and hyst == "clear_above":
        extra += f"\n  clear_above: {value + 1}"
    return f"metric: {key}\n  op: \"{op}\"\n  value: {value}{extra}"


@st.composite
def _trigger(draw: st.DrawFn) -> str:
    leaves = draw(st.lists(_leaf(), min_size=1, max_size=3))
    if len(leaves) == 1:
        return "trigger:\n  " + leaves[0] + "\n"
    kind = draw(st.sampled_from(["all", "any"]))
    items = "".join("    - " + leaf.replace("\n  ", "\n      ") + "\n" for leaf in leaves)
    return f"trigger:\n  {kind}:\n{items}"


@st.composite
def _metrics(draw: st.DrawFn) -> dict[str, float | None]:
    m: dict[str, float | None] = {}
    for k in ("m.a[one]", "m.a[two]", "m.b", "m.c[p]", "m.c[q]", "other"):
        if draw(st.integers(0, 4)):  # mostly present; keys come and go
            m[k] = draw(_VALUES)
    return m


_FORECASTS = st.lists(st.builds(
    Forecast, resource=st.sampled_from(["f.x[/]", "f.x[/var]", "f.y", "f.z"]),
    eta_s=st.one_of(st.none(), st.sampled_from([0.0, 5.0, 10.0, 30.0, 60.0, 1e9])),
    confidence=st.sampled_from([0.0, 0.3, 0.5, 0.6, 1.0]), rate_per_s=st.just(1.0)), max_size=4)


@settings(max_examples=300, deadline=None)
@given(_trigger(), st.lists(st.tuples(_metrics(), _FORECASTS), min_size=1, max_size=25))
def test_a_quiet_skip_gives_the_full_evaluations_matches_for_any_tree_and_values(
        trigger: str, stream: list[tuple[dict[str, float | None], list[Forecast]]]) -> None:
    _quiet_equals_full(trigger, stream)


@pytest.mark.parametrize("op", [">", ">=", "<", "<=", "==", "!="])
@pytest.mark.parametrize("values", [(0.0, 5.0), (5.0, 0.0), (math.nan, 5.0), (math.nan, -3.0),
                                    (-3.0, math.nan), (1.0, math.inf), (-math.inf, 1.0), (None, 2.0),
                                    (math.nan, math.nan)])
def test_a_quiet_skip_reads_every_label_of_a_family(op: str,
                                                    values: tuple[float | None, float | None]) -> None:
    """One label beyond the line is enough, wherever it sits among the others and whatever NaN
    (holds no comparison), None or infinity sits beside it: the quiet check compares the family's
    least and greatest values for an ordering and every value for == and !=."""
    trigger = f'trigger:\n  metric: "m.a[{{x}}]"\n  op: "{op}"\n  value: 1\n'
    _quiet_equals_full(trigger, [({"m.a[one]": values[0], "m.a[two]": values[1]}, [])])


def _quiet_equals_full(trigger: str, stream: list[tuple[dict[str, float | None], list[Forecast]]]) -> None:
    pb = playbook("name: t\ndescription: d\n" + trigger + STEPS)
    skipping, full = TriggerEvaluator(pb.trigger), TriggerEvaluator(pb.trigger)
    log, plan = EventLog(), KeyPlan()
    for i, (metrics, fcs) in enumerate(stream):
        s = Sample(node="n", seq=i, wall=1000.0 + i, mono=float(i), metrics=metrics)
        risk = Risk(seq=i, wall=s.wall, anomaly=None, alert=False, cold=True, model_version="-",
                    forecasts=tuple(fcs))
        by_family: dict[str, list[Forecast]] = {}
        for f in fcs:
            by_family.setdefault(f.resource.split("[")[0], []).append(f)
        ctx = EvalContext(SampleIndex(s, plan), risk, log, s.wall, s.mono)
        got = [] if skipping.quiet(ctx.index, by_family, log) else skipping.evaluate(ctx)
        want = full.evaluate(EvalContext(SampleIndex(s), risk, log, s.wall, s.mono))
        assert got == want, (i, metrics, fcs)


_PLAN_KEYS = [f"{fam}[{label}]" for fam in ("a", "b", "c") for label in ("x", "y", "z", "/")] + ["d", "e.f"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_PLAN_KEYS), unique=True), min_size=1, max_size=20))
def test_a_key_plan_patched_as_keys_come_and_go_is_the_plan_made_afresh(stream: list[list[str]]) -> None:
    """Keys come and go a few at a time or all at once (each sample holds its keys in one global
    order, as the collectors write them): the patched plan equals one made from that sample alone,
    and a plan handed out before is never changed."""
    plan = KeyPlan()
    handed: list[tuple[dict[str, list[tuple[str | None, str]]], dict[str, list[tuple[str | None, str]]]]] = []
    for keys in stream:
        metrics: dict[str, float | None] = dict.fromkeys(sorted(keys, key=_PLAN_KEYS.index), 1.0)
        got = plan.update(metrics)
        assert got == KeyPlan().update(metrics)
        handed.append((got, {f: list(e) for f, e in got.items()}))
    for got, copy in handed:
        assert got == copy
