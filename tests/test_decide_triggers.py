"""Trigger semantics: for, hysteresis, wildcard binding, events in windows, combinators, risk."""

from __future__ import annotations

import time

from playbook_kit import playbook, risk, sample, xid

from agent.decide.model import model_driven
from agent.decide.triggers import EvalContext, EventLog, SampleIndex, TriggerEvaluator
from agent.score.types import Forecast

STEPS = "steps:\n  - action: drop_caches\n"


def ev(trigger: str) -> TriggerEvaluator:
    return TriggerEvaluator(playbook(f"name: t\ndescription: d\ntrigger:\n{trigger}{STEPS}").trigger)


def ctx(
    metrics: dict[str, float | None],
    mono: float,
    *,
    log: EventLog | None = None,
    r=None,
    watermark: float = 0.0,
) -> EvalContext:
    s = sample(metrics)
    return EvalContext(SampleIndex(s), r, log or EventLog(), time.time(), mono, watermark=watermark)


def test_for_and_hysteresis() -> None:
    t = ev('  metric: "disk.used_pct[/]"\n  op: ">="\n  value: 90\n  for: 30s\n  clear_below: 85\n')
    assert not t.evaluate(ctx({"disk.used_pct[/]": 95}, 0))
    assert not t.evaluate(ctx({"disk.used_pct[/]": 95}, 29))
    m = t.evaluate(ctx({"disk.used_pct[/]": 95}, 30))
    assert m
    assert m[0].inputs == {"disk.used_pct[/]": 95}
    assert t.evaluate(ctx({"disk.used_pct[/]": 88}, 31)), "hysteresis: still holds above clear_below"
    assert t.evaluate(ctx({"disk.used_pct[/]": None}, 32)), "unreadable keeps state"
    assert not t.evaluate(ctx({"disk.used_pct[/]": 84}, 33))
    assert not t.evaluate(ctx({"disk.used_pct[/]": 95}, 34)), "for restarts after clearing"


def test_dip_resets_for_timer() -> None:
    t = ev('  metric: mem.used_pct\n  op: ">"\n  value: 90\n  for: 10s\n')
    t.evaluate(ctx({"mem.used_pct": 95}, 0))
    t.evaluate(ctx({"mem.used_pct": 80}, 5))
    assert not t.evaluate(ctx({"mem.used_pct": 95}, 11))
    assert t.evaluate(ctx({"mem.used_pct": 95}, 21))


def test_wildcard_binds_label_and_worst_wins() -> None:
    t = ev('  metric: "disk.used_pct[{mount}]"\n  op: ">="\n  value: 90\n')
    ms = t.evaluate(ctx({"disk.used_pct[/]": 50, "disk.used_pct[/var]": 93, "disk.used_pct[/data]": 99}, 0))
    assert sorted(m.bindings["mount"] for m in ms) == ["/data", "/var"]
    assert max(ms, key=lambda m: m.severity).bindings == {"mount": "/data"}
    star = ev('  metric: "disk.used_pct[*]"\n  op: ">="\n  value: 90\n')
    assert star.evaluate(ctx({"disk.used_pct[/x]": 95}, 0))[0].bindings == {"label": "/x"}


def test_all_joins_bindings_on_the_same_label() -> None:
    t = ev(
        '  all:\n    - metric: "disk.used_pct[{mount}]"\n      op: ">"\n      value: 90\n'
        '    - metric: "disk.inodes_used_pct[{mount}]"\n      op: ">"\n      value: 50\n'
    )
    ms = t.evaluate(
        ctx(
            {
                "disk.used_pct[/a]": 95,
                "disk.inodes_used_pct[/a]": 10,
                "disk.used_pct[/b]": 95,
                "disk.inodes_used_pct[/b]": 60,
            },
            0,
        )
    )
    assert [m.bindings for m in ms] == [{"mount": "/b"}]


def test_any_and_absent_metric() -> None:
    t = ev(
        '  any:\n    - metric: mem.used_pct\n      op: ">"\n      value: 90\n'
        '    - metric: "psi.some_avg10_pct[memory]"\n      op: ">"\n      value: 20\n'
    )
    assert not t.evaluate(ctx({}, 0))
    assert t.evaluate(ctx({"psi.some_avg10_pct[memory]": 30}, 1))


def test_xid_buckets_window_and_flood_of_45_ignored() -> None:
    t = ev(
        "  event: gpu.xid\n  values: [48, 63, 64, 74, 79, 94, 95]\n  ignore_values: [45]\n"
        '  count: 1\n  within: 10m\n  labels: {gpu: "{gpu}"}\n'
    )
    log = EventLog()
    now = time.time()
    log.add([xid(45, wall=now - i * 0.001) for i in range(5000)], now)
    assert not t.evaluate(ctx({}, 0, log=log))
    log.add([xid(79, gpu="3", wall=now - 700)], now)  # outside the 10 minute window
    assert not t.evaluate(ctx({}, 0, log=log))
    log.add([xid(79, gpu="3", wall=now)], now)
    ms = t.evaluate(ctx({}, 0, log=log))
    assert [m.bindings for m in ms] == [{"gpu": "3"}]
    assert ms[0].inputs["event[gpu.xid].values"] == ["79"]
    assert not t.evaluate(ctx({}, 0, log=log, watermark=now)), "events a run handled are not counted again"


def test_event_count_threshold_and_dedupe() -> None:
    t = ev("  event: mem.oom_kill\n  count: 3\n  within: 1m\n")
    log = EventLog()
    e = xid(1)
    oom = type(e)(kind="mem.oom_kill", source="memory", wall=time.time())
    log.add([oom, oom, oom], time.time())  # the same event seen in three samples counts once
    assert not t.evaluate(ctx({}, 0, log=log))
    log.add(
        [type(e)(kind="mem.oom_kill", source="memory", wall=time.time() + i) for i in range(1, 3)],
        time.time(),
    )
    assert t.evaluate(ctx({}, 0, log=log))


def test_risk_failure_forecast_and_model_driven() -> None:
    t = ev(
        "  any:\n    - risk: anomaly\n      above: 1.5\n    - failure: disk_full\n      above: 0.8\n"
        '    - forecast: "disk.used_bytes[{mount}]"\n      eta_below: 15m\n'
    )
    assert model_driven(t.condition)
    assert not t.evaluate(ctx({}, 0, r=risk(anomaly=1.0)))
    assert t.evaluate(ctx({}, 0, r=risk(anomaly=2.0)))
    assert t.evaluate(ctx({}, 0, r=risk(failure={"disk_full": 0.9})))
    f = Forecast(resource="disk.used_bytes[/var]", eta_s=600, confidence=0.9, rate_per_s=1e6)
    ms = t.evaluate(ctx({}, 0, r=risk(forecasts=[f])))
    assert ms[0].bindings == {"mount": "/var"}
    low = Forecast(resource="disk.used_bytes[/var]", eta_s=600, confidence=0.1, rate_per_s=1e6)
    assert not t.evaluate(ctx({}, 0, r=risk(forecasts=[low])))
    assert not t.evaluate(ctx({}, 0, r=None))


def test_yaml_off_is_a_string_mode() -> None:
    pb = playbook(
        "name: t\ndescription: d\nmode: off\ntrigger: {metric: mem.used_pct, op: '>', value: 1}\n" + STEPS
    )
    assert pb.mode == "off"
