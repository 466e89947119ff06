"""Validation at the wire (issue 18, item 1), on both sides.

The decoder rejects, with a WireError naming the field, every NaN or infinity, every string,
list and map over its bound, in every message kind; the agent's builders turn hostile but valid
input (NaN metrics, infinite forecasts, huge strings, maps and ints from a collector or the
engine) into messages that decode; and the reporter never queues a message its coordinator
would reject (dropped, counted, logged once per streak).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_report_build import submitted
from test_wire_codec import MESSAGES

from agent import wire
from agent.collect.sample import Event as SampleEvent
from agent.collect.sample import Sample
from agent.report import build
from agent.report.settings import MqttSettings
from agent.report.transport import Reporter
from agent.score.types import Contribution, Forecast
from agent.score.types import Risk as ScoreRisk
from agent.wire.messages import Finite

NON_FINITE = [math.nan, math.inf, -math.inf]
BIG = 1 << 30  # a coordinator configured with a huge max_payload_bytes: the bounds still hold


def test_msgspec_bounds_reject_nan_and_infinities() -> None:
    """The ``ge``/``le`` constraints are what rejects NaN and the infinities (a NaN compares false)."""
    dec = msgspec.msgpack.Decoder(Finite)
    for bad in NON_FINITE:
        with pytest.raises(msgspec.ValidationError):
            dec.decode(msgpack.packb(bad))
    for ok in (0.0, -0.0, 5e-324, -wire.MAX_FLOAT, wire.MAX_FLOAT, 2**64 - 1, -(2**63)):
        assert dec.decode(msgpack.packb(ok)) == float(ok)
    assert msgspec.json.Decoder(Finite).decode(b"1e308") == 1e308
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.Decoder(Finite).decode(b"1e309")  # JSON's way to say infinity


# ------------------------------------------------------------------ hostile mutations of valid messages
Doc = dict[str, Any]
Mutation = Callable[[Doc, Any], str]  # sets a hostile value in the doc; returns the path the error names


def _sample(doc: Doc) -> Doc:
    if not doc.get("samples"):
        doc["samples"] = [{"seq": 1, "wall": 1.0, "mono": 1.0, "metrics": {}}]
    sample: Doc = doc["samples"][0]
    return sample


def _first(doc: Doc, field: str, base: Doc) -> Doc:
    if not doc.get(field):
        doc[field] = [dict(base)]
    item: Doc = doc[field][0]
    return item


_CONTRIBUTION = {"feature": "f", "share": 0.5}
_FORECAST = {"resource": "disk", "eta_s": 1.0, "confidence": 0.5, "rate_per_s": 1.0}


def set_(field: str) -> Mutation:
    def mutate(doc: Doc, value: Any) -> str:
        doc[field] = value
        return f"`$.{field}`"
    return mutate


def in_map(field: str) -> Mutation:
    def mutate(doc: Doc, value: Any) -> str:
        doc.setdefault(field, {})["k"] = value
        return f"`$.{field}[...]`"
    return mutate


def sample_field(field: str) -> Mutation:
    def mutate(doc: Doc, value: Any) -> str:
        _sample(doc)[field] = value
        return f"`$.samples[0].{field}`"
    return mutate


def sample_metric(doc: Doc, value: Any) -> str:
    _sample(doc)["metrics"]["cpu.util_pct"] = value
    return "`$.samples[0].metrics[...]`"


def contribution_share(doc: Doc, value: Any) -> str:
    _first(doc, "explanation", _CONTRIBUTION)["share"] = value
    return "`$.explanation[0].share`"


def forecast_field(field: str) -> Mutation:
    def mutate(doc: Doc, value: Any) -> str:
        _first(doc, "forecasts", _FORECAST)[field] = value
        return f"`$.forecasts[0].{field}`"
    return mutate


def in_list_in_map(field: str) -> Mutation:
    def mutate(doc: Doc, value: Any) -> str:
        doc.setdefault(field, {})["k"] = [1, value]
        return f"`$.{field}[...][1]`"
    return mutate


ENVELOPE_FLOATS: list[Mutation] = [set_("ts"), set_("mono")]
#: Every float field of every kind (envelope floats apply to all).
FLOATS: dict[str, list[Mutation]] = {
    "birth": [set_("boot_ts")],
    "status": [],
    "metrics": [sample_field("wall"), sample_field("mono"), sample_metric],
    "risk": [set_("anomaly"), contribution_share, in_map("failure"), forecast_field("eta_s"),
             forecast_field("confidence"), forecast_field("rate_per_s")],
    "event": [set_("wall"), set_("value")],
    "action": [set_("duration_s"), in_map("result"), in_list_in_map("result")],
    "command": [set_("issued_at"), set_("expires_at"), in_map("args"), in_list_in_map("args")],
    "command_ack": [in_map("result"), in_list_in_map("result")],
    "cost": [set_(f) for f in ("start", "end", "money", "seconds", "core_h", "idle_core_h",
                               "cores_under_line_h", "gpu_h", "idle_gpu_h", "gpu_mem_idle_gib_h",
                               "mem_stranded_gib_h", "energy_kwh")],
}


def long_string(field: str, limit: int) -> tuple[Mutation, int]:
    return set_(field), limit


def key_in(field: str) -> Mutation:
    def mutate(doc: Doc, value: Any) -> str:
        doc.setdefault(field, {})[value] = "v"
        return f"`key` in `$.{field}`"
    return mutate


def item_in(field: str) -> Mutation:
    def mutate(doc: Doc, value: Any) -> str:
        doc.setdefault(field, []).append(value)
        return f"`$.{field}[{len(doc[field]) - 1}]`"
    return mutate


def metric_key(doc: Doc, value: Any) -> str:
    _sample(doc)["metrics"][value] = 1.0
    return "`key` in `$.samples[0].metrics`"


def feature(doc: Doc, value: Any) -> str:
    _first(doc, "explanation", _CONTRIBUTION)["feature"] = value
    return "`$.explanation[0].feature`"


def resource(doc: Doc, value: Any) -> str:
    _first(doc, "forecasts", _FORECAST)["resource"] = value
    return "`$.forecasts[0].resource`"


def label_value(field: str) -> Mutation:
    def mutate(doc: Doc, value: Any) -> str:
        doc.setdefault(field, {})["k"] = value
        return f"`$.{field}[...]`"
    return mutate


#: Every string of every kind, with its bound.
STRINGS: dict[str, list[tuple[Mutation, int]]] = {
    "birth": [(set_("agent_version"), wire.MAX_TEXT), (set_("model_version"), wire.MAX_TEXT),
              (set_("hostname"), wire.MAX_TEXT), (key_in("labels"), wire.MAX_KEY),
              (label_value("labels"), wire.MAX_TEXT), (item_in("collectors"), wire.MAX_KEY),
              (item_in("capabilities"), wire.MAX_KEY)],
    "status": [(set_("reason"), wire.MAX_TEXT)],
    "metrics": [(metric_key, wire.MAX_KEY)],
    "risk": [(set_("model_version"), wire.MAX_TEXT), (feature, wire.MAX_KEY),
             (key_in("failure"), wire.MAX_KEY), (resource, wire.MAX_KEY)],
    "event": [(set_("name"), wire.MAX_NAME), (set_("source"), wire.MAX_TEXT),
              (set_("message"), wire.MAX_TEXT), (key_in("labels"), wire.MAX_KEY),
              (label_value("labels"), wire.MAX_TEXT)],
    "action": [(set_("run_id"), wire.MAX_NAME), (set_("playbook"), wire.MAX_NAME),
               (set_("step"), wire.MAX_TEXT), (set_("action"), wire.MAX_TEXT), (set_("error"), wire.MAX_TEXT),
               (key_in("result"), wire.MAX_KEY), (label_value("result"), wire.MAX_TEXT)],
    "command": [(set_("id"), wire.MAX_NAME), (set_("issuer"), wire.MAX_TEXT), (set_("name"), wire.MAX_NAME),
                (key_in("args"), wire.MAX_KEY), (label_value("args"), wire.MAX_TEXT)],
    "command_ack": [(set_("command_id"), wire.MAX_NAME), (set_("message"), wire.MAX_TEXT),
                    (key_in("result"), wire.MAX_KEY), (label_value("result"), wire.MAX_TEXT)],
    "cost": [(set_("node_class"), 64), (set_("currency"), 16)],
}


def to_doc(message: wire.Envelope) -> Doc:
    doc: Doc = msgspec.to_builtins(message, builtin_types=(bytes,))
    return doc


def rejected(doc: Doc, max_bytes: int = BIG) -> wire.WireError:
    with pytest.raises(wire.WireError) as err:
        wire.decode(msgpack.packb(doc), max_bytes=max_bytes)
    return err.value


def test_every_kind_has_its_hostile_cases() -> None:
    assert set(FLOATS) == set(STRINGS) == set(wire.KINDS)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_non_finite_floats_are_rejected_naming_the_field(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(sorted(wire.KINDS)))
    message = data.draw(MESSAGES[wire.KINDS[kind]])
    mutate = data.draw(st.sampled_from(ENVELOPE_FLOATS + FLOATS[kind]))
    doc = to_doc(message)
    path = mutate(doc, data.draw(st.sampled_from(NON_FINITE)))
    err = rejected(doc)
    assert isinstance(err, wire.WireDecodeError)
    assert path in str(err), str(err)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_oversized_strings_are_rejected_naming_the_field(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(sorted(wire.KINDS)))
    message = data.draw(MESSAGES[wire.KINDS[kind]])
    mutate, limit = data.draw(st.sampled_from(STRINGS[kind]))
    doc = to_doc(message)
    over = data.draw(st.integers(limit + 1, limit + 5000))
    path = mutate(doc, data.draw(st.sampled_from("xé€😀")) * over)
    err = rejected(doc)
    assert isinstance(err, wire.WireDecodeError)
    assert path in str(err), str(err)
    assert f"length <= {limit}" in str(err)


def test_a_10_mb_string_is_refused_before_decoding_and_by_its_bound() -> None:
    doc = to_doc(wire.Event(v=1, node="n1", site="s1", seq=1, ts=1.0, name="x", source="s", wall=1.0))
    doc["message"] = "x" * 10_000_000
    assert isinstance(rejected(doc, wire.DEFAULT_MAX_BYTES), wire.WireTooLarge)
    assert "`$.message`" in str(rejected(doc))


def base(kind: str) -> wire.Envelope:
    """A small valid message of ``kind``."""
    env: Doc = {"v": 1, "node": "n1", "site": "s1", "seq": 1, "ts": 1.0}
    messages: dict[str, wire.Envelope] = {
        "birth": wire.Birth(**env, bdseq=1, agent_version="1"),
        "status": wire.Status(**env, state="online", bdseq=1),
        "metrics": wire.Metrics(**env, samples=[]),
        "risk": wire.Risk(**env, sample_seq=1, anomaly=None, alert=False, cold=True, model_version=""),
        "event": wire.Event(**env, name="x", source="s", wall=1.0),
        "action": wire.Action(**env, phase="started", run_id="r", playbook="p", step="s", action="a",
                              dry_run=True),
        "command": wire.Command(**env, id="c", issued_at=1.0, expires_at=2.0, nonce=b"n", name="run"),
        "command_ack": wire.CommandAck(**env, command_id="c", status="done"),
        "cost": wire.Cost(**env, start=1.0, end=2.0),
    }
    return messages[kind]


HUGE_CONTAINERS: list[tuple[str, Callable[[Doc], None], str]] = [
    ("birth", lambda d: d.update(labels={str(i): "" for i in range(wire.MAX_LABELS + 1)}), "`$.labels`"),
    ("birth", lambda d: d.update(collectors=[""] * (wire.MAX_ITEMS + 1)), "`$.collectors`"),
    ("birth", lambda d: d.update(capabilities=[""] * (wire.MAX_ITEMS + 1)), "`$.capabilities`"),
    ("metrics", lambda d: d.update(samples=[{"seq": 1, "wall": 1.0, "mono": 1.0, "metrics": {}}]
                                   * (wire.MAX_SAMPLES + 1)), "`$.samples`"),
    ("metrics", lambda d: d.update(samples=[{"seq": 1, "wall": 1.0, "mono": 1.0, "metrics": {
        str(i): None for i in range(wire.MAX_METRICS + 1)}}]), "`$.samples[0].metrics`"),
    ("risk", lambda d: d.update(explanation=[_CONTRIBUTION] * (wire.MAX_ITEMS + 1)), "`$.explanation`"),
    ("risk", lambda d: d.update(failure={str(i): 0.0 for i in range(wire.MAX_ITEMS + 1)}), "`$.failure`"),
    ("risk", lambda d: d.update(forecasts=[_FORECAST] * (wire.MAX_ITEMS + 1)), "`$.forecasts`"),
    ("event", lambda d: d.update(labels={str(i): "" for i in range(wire.MAX_LABELS + 1)}), "`$.labels`"),
    ("action", lambda d: d.update(result={str(i): 1 for i in range(wire.MAX_ARGS + 1)}), "`$.result`"),
    ("action", lambda d: d.update(result={"k": [1] * (wire.MAX_ARGS + 1)}), "`$.result[...]`"),
    ("command", lambda d: d.update(args={str(i): 1 for i in range(wire.MAX_ARGS + 1)}), "`$.args`"),
    ("command_ack", lambda d: d.update(result={"k": [None] * (wire.MAX_ARGS + 1)}), "`$.result[...]`"),
]


@pytest.mark.parametrize(("kind", "grow", "path"), HUGE_CONTAINERS,
                         ids=[f"{k}-{p}" for k, _, p in HUGE_CONTAINERS])
def test_huge_maps_and_lists_are_rejected_naming_the_field(kind: str, grow: Callable[[Doc], None],
                                                           path: str) -> None:
    doc = to_doc(base(kind))
    grow(doc)
    err = rejected(doc)
    assert isinstance(err, wire.WireDecodeError)
    assert path in str(err), str(err)
    assert "length <=" in str(err)


@pytest.mark.parametrize(("field", "value"), [
    ("ts", -1.0), ("ts", wire.MAX_WALL * 2), ("wall", -0.5), ("wall", 1e300),
])
def test_timestamps_are_on_the_wall_clock(field: str, value: float) -> None:
    doc = to_doc(wire.Event(v=1, node="n1", site="s1", seq=1, ts=1.0, name="x", source="s", wall=1.0))
    doc[field] = value
    assert f"`$.{field}`" in str(rejected(doc))


@pytest.mark.parametrize("field", ["bdseq", "spool_pending", "dropped_metrics", "dropped_other"])
def test_counters_fit_the_stores_bigint(field: str) -> None:
    doc = to_doc(wire.Status(v=1, node="n1", site="s1", seq=1, ts=1.0, state="online", bdseq=1))
    doc[field] = 2**63  # valid msgpack (uint64), but no database column takes it
    assert f"`$.{field}`" in str(rejected(doc))
    doc[field] = 2**63 - 1
    assert wire.decode(msgpack.packb(doc)) is not None


def test_a_nan_error_says_finite() -> None:
    doc = to_doc(wire.Event(v=1, node="n1", site="s1", seq=1, ts=1.0, name="x", source="s", wall=1.0))
    doc["value"] = math.nan
    assert str(rejected(doc)) == ("invalid event message: Expected a finite `float` (not NaN or infinite)"
                                  " - at `$.value`")


# ------------------------------------------------------------------ the agent's builders, hostile input
hostile_floats = st.floats() | st.integers(-(2**70), 2**70).map(float) | st.sampled_from(NON_FINITE)
maybe_floats = st.none() | hostile_floats
hostile_text = st.text(max_size=20) | st.integers(0, 9000).map(lambda n: "é" * n)
hostile_keys = st.text(max_size=12) | st.integers(1000, 1100).map(lambda n: "k" * n)


@st.composite
def samples(draw: st.DrawFn) -> Sample:
    metrics = draw(st.dictionaries(hostile_keys, maybe_floats, max_size=20))
    if draw(st.booleans()):
        metrics.update({f"many[{i}]": float(i) for i in range(draw(st.integers(0, wire.MAX_METRICS + 10)))})
    return Sample(node="n1", seq=draw(st.integers(0, 2**63 - 1)), wall=draw(hostile_floats),
                  mono=draw(hostile_floats), metrics=metrics)


sample_events = st.builds(
    SampleEvent, kind=hostile_text, source=hostile_text, wall=hostile_floats,
    labels=st.dictionaries(hostile_keys, hostile_text, max_size=5)
    | st.integers(0, 400).map(lambda n: {str(i): "v" for i in range(n)}),
    value=maybe_floats, message=hostile_text)
score_risks = st.builds(
    ScoreRisk, seq=st.integers(0, 2**63 - 1), wall=hostile_floats, anomaly=maybe_floats, alert=st.booleans(),
    cold=st.booleans(), model_version=hostile_text,
    explanation=st.lists(st.builds(Contribution, hostile_keys, hostile_floats), max_size=5).map(tuple),
    failure=st.dictionaries(hostile_keys, hostile_floats, max_size=5),
    forecasts=st.lists(st.builds(Forecast, resource=hostile_keys, eta_s=maybe_floats,
                                 confidence=hostile_floats, rate_per_s=hostile_floats),
                       max_size=5).map(tuple))
record_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | hostile_floats | hostile_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_keys, inner, max_size=3),
    max_leaves=12)
#: The engine's audit records: any values (flat_args takes anything).
records = st.dictionaries(st.sampled_from(["type", "playbook", "run_id", "status", "ok", "step", "action",
                                           "detail", "duration_s", "bindings", "extra"]) | hostile_keys,
                          record_values, max_size=10)
#: The engine's events for humans: their documented fields, with hostile values.
engine_events = st.fixed_dictionaries({}, optional={
    "kind": hostile_text | st.just("playbook.approval_requested"), "playbook": hostile_text,
    "run_id": hostile_text, "severity": hostile_text, "node": hostile_text, "action": hostile_text,
    "message": hostile_text, "wall": hostile_floats,
    "labels": st.dictionaries(hostile_keys, hostile_text, max_size=4)
    | st.integers(0, 400).map(lambda n: {str(i): "v" for i in range(n)}),
})


def stamped(message: wire.Envelope) -> wire.Envelope:
    """The envelope the reporter stamps (node, site, seq)."""
    return msgspec.structs.replace(message, node="n1", site="s1", seq=7)


def decodes(message: wire.Envelope) -> wire.Message:
    out = wire.decode(wire.encode(stamped(message)), max_bytes=BIG)
    assert isinstance(out, type(message))
    return out


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(samples(), min_size=1, max_size=3))
def test_metrics_from_hostile_samples_decode(batch: list[Sample]) -> None:
    out = decodes(build.metrics(batch))
    assert isinstance(out, wire.Metrics)
    for got, s in zip(out.samples, batch, strict=True):
        assert len(got.metrics) <= wire.MAX_METRICS
        for k, v in got.metrics.items():
            original = s.metrics[k]
            if original is not None and math.isfinite(original):
                assert v == original  # a finite value is carried as it is
            else:
                assert v is None  # NaN and the infinities are "could not read"


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(sample_events)
def test_events_from_hostile_collector_events_decode(event: SampleEvent) -> None:
    out = decodes(build.event(event))
    assert isinstance(out, wire.Event)
    if event.value is not None and math.isfinite(event.value):
        assert out.value == event.value
    else:
        assert out.value is None


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(score_risks)
def test_risk_from_hostile_scores_decodes(risk: ScoreRisk) -> None:
    decodes(build.risk(risk))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(records, engine_events)
def test_engine_records_and_events_decode(record: dict[str, Any], event: dict[str, Any]) -> None:
    decodes(build.playbook_record(record))
    decodes(build.playbook_event(event))


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_text, hostile_text, hostile_text, st.dictionaries(hostile_keys, record_values, max_size=5),
       maybe_floats)
def test_action_ack_and_report_event_builders_decode(text: str, other: str, name: str, result: dict[str, Any],
                                                      number: float | None) -> None:
    decodes(build.action(phase="finished", run_id=name, playbook=name, step=text, action=other, dry_run=True,
                         outcome="ok", result=build.flat_args(result), error=text, duration_s=number))
    decodes(build.command_ack(name, "done", message=text, result=build.flat_args(result)))
    decodes(build.report_event(name, value=number, message=text, labels={other: text}))


# ------------------------------------------------------------ the reporter sends nothing that is rejected
def test_reporter_drops_counts_and_logs_once_per_streak_what_would_be_rejected(tmp_path: Path) -> None:
    r = Reporter(MqttSettings(), node="n1", site="s1", state_dir=tmp_path,
                 labels={"long": "v" * 5000} | {f"k{i}": "v" for i in range(300)}, collectors=["x" * 2000])
    try:
        # a message built around the builders (as the control stage builds its lease events)
        def bad(value: float) -> wire.Event:
            return wire.Event(**build.envelope(), name="lease_request", source="control", wall=time.time(),
                              value=value)

        with structlog.testing.capture_logs() as logs:
            assert not r.submit(bad(math.nan))
            assert not r.submit(bad(math.inf))
            assert not r.submit(wire.Event(**build.envelope(), name="x" * 300, source="s", wall=1.0))
            assert r.submit(bad(300.0))  # a valid one of the kind ends the streak
            assert not r.submit(bad(-math.inf))
        assert r.counters.dropped_invalid == 4
        assert r.backlog == 1  # only the valid one
        assert wire.decode(submitted(r)[0]).value == 300.0  # type: ignore[union-attr]
        errors = [e for e in logs if e["event"] == "report.message_invalid" and e["log_level"] == "error"]
        assert len(errors) == 2  # the first of each streak
        assert "`$.value`" in errors[0]["error"]
        assert [e["dropped"] for e in logs if e["event"] == "report.message_valid_again"] == [3]
        # the birth's own fields were brought inside the bounds when the reporter was made
        assert len(r.labels) == wire.MAX_LABELS
        assert len(r.labels["long"]) == wire.MAX_TEXT
        assert r.collectors == ["x" * wire.MAX_KEY]
        assert isinstance(wire.decode(r._birth(1)), wire.Birth)
    finally:
        r.spool.close()


def test_reporter_metrics_with_nan_go_out_as_null(tmp_path: Path) -> None:
    r = Reporter(MqttSettings(), node="n1", site="s1", state_dir=tmp_path)
    try:
        r.submit_sample(Sample(node="n1", seq=1, wall=time.time(), mono=1.0,
                               metrics={"a": math.nan, "b": math.inf, "c": 1.5, "d": None}))
        r.flush_samples()
        assert r.counters.dropped_invalid == 0
        out = wire.decode(submitted(r)[0])
        assert isinstance(out, wire.Metrics)
        assert out.samples[0].metrics == {"a": None, "b": None, "c": 1.5, "d": None}
    finally:
        r.spool.close()


def test_wire_float_bound_is_the_largest_float() -> None:
    assert sys.float_info.max == wire.MAX_FLOAT
